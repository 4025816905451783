"""The head's HTTP/1.1 server over raw sockets: the protocol cases the openai client never exercises."""

from __future__ import annotations

import asyncio
import json
import socket

from slurmserve.router.http_server import HTTPServer, Request, Response


async def _echo(request: Request, response: Response) -> None:
    if request.path == "/stream":
        response.start(200, [(b"content-type", b"text/plain")])
        for word in (b"one ", b"two ", b"three"):
            response.write(word)
            await asyncio.sleep(0)
        response.end()
    elif request.path == "/wait":
        left = asyncio.get_running_loop().create_future()
        response.on_disconnect = lambda: left.set_result(None)
        await left
        _echo.disconnects += 1
    elif request.path == "/boom":
        raise RuntimeError("handler bug")
    else:
        body = json.dumps({"method": request.method, "path": request.path, "len": len(request.body),
                           "query": request.query.decode()}).encode()
        response.send(200, body, [(b"content-type", b"application/json")])


_echo.disconnects = 0


def with_server(test):
    """Run the async test against a real server on a loopback port."""
    def run():
        async def main():
            listener = socket.create_server(("127.0.0.1", 0))
            srv = HTTPServer(_echo, max_body=1 << 20, keep_alive_s=1.0)
            await srv.start(listener)
            try:
                await test((srv, listener.getsockname()[1]))
            finally:
                srv.close()
        asyncio.run(main())
    run.__name__ = test.__name__
    return run


async def _exchange(port: int, data: bytes, until: bytes | None = None, timeout: float = 5.0) -> bytes:
    """Send `data`, read until `until` is seen or the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    out = b""
    try:
        async with asyncio.timeout(timeout):
            while until is None or until not in out:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                out += chunk
    finally:
        writer.close()
    return out


def _post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n" % len(body)
            + extra + b"\r\n" + body)


@with_server
async def test_pipelined_requests_are_answered_in_order(server):
    _, port = server
    data = _post("/a?x=1", b"12345") + _post("/b", b"") + b"GET /c HTTP/1.1\r\nhost: x\r\n\r\n"
    out = await _exchange(port, data, until=b'"/c"')
    paths = [json.loads(part.split(b"\r\n\r\n", 1)[1][:200].split(b"HTTP/1.1")[0])["path"]
             for part in out.split(b"HTTP/1.1 200 OK")[1:]]
    assert paths == ["/a", "/b", "/c"]
    assert b'"query": "x=1"' in out and b'"len": 5' in out


@with_server
async def test_chunked_stream_and_http10(server):
    _, port = server
    out = await _exchange(port, b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n", until=b"0\r\n\r\n")
    assert b"transfer-encoding: chunked" in out
    assert out.endswith(b"4\r\none \r\n4\r\ntwo \r\n5\r\nthree\r\n0\r\n\r\n")
    # an HTTP/1.0 client gets the raw body and the end of the connection, not chunks
    out = await _exchange(port, b"GET /stream HTTP/1.0\r\n\r\n")
    assert b"transfer-encoding" not in out and b"connection: close" in out
    assert out.endswith(b"\r\n\r\none two three")


@with_server
async def test_chunked_request_body_and_expect_continue(server):
    _, port = server
    data = (b"POST /x HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nexpect: 100-continue\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    out = await _exchange(port, data, until=b"}")
    assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK")
    assert b'"len": 5' in out


@with_server
async def test_bad_input_gets_an_openai_error_and_a_closed_connection(server):
    _, port = server
    out = await _exchange(port, b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 99999999\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 413 ")
    assert json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "invalid_request_error"
    out = await _exchange(port, b"NOT HTTP AT ALL\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ") and b"connection: close" in out
    out = await _exchange(port, b"GET /boom HTTP/1.1\r\nhost: x\r\n\r\n", until=b"}")
    assert out.startswith(b"HTTP/1.1 500 ") and b"internal server error" in out


@with_server
async def test_disconnect_reaches_the_handler_and_idle_connections_close(server):
    srv, port = server
    before = _echo.disconnects
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /wait HTTP/1.1\r\nhost: x\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    for _ in range(50):
        if _echo.disconnects > before:
            break
        await asyncio.sleep(0.05)
    assert _echo.disconnects == before + 1
    # keep-alive: an idle connection is closed after keep_alive_s (1 s here, swept every 0.5 s)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n")
    await reader.readuntil(b"}")
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    writer.close()
    assert not srv.connections
