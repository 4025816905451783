"""HTTP/1.1 for the head and the gateway: httptools' parser on an asyncio Protocol, no ASGI between.

Under ASGI every piece of a response is a dict sent through an awaited callable, and a streamed
token reaches the socket only after a task wakes up to send it. Here a handler gets a `Response`
whose `write` goes to the transport at once, so the head can write a request's tokens from the
engine-step fan-out itself, and headers, chunks and the terminator of what is ready together
leave in one system call.

Handled: keep-alive (idle connections close after `keep_alive_s`), pipelined requests answered in
order, Content-Length and chunked request bodies up to `max_body`, `Expect: 100-continue`,
HTTP/1.0 clients, TCP_NODELAY, client disconnects (reported to the handler). Not handled: TLS,
upgrades (WebSocket, h2c), HTTP/2; the endpoint listens on loopback or the job's own network.

Slow or hostile clients: a request head must arrive within `read_timeout_s` of its first byte,
and a body must not stall for longer (slowloris); one client address holds at most
`max_connections_per_client` connections. A request refused before it was read (413, a bad chunk
size, a timeout) is answered, then the connection is closed gracefully: FIN after the answer, and
what the client still sends is read and dropped for up to `linger_s`, because closing a socket with
unread data sends a reset that would destroy the answer before the client reads it.
"""

from __future__ import annotations

import asyncio
import http
import logging
import re
import resource
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from email.utils import formatdate

import httptools

from slurmserve.router.openai_api import APIError

log = logging.getLogger(__name__)

_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}
_MAX_HEADER_BYTES = 64 << 10
_MAX_PIPELINED = 16           # requests queued behind the one being answered before reading pauses
_LAST_CHUNK = b"0\r\n\r\n"
# A line that could be a chunk-size line (`HEX[;ext]CRLF`) of 7+ hex digits (>= 16 MiB: maybe over
# the body limit); whether it is one, the parser tells (Connection._feed).
_BIG_CHUNK_LINE = re.compile(rb"\n([0-9A-Fa-f]{7,})[ \t]*(?:;[^\r\n]*)?\r\n")
_TAIL = 64   # bytes of the previous read kept for such a line cut in two

Headers = list[tuple[bytes, bytes]]


def listen(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket. `reuse_port`: SO_REUSEPORT, for a head's front-end processes that
    share one port; the kernel spreads connections over them and admits only sockets of the same
    user to the group."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=2048, reuse_port=reuse_port)


class Request:
    __slots__ = ("method", "path", "query", "headers", "body")

    def __init__(self, method: str, path: str, headers: Headers, body: bytes = b"", query: bytes = b""):
        self.method, self.path, self.query, self.headers, self.body = method, path, query, headers, body

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header; `name` in lower case."""
        for k, v in self.headers:
            if k == name:
                return v
        return None


class Response:
    """A handler's answer: `send(status, body)` once; or `start(status)`, `write(data)` any number of
    times, and `end()`. Writes after the client left are dropped; `on_disconnect`, when set, is
    called once when it leaves before the answer ended."""

    __slots__ = ("_conn", "_head", "_chunked", "keep_alive", "started", "finished", "disconnected",
                 "on_disconnect")

    def __init__(self, conn: _Connection | None, keep_alive: bool = True, chunked: bool = True):
        self._conn = conn
        self._head: bytes | None = None     # status line and headers, held until the first write
        self._chunked = chunked             # False for HTTP/1.0 clients: raw body, then close
        self.keep_alive = keep_alive
        self.started = self.finished = self.disconnected = False
        self.on_disconnect: Callable[[], None] | None = None

    def send(self, status: int, body: bytes, headers: Headers = ()) -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        self._emit(self._status_line(status, headers) + b"content-length: %d\r\n\r\n" % len(body) + body)
        self._finish()

    def start(self, status: int, headers: Headers = ()) -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        self._head = self._status_line(status, headers) + (
            b"transfer-encoding: chunked\r\n\r\n" if self._chunked else b"\r\n")

    def write(self, data: bytes) -> None:
        if not self.finished and data:
            self._emit(self._frame(data))

    def end(self, data: bytes = b"") -> None:
        """The last `data`, if any, and the end of the body, in one write."""
        if self.finished:
            return
        out = self._frame(data) if data else b""
        self._emit(out + _LAST_CHUNK if self._chunked else out)
        self._finish()

    async def drain(self) -> None:
        """Wait while the client reads slower than we write (for proxies: don't buffer it all)."""
        if self._conn is not None:
            await self._conn.drain()

    def _status_line(self, status: int, headers: Headers) -> bytes:
        parts = [b"HTTP/1.1 %d %s\r\ndate: %s\r\n" % (status, _REASONS.get(status, b""), _http_date())]
        parts += [k + b": " + v + b"\r\n" for k, v in headers]
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        return b"".join(parts)

    def _frame(self, data: bytes) -> bytes:
        return b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data

    def _emit(self, data: bytes) -> None:
        if self._head is not None:     # the first write after start() carries the headers
            data, self._head = self._head + data, None
        if not self.disconnected:
            self._conn.transport.write(data)

    def _finish(self) -> None:
        self.finished = True
        self._conn.response_done(self)

    def client_left(self) -> None:
        """The connection closed before the answer ended."""
        if self.disconnected:
            return
        self.disconnected = True
        if not self.finished and self.on_disconnect is not None:
            self.on_disconnect()


class BufferedResponse(Response):
    """A response kept in memory, for in-process callers of a handler (the batch driver)."""

    __slots__ = ("status", "headers", "parts")

    def __init__(self):
        super().__init__(None)
        self.status = 0
        self.headers: Headers = []
        self.parts: list[bytes] = []

    def send(self, status: int, body: bytes, headers: Headers = ()) -> None:
        self.start(status, headers)
        self.end(body)

    def start(self, status: int, headers: Headers = ()) -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started, self.status, self.headers = True, status, list(headers)

    def write(self, data: bytes) -> None:
        if not self.finished:
            self.parts.append(data)

    def end(self, data: bytes = b"") -> None:
        if self.finished:
            return
        self.parts.append(data)
        self.finished = True

    async def drain(self) -> None:
        pass

    @property
    def body(self) -> bytes:
        return b"".join(self.parts)


Handler = Callable[[Request, Response], Awaitable[None]]


class HTTPServer:
    """`read_timeout_s`: for a request head from its first byte, and for each pause in a body
    (nginx's client_header_timeout / client_body_timeout; vLLM and nginx use about 60 s).
    `max_connections_per_client`: connections one client address may hold; more are answered 429
    and closed. The default is twice the head's default `max_concurrent_requests`, so that a
    gateway or a load generator, which send everything from one address, meet the head's own
    in-flight limit first; it is lowered to half the open-file limit, so that one address can never
    take every descriptor. `linger_s`: how long a refused connection's input is drained."""

    def __init__(self, handler: Handler, *, max_body: int, keep_alive_s: float = 30.0,
                 read_timeout_s: float = 60.0, max_connections_per_client: int = 8192,
                 linger_s: float = 5.0):
        self.handler = handler
        self.max_body = max_body
        self.keep_alive_s = keep_alive_s
        self.read_timeout_s = read_timeout_s
        self.max_connections_per_client = max_connections_per_client
        self.linger_s = linger_s
        self.connections: set[_Connection] = set()
        self.per_client: dict[str, int] = {}
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self.max_connections_per_client = min(self.max_connections_per_client, _raise_open_files() // 2)
        self._server = await loop.create_server(lambda: _Connection(self), sock=sock, backlog=2048)
        self._sweep()

    def close(self) -> None:
        """Stop listening and close every connection (answers still running are cut)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.transport.close()

    def _sweep(self) -> None:
        """Close keep-alive connections idle for keep_alive_s, and refuse requests that did not
        arrive within read_timeout_s; one timer for all of them."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        cutoff = now - self.keep_alive_s
        for conn in list(self.connections):
            if conn.idle_since is not None and conn.idle_since < cutoff:
                conn.transport.close()
            elif conn.read_deadline is not None and conn.read_deadline < now and conn.current is None:
                conn.read_deadline = None
                conn._fail(408, f"the request did not arrive within {self.read_timeout_s:g} s")
        period = min(self.keep_alive_s, self.read_timeout_s) / 4
        self._sweeper = loop.call_later(max(0.5, period), self._sweep)

    def _admit(self, client: str) -> bool:
        """Count a new connection against its client's limit; False if it is over."""
        n = self.per_client.get(client, 0)
        if n >= self.max_connections_per_client:
            return False
        self.per_client[client] = n + 1
        return True

    def _release(self, client: str) -> None:
        n = self.per_client[client] - 1
        if n:
            self.per_client[client] = n
        else:
            del self.per_client[client]


def _raise_open_files() -> int:
    """Raise this process's soft limit on open files to the hard one (each connection is a file;
    a login shell's 1024 would end the server's service long before its other limits); the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class _Connection(asyncio.Protocol):
    def __init__(self, server: HTTPServer):
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.idle_since: float | None = None
        self.read_deadline: float | None = None   # set while a request is being read
        self.client: str | None = None            # the peer's address, counted in server.per_client
        self.queue: deque[tuple[Request, Response]] = deque()
        self.current: Response | None = None
        self.failed = False                       # nothing more is read: answer, then close
        self._failure: tuple | None = None        # (status, message, headers) still to answer
        self._body_left = 0                       # bytes still due of a Content-Length body
        self._tail = b""
        self._chunk_header_last = False
        self._writable: asyncio.Future | None = None
        self._reading_paused = False
        self._url = b""
        self._headers: Headers = []
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_size = 0

    # ---- transport events ---------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Nagle would hold small SSE chunks and keep-alive answers for the peer's delayed ACK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)
        self.idle_since = self.loop.time()
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):   # (a unix socket has no address to count)
            if not self.server._admit(peer[0]):
                self._fail(429, f"too many connections from {peer[0]}", [(b"retry-after", b"1")])
                return
            self.client = peer[0]

    def data_received(self, data: bytes) -> None:
        if self.failed:
            return   # (lingering: read and dropped)
        try:
            if len(data) <= self._body_left:   # all of it body: nothing else to look at
                self._tail = b""
                self.parser.feed_data(data)
            else:
                self._feed(data)
        except httptools.HttpParserUpgrade:
            # (e.g. curl's `Upgrade: h2c`): the request is answered in HTTP/1.1, the rest not read
            self.failed = True
            if self.current is None and not self.queue:
                self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as e:
            if not self.failed:
                self._fail(400, f"malformed HTTP request: {e}")

    def eof_received(self) -> bool:
        return False    # the client is gone: close, and abort what it asked for

    def connection_lost(self, exc) -> None:
        self.server.connections.discard(self)
        if self.client is not None:
            self.server._release(self.client)
            self.client = None
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if self.current is not None:
            self.current.client_left()
        self.queue.clear()

    def pause_writing(self) -> None:
        self._writable = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    async def drain(self) -> None:
        if self._writable is not None:
            await self._writable

    # ---- parser callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url, self._headers, self._header_bytes = b"", [], 0
        self._body, self._body_size = [], 0
        # (not on any byte: a client sending only blank lines stays idle, and is closed as such)
        self.idle_since = None
        self.read_deadline = self.loop.time() + self.server.read_timeout_s

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > _MAX_HEADER_BYTES:
            self._fail(431, "request headers are too large")
            raise httptools.HttpParserError("headers too large")
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        length = next((v for k, v in self._headers if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.server.max_body:
            self._fail(413, f"request body exceeds {self.server.max_body >> 20} MiB")
            raise httptools.HttpParserError("body too large")
        if any(k == b"expect" and v.lower() == b"100-continue" for k, v in self._headers):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._body_left = int(length) if length is not None and length.isdigit() else 0
        self._chunk_header_last = False
        self.read_deadline = self.loop.time() + self.server.read_timeout_s   # the body's turn

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        self._body_left -= len(body)
        self._chunk_header_last = False
        if self._body_size > self.server.max_body:
            self._fail(413, f"request body exceeds {self.server.max_body >> 20} MiB")
            raise httptools.HttpParserError("body too large")
        self._body.append(body)
        self.read_deadline = self.loop.time() + self.server.read_timeout_s

    def on_chunk_header(self) -> None:
        self._chunk_header_last = True

    def _feed(self, data: bytes) -> None:
        """Feed what may hold request heads or a chunked body, refusing a chunk whose declared size
        is over the body limit as soon as its size line is in (the parser tells no sizes: a chunk
        of 2^64-1 bytes would be read until the limit or the read timeout). Data is fed up to the
        end of each line that could be such a size line; it was one if the parser's last event
        then is a chunk header."""
        buf = self._tail + data if self._tail else data
        skip = len(buf) - len(data)
        fed = 0
        for m in _BIG_CHUNK_LINE.finditer(buf):
            end = m.end() - skip   # where the line ends in `data`
            if end <= fed:
                continue
            self._chunk_header_last = False
            self.parser.feed_data(data[fed:end])
            fed = end
            size = int(m.group(1), 16)
            if self._chunk_header_last and size > self.server.max_body - self._body_size:
                self._fail(413, f"request body exceeds {self.server.max_body >> 20} MiB "
                                f"(a chunk of {size} bytes)")
                return
        self.parser.feed_data(data[fed:] if fed else data)
        self._tail = data[-_TAIL:]

    def on_message_complete(self) -> None:
        self.read_deadline = None
        self._body_left = 0
        url = httptools.parse_url(self._url)
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        request = Request(self.parser.get_method().decode(), url.path.decode("latin-1"), self._headers,
                          body, url.query or b"")
        http10 = self.parser.get_http_version() == "1.0"
        response = Response(self, keep_alive=self.parser.should_keep_alive() and not http10,
                            chunked=not http10)
        self.queue.append((request, response))
        if self.current is None:
            self._next()
        elif len(self.queue) >= _MAX_PIPELINED and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    # ---- answering ------------------------------------------------------------------------------

    def _next(self) -> None:
        request, response = self.queue.popleft()
        self.current = response
        task = self.loop.create_task(self.server.handler(request, response))
        task.add_done_callback(lambda t, r=response: self._handler_done(t, r))

    def _handler_done(self, task: asyncio.Task, response: Response) -> None:
        if task.cancelled():
            exc = None
        else:
            exc = task.exception()
            if exc is not None:
                log.error("request handler failed", exc_info=exc)
        if response.finished or response.disconnected:
            return
        if response.started:       # a broken answer must not look complete: cut the connection
            self.transport.close()
        else:
            err = APIError(500, "internal server error", type_="server_error")
            response.send(500, err.body(), [(b"content-type", b"application/json")])

    def response_done(self, response: Response) -> None:
        if response is not self.current:
            return
        self.current = None
        if not response.keep_alive:
            if self.failed:
                self._close_gracefully()
            else:
                self.transport.close()
            return
        if self.queue:
            self._next()
            return
        if self.failed:
            if self._failure is not None:
                self._answer_failure()
            else:
                self._close_gracefully()
            return
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
        if self.read_deadline is None:
            self.idle_since = self.loop.time()
        else:   # a request half read while we were answering: its time starts again
            self.read_deadline = self.loop.time() + self.server.read_timeout_s

    def _fail(self, status: int, message: str, headers: Headers = ()) -> None:
        """A request we cannot parse or take: answered after those before it, then the connection
        closes (gracefully: see the module's docstring)."""
        self.failed = True
        self._failure = (status, message, headers)
        if self.current is None:
            self._answer_failure()

    def _answer_failure(self) -> None:
        status, message, headers = self._failure
        self._failure = None
        response = Response(self, keep_alive=False)
        self.current = response
        response.send(status, APIError(status, message).body(),
                      [(b"content-type", b"application/json"), *headers])

    def _close_gracefully(self) -> None:
        """FIN after the answer; the client's further input is dropped (data_received) until it
        closes, or for linger_s at most."""
        self.read_deadline = self.idle_since = None
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
        if self.transport.is_closing() or not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self.loop.call_later(self.server.linger_s, self.transport.close)


_date = [0, b""]


def _http_date() -> bytes:
    now = int(time.time())
    if now != _date[0]:
        _date[0], _date[1] = now, formatdate(now, usegmt=True).encode()
    return _date[1]
