"""What the head knows about every engine's KV cache, fed by the engines' KV events.

It counts events, tracks which instances' cache state is trustworthy, and keeps the fleet KV index
that routing reads (the `kv` policy; the Router, for what a decode instance caches): fed by these
events, or, in approximate mode, by the `kv` policy's own decisions (then events are only counted). An instance whose engine
declared no block-hash scheme the head can reproduce (protocol.EngineInfo) has its events counted
only: its hashes could never match a prompt's, and would only fill the index.
"""

from __future__ import annotations

import logging

import zmq

from slurmserve.kvfabric.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventSubscriber
from slurmserve.kvfabric.kv_index import ApproxKVIndex, KVIndex
from slurmserve.router.metrics import HeadMetrics
from slurmserve.runtime.protocol import EngineInfo

log = logging.getLogger(__name__)


class KVState:
    def __init__(self, metrics: HeadMetrics, index: KVIndex | ApproxKVIndex | None = None,
                 zctx: zmq.Context | None = None):
        self.metrics = metrics
        self.index = KVIndex() if index is None else index
        self._from_events = type(self.index) is KVIndex
        self._tally = metrics.kv_events.tally
        self.unmatched: set[int] = set()  # instances whose block hashes the head cannot reproduce
        # On the head's ZeroMQ context when given: one I/O thread takes an engine step's outputs and
        # its KV events together, where two would each wake for their half.
        self.subscriber = KVEventSubscriber(self.on_batch, self.on_gap, ctx=zctx)

    def watch(self, instance: int, endpoint: str, server_key: bytes | None) -> None:
        for cls in (BlockStored, BlockRemoved, AllBlocksCleared):
            self._tally[cls, instance] += 0   # every series shows from the start, at 0
        self.subscriber.add(instance, endpoint, server_key)

    def declare(self, instance: int, info: EngineInfo) -> None:
        """The instance's engine declared itself (EngineClient's on_instance_declared)."""
        if info.hash_algo is None or not info.prefix_caching:
            if instance not in self.unmatched:
                log.info("instance %d: its KV events are counted, not indexed (no block-hash scheme the "
                         "head can reproduce)", instance)
            self.unmatched.add(instance)
            if self._from_events:
                self.index.forget(instance)
        else:
            self.unmatched.discard(instance)

    def on_batch(self, instance: int, seq: int, events: list) -> None:
        if self._from_events and instance not in self.unmatched:
            self.index.apply(instance, events)
        tally = self._tally
        for ev in events:
            tally[type(ev), instance] += 1

    def on_gap(self, instance: int, expected: int, got: int) -> None:
        if expected == 0 and got > 0:
            log.info("instance %d: KV events start at seq %d (published before we connected)", instance, got)
        else:
            log.warning("instance %d: KV event gap (expected seq %d, got %d); cache state unknown",
                        instance, expected, got)
        self.metrics.kv_event_gaps.labels(instance).inc()
        if self._from_events:   # stale entries would attract requests to blocks long evicted
            self.index.forget(instance)

    def forget(self, instance: int) -> None:
        """The instance is gone, and its cache with it."""
        self.index.forget(instance)

    async def close(self) -> None:
        await self.subscriber.aclose()
