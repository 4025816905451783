"""ZeroMQ sockets driven by the asyncio loop's reader callback instead of zmq.asyncio futures.

zmq.asyncio builds a future, a poller update and several enum objects per message; on the head
that was most of the CPU spent per request. Here a socket's FD wakes one callback that drains every
queued message into a plain handler. ZeroMQ's FD is edge-triggered and a send can consume the edge,
so every send schedules one more drain.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import zmq

log = logging.getLogger(__name__)

_DRAIN_BATCH = 512   # messages handled per callback before yielding to the loop


class LoopSocket:
    def __init__(self, sock: zmq.Socket, on_message: Callable[[list[bytes]], None]):
        self.sock = sock
        self.on_message = on_message
        self._loop = asyncio.get_running_loop()
        self._fd = sock.getsockopt(zmq.FD)
        self._drain_scheduled = False
        self._closed = False
        self._loop.add_reader(self._fd, self._drain)
        self._schedule_drain()   # messages that arrived before we registered

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled and not self._closed:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        recv, handle = self.sock.recv_multipart, self.on_message
        for _ in range(_DRAIN_BATCH):
            if self._closed:
                return
            try:
                frames = recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as e:
                if not self._closed:
                    log.warning("zmq receive failed: %s", e)
                return
            try:
                handle(frames)
            except Exception:
                log.exception("message handler failed")
        self._schedule_drain()   # more may be queued: continue after other callbacks had a turn

    def send_multipart(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames, zmq.NOBLOCK)
        self._schedule_drain()

    def send(self, data: bytes) -> None:
        self.sock.send(data, zmq.NOBLOCK)
        self._schedule_drain()

    def close(self, linger_ms: int = 0) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        self.sock.close(linger=linger_ms)
