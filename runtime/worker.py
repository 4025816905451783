"""The engine rank's loop: requests in from the head, one message per engine step back out.

Every request runs as a task that appends its deltas to a shared list; the first append of a
loop iteration schedules one flush, so all the tokens an engine step produced leave together.
A request's first token leaves at once; later ones wait until its stream interval is reached (or
it ends), so an answer read only whole costs two deltas, not one per token.

At most OUTPUT_WINDOW messages are unread by the head at a time (protocol.Consumed): while the
window is full, further steps' deltas wait here and leave merged, one delta per request, as soon
as the head has caught up. The head's work per message is its scarce resource; the engine's is not.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import zmq

from slurmserve.runtime import protocol as P
from slurmserve.runtime.engine import Engine, EngineRequest
from slurmserve.runtime.zmq_loop import LoopSocket

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, engine: Engine, head_endpoint: str, head_key: bytes, instance: int,
                 heartbeat_interval_s: float, head_timeout_s: float):
        self.engine = engine
        self.instance = instance
        self.heartbeat_interval_s = heartbeat_interval_s
        self.head_timeout_s = head_timeout_s
        # The silence clock starts at the head's first message, or gives up waiting for one after
        # a startup allowance (a head that died before its first ping must not leave us running).
        self.head_seen: float | None = None
        self.first_contact_timeout_s = max(60.0, 10 * head_timeout_s)
        self.ctx = zmq.Context()
        self._zsock = self.ctx.socket(zmq.DEALER)
        self._zsock.setsockopt(zmq.IDENTITY, f"instance-{instance}".encode())
        self._zsock.curve_serverkey = head_key    # CURVE: encrypted, and only the job knows this key
        self._zsock.curve_publickey, self._zsock.curve_secretkey = zmq.curve_keypair()
        self._zsock.setsockopt(zmq.LINGER, 0)
        self._zsock.setsockopt(zmq.SNDHWM, 0)   # outputs are never dropped for lack of room
        self._zsock.setsockopt(zmq.RCVHWM, 0)
        self._zsock.connect(head_endpoint)
        self.sock: LoopSocket | None = None
        self.tasks: dict[str, asyncio.Task] = {}
        self.pending: list[P.Delta] = []
        self.flush_scheduled = False
        self.sent = 0           # StepOutputs sent, and read by the head as far as it has told us
        self.read = 0
        self.stopping = asyncio.Event()

    # ---- outputs --------------------------------------------------------------------------------

    def _emit(self, delta: P.Delta) -> None:
        self.pending.append(delta)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self, force: bool = False) -> None:
        self.flush_scheduled = False
        if self.pending and (self.sent - self.read < P.OUTPUT_WINDOW or force):
            batch, self.pending = P.coalesce(self.pending), []
            self.sock.send(P.encode(P.StepOutputs(batch)))
            self.sent += 1

    def _window_reopened(self, read: int) -> None:
        self.read = read
        if self.pending and not self.flush_scheduled:
            self._flush()

    async def _run_request(self, msg: P.Generate) -> None:
        req = EngineRequest(msg.req_id, msg.prompt_token_ids, msg.params, msg.kv_transfer_params)
        interval, held, n_held, sent_first = msg.stream_interval, [], 0, False
        try:
            async for delta in self.engine.generate(req):
                if sent_first and interval > 1:
                    held.append(delta)
                    n_held += len(delta.token_ids)
                    if delta.finish_reason is None and n_held < interval:
                        continue
                    delta, held, n_held = P.merge_deltas(held), [], 0
                sent_first = True
                self._emit(delta)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # an engine failure ends this request, not the worker
            log.exception("request %s failed in the engine", msg.req_id)
            self._emit(P.Delta(msg.req_id, [], finish_reason="error", error=f"engine error: {e}"))
        finally:
            self.tasks.pop(msg.req_id, None)

    # ---- loops ----------------------------------------------------------------------------------

    async def _heartbeats(self) -> None:
        started = time.monotonic()
        while not self.stopping.is_set():
            now = time.monotonic()
            if self.head_seen is not None and now - self.head_seen > self.head_timeout_s:
                log.error("no message from the head for %.0f s; shutting down", self.head_timeout_s)
                self.stopping.set()
                return
            if self.head_seen is None and now - started > self.first_contact_timeout_s:
                log.error("the head never answered in %.0f s; shutting down", self.first_contact_timeout_s)
                self.stopping.set()
                return
            self.sock.send(P.encode(P.Heartbeat(self.instance, self.engine.load())))
            try:
                await asyncio.wait_for(self.stopping.wait(), self.heartbeat_interval_s)
            except TimeoutError:
                pass

    def _on_message(self, payload: bytes) -> None:
        msg = P.decode_to_worker(payload)
        self.head_seen = time.monotonic()
        if type(msg) is P.Consumed:
            self._window_reopened(max(self.read, msg.read))
        elif type(msg) is P.Ping:      # stands in for a Consumed that was lost
            self._window_reopened(self.sent)
        elif type(msg) is P.Generate:
            self.tasks[msg.req_id] = asyncio.create_task(self._run_request(msg))
        elif type(msg) is P.Abort:
            for req_id in msg.req_ids:
                if req_id in self.tasks:
                    self.engine.abort(req_id)
        elif type(msg) is P.Shutdown:
            log.info("shutdown requested by the head: %s", msg.reason)
            self.stopping.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        await self.engine.start()
        self.sock = LoopSocket(self._zsock, self._on_message)
        heartbeats = asyncio.create_task(self._heartbeats())
        await self.stopping.wait()
        heartbeats.cancel()
        for req_id in list(self.tasks):
            self.engine.abort(req_id)
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=2.0)
        self._flush(force=True)
        self.sock.send(P.encode(P.Goodbye(self.instance, "shutdown")))
        await self.engine.stop()
        self.sock.close(linger_ms=200)
        self.ctx.term()
