"""The L1: fresh responses held in this process, in front of Redis, so that a hit costs no
Redis round trip. Bounded in bytes (least recently used out first).

It never decides freshness on its own (the flow asks ``plan.decide`` with the request's own
directives) and never outlives an invalidation it can know of:

* Redis drives it. Every purge announces its tags on its shard's channel; the feed hands
  them over (``on_purge``) and the entries carrying them go. The flow drains the feed
  without blocking before L1 answers (once per turn of the event loop, see ``Feed.drain``),
  so whatever reached this host before the request did is applied.
* This instance's own invalidations (writes, admin purges, deferred ones) drop their tags in
  every shard at once (``drop_tags``), before Redis is even asked.
* While the feed is down announcements may be lost: the L1 empties and stands aside until
  the feed is back (``on_state``).
* An entry read from Redis is kept only when no invalidation that could touch it was seen
  since the read was issued (``put``'s ``since``): a purge announced while the lookup was on
  its way cannot be overtaken by the lookup's older answer.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import keys
from .entry import Entry
from .layout import Layout, Shard

# Invalidations remembered for the check in ``put``; an older read is not kept at all.
RECENT = 4096
_ALL_SHARDS = -1
_OVERHEAD = 256  # bytes of bookkeeping per entry, roughly


@dataclass(slots=True)
class Held:
    entry: Entry
    shard: int
    size: int


class L1:
    def __init__(self, layout: Layout, max_bytes: int) -> None:
        self.layout = layout
        self.max_bytes = max_bytes
        self.enabled = max_bytes > 0
        self.up = False  # the feed is up: Redis can tell us what to drop
        self.bytes = 0
        self._held: OrderedDict[str, Held] = OrderedDict()  # entry id -> held
        self._vary: dict[str, tuple[str, ...]] = {}  # primary -> its responses' Vary names
        self._by_tag: dict[tuple[int, str], set[str]] = {}
        # Held entries by their URL as first requested (path and query as sent): the fast
        # path asks before it parses a request's fields, so that a miss costs it little.
        self._urls: dict[str, int] = {}
        self.seq = 0  # invalidations seen
        self._recent: deque[tuple[int, int, frozenset[str]]] = deque(maxlen=RECENT)
        self._floor = 0  # reads issued before this sequence are never kept

    @property
    def serving(self) -> bool:
        return self.enabled and self.up

    def get(self, primary: str, value_of: Callable[[str], str | None]) -> Entry | None:
        names = self._vary.get(primary)
        entry_id = keys.variant_key(primary, names, value_of)[0] if names else primary
        held = self._held.get(entry_id)
        if held is None:
            return None
        self._held.move_to_end(entry_id)
        return held.entry

    def put(self, primary: str, entry: Entry, since: int) -> None:
        """Keep ``entry`` (fresh, read from or just stored in Redis by a call issued at
        sequence ``since``) unless an invalidation that may cover it came in since."""
        shard = self.layout.shard(primary).index
        if not self.serving or since < self._floor or self._touched(since, entry, shard):
            return
        names = tuple(n for n, _ in entry.vary)
        if names:
            self._vary[primary] = names
            entry_id = keys.variant_key(primary, names, dict(entry.vary).get)[0]
        else:
            self._vary.pop(primary, None)
            entry_id = primary
        self._remove(entry_id)
        size = _size(entry)
        if size > self.max_bytes // 4:
            return
        self._held[entry_id] = Held(entry, shard, size)
        self.bytes += size
        self._urls[entry.url] = self._urls.get(entry.url, 0) + 1
        for tag in entry.tags:
            self._by_tag.setdefault((shard, tag), set()).add(entry_id)
        while self.bytes > self.max_bytes:
            self._remove(next(iter(self._held)))

    def _touched(self, since: int, entry: Entry, shard: int) -> bool:
        """Whether an invalidation seen after ``since`` may cover ``entry``."""
        if since == self.seq:
            return False
        if self._recent and self._recent[0][0] > since + 1:
            return True  # older than what is remembered: cannot tell, do not keep
        tags = frozenset(entry.tags)
        for seq, where, purged in reversed(self._recent):
            if seq <= since:
                break
            if where in (_ALL_SHARDS, shard) and not tags.isdisjoint(purged):
                return True
        return False

    def _remove(self, entry_id: str) -> None:
        held = self._held.pop(entry_id, None)
        if held is None:
            return
        self.bytes -= held.size
        url = held.entry.url
        if self._urls[url] > 1:
            self._urls[url] -= 1
        else:
            del self._urls[url]
        for tag in held.entry.tags:
            ids = self._by_tag.get((held.shard, tag))
            if ids is not None:
                ids.discard(entry_id)
                if not ids:
                    del self._by_tag[(held.shard, tag)]

    def may_hold(self, url: str) -> bool:
        """Whether an entry first requested as ``url`` (path and query as sent) is held: no
        means nothing is held for that very URL, though something may be for the same
        resource asked otherwise (its parameters in another order, say)."""
        return url in self._urls

    def clear(self) -> None:
        self._held.clear()
        self._vary.clear()
        self._by_tag.clear()
        self._urls.clear()
        self.bytes = 0

    def _event(self, where: int, tags: frozenset[str]) -> None:
        self.seq += 1
        self._recent.append((self.seq, where, tags))

    # -- invalidations -------------------------------------------------------------------------

    def drop_tags(self, tags: Sequence[str]) -> None:
        """This instance invalidates ``tags`` (in every shard): drop them now."""
        purged = frozenset(tags)
        self._event(_ALL_SHARDS, purged)
        for shard in self.layout.shards:
            self._drop(shard.index, purged)

    def _drop(self, shard: int, tags: frozenset[str]) -> None:
        for tag in tags:
            for entry_id in list(self._by_tag.get((shard, tag), ())):
                self._remove(entry_id)

    def on_purge(self, shard: Shard, tags: Sequence[str]) -> None:
        purged = frozenset(tags)
        self._event(shard.index, purged)
        self._drop(shard.index, purged)

    def on_flush(self) -> None:
        self._event(_ALL_SHARDS, frozenset())
        self._floor = self.seq
        self.clear()

    def on_state(self, up: bool) -> None:
        self._event(_ALL_SHARDS, frozenset())
        self._floor = self.seq
        self.up = up
        self.clear()

    def on_fill(self, primary: str) -> None:
        pass


def _size(entry: Entry) -> int:
    """What holding ``entry`` may cost: its body, its decompressed body when the proxy
    compressed it (gzip's trailer says how large: clients without gzip get it), the header
    section twice (as stored, as prepared for sending), and bookkeeping."""
    size = len(entry.body) + 2 * sum(len(k) + len(v) for k, v in entry.headers) + _OVERHEAD
    if entry.encoded and len(entry.body) >= 4:
        size += int.from_bytes(entry.body[-4:], "little")
    return size
