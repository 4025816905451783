"""Slow and hostile clients against a real HTTPServer over raw sockets (issue 20, items 6 and 7):
slowloris heads and bodies, connections per client address, a body over the limit that must be
answered before the connection goes, absurd chunk sizes, and deeply nested JSON at the gateway.
Timeouts are short here (constructor arguments); assertions give generous bounds, never speeds."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from slurmserve.gateway.server import GatewayApp, GatewayMetrics
from slurmserve.gateway.jobs import JobTable
from slurmserve.router.http_server import HTTPServer, Request, Response

MIB = 1 << 20


async def _app(request: Request, response: Response) -> None:
    if request.path == "/slow":     # a slow answer is not a slow client
        await asyncio.sleep(1.5)
    body = json.dumps({"path": request.path, "len": len(request.body)}).encode()
    response.send(200, body, [(b"content-type", b"application/json")])


def serve(handler=_app, **kw):
    """Run the async test against a real server on a loopback port: test(server, port)."""
    kw = {"max_body": MIB, "keep_alive_s": 30.0, "read_timeout_s": 0.5, **kw}

    def wrap(test):
        def run():
            async def main():
                listener = socket.create_server(("127.0.0.1", 0))
                srv = HTTPServer(handler, **kw)
                await srv.start(listener)
                try:
                    await test(srv, listener.getsockname()[1])
                finally:
                    srv.close()
            asyncio.run(main())
        run.__name__ = test.__name__
        return run
    return wrap


async def _read_all(reader: asyncio.StreamReader, timeout: float = 10.0) -> bytes:
    """Everything until the server closes (fails the test if it does not within `timeout`)."""
    out = b""
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(65536):
            out += chunk
    return out


def _status(out: bytes) -> int:
    return int(out.split(b" ", 2)[1])


def _error(out: bytes) -> dict:
    return json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]


# ---- slowloris ------------------------------------------------------------------------------------

@serve()
async def test_a_request_head_that_never_ends_is_closed(srv, port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /x HTTP/1.1\r\nhost: x\r\n")

    async def trickle():   # a header line now and then: each read is progress, the head is not
        try:
            for i in range(100):
                await asyncio.sleep(0.1)
                writer.write(b"x-%d: y\r\n" % i)
        except (ConnectionError, RuntimeError):
            pass
    t = asyncio.create_task(trickle())
    out = await _read_all(reader)
    t.cancel()
    writer.close()
    assert _status(out) == 408 and "did not arrive" in _error(out)["message"]


@serve()
async def test_a_body_that_stalls_is_closed(srv, port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789")
    out = await _read_all(reader)
    writer.close()
    assert _status(out) == 408
    async with asyncio.timeout(5):   # the client closed its side: the server's goes too
        while srv.connections or srv.per_client:
            await asyncio.sleep(0.02)


@serve()
async def test_slow_answers_and_idle_keep_alive_are_not_read_timeouts(srv, port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    # an answer that takes longer than the read timeout, and a complete request pipelined behind it
    writer.write(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\nGET /after HTTP/1.1\r\nhost: x\r\n\r\n")
    out = b""
    async with asyncio.timeout(10):
        while b'"/after"' not in out:
            out += await reader.read(65536)
    assert out.count(b"HTTP/1.1 200 ") == 2
    await asyncio.sleep(1.2)     # idle (between requests) past the read timeout: still open
    writer.write(b"GET /again HTTP/1.1\r\nhost: x\r\n\r\n")
    async with asyncio.timeout(5):
        assert b'"/again"' in await reader.readuntil(b"}")
    writer.close()


# ---- connections per client -------------------------------------------------------------------------

@serve(max_connections_per_client=3)
async def test_connections_per_client_are_capped(srv, port):
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
    for reader, writer in held:    # all three are served, and stay open (keep-alive)
        writer.write(b"GET /held HTTP/1.1\r\nhost: x\r\n\r\n")
        async with asyncio.timeout(5):
            await reader.readuntil(b"}")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /fourth HTTP/1.1\r\nhost: x\r\n\r\n")
    out = await _read_all(reader)
    writer.close()
    assert _status(out) == 429 and b"retry-after: 1" in out
    assert "too many connections" in _error(out)["message"]
    held[0][1].close()
    async with asyncio.timeout(5):
        while srv.per_client.get("127.0.0.1") != 2:
            await asyncio.sleep(0.02)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /again HTTP/1.1\r\nhost: x\r\n\r\n")
    async with asyncio.timeout(5):
        assert b"HTTP/1.1 200 " in await reader.readuntil(b"}")
    writer.close()
    for _, w in held[1:]:
        w.close()


# ---- bodies over the limit ----------------------------------------------------------------------------

def _send_then_read(port: int, head: bytes, body_size: int) -> tuple[bytes, str | None]:
    """A blocking client as most are: send the whole request, then read the answer. Returns what it
    read and the error that ended sending, if any."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(20)
        send_error = None
        try:
            s.sendall(head)
            chunk = b"x" * MIB
            for _ in range(body_size // MIB):
                s.sendall(chunk)
        except OSError as e:
            send_error = repr(e)
        out = b""
        try:
            while data := s.recv(65536):
                out += data
        except OSError as e:
            send_error = (send_error or "") + f"; recv: {e!r}"
        return out, send_error


@serve(max_body=32 * MIB)
async def test_a_40_mb_body_gets_its_413_before_the_connection_goes(srv, port):
    head = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % (40 * MIB)
    out, err = await asyncio.to_thread(_send_then_read, port, head, 40 * MIB)
    assert out.startswith(b"HTTP/1.1 413 "), (out[:200], err)
    assert err is None, err                       # no reset: the client sent it all, then read
    assert "exceeds 32 MiB" in _error(out)["message"]


@serve(max_body=32 * MIB)
async def test_a_chunked_body_over_the_limit_gets_its_413(srv, port):
    head = b"POST /x HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n%s\r\n" % (MIB, b"x" * MIB)

    def send():
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.settimeout(20)
            try:
                s.sendall(head + chunk * 40)
            except OSError as e:
                return b"", repr(e)
            out = b""
            while data := s.recv(65536):
                out += data
            return out, None
    out, err = await asyncio.to_thread(send)
    assert out.startswith(b"HTTP/1.1 413 "), (out[:200], err)


@pytest.mark.parametrize("parts", [
    [b"FFFFFFFFFFFFFFFF\r\nabc"],                       # with the head, in one read
    [b"", b"FFFFFFFFFFFFFFFF\r\n"],                      # alone, after the head
    [b"3\r\nabc\r\nFFFFFFFF", b"FFFFFFFF;ext=1\r\nab"],   # after a chunk, cut in two
    [b"0000002000001\r\n"],                             # one byte over the limit, leading zeros
], ids=["one-read", "own-read", "split", "just-over"])
def test_an_absurd_chunk_size_is_refused_at_once(parts):
    @serve(max_body=32 * MIB, read_timeout_s=30.0)
    async def check(srv, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /x HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n" + parts[0])
        for part in parts[1:]:
            await asyncio.sleep(0.1)
            writer.write(part)
        out = await _read_all(reader, timeout=5)   # the read timeout (30 s) would be too late
        writer.close()
        assert _status(out) == 413 and "a chunk of" in _error(out)["message"]
    check()


@serve(max_body=32 * MIB)
async def test_chunk_data_that_looks_like_a_size_line_is_just_data(srv, port):
    data = b"x\nFFFFFFFF\r\n\nFFFFFFFFF\r\n"            # inside a chunk: not a chunk size
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /x HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n" + body)
    async with asyncio.timeout(5):
        out = await reader.readuntil(b"}")
    writer.close()
    assert _status(out) == 200 and b'"len": %d' % len(data) in out
    # one past 2^64 - 1 overflows the parser: a 400 as well
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /x HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n1FFFFFFFFFFFFFFFF\r\n")
    out = await _read_all(reader, timeout=5)
    writer.close()
    assert _status(out) == 400


# ---- deeply nested JSON at the gateway ---------------------------------------------------------------

NESTED = {
    "prompt": b'{"model": "m", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "prompt-unclosed": b'{"model": "m", "prompt": ' + b"[" * 5000,
    "messages": b'{"model": "m", "messages": [{"role": "user", "content": ' + b"[" * 5000 + b"]" * 5000 + b"}]}",
}


@pytest.mark.parametrize("kind", NESTED)
def test_the_gateway_answers_deeply_nested_json_with_a_400(kind):
    async def main():
        app = GatewayApp(JobTable(queue_timeout_s=1.0), GatewayMetrics(), "sk-test")
        listener = socket.create_server(("127.0.0.1", 0))
        srv = HTTPServer(app, max_body=32 * MIB)
        await srv.start(listener)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.getsockname()[1])
            body = NESTED[kind]
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-test\r\n"
                         b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            async with asyncio.timeout(10):
                out = await reader.readuntil(b"}}")
            writer.close()
            return out
        finally:
            srv.close()
    out = asyncio.run(main())
    assert _status(out) == 400, out[:300]
    err = _error(out)
    assert err["type"] == "invalid_request_error" and "nested too deeply" in err["message"]

