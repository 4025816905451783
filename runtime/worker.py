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
from collections.abc import Callable

import zmq
import zmq.utils.monitor

from slurmserve.runtime import protocol as P
from slurmserve.runtime.engine import Engine, EngineRequest, InvalidRequest
from slurmserve.zmq_loop import LoopSocket

log = logging.getLogger(__name__)


class HeadGone(Exception):
    """The head's process is gone (its connection closed or was refused) or silent for too long."""


class Worker:
    def __init__(self, create_engine: Callable[[], Engine], head_endpoint: str, head_key: bytes,
                 instance: int, heartbeat_interval_s: float, head_timeout_s: float, rank: int | None = None,
                 log_path: str | None = None, start_timeout_s: float = 1200.0):
        """`create_engine()` builds the engine once the worker is connected, so that a failure to
        build or start it reaches the head (`Failed`) instead of leaving the job waiting; that
        message names the `rank` and its `log_path`. A start that takes longer than
        `start_timeout_s` has failed too: a hung engine start (vLLM waits for ever on a NIXL
        side-channel port another process took) must not hold the allocation until its time limit."""
        self.create_engine = create_engine
        self.start_timeout_s = start_timeout_s
        self.engine: Engine | None = None
        self.started = False      # the engine is serving
        self.instance = instance
        self.rank = rank
        self.log_path = log_path
        self.heartbeat_interval_s = heartbeat_interval_s
        # A head whose process is gone is noticed by its connection (below) within seconds; this
        # silence limit is only for a head that is alive but unreachable (a hung node), so it is long
        # enough that a head which stalls for a while (a huge request, a swap storm) is never left.
        self.head_timeout_s = head_timeout_s
        self.head_seen: float | None = None
        self.gave_up: str | None = None     # why the worker left a head that did not tell it to
        self.deployment_failed = False      # the head stopped us because the deployment failed
        self.ctx = zmq.Context()
        self._zsock = self.ctx.socket(zmq.DEALER)
        self._zsock.setsockopt(zmq.IDENTITY, f"instance-{instance}".encode())
        self._zsock.curve_serverkey = head_key    # CURVE: encrypted, and only the job knows this key
        self._zsock.curve_publickey, self._zsock.curve_secretkey = zmq.curve_keypair()
        self._zsock.setsockopt(zmq.LINGER, 0)
        self._zsock.setsockopt(zmq.SNDHWM, 0)   # outputs are never dropped for lack of room
        self._zsock.setsockopt(zmq.RCVHWM, 0)
        # ZMTP heartbeats are answered by the head's ZeroMQ I/O thread, not its Python loop: they
        # tell a dead or unreachable head from one whose loop is merely busy.
        self._zsock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        self._zsock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10_000)
        self._monitor = self._zsock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED)
        self.connected = False
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
        req = EngineRequest(msg.req_id, msg.prompt_token_ids, msg.params, phase=msg.phase, handoff=msg.handoff)
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
        except InvalidRequest as e:   # the client's mistake: one line in the log, a 400 for the client
            log.info("request %s refused by the engine: %s", msg.req_id, e)
            self._emit(P.Delta(msg.req_id, [], finish_reason="error", error=str(e), rejected=True))
        except Exception as e:  # an engine failure ends this request, not the worker
            log.exception("request %s failed in the engine", msg.req_id)
            self._emit(P.Delta(msg.req_id, [], finish_reason="error", error=f"engine error: {e}"))
        finally:
            self.tasks.pop(msg.req_id, None)

    # ---- loops ----------------------------------------------------------------------------------

    def _failure_line(self, e: BaseException) -> str:
        """One line for `slurmserve status`: what failed, on which rank, and where to read more."""
        first = (str(e).strip().splitlines() or [""])[0]
        what = f"{type(e).__name__}: {first}" if first else type(e).__name__
        where = f" on rank {self.rank}" if self.rank is not None else ""
        log_hint = f" (log: {self.log_path})" if self.log_path else ""
        return f"engine instance {self.instance} failed to start{where}: {what}{log_hint}"

    def _give_up(self, why: str) -> None:
        if not self.stopping.is_set():
            log.error("%s; shutting down", why)
            self.gave_up = why
            self.stopping.set()

    async def _heartbeats(self) -> None:
        """While the engine starts, heartbeats say `ready=False`: the head then knows this rank is
        alive, and notices when it dies before it is up. The first ready one carries the engine's
        declaration (protocol.EngineInfo): messages on this connection arrive in order or not at
        all (a lost connection ends the worker), so once is enough."""
        declared = False
        while not self.stopping.is_set():
            if self.head_seen is not None and time.monotonic() - self.head_seen > self.head_timeout_s:
                self._give_up(f"no message from the head for {self.head_timeout_s:.0f} s")
                return
            info = None
            if self.started and not declared:
                info, declared = self.engine.info(), True
            load = self.engine.load() if self.started else P.Load()
            self.sock.send(P.encode(P.Heartbeat(self.instance, load, ready=self.started, info=info)))
            try:
                await asyncio.wait_for(self.stopping.wait(), self.heartbeat_interval_s)
            except TimeoutError:
                pass

    def _on_monitor_event(self, *frames: bytes) -> None:
        event = zmq.utils.monitor.parse_monitor_message(list(frames))["event"]
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.connected = True
        elif event == zmq.EVENT_DISCONNECTED:
            # The monitor is another socket: its event can be read before the head's last messages
            # (a Shutdown saying why) that arrived ahead of it. Read those first.
            self.sock.read_pending()
            self._give_up("the head closed its connection (its process ended)")
        elif event == zmq.EVENT_CONNECT_RETRIED and not self.connected:
            # The head binds its port before the ranks learn it and keeps it until it exits:
            # a refused first connection means the head has already gone.
            self._give_up("the head's port refuses connections (the head failed to start)")

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
            self.deployment_failed = msg.failed
            self.stopping.set()

    async def run(self) -> int:
        """Build and start the engine, serve until the head says stop (or a signal); 0 then, 1 when
        the engine failed (the head has been told why), the deployment failed, or the head is gone."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        self.sock = LoopSocket(self._zsock, self._on_message)
        monitor = LoopSocket(self._monitor, self._on_monitor_event, frames=2)
        heartbeats = asyncio.create_task(self._heartbeats())
        code = 0
        try:
            self.engine = self.create_engine()
            starting = asyncio.create_task(self.engine.start())
            stopped = asyncio.create_task(self.stopping.wait())
            await asyncio.wait([starting, stopped], timeout=self.start_timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                starting.result()      # raises the engine's start failure
                self.started = True
                await stopped
            else:
                starting.cancel()
                if not stopped.done():
                    stopped.cancel()
                    raise TimeoutError(f"the engine did not start within {self.start_timeout_s:.0f} s "
                                       f"(runtime.engine_start_timeout_s)")
        except Exception as e:
            log.exception("engine instance %d failed to start", self.instance)
            self.sock.send(P.encode(P.Failed(self.instance, self._failure_line(e))))
            code = 1
        heartbeats.cancel()
        for req_id in list(self.tasks):
            self.engine.abort(req_id)
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=2.0)
        self._flush(force=True)
        if code == 0:
            self.sock.send(P.encode(P.Goodbye(self.instance, self.gave_up or "shutdown")))
        if self.engine is not None:
            try:
                await asyncio.wait_for(self.engine.stop(), 30.0)
            except Exception:
                log.exception("engine instance %d did not stop cleanly", self.instance)
        monitor.close()
        self._zsock.disable_monitor()
        self.sock.close(linger_ms=200)
        self.ctx.term()
        return 1 if code or self.gave_up or self.deployment_failed else 0
