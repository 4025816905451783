"""Streaming OpenAI load generator: closed loop at a concurrency, or open loop at a rate.

Works against any OpenAI-compatible endpoint. Per request it records TTFT, inter-token latencies
and end-to-end latency from the SSE stream (token counts from `include_usage` when served).

The client is aiohttp, as in vLLM's serving benchmark. httpx was used until it showed two faults
that bend the figures on a small machine: about 1.7 ms of client CPU per request (the load generator
shares the cores with what it measures), and a connection pool that, at concurrency 256, kept some
requests waiting about as long as the whole run before it sent them (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import aiohttp
import msgspec

from slurmserve.bench.datasets import RequestSpec


@dataclass
class Result:
    ok: bool
    start: float = 0.0
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    error: str = ""
    index: int = -1                          # position of its RequestSpec in the list sent
    expected_prompt_tokens: int | None = None   # the spec's prompt_len
    inflight: int = 0                        # requests in flight when it started, itself included

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.encode
_JSON = {"Content-Type": "application/json"}


async def one_request(session: aiohttp.ClientSession, base: str, model: str, spec: RequestSpec,
                      ignore_eos: bool = True) -> Result:
    chat = spec.messages is not None
    body = {"model": model, "max_tokens": spec.max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0.0, **spec.extra}
    if ignore_eos:
        body["ignore_eos"] = True
    if chat:
        body["messages"] = spec.messages
    else:
        body["prompt"] = spec.prompt
    url = base + ("/chat/completions" if chat else "/completions")
    res = Result(ok=False, start=time.perf_counter())
    last = res.start
    chunks = 0
    try:
        async with session.post(url, data=_encode(body), headers=_JSON) as r:
            if r.status != 200:
                res.error = f"HTTP {r.status}: {(await r.read())[:200]!r}"
                return res
            tail = b""
            async for data in r.content.iter_any():
                *lines, tail = (tail + data).split(b"\n")
                for line in lines:
                    if not line.startswith(b"data: {"):
                        continue        # blank separators, comments, the closing [DONE]
                    msg = _decode(line[6:])
                    if "error" in msg:
                        res.error = str(msg["error"].get("message"))
                        return res
                    if msg.get("usage"):
                        u = msg["usage"]
                        res.prompt_tokens = u.get("prompt_tokens", 0)
                        res.output_tokens = u.get("completion_tokens", 0)
                        res.cached_tokens = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                    choices = msg.get("choices") or []
                    if choices and _has_text(choices[0], chat):
                        now = time.perf_counter()
                        if chunks == 0:
                            res.ttft = now - res.start
                        else:
                            res.itls.append(now - last)
                        last = now
                        chunks += 1
        res.e2e = time.perf_counter() - res.start
        res.output_tokens = res.output_tokens or chunks
        res.ok = True
    except (aiohttp.ClientError, OSError) as e:     # timeouts are OSErrors (TimeoutError)
        res.error = f"{type(e).__name__}: {e}"
    return res


def _has_text(choice: dict, chat: bool) -> bool:
    return bool((choice.get("delta") or {}).get("content")) if chat else bool(choice.get("text"))


async def run_load(base: str, api_key: str, model: str, specs: list[RequestSpec], *,
                   concurrency: int | None = None, rate: float | None = None, burstiness: float = 1.0,
                   duration_s: float | None = None, seed: int = 0, ignore_eos: bool = True,
                   on_result=None) -> tuple[list[Result], float]:
    """Send `specs`; returns the results (in completion order) and the wall time.

    Closed loop (no rate, no trace timestamps): `concurrency` users, each sending its next request
    when its previous one finished, until the specs run out or `duration_s` has passed. Open loop:
    requests arrive on `arrival_times` (trace timestamps, or gamma inter-arrivals at `rate`); every
    request whose arrival falls within `duration_s` is sent, at most `concurrency` at a time.
    Multi-turn sessions send a conversation's turns one after another."""
    # One keep-alive connection per request in flight; long generations must not time out.
    connector = aiohttp.TCPConnector(limit=(concurrency or 1024) + 8, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=600, sock_read=600)
    headers = {"Authorization": f"Bearer {api_key}"}
    results: list[Result] = []
    sessions: dict[str, asyncio.Lock] = {}
    deadline = None if duration_s is None else time.perf_counter() + duration_s
    inflight = 0
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as client:
        async def fire(index: int, spec: RequestSpec) -> None:
            nonlocal inflight
            lock = sessions.setdefault(spec.session, asyncio.Lock()) if spec.session else None
            if lock:
                await lock.acquire()
            inflight += 1
            now_inflight = inflight
            try:
                r = await one_request(client, base, model, spec, ignore_eos)
            finally:
                inflight -= 1
                if lock:
                    lock.release()
            r.index, r.expected_prompt_tokens, r.inflight = index, spec.prompt_len, now_inflight
            results.append(r)
            if on_result:
                on_result(r)

        start = time.perf_counter()
        if rate is None and all(s.at is None for s in specs):
            queue = iter(enumerate(specs))

            async def user() -> None:
                for index, spec in queue:
                    if deadline is not None and time.perf_counter() > deadline:
                        return
                    await fire(index, spec)

            await asyncio.gather(*(user() for _ in range(concurrency or 1)))
        else:
            sem = asyncio.Semaphore(concurrency) if concurrency else None
            tasks = []
            for index, (spec, t) in enumerate(zip(specs, arrival_times(specs, rate, burstiness, seed))):
                if duration_s is not None and t > duration_s:
                    break
                delay = start + t - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)

                async def gated(i=index, s=spec):
                    if sem is None:
                        return await fire(i, s)
                    async with sem:
                        await fire(i, s)

                tasks.append(asyncio.create_task(gated()))
            await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def arrival_times(specs: list[RequestSpec], rate: float | None, burstiness: float = 1.0,
                  seed: int = 0) -> list[float]:
    """Seconds after the start at which each request arrives in open loop: a spec's own `at`
    (trace replay), else the previous arrival plus a gamma-distributed gap with mean 1/rate and
    shape `burstiness` (1: Poisson arrivals; below 1: burstier; above 1: more regular)."""
    rng = random.Random(seed)
    out, t = [], 0.0
    for spec in specs:
        if spec.at is not None:
            t = spec.at
        elif rate is None:
            raise ValueError("open loop needs a rate for specs without timestamps")
        else:
            t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        out.append(t)
    return out


def percentiles(xs: list[float], ps=(50, 90, 99)) -> dict:
    if not xs:
        return {"mean": None, **{f"p{p}": None for p in ps}}
    s = sorted(xs)

    def q(p):
        k = (len(s) - 1) * p / 100
        lo = int(k)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)

    return {"mean": sum(s) / len(s), **{f"p{p}": q(p) for p in ps}}


def summarize(results: list[Result], wall_s: float, slos: dict[str, float] | None = None) -> dict:
    """Latencies in milliseconds. Goodput (DistServe): completed requests per second that meet
    every given SLO (keys ttft, tpot, e2e; values in ms)."""
    ok = [r for r in results if r.ok]
    ms = lambda xs: {k: (None if v is None else v * 1000) for k, v in percentiles(xs).items()}  # noqa: E731
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    summary = {
        "completed": len(ok), "failed": len(results) - len(ok), "wall_s": wall_s,
        "request_throughput": len(ok) / wall_s if wall_s else 0.0,
        "output_throughput": out_tokens / wall_s if wall_s else 0.0,
        "total_token_throughput": (out_tokens + prompt_tokens) / wall_s if wall_s else 0.0,
        "prompt_tokens": prompt_tokens, "output_tokens": out_tokens,
        "cached_tokens": sum(r.cached_tokens for r in ok),
        "cached_fraction": (sum(r.cached_tokens for r in ok) / prompt_tokens) if prompt_tokens else None,
        "prompt_tokens_mismatched": sum(1 for r in ok if r.expected_prompt_tokens is not None
                                        and r.prompt_tokens != r.expected_prompt_tokens),
        "max_concurrency": max((r.inflight for r in results), default=0),
        # several tokens to a chunk means the server was behind and merged them (or a stream interval)
        "chunks_per_request": (sum(len(r.itls) + 1 for r in ok) / len(ok)) if ok else None,
        "ttft_ms": ms([r.ttft for r in ok]),
        "tpot_ms": ms([r.tpot for r in ok if r.output_tokens > 1]),
        "itl_ms": ms([x for r in ok for x in r.itls]),
        "e2e_ms": ms([r.e2e for r in ok]),
        "errors": sorted({r.error for r in results if not r.ok})[:10],
    }
    if slos:
        n_good = sum(meets_slos(r, slos) for r in ok)
        summary["goodput"] = n_good / wall_s if wall_s else 0.0
        summary["slo_attainment"] = n_good / len(results) if results else None
        summary["slos_ms"] = slos
    return summary


def meets_slos(r: Result, slos: dict[str, float]) -> bool:
    """DistServe: a request is good when it meets every given limit (ms); TPOT of a one-token
    answer is 0."""
    return r.ok and all(value * 1000 <= slos[name] for name, value in
                        (("ttft", r.ttft), ("tpot", r.tpot), ("e2e", r.e2e)) if name in slos)
