"""The router process's side of a multi-process head: the one Orchestrator (routing state, KV index,
load ledger, engine connections) serving the requests that every HTTP front end prepared.

Each front end's requests are kept apart (`_Frontend`), so that a front end that dies takes only
its own requests with it (they are aborted in the engines). Deltas are not sent as they come:
what one turn of the loop brought for a front end (an engine step, usually) leaves as one Batch.
Deployment-wide rules are kept here, where every request passes: the in-flight limit
(max_concurrent_requests) and draining.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine

import msgspec
import zmq

from slurmserve.router import frontend_protocol as F
from slurmserve.router.instance import NoInstanceError
from slurmserve.router.metrics import HeadMetrics, RequestSnapshot
from slurmserve.router.orchestrator import Orchestrator, RequestStream
from slurmserve.runtime import protocol as P
from slurmserve.zmq_loop import LoopSocket

log = logging.getLogger(__name__)

_SCRAPE_WAIT_S = 2.0    # a front end that does not answer a Gather within this is left out


class _Frontend:
    __slots__ = ("identity", "index", "pid", "streams", "pending", "started", "refused", "deltas",
                 "ended", "queued", "drained")

    def __init__(self, identity: bytes, index: int, pid: int):
        self.identity, self.index, self.pid = identity, index, pid
        self.streams: dict[str, RequestStream] = {}
        self.pending: dict[str, asyncio.Task] = {}     # requests waiting for a remote prefill leg
        self.started: list[str] = []
        self.refused: list[tuple[str, int, str]] = []
        self.deltas: list[tuple[str, P.Delta]] = []
        self.ended: list[RequestStream] = []
        self.queued = False       # has something to send at the end of this turn
        self.drained: int | None = None


class _Gathering:
    __slots__ = ("requester", "waiting", "snapshots", "timer")

    def __init__(self, requester: bytes, waiting: set[bytes]):
        self.requester, self.waiting = requester, waiting
        self.snapshots: list[RequestSnapshot] = []
        self.timer: asyncio.TimerHandle | None = None


class FrontendHub:
    def __init__(self, orch: Orchestrator, metrics: HeadMetrics, sock: zmq.Socket, max_concurrent: int):
        self.orch = orch
        self.metrics = metrics
        self._zsock = sock
        self.sock: LoopSocket | None = None
        self.max_concurrent = max_concurrent
        self.frontends: dict[bytes, _Frontend] = {}
        self.draining = False
        self._dirty: list[_Frontend] = []
        self._flush_scheduled = False
        self._decode = msgspec.msgpack.Decoder(F.ToRouter).decode
        self._encode = msgspec.msgpack.Encoder().encode
        self._fleet: F.Fleet | None = None
        self._gatherings: dict[int, _Gathering] = {}
        self._tasks: list[asyncio.Task] = []
        self.hello = asyncio.Event()    # set at each Hello (FrontendPool waits for all of them)

    @staticmethod
    def bind(address: str) -> tuple[zmq.Context, zmq.Socket]:
        zctx = zmq.Context()
        sock = zctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)     # a front end's deltas are never dropped for lack of room
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)   # a restarted front end takes its old identity
        sock.bind(address)
        return zctx, sock

    def start(self) -> None:
        self.sock = LoopSocket(self._zsock, self._on_message, frames=2)
        self._tasks.append(asyncio.create_task(self._watch_fleet()))

    @property
    def inflight(self) -> int:
        return sum(len(fe.streams) + len(fe.pending) for fe in self.frontends.values())

    # ---- requests -------------------------------------------------------------------------------

    def _on_message(self, identity: bytes, payload: bytes) -> None:
        msg = self._decode(payload)
        fe = self.frontends.get(identity)
        kind = type(msg)
        if kind is F.Start:
            if fe is not None:
                self._start(fe, msg)
        elif kind is F.Release:
            if fe is not None:
                self._release(fe, msg.rid)
        elif kind is F.Hello:
            if fe is not None:     # restarted before we saw it go: its requests went with it
                self.forget(identity)
            self.frontends[identity] = _Frontend(identity, msg.index, msg.pid)
            if self._fleet is not None:
                self._send(identity, self._fleet)
            self.hello.set()
        elif kind is F.Scrape:
            self._gather(identity, msg.token)
        elif kind is F.Snapshot:
            self._snapshot(identity, msg)
        elif kind is F.Drained and fe is not None:
            fe.drained = msg.cut

    def _start(self, fe: _Frontend, msg: F.Start) -> None:
        rid = msg.rid
        if self.draining:
            return self._refuse(fe, rid, 503, "the deployment is draining; retry on another endpoint")
        if self.inflight >= self.max_concurrent:
            return self._refuse(fe, rid, 429, "too many requests in flight")
        try:
            started = self.orch.begin(rid, msg.prompt, msg.params, msg.session, msg.interval)
        except NoInstanceError as e:
            return self._refuse(fe, rid, 503, str(e))
        if isinstance(started, RequestStream):
            self._attach(fe, rid, started)
        else:
            self._after_prefill(fe, rid, started)

    def _after_prefill(self, fe: _Frontend, rid: str, coro: Coroutine) -> None:
        task = asyncio.create_task(coro)
        fe.pending[rid] = task

        def done(task: asyncio.Task) -> None:
            if fe.pending.pop(rid, None) is None or task.cancelled():
                return      # released while its prefill ran, or the front end is gone
            if (e := task.exception()) is not None:
                status = 503 if isinstance(e, NoInstanceError) else 500
                if status == 500:
                    log.error("starting request %s failed", rid, exc_info=e)
                self._refuse(fe, rid, status, str(e))
            else:
                self._attach(fe, rid, task.result())
        task.add_done_callback(done)

    def _attach(self, fe: _Frontend, rid: str, stream: RequestStream) -> None:
        fe.streams[rid] = stream
        fe.started.append(rid)
        self._queue(fe)

        def sink(delta: P.Delta) -> None:
            fe.deltas.append((rid, delta))
            if delta.finish_reason is not None:
                fe.ended.append(stream)
            self._queue(fe)
        stream.attach(sink)

    def _refuse(self, fe: _Frontend, rid: str, status: int, message: str) -> None:
        fe.refused.append((rid, status, message))
        self._queue(fe)

    def _release(self, fe: _Frontend, rid: str) -> None:
        stream = fe.streams.pop(rid, None)
        if stream is not None:
            self.orch.release(stream)
        elif (task := fe.pending.pop(rid, None)) is not None:
            task.cancel()    # the prefill leg releases itself

    def _queue(self, fe: _Frontend) -> None:
        if not fe.queued:
            fe.queued = True
            self._dirty.append(fe)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """End of a turn: one Batch to each front end that has news; requests that ended are released."""
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, []
        for fe in dirty:
            fe.queued = False
            if self.frontends.get(fe.identity) is not fe:
                continue
            batch = F.Batch(fe.started, fe.refused, fe.deltas)
            fe.started, fe.refused, fe.deltas = [], [], []
            try:
                self.sock.send_to(fe.identity, self._encode(batch))
            except zmq.ZMQError as e:
                log.warning("front end %d: send failed: %s", fe.index, e)
            for stream in fe.ended:
                if fe.streams.pop(stream.req_id, None) is not None:
                    self.orch.release(stream)
            fe.ended.clear()

    def forget(self, identity: bytes) -> None:
        """A front end died: abort its requests in the engines."""
        fe = self.frontends.pop(identity, None)
        if fe is None:
            return
        for stream in fe.streams.values():
            self.orch.release(stream)
        for task in fe.pending.values():
            task.cancel()
        if fe.streams or fe.pending:
            log.warning("front end %d (pid %d) is gone: %d request(s) aborted", fe.index, fe.pid,
                        len(fe.streams) + len(fe.pending))
        fe.streams.clear()
        fe.pending.clear()

    # ---- fleet state, metrics, drain ------------------------------------------------------------

    def _send(self, identity: bytes, msg) -> None:
        try:
            self.sock.send_to(identity, self._encode(msg))
        except zmq.ZMQError as e:
            log.warning("sending to a front end failed: %s", e)

    def broadcast(self, msg) -> None:
        for identity in list(self.frontends):
            self._send(identity, msg)

    async def _watch_fleet(self, period_s: float = 0.1) -> None:
        """Tell the front ends when the engines' readiness or kinds change (/health, checks)."""
        while True:
            fleet = F.Fleet(self.orch.ready(), sorted(self.orch.engine_kinds()))
            if fleet != self._fleet:
                self._fleet = fleet
                self.broadcast(fleet)
            await asyncio.sleep(period_s)

    def _gather(self, requester: bytes, token: int) -> None:
        g = self._gatherings[token] = _Gathering(requester, set(self.frontends))
        self.broadcast(F.Gather(token))
        g.timer = asyncio.get_running_loop().call_later(_SCRAPE_WAIT_S, self._scraped, token)

    def _snapshot(self, identity: bytes, msg: F.Snapshot) -> None:
        g = self._gatherings.get(msg.token)
        if g is None or identity not in g.waiting:
            return
        g.waiting.discard(identity)
        g.snapshots.append(msg.metrics)
        if not g.waiting:
            self._scraped(msg.token)

    def _scraped(self, token: int) -> None:
        g = self._gatherings.pop(token, None)
        if g is None:
            return
        g.timer.cancel()
        if g.waiting:
            log.warning("/metrics: %d front end(s) did not answer; their request metrics are left out",
                        len(g.waiting))
        self._send(g.requester, F.Scraped(token, self.metrics.render_merged(g.snapshots)))

    async def drain(self, grace_s: float) -> int:
        """Every front end refuses new requests and lets running ones finish within `grace_s`;
        the requests cut at its end."""
        self.draining = True
        for fe in self.frontends.values():
            fe.drained = None
        self.broadcast(F.Drain(grace_s))
        deadline = time.monotonic() + grace_s + 5.0
        while any(fe.drained is None for fe in self.frontends.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return sum(fe.drained or 0 for fe in self.frontends.values())

    def close(self) -> None:
        self.broadcast(F.Stop())
        for t in self._tasks:
            t.cancel()
        for identity in list(self.frontends):
            self.forget(identity)
        self.sock.close(linger_ms=500)
