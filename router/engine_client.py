"""The head's side of the control plane, transport only: engine instances' liveness, and request
streams to and from them. Which instance serves a request is the Router's business (router/routing.py).

One ROUTER socket talks to every instance's DEALER. Deltas arrive batched per engine step and are
fanned out to per-request streams; heartbeats keep each instance in rotation (the first ready one
carries the engine's declaration, protocol.EngineInfo: block size, block-hash scheme, batch capacity,
prefix caching, which is all the head knows of an engine), and an instance that
misses them for `heartbeat_timeout_s` is dropped with its in-flight requests failed cleanly: each
stream ends with an error delta and is marked `lost`, which the Orchestrator may answer by
continuing the request on another instance (migration). Sending and releasing requests keeps each
instance's load ledger (HeadLoad, router/instance.py) that the `kv` policy reads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

import zmq

from slurmserve.router.instance import Instance
from slurmserve.router.metrics import HeadMetrics
from slurmserve.runtime import protocol as P
from slurmserve.zmq_loop import LoopSocket

log = logging.getLogger(__name__)


class DeltaStream:
    """Deltas of one request on one instance, read in one of two ways:

    * `async for delta in stream` (the prefill leg of a disaggregated request), where deltas
      that queued up meanwhile come merged as one;
    * `stream.attach(sink)`: after every drain of the control socket, `sink(delta)` gets the
      request's new deltas merged into one, called from the fan-out itself. A streamed answer goes
      to its HTTP connection this way, with no task woken per engine step.

    The engine rank already holds tokens back to the request's stream interval. The stream also
    carries the request's share of the head's load account (see `EngineClient.submit`).
    """

    __slots__ = ("req_id", "instance", "prefill_blocks", "held_blocks", "held_hashes", "started", "done",
                 "lost", "_items", "_waiter", "_sink", "_dirty")

    def __init__(self, req_id: str, instance: Instance, prefill_blocks: int = 0, held_blocks: int = 0,
                 held_hashes: list[int] | None = None):
        self.req_id = req_id
        self.instance = instance
        self.prefill_blocks = prefill_blocks   # uncached prompt blocks, pending until the first delta
        self.held_blocks = held_blocks         # KV blocks held until the request ends
        self.held_hashes = held_hashes         # the hashes of those blocks that are full, if known
        self.started = False                   # a delta has arrived
        self.done = False                      # the last delta has been read
        self.lost = False                      # its instance died: the request may go on elsewhere
        self._items: deque[P.Delta] = deque()
        self._waiter: asyncio.Future | None = None
        self._sink: Callable[[P.Delta], None] | None = None
        self._dirty = False

    def push(self, delta: P.Delta, dirty: list[DeltaStream]) -> None:
        if not self.started:
            self.started = True
            self.instance.prefilled(self)
        self._items.append(delta)
        if self._sink is not None:
            if not self._dirty:
                self._dirty = True
                dirty.append(self)
        elif self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def attach(self, sink: Callable[[P.Delta], None]) -> None:
        """Deliver deltas to `sink` from now on; any that already arrived, at once."""
        self._sink = sink
        self.flush()

    def flush(self) -> None:
        self._dirty = False
        while self._items and not self.done:
            self._sink(self._next())

    def _next(self) -> P.Delta:
        items = self._items
        delta = items.popleft()
        if items and delta.finish_reason is None:
            run = [delta]
            while items and run[-1].finish_reason is None:
                run.append(items.popleft())
            delta = P.merge_deltas(run)
        if delta.finish_reason is not None:
            self.done = True
        return delta

    def __aiter__(self):
        return self

    async def __anext__(self) -> P.Delta:
        if self.done:
            raise StopAsyncIteration
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None
        return self._next()


class EngineClient:
    """The ROUTER socket to every instance: their liveness (heartbeats, the watchdog, Failed and
    Goodbye), requests sent, aborted and released, and output flow control."""

    def __init__(self, sock: zmq.Socket, instances: list[Instance], metrics: HeadMetrics,
                 heartbeat_timeout_s: float,
                 on_instance_down: Callable[[int], None] = lambda index: None,
                 on_instance_declared: Callable[[int, P.EngineInfo], None] = lambda index, info: None):
        self._zsock = sock
        self.sock: LoopSocket | None = None
        self.instances = instances
        self.by_identity = {i.identity: i for i in instances}
        self.metrics = metrics
        self.heartbeat_timeout_s = heartbeat_timeout_s
        # A rank that sends heartbeats while its engine starts and then falls silent died starting
        # (a segfault, the OOM killer): a longer limit, since a model load can starve its loop.
        self.startup_silence_s = max(10.0, 3 * heartbeat_timeout_s)
        self._period = min(0.25, heartbeat_timeout_s / 4)   # of the watchdog
        self._awake = self._tick_at = time.monotonic()      # the silence clock (see _silence_clock)
        self.min_instances = len(instances)   # runtime.min_instances: up for the pools to be ready
        self.on_instance_down = on_instance_down
        self.on_instance_declared = on_instance_declared
        self.streams: dict[str, DeltaStream] = {}
        self._dirty: list[DeltaStream] = []   # streams with a sink and undelivered deltas
        self._window_full: list[Instance] = []   # instances owed a Consumed after this drain
        self._tasks: list[asyncio.Task] = []
        self.closing = False
        for inst in instances:
            metrics.instance_up.labels(inst.index, inst.role).set(0)

    def start(self) -> None:
        self.sock = LoopSocket(self._zsock, self._on_message, frames=2, on_drained=self._flush)
        self._awake = self._tick_at = time.monotonic()
        self._tasks = [asyncio.create_task(self._watch())]

    async def close(self, reason: str, grace_s: float, failed: bool = False) -> None:
        """Ask every instance to shut down and wait (up to grace_s) for their goodbyes; `failed`:
        the deployment failed, so the ranks exit with an error. Instances still starting are waited
        for too: the socket's LINGER is 0, so closing it at once could drop their Shutdown."""
        self.closing = True
        for inst in self.instances:   # down ones too: one that is only late still hears it
            self.sock.send_to(inst.identity, P.encode(P.Shutdown(reason, failed)))
        deadline = time.monotonic() + grace_s
        while any(i.heard for i in self.instances) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for t in self._tasks:
            t.cancel()
        self.sock.close()

    # ---- pools ----------------------------------------------------------------------------------

    def pool(self, role: str) -> list[Instance]:
        """The instances of `role` in rotation."""
        return [i for i in self.instances if i.up and i.role == role]

    def all_ready(self) -> bool:
        """Every instance has come up once or failed to start, at least `min_instances` came up,
        and every pool still has a live instance."""
        if not all(i.ever_up or i.failed for i in self.instances):
            return False
        if sum(i.ever_up for i in self.instances) < self.min_instances:
            return False
        return all(self.pool(role) for role in {i.role for i in self.instances})

    def batch_capacity(self, roles: tuple[str, ...] = ("worker", "decode")) -> int:
        """Requests the declared instances of `roles` can run at once (their max_num_seqs)."""
        return sum(i.info.max_num_seqs for i in self.instances if i.info is not None and i.role in roles)

    # ---- requests -------------------------------------------------------------------------------

    def submit(self, inst: Instance, req_id: str, prompt_token_ids: list[int], params: P.SamplingParams,
               phase: str = P.AGGREGATED, handoff: dict | None = None, interval: int = 1,
               prefill_blocks: int = 0, held_blocks: int = 0, held_hashes: list[int] | None = None) -> DeltaStream:
        """Send the request to `inst` in disaggregation `phase` (with the `handoff` a prefill leg
        returned, passed on unread); `interval` is its stream interval, applied by the engine rank.

        Between heartbeats the head keeps its own account of each instance's load: the request's
        `prefill_blocks` (uncached prompt blocks) count as pending prefill until its first delta,
        and its `held_blocks` as held KV until it is released; a block among its `held_hashes`
        that another request here holds already is not counted again. The `kv` policy reads both."""
        stream = DeltaStream(req_id, inst, prefill_blocks, held_blocks, held_hashes)
        inst.add(stream)
        inst.streams[req_id] = stream
        self.streams[req_id] = stream
        self.sock.send_to(inst.identity, P.encode(P.Generate(req_id, prompt_token_ids, params, phase, handoff,
                                                               interval)))
        return stream

    def release(self, stream: DeltaStream) -> None:
        """Forget a request; if the engine has not finished it, abort it there."""
        self.streams.pop(stream.req_id, None)
        inst = stream.instance
        inst.remove(stream)
        if inst.streams.pop(stream.req_id, None) is not None and not stream.done and inst.up:
            self.sock.send_to(inst.identity, P.encode(P.Abort([stream.req_id])))

    # ---- incoming -------------------------------------------------------------------------------

    def _on_message(self, identity: bytes, payload: bytes) -> None:
        msg = P.decode_to_head(payload)
        inst = self.by_identity.get(identity)
        if type(msg) is P.StepOutputs:
            if inst is not None:
                inst.outputs_read += 1
                if inst.outputs_read - inst.outputs_confirmed == P.OUTPUT_WINDOW:
                    self._window_full.append(inst)
            streams, dirty = self.streams, self._dirty
            for delta in msg.deltas:
                stream = streams.get(delta.req_id)
                if stream is not None:
                    stream.push(delta, dirty)
                    if delta.finish_reason is not None:
                        del streams[delta.req_id]
                        stream.instance.streams.pop(delta.req_id, None)
            return
        if inst is None:
            log.warning("message from unknown instance %r ignored", identity)
        elif type(msg) is P.Heartbeat:
            self._heartbeat(inst, msg)
        elif type(msg) is P.Goodbye:
            self._drop(inst, f"instance {inst.index} left: {msg.reason}")
        elif type(msg) is P.Failed:
            self._fail(inst, msg.error)

    def _flush(self) -> None:
        """After a drain: instances whose output window we emptied may send again (told first,
        so that their next message travels while we write); then each attached stream gets what
        this drain brought it, as one delta."""
        if self._window_full:
            for inst in self._window_full:
                inst.outputs_confirmed = inst.outputs_read
                self.sock.send_to(inst.identity, P.encode(P.Consumed(inst.outputs_read)))
            self._window_full.clear()
        dirty, self._dirty = self._dirty, []
        for stream in dirty:
            try:
                stream.flush()
            except Exception:
                log.exception("delivering the deltas of %s failed", stream.req_id)

    def _silence_clock(self) -> float:
        """Monotonic time less the head's own stalls: since the watchdog's last tick, at most two of
        its periods count, so a stall of the head's loop is no instance's silence."""
        return self._awake + min(time.monotonic() - self._tick_at, 2 * self._period)

    def _heartbeat(self, inst: Instance, hb: P.Heartbeat) -> None:
        inst.last_seen = self._silence_clock()
        inst.heard = True
        load = hb.load
        inst.running, inst.waiting, inst.kv_usage = load.running, load.waiting, load.kv_usage
        inst.num_kv_blocks, inst.block_size = load.num_kv_blocks, load.block_size
        if hb.info is not None:
            self._declared(inst, hb.info)
        labels = (inst.index, inst.role)
        for field, gauge in self.metrics.instance_load.items():
            gauge.labels(*labels).set(getattr(load, field))
        if not inst.up and hb.ready:
            inst.up = inst.ever_up = True
            self.metrics.instance_up.labels(*labels).set(1)
            log.info("instance %d (%s) at %s is up", inst.index, inst.role, inst.address)

    def _declared(self, inst: Instance, info: P.EngineInfo) -> None:
        known = next((i.info for i in self.instances if i.info is not None and i is not inst), None)
        if known is not None and (known.hash_algo, known.hash_seed, known.prefix_caching) != \
                (info.hash_algo, info.hash_seed, info.prefix_caching):
            log.warning("instance %d declares block hashes %s (seed %r, prefix caching %s) unlike the others "
                        "(%s, %r, %s): KV-aware routing follows the first declaration", inst.index,
                        info.hash_algo, info.hash_seed, info.prefix_caching, known.hash_algo, known.hash_seed,
                        known.prefix_caching)
        inst.info = info
        log.info("instance %d declares: %s engine, %d ranks, %d KV blocks of %d tokens, max_num_seqs %d, "
                 "prefix caching %s, block hashes %s", inst.index, info.kind or "unnamed", info.ranks,
                 info.num_kv_blocks, info.block_size, info.max_num_seqs, "on" if info.prefix_caching else "off",
                 info.hash_algo or "not reproducible here")
        self.on_instance_declared(inst.index, info)

    async def _watch(self) -> None:
        period = self._period
        ping = P.encode(P.Ping())
        while True:
            await asyncio.sleep(period)
            for inst in self.instances:   # unconnected identities are dropped by the ROUTER
                self.sock.send_to(inst.identity, ping)
            # A tick far later than its period: the head's loop stalled (a long callback), and the
            # heartbeats that came meanwhile may still be unread behind this task. The stall counts
            # as two periods at most, or one stall longer than the timeout would drop every instance.
            mono = time.monotonic()
            self._awake += min(mono - self._tick_at, 2 * period)
            self._tick_at = mono
            now = self._awake
            for inst in self.instances:
                if inst.up and now - inst.last_seen > self.heartbeat_timeout_s:
                    self._drop(inst, f"instance {inst.index} ({inst.role}) missed heartbeats for "
                                     f"{now - inst.last_seen:.1f} s")
                elif (not inst.ever_up and inst.failed is None and inst.last_seen
                      and now - inst.last_seen > self.startup_silence_s):
                    self._fail(inst, f"engine instance {inst.index} ({inst.role}) fell silent while "
                                     f"starting: its rank died (see its log)")

    def _fail(self, inst: Instance, error: str) -> None:
        """The instance gave up: out of rotation for good; the head decides whether the job can go on."""
        log.error("%s", error)
        if not inst.ever_up:
            inst.failed = error
        self._drop(inst, error)

    def _drop(self, inst: Instance, reason: str) -> None:
        inst.heard = False   # it left, failed or fell silent: nobody to wait for at close
        if not inst.up:
            return
        inst.down_reason = reason
        log.log(logging.INFO if self.closing else logging.WARNING, "%s; taking it out of rotation", reason)
        inst.up = False
        self.metrics.instance_down(inst.index, inst.role)
        self.on_instance_down(inst.index)   # its cache is gone with it
        # its load account empties as its requests are released, the failed ones below included
        failed, inst.streams = inst.streams, {}
        if failed:   # an instance that only hung must not go on computing them if it comes back
            self.sock.send_to(inst.identity, P.encode(P.Abort(list(failed))))
        for req_id, stream in failed.items():
            self.streams.pop(req_id, None)
            stream.lost = not self.closing   # the Orchestrator may continue it on another instance
            stream.push(P.Delta(req_id, [], finish_reason="error",
                                error=f"engine instance {inst.index} failed during the request"),
                        self._dirty)
        self._flush()
