"""ZeroMQ sockets driven by the asyncio loop's reader callback instead of zmq.asyncio futures.

zmq.asyncio builds a future, a poller update and several enum objects per message; on the head
that was most of the CPU spent per request. Here a socket's FD wakes one callback that drains every
queued message into a plain handler. ZeroMQ's FD is edge-triggered and a send can consume the edge,
so every send schedules one more look; it asks the socket's EVENTS first, which costs a third of a
receive that fails with zmq.Again, as after most sends there is nothing to read. Messages have a
fixed number of frames per socket (2 on a ROUTER: identity and payload), read with plain `recv`:
pyzmq's `*_multipart` helpers cost three times as much per message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import zmq

log = logging.getLogger(__name__)

_DRAIN_BATCH = 512   # messages handled per callback before yielding to the loop
_NOBLOCK = int(zmq.NOBLOCK)                  # plain ints: or-ing the flag enums costs per call
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


class LoopSocket:
    def __init__(self, sock: zmq.Socket, on_message: Callable, frames: int = 1,
                 on_drained: Callable[[], None] | None = None):
        """`on_message(frame)` for one-frame messages, `on_message(frame0, frame1, ...)` otherwise;
        `on_drained()` after each run of messages (the head writes what a run brought at once)."""
        self.sock = sock
        self.on_message = on_message
        self.on_drained = on_drained
        self.frames = frames
        self._loop = asyncio.get_running_loop()
        self._fd = sock.getsockopt(zmq.FD)
        self._drain_scheduled = False
        self._closed = False
        self._loop.add_reader(self._fd, self._drain)
        self._schedule_drain()   # messages that arrived before we registered

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled and not self._closed:
            self._drain_scheduled = True
            self._loop.call_soon(self._look)

    def _look(self) -> None:
        if self._closed or not self.sock.getsockopt(_EVENTS) & _POLLIN:
            self._drain_scheduled = False
            return
        self._drain()

    def _drain(self) -> None:
        self._drain_scheduled = False
        received = self._receive()
        if received and self.on_drained is not None and not self._closed:
            try:
                self.on_drained()
            except Exception:
                log.exception("drain handler failed")
        if received == _DRAIN_BATCH:
            self._schedule_drain()   # more may be queued: continue after other callbacks had a turn

    def _receive(self) -> int:
        """Handle queued messages, up to _DRAIN_BATCH; how many there were. The first receive is
        tried blindly (something woke us); before each further one the socket's EVENTS are asked,
        since a receive that fails raises zmq.Again, which costs three times as much."""
        sock, handle, more = self.sock, self.on_message, self.frames - 1
        recv, events = sock.recv, sock.getsockopt
        for n in range(_DRAIN_BATCH):
            if self._closed or (n and not events(_EVENTS) & _POLLIN):
                return n
            try:
                first = recv(_NOBLOCK)
                # a multipart message arrives whole, so its other frames are already here
                rest = [recv(_NOBLOCK) for _ in range(more)] if more else ()
            except zmq.Again:
                return n
            except zmq.ZMQError as e:
                if not self._closed:
                    log.warning("zmq receive failed: %s", e)
                return n
            try:
                handle(first, *rest)
            except Exception:
                log.exception("message handler failed")
        return _DRAIN_BATCH

    def read_pending(self) -> None:
        """Handle the messages queued now, without waiting for the loop to call back."""
        if not self._closed and self.sock.getsockopt(_EVENTS) & _POLLIN:
            self._drain()

    def send_to(self, identity: bytes, payload: bytes) -> None:
        """ROUTER: one message to the peer with this identity."""
        self.sock.send(identity, _NOBLOCK_MORE)
        self.sock.send(payload, _NOBLOCK)
        self._schedule_drain()

    def send(self, data: bytes) -> None:
        self.sock.send(data, _NOBLOCK)
        self._schedule_drain()

    def close(self, linger_ms: int = 0) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        self.sock.close(linger=linger_ms)
