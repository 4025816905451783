"""CPU per request of the HTTP clients the gateway could use towards a head.

    python -m slurmserve.bench.upstream_clients URL KEY_FILE MODEL [-n 2000]

Sends the same requests (a streamed 16-token completion, then a non-streamed one) one at a time
through each client over one keep-alive connection and reports this process's CPU time per request
(`time.process_time`), i.e. the client's own cost: the gateway's keep-alive pool
(`gateway/upstream.py`), httpx.AsyncClient and, when installed, aiohttp. Run it where the head
has spare CPU (its cost is not counted, only the wait for it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from urllib.parse import urlsplit

import uvloop


def _bodies(model: str) -> list[tuple[bytes, bytes]]:
    base = {"model": model, "prompt": [1, 2, 3, 4, 5, 6, 7, 8], "max_tokens": 16, "ignore_eos": True}
    return [(b"/v1/completions", json.dumps(dict(base, stream=True)).encode()),
            (b"/v1/completions", json.dumps(base).encode())]


async def _pool(url: str, key: str, bodies, n: int) -> float:
    from slurmserve.gateway.upstream import Upstream
    u = urlsplit(url)
    up = Upstream(u.hostname, u.port, key)

    async def one(path, body):
        conn = await up.request(b"POST", path, body)
        n_bytes = len(await conn.read_all())
        conn.release()
        return n_bytes
    return await _measure(one, bodies, n)


async def _httpx(url: str, key: str, bodies, n: int) -> float:
    import httpx
    u = urlsplit(url)
    async with httpx.AsyncClient(base_url=f"{u.scheme}://{u.netloc}", timeout=60,
                                 headers={"authorization": f"Bearer {key}",
                                          "content-type": "application/json"}) as c:
        async def one(path, body):
            n_bytes = 0
            async with c.stream("POST", path.decode(), content=body) as r:
                async for chunk in r.aiter_raw():
                    n_bytes += len(chunk)
            return n_bytes
        return await _measure(one, bodies, n)


async def _aiohttp(url: str, key: str, bodies, n: int) -> float:
    import aiohttp
    u = urlsplit(url)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(f"{u.scheme}://{u.netloc}", connector=conn, auto_decompress=False,
                                     headers={"authorization": f"Bearer {key}",
                                              "content-type": "application/json"}) as s:
        async def one(path, body):
            n_bytes = 0
            async with s.post(path.decode(), data=body) as r:
                async for chunk in r.content.iter_any():
                    n_bytes += len(chunk)
            return n_bytes
        return await _measure(one, bodies, n)


async def _measure(one, bodies, n: int) -> float:
    for i in range(50):                                  # warm up, open the connection
        await one(*bodies[i % len(bodies)])
    t0 = time.process_time()
    for i in range(n):
        await one(*bodies[i % len(bodies)])
    return (time.process_time() - t0) * 1000 / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("key_file")
    ap.add_argument("model")
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    key = open(a.key_file).read().strip()
    bodies = _bodies(a.model)
    clients = {"gateway pool (httptools)": _pool, "httpx.AsyncClient": _httpx}
    try:
        import aiohttp  # noqa: F401
        clients["aiohttp.ClientSession"] = _aiohttp
    except ImportError:
        pass
    results = {name: [] for name in clients}
    for _ in range(a.repeats):                           # interleaved, so drift hits every client
        for name, fn in clients.items():
            results[name].append(uvloop.run(fn(a.url, key, bodies, a.n)))
    print("| client | CPU ms / request (median of %d) | runs |" % a.repeats)
    print("|---|---|---|")
    for name, xs in results.items():
        print(f"| {name} | {statistics.median(xs):.3f} | {', '.join(f'{x:.3f}' for x in xs)} |")


if __name__ == "__main__":
    main()
