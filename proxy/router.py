"""The request path's commands sent to the node that serves them (``topology``), over lean
pipelined connections (``resp``), one set per node.

A caller groups its commands by node (``node_for`` a key: every key of one command shares a
shard's hash tag, so a slot) and sends each group in one go. Replies that say the data moved
are followed here, once: ``MOVED`` (the slot belongs to another primary now: the topology is
read again and the command resent to the owner), ``ASK`` (the slot is migrating: the command
goes to the target with ``ASKING``), ``READONLY`` (a demoted primary after a failover: read
the topology again and resend). Anything else is the caller's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from .feed import Node
from .resp import Arg, Client, RespError
from .topology import Topology

Command = Sequence[Arg]
_REDIRECTS = ("MOVED ", "ASK ", "READONLY ", "TRYAGAIN ")


class Router:
    def __init__(self, topology: Topology, *, db: int, connect_timeout_s: float,
                 connections: int = 4) -> None:
        self.topology = topology
        self.db = db
        self.connect_timeout_s = connect_timeout_s
        self.connections = connections
        self._clients: dict[Node, Client] = {}
        self._dedicated: dict[Node, Client] = {}

    def node_for(self, key: str) -> Node:
        return self.topology.node_for(key)

    def client(self, node: Node, *, dedicated: bool = False) -> Client:
        """The node's pipelined connections; ``dedicated``: one connection of its own, for
        commands that block it (``WAIT`` after a purge) without holding up lookups."""
        pool = self._dedicated if dedicated else self._clients
        client = pool.get(node)
        if client is None:
            client = pool[node] = Client(node, db=self.db,
                                         connect_timeout_s=self.connect_timeout_s,
                                         connections=1 if dedicated else self.connections)
        return client

    async def call(self, key: str, *args: Arg) -> Any:
        [reply] = await self.send(self.node_for(key), [args], key=key)
        if isinstance(reply, RespError):
            raise reply
        return reply

    async def send(self, node: Node, commands: Sequence[Command], *, key: str | None = None,
                   dedicated: bool = False) -> list[Any]:
        """Replies in order (error replies in place, not raised), redirections followed.
        ``key``: one the commands are about (where to resend them once the topology is
        read again)."""
        replies = await self.client(node, dedicated=dedicated).call_many(commands)
        moved = [i for i, r in enumerate(replies)
                 if isinstance(r, RespError) and str(r).startswith(_REDIRECTS)]
        if not moved:
            return replies
        if any(not str(replies[i]).startswith("ASK ") for i in moved):
            await self.topology.refresh()
        for i in moved:
            replies[i] = await self._redirected(commands[i], str(replies[i]), node, key)
        return replies

    async def _redirected(self, command: Command, error: str, origin: Node,
                          key: str | None) -> Any:
        kind, _, rest = error.partition(" ")
        if kind == "ASK":
            target = self._node_at(rest.split()[-1], origin)
            _, reply = await self.client(target).call_many([("ASKING",), command])
            return reply
        if kind == "TRYAGAIN":  # a multi-key command during a migration: once more, shortly
            await asyncio.sleep(0.01)
        target = self.node_for(key) if key is not None else self.topology.primaries[0]
        if kind == "MOVED":
            target = self._node_at(rest.split()[-1], origin)
        [reply] = await self.client(target).call_many([command])
        return reply

    def _node_at(self, address: str, origin: Node) -> Node:
        host, _, port = address.rpartition(":")
        for node in self.topology.primaries:
            if node.host == host and node.port == int(port):
                return node
        return Node(host=host or origin.host, port=int(port), tls=origin.tls,
                    username=origin.username, password=origin.password)

    async def broadcast(self, *args: Arg) -> list[Any]:
        """One command to every primary (``SCRIPT LOAD``); replies in the primaries' order."""
        return list(await asyncio.gather(*(self.client(n).call(*args)
                                           for n in self.topology.primaries)))

    async def close(self) -> None:
        clients = [*self._clients.values(), *self._dedicated.values()]
        self._clients, self._dedicated = {}, {}
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
