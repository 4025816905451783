"""What a front-end process of a multi-process head has in place of the Orchestrator: the same
calls HeadApp makes (`start`, `release`, `ready`, `engine_kinds`), carried to the router process
(router/frontend_hub.py) over the front end's DEALER socket. Deltas come back in one Batch per turn
of the router's loop and go to each request's sink, as DeltaStream.attach delivers them in a
single-process head.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

import msgspec
import zmq

from slurmserve.router import frontend_protocol as F
from slurmserve.router.instance import NoInstanceError
from slurmserve.router.metrics import HeadMetrics
from slurmserve.router.openai_api import APIError
from slurmserve.runtime import protocol as P
from slurmserve.zmq_loop import LoopSocket


class RemoteStream:
    """One request's deltas from the router process; `attach(sink)` as a RequestStream's."""

    __slots__ = ("req_id", "done", "waiter", "_sink", "_items")

    def __init__(self, req_id: str, waiter: asyncio.Future):
        self.req_id = req_id
        self.done = False         # its last delta came: the router has released it
        self.waiter = waiter      # resolves when the router started it (or refused it)
        self._sink: Callable[[P.Delta], None] | None = None
        self._items: list[P.Delta] = []

    def push(self, delta: P.Delta) -> None:
        if delta.finish_reason is not None:
            self.done = True
        if self._sink is not None:
            self._sink(delta)
        else:
            self._items.append(delta)

    def attach(self, sink: Callable[[P.Delta], None]) -> None:
        self._sink = sink
        items, self._items = self._items, []
        for delta in items:
            sink(delta)


class RemoteOrchestrator:
    def __init__(self, sock: zmq.Socket, metrics: HeadMetrics, on_control: Callable[[object], None]):
        """`on_control(msg)` gets the router's Drain and Stop."""
        self._zsock = sock
        self.sock: LoopSocket | None = None
        self.metrics = metrics
        self.on_control = on_control
        self.streams: dict[str, RemoteStream] = {}
        self.fleet = F.Fleet(False, [])
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(F.ToFrontend).decode
        self._tokens = itertools.count()
        self._scrapes: dict[int, asyncio.Future] = {}

    def connect(self, hello: F.Hello) -> None:
        self.sock = LoopSocket(self._zsock, self._on_message)
        self.send(hello)

    def send(self, msg) -> None:
        self.sock.send(self._encode(msg))

    def close(self) -> None:
        self.sock.close(linger_ms=500)

    # ---- what HeadApp calls ---------------------------------------------------------------------

    def ready(self) -> bool:
        return self.fleet.ready

    def engine_kinds(self) -> set[str]:
        return set(self.fleet.kinds)

    async def start(self, req_id: str, prompt: list[int], params: P.SamplingParams,
                    session: bytes | None = None, interval: int = 1) -> RemoteStream:
        """As Orchestrator.start: the router routes and sends it; NoInstanceError if it cannot."""
        stream = self.streams[req_id] = RemoteStream(req_id, asyncio.get_running_loop().create_future())
        self.send(F.Start(req_id, prompt, params, session, interval))
        try:
            await stream.waiter
        except asyncio.CancelledError:    # the client left while it was routed
            self.release(stream)
            raise
        return stream

    def release(self, stream: RemoteStream) -> None:
        if self.streams.pop(stream.req_id, None) is not None and not stream.done:
            self.send(F.Release(stream.req_id))

    async def scrape(self) -> bytes:
        """/metrics of the whole head, from the router process."""
        token = next(self._tokens)
        waiter = self._scrapes[token] = asyncio.get_running_loop().create_future()
        self.send(F.Scrape(token))
        try:
            async with asyncio.timeout(10.0):
                return await waiter
        except TimeoutError:
            raise APIError(503, "the router process did not answer", type_="service_unavailable") from None
        finally:
            self._scrapes.pop(token, None)

    # ---- from the router ------------------------------------------------------------------------

    def _on_message(self, payload: bytes) -> None:
        msg = self._decode(payload)
        if type(msg) is F.Batch:
            streams = self.streams
            for rid in msg.started:
                stream = streams.get(rid)
                if stream is not None and not stream.waiter.done():
                    stream.waiter.set_result(None)
            for rid, status, message in msg.refused:
                stream = streams.pop(rid, None)
                if stream is not None and not stream.waiter.done():
                    stream.done = True
                    stream.waiter.set_exception(_refusal(status, message))
            for rid, delta in msg.deltas:
                stream = streams.get(rid)
                if stream is not None:
                    stream.push(delta)
        elif type(msg) is F.Fleet:
            self.fleet = msg
        elif type(msg) is F.Gather:
            self.send(F.Snapshot(msg.token, self.metrics.snapshot()))
        elif type(msg) is F.Scraped:
            waiter = self._scrapes.get(msg.token)
            if waiter is not None and not waiter.done():
                waiter.set_result(msg.text)
        else:
            self.on_control(msg)


def _refusal(status: int, message: str) -> Exception:
    if status == 503:
        return NoInstanceError(message)
    if status == 429:
        return APIError(429, message, type_="rate_limit_error", headers={"retry-after": "1"})
    return RuntimeError(message)
