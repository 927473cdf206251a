"""The Redis key layout: virtual shards and the names of their keys. Pure.

Every entry belongs to one of ``count`` virtual shards, chosen from its primary key; a shard
is a hash tag ``{P:n}``, so each shard is one Redis Cluster slot and the keys one script
touches (an entry, its tag generations and index records, the shard marker, the lock, the
shard's channel) always share it. The tags are chosen so that the shards' slots are spread
evenly over the slot range (a cluster assigns slots in contiguous ranges): data spreads over
every primary. The same layout runs on a single server.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

STATS_SUFFIX = "stats"
INSTANCES_SUFFIX = "instances"


def shard_tags(prefix: str, count: int) -> tuple[str, ...]:
    """``count`` hash tags ``P:n`` whose slots fall one in each of ``count`` equal parts of
    the slot range, in order; deterministic for a prefix and count."""
    width = REDIS_CLUSTER_HASH_SLOTS / count
    found: dict[int, str] = {}
    n = 0
    while len(found) < count:
        tag = f"{prefix}:{n}"
        bucket = int(key_slot(tag.encode()) / width)
        found.setdefault(bucket, tag)
        n += 1
    return tuple(found[b] for b in range(count))


@dataclass(frozen=True, slots=True)
class Shard:
    index: int
    prefix: str  # "{P:n}:"

    @property
    def marker(self) -> str:
        # "M", a hash of bucket bounds (the string marker "m" of earlier versions is left
        # to expire: a new key name, so an upgrade never meets the old type)
        return self.prefix + "M"

    @property
    def channel(self) -> str:
        return self.prefix + "c"

    def entry(self, entry_id: str) -> str:
        return self.prefix + "e:" + entry_id

    def lock(self, primary: str) -> str:
        return self.prefix + "l:" + primary

    def index_key(self, tag: str) -> str:
        return self.prefix + "t:" + tag

    def generation(self, tag: str) -> str:
        return self.prefix + "g:" + tag


class Layout:
    def __init__(self, prefix: str, count: int) -> None:
        self.prefix = prefix
        self.shards = tuple(Shard(i, "{" + tag + "}:")
                            for i, tag in enumerate(shard_tags(prefix, count)))
        self.by_channel = {s.channel.encode(): s for s in self.shards}
        self._prefixes = frozenset(s.prefix for s in self.shards)
        self.stats_key = "{" + prefix + "}:" + STATS_SUFFIX
        self.instances_key = "{" + prefix + "}:" + INSTANCES_SUFFIX

    def shard(self, primary: str) -> Shard:
        """The shard of a primary key (a hex digest, from ``keys``)."""
        return self.shards[int(primary[:8], 16) % len(self.shards)]

    def owns(self, key: bytes | str) -> bool:
        """Whether a Redis key is one of this proxy's (for a flush), exactly: another
        prefix that merely starts the same way is not."""
        text = key.decode("latin-1") if isinstance(key, bytes) else key
        tag, sep, _ = text.partition("}:")
        if not sep or not tag.startswith("{"):
            return False
        return tag[1:] == self.prefix or tag + "}:" in self._prefixes
