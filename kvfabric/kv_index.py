"""The fleet's KV index: which engine instance holds which KV blocks, to route requests by overlap.

Block hashes are chained (each one covers its whole prefix), so a flat map from block hash to the
set of holders is a radix tree in disguise: a prompt's leading blocks held by an instance are found
by walking the prompt's hashes until that instance drops out. Holder sets are int bitmasks over
instance indexes, so one query costs O(prompt blocks + instances), whatever the fleet's size.

Two ways to fill it:
  * KVIndex.apply(): engines' KV events (BlockStored / BlockRemoved / AllBlocksCleared);
  * ApproxKVIndex.record(): the router's own decisions, for engines that publish no events; an
    entry expires after `ttl_s`, as the engine will have evicted it by then under load.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

from slurmserve.kvfabric.block_hash import event_hash
from slurmserve.kvfabric.events import AllBlocksCleared, BlockRemoved, BlockStored


def _walk(holders_of, hashes: Sequence[int], instances: Sequence[int]) -> dict[int, int]:
    """Leading blocks of `hashes` held by each of `instances`, given a hash -> bitmask lookup."""
    overlap = dict.fromkeys(instances, 0)
    alive = 0
    for i in instances:
        alive |= 1 << i
    for depth, h in enumerate(hashes):
        still = alive & (holders_of(h) or 0)
        dropped = alive & ~still
        while dropped:                      # the instances whose prefix match ends here
            low = dropped & -dropped
            overlap[low.bit_length() - 1] = depth
            dropped ^= low
        alive = still
        if not alive:
            return overlap
    while alive:
        low = alive & -alive
        overlap[low.bit_length() - 1] = len(hashes)
        alive ^= low
    return overlap


def _as_int(h) -> int:
    """vLLM sends 64-bit ints, or raw digests with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0."""
    return h if type(h) is int else event_hash(h)


class KVIndex:
    """Fed by KV events. Events of an instance must arrive in its publish order."""

    def __init__(self) -> None:
        self._holders: dict[int, int] = {}         # block hash -> bitmask of instances
        self._blocks: dict[int, set[int]] = {}     # instance -> the hashes it holds

    def apply(self, instance: int, events: Sequence) -> None:
        holders = self._holders
        mine = self._blocks.setdefault(instance, set())
        bit = 1 << instance
        for ev in events:
            kind = type(ev)
            if kind is BlockStored:
                for h in ev.block_hashes:
                    h = _as_int(h)
                    holders[h] = holders.get(h, 0) | bit
                    mine.add(h)
            elif kind is BlockRemoved:
                for h in ev.block_hashes:
                    h = _as_int(h)
                    if h in mine:
                        mine.discard(h)
                        self._unset(h, bit)
            elif kind is AllBlocksCleared:
                self.forget(instance)
                mine = self._blocks.setdefault(instance, set())

    def forget(self, instance: int) -> None:
        """Drop everything known about an instance (it restarted, left, or we missed its events)."""
        bit = 1 << instance
        for h in self._blocks.pop(instance, ()):
            self._unset(h, bit)

    def _unset(self, h: int, bit: int) -> None:
        rest = self._holders.get(h, 0) & ~bit
        if rest:
            self._holders[h] = rest
        else:
            self._holders.pop(h, None)

    def overlap(self, hashes: Sequence[int], instances: Sequence[int]) -> dict[int, int]:
        """Number of leading blocks of `hashes` each instance holds."""
        return _walk(self._holders.get, hashes, instances) if self._holders else dict.fromkeys(instances, 0)

    def blocks(self, instance: int) -> int:
        return len(self._blocks.get(instance, ()))

    def __len__(self) -> int:
        return len(self._holders)


class ApproxKVIndex:
    """Fed by routing decisions: what an instance was sent recently, it probably still caches.

    An entry expires `ttl_s` after it was last recorded. Each record first drops what has expired
    since the last one, oldest first from a queue of the records (one clock, one TTL: the queue is
    in expiry order), so the work is what expired, never a pass over the whole index, which at a
    high request rate would hold the event loop for as long as the index is large."""

    def __init__(self, ttl_s: float = 120.0, clock=time.monotonic):
        self.ttl_s = ttl_s
        self._clock = clock
        self._expiry: dict[int, dict[int, float]] = {}   # block hash -> {instance: expiry}
        self._records: deque[tuple[float, int, tuple[int, ...]]] = deque()   # (expiry, instance, hashes)

    def record(self, instance: int, hashes: Sequence[int]) -> None:
        now = self._clock()
        self._expire(now)
        until = now + self.ttl_s
        expiry = self._expiry
        for h in hashes:
            e = expiry.get(h)
            if e is None:
                expiry[h] = {instance: until}
            else:
                e[instance] = until
        self._records.append((until, instance, tuple(hashes)))

    def _expire(self, now: float) -> None:
        records, expiry = self._records, self._expiry
        while records and records[0][0] <= now:
            until, instance, hashes = records.popleft()
            for h in hashes:
                e = expiry.get(h)
                if e is not None and e.get(instance) == until:   # (else recorded again since)
                    del e[instance]
                    if not e:
                        del expiry[h]

    def _holders_of(self, h: int) -> int:
        e = self._expiry.get(h)
        if not e:
            return 0
        now = self._clock()
        mask = 0
        for i, t in e.items():
            if t > now:
                mask |= 1 << i
        return mask

    def forget(self, instance: int) -> None:
        for e in self._expiry.values():
            e.pop(instance, None)

    def overlap(self, hashes: Sequence[int], instances: Sequence[int]) -> dict[int, int]:
        return _walk(self._holders_of, hashes, instances)

    def __len__(self) -> int:
        return len(self._expiry)
