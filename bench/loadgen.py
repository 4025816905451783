"""Streaming OpenAI load generator: closed loop at a concurrency, or open loop at a rate.

Works against any OpenAI-compatible endpoint. Per request it records TTFT, inter-token latencies
and end-to-end latency from the SSE stream (token counts from `include_usage` when served).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import httpx
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

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


_decode = msgspec.json.Decoder().decode


async def one_request(client: httpx.AsyncClient, base: str, model: str, spec: RequestSpec,
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
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    continue   # read to the end of the body: leaving early closes the connection
                msg = _decode(data)
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
    except (httpx.HTTPError, OSError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


def _has_text(choice: dict, chat: bool) -> bool:
    return bool((choice.get("delta") or {}).get("content")) if chat else bool(choice.get("text"))


async def run_load(base: str, api_key: str, model: str, specs: list[RequestSpec], *,
                   concurrency: int | None = None, rate: float | None = None, burstiness: float = 1.0,
                   duration_s: float | None = None, seed: int = 0, ignore_eos: bool = True,
                   on_result=None) -> tuple[list[Result], float]:
    """Send `specs`; returns the results and the wall time. Bounded by len(specs) and duration_s."""
    limits = httpx.Limits(max_connections=(concurrency or 1024) + 8, max_keepalive_connections=None)
    headers = {"Authorization": f"Bearer {api_key}"}
    results: list[Result] = []
    sessions: dict[str, asyncio.Lock] = {}
    deadline = None if duration_s is None else time.perf_counter() + duration_s
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits, headers=headers) as client:
        async def fire(spec: RequestSpec) -> None:
            if deadline is not None and time.perf_counter() > deadline:
                return
            lock = sessions.setdefault(spec.session, asyncio.Lock()) if spec.session else None
            if lock:
                await lock.acquire()
            try:
                r = await one_request(client, base, model, spec, ignore_eos)
            finally:
                if lock:
                    lock.release()
            results.append(r)
            if on_result:
                on_result(r)

        start = time.perf_counter()
        if rate is None and all(s.at is None for s in specs):
            queue = iter(specs)

            async def user() -> None:
                for spec in queue:
                    if deadline is not None and time.perf_counter() > deadline:
                        return
                    await fire(spec)

            await asyncio.gather(*(user() for _ in range(concurrency or 1)))
        else:
            rng = random.Random(seed)
            sem = asyncio.Semaphore(concurrency) if concurrency else None
            tasks, t = [], 0.0
            for spec in specs:
                if spec.at is not None:
                    t = spec.at
                else:   # gamma inter-arrivals with mean 1/rate; shape 1 is Poisson
                    t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
                delay = start + t - time.perf_counter()
                if deadline is not None and start + t > deadline:
                    break
                if delay > 0:
                    await asyncio.sleep(delay)

                async def gated(s=spec):
                    if sem is None:
                        return await fire(s)
                    async with sem:
                        await fire(s)

                tasks.append(asyncio.create_task(gated()))
            await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


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
        "cached_fraction": (sum(r.cached_tokens for r in ok) / prompt_tokens) if prompt_tokens else None,
        "ttft_ms": ms([r.ttft for r in ok]),
        "tpot_ms": ms([r.tpot for r in ok if r.output_tokens > 1]),
        "itl_ms": ms([x for r in ok for x in r.itls]),
        "e2e_ms": ms([r.e2e for r in ok]),
        "errors": sorted({r.error for r in results if not r.ok})[:10],
    }
    if slos:
        def good(r: Result) -> bool:
            return ((r.ttft * 1000 <= slos.get("ttft", float("inf")))
                    and (r.tpot * 1000 <= slos.get("tpot", float("inf")))
                    and (r.e2e * 1000 <= slos.get("e2e", float("inf"))))
        summary["goodput"] = sum(good(r) for r in ok) / wall_s if wall_s else 0.0
        summary["slos_ms"] = slos
    return summary
