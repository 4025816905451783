"""Carries one engine's KV events from a private ipc:// socket to a CURVE-protected TCP publisher.

KV events hold prompts' token ids, and engine nodes are shared with other users. vLLM's publisher
has no authentication, so every engine publishes on an ipc:// socket inside a 0700 directory that
only this user can enter, and its rank forwards the frames unchanged (no decoding, sequence numbers
intact, so the head still sees gaps) on a TCP socket that only holders of the CURVE public key,
handed out over MPI, can subscribe to.
"""

from __future__ import annotations

import threading

import zmq


class KVEventRelay:
    def __init__(self, source: str, endpoint: str, curve_keys: tuple[bytes, bytes], hwm: int = 100_000):
        """Subscribe to everything on `source` and publish it on `endpoint` (bound now, so a bad
        address fails here); `curve_keys` is the publisher's (public, secret) pair."""
        self._ctx = zmq.Context(io_threads=1)
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.setsockopt(zmq.RCVHWM, hwm)
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, hwm)
        self._pub.curve_server = True
        self._pub.curve_publickey, self._pub.curve_secretkey = curve_keys
        self._control = self._ctx.socket(zmq.PAIR)
        control = f"inproc://kv-relay-control-{id(self)}"
        self._control.bind(control)
        try:
            self._pub.bind(endpoint)
        except zmq.ZMQError:
            self._close_sockets()
            raise
        self._sub.connect(source)   # ipc: connects before the engine binds are retried by zmq
        self.endpoint = endpoint
        self._stop = self._ctx.socket(zmq.PAIR)
        self._stop.connect(control)
        self._thread = threading.Thread(target=self._forward, name="kv-event-relay", daemon=True)
        self._thread.start()

    def _forward(self) -> None:
        try:
            zmq.proxy_steerable(self._sub, self._pub, None, self._control)
        except zmq.ContextTerminated:
            pass

    def close(self) -> None:
        if self._thread is None:
            return
        self._stop.send(b"TERMINATE")
        self._thread.join(timeout=5)
        self._thread = None
        self._stop.close(linger=0)
        self._close_sockets()

    def _close_sockets(self) -> None:
        for sock in (self._sub, self._pub, self._control):
            sock.close(linger=0)
        self._ctx.term()
