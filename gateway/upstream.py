"""The gateway's HTTP/1.1 client to the heads: a keep-alive connection pool per job.

A connection is an asyncio protocol with httptools' response parser: the request goes out as one
`write`, the response's status and headers arrive once, and body chunks (already de-chunked) are
handed on as the bytes they are, never parsed. This costs less CPU per request than httpx or aiohttp
(docs/benchmarks.md, "Login-node gateway").

The job's secret goes into a header prefix built once per pool; no error message carries it.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import time

import httptools

IDLE_KEEP_S = 20.0          # heads close idle keep-alive connections after 30 s


class UpstreamError(Exception):
    """The head could not be reached or its response broke off. `retryable`: the head sent nothing,
    so the request can go to another job."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


class Conn(asyncio.Protocol):
    """One connection to a head, carrying one request at a time."""

    def __init__(self, pool: Upstream) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: collections.deque[bytes] = collections.deque()
        self.got_headers = False
        self.got_bytes = False
        self.complete = False
        self.keep_alive = False
        self.error: UpstreamError | None = None
        self._waiter: asyncio.Future | None = None

    # ---- protocol callbacks ---------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.error = UpstreamError(f"malformed response from the head ({type(e).__name__})", False)
            self.transport.abort()
            self._wake()

    def connection_lost(self, exc) -> None:
        self.closed = True
        if not self.complete and self.error is None:
            self.error = UpstreamError("the head closed the connection" + (
                " before answering" if not self.got_bytes else " in the middle of the response"),
                retryable=not self.got_bytes)
        self._wake()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.got_headers = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # ---- what the gateway calls -----------------------------------------------------------------

    async def wait(self) -> None:
        """Until something arrives (headers, a body chunk, the end, an error)."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read_all(self) -> bytes:
        """The rest of the body; UpstreamError if it breaks off."""
        parts = []
        while True:
            while self.chunks:
                parts.append(self.chunks.popleft())
            if self.complete:
                return b"".join(parts)
            if self.error is not None:
                raise self.error
            await self.wait()

    def release(self) -> None:
        self.pool.release(self)

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.closed = True


class Upstream:
    """Keep-alive connections to one head (one job's endpoint)."""

    def __init__(self, host: str, port: int, api_key: str):
        self.host, self.port = host, port
        self._head = (f"host: {host}:{port}\r\nauthorization: Bearer {api_key}\r\n"
                      f"content-type: application/json\r\naccept: */*\r\n").encode()
        self._idle: list[Conn] = []
        self._active: set[Conn] = set()
        self._closed = False

    async def _connect(self) -> Conn:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(lambda: Conn(self), self.host, self.port)
        except OSError as e:
            raise UpstreamError(f"cannot connect to the head ({e.strerror or type(e).__name__})",
                                retryable=True) from None
        return conn

    async def request(self, method: bytes, path: bytes, body: bytes) -> Conn:
        """Send a request; returns its connection once the response's headers are in. A reused
        connection the head had already closed is replaced once, transparently."""
        if self._closed:
            raise UpstreamError("the job has ended", retryable=True)
        now = time.monotonic()
        while True:
            conn = None
            while self._idle:
                c = self._idle.pop()
                if not c.closed and now - c.idle_since < IDLE_KEEP_S:
                    conn = c
                    break
                c.abort()
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            conn.reset()
            self._active.add(conn)
            conn.transport.write(b"%s %s HTTP/1.1\r\n%scontent-length: %d\r\n\r\n%s"
                                 % (method, path, self._head, len(body), body))
            while not conn.got_headers and conn.error is None:
                await conn.wait()
            if conn.error is None:
                return conn
            self._active.discard(conn)
            conn.abort()
            if not (reused and conn.error.retryable):
                raise conn.error

    def release(self, conn: Conn) -> None:
        """Back to the pool when its response was read to the end, else closed."""
        self._active.discard(conn)
        if conn.complete and conn.keep_alive and not conn.closed and not self._closed:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.abort()

    def close(self) -> None:
        """The job ended: every connection is cut, so its in-flight requests end at once."""
        self._closed = True
        for c in self._idle + list(self._active):
            c.abort()
        self._idle.clear()
