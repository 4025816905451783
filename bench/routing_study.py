"""`slurmserve bench routing`: the routing policies on a shared-prefix workload, on virtual time.

The served routing scenario (bench/scenarios/routing-policies.yaml) runs 4 sim engines, the head
and the load generator on one machine, so its numbers move with that machine's load and take
minutes per run. This runs the same workload through `bench.fleet_sim` instead: the same SimEngine
scheduling and step model, the head's own policy classes and load account, KV events applied the
moment an engine publishes them, no network and no CPU contention. A run takes a fraction of a
second, so every figure is the median over many seeds (each seed draws other prefixes and another
request order), and the gap to the served figures is what the real system adds.

Reported per policy: TTFT p50 / p99, E2E p99, cached-token fraction; kv against round_robin per
seed; a sweep of kv's `prefill_load_scale`; a steady-state row (the last `--requests` of twice as
many), where every prefix is long cached and no cold start remains; and an oracle that is no
router: it knows each prompt's prefix and pins every prefix to one engine, so that each request
after its prefix's first is a full hit, the most any placement gets on this workload. What the
oracle's TTFT gains over round robin bounds what cache affinity can gain here.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

from slurmserve.launcher.argtypes import non_negative_float, non_negative_int, positive_int
from slurmserve.bench.datasets import build
from slurmserve.bench.fleet_sim import POLICIES, Fleet
from slurmserve.bench.loadgen import Result, summarize
from slurmserve.config import KVRoutingConfig, SimConfig
from slurmserve.router.policies import Choice, Policy


ORACLE = "prefix-pinned (oracle)"


class PrefixPinned(Policy):
    """The oracle: the n-th distinct prefix to arrive goes to engine n mod workers, and so does
    every later prompt that starts with it. It reads the prefix off the prompt's first block,
    which only this dataset (a prefix longer than a block per prompt) makes possible."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.engine_of: dict[tuple[int, ...], int] = {}

    def choice(self, candidates, route):
        key = tuple(route.prompt_token_ids[:self.block_size])
        n = self.engine_of.setdefault(key, len(self.engine_of))
        return Choice(candidates[n % len(candidates)])


def run_once(a, policy: str, seed: int, scale: float | None = None, requests: int | None = None) -> list[Result]:
    n = requests or a.requests
    specs = build("prefix-repetition", n, num_prefixes=a.prefixes, prefix_len=a.prefix_len,
                  suffix_len=a.suffix_len, output_len=a.output_len, seed=seed)
    sim = SimConfig(speedup=float("inf"), num_kv_blocks=a.num_kv_blocks, block_size=a.block_size)
    kv = KVRoutingConfig(prefill_load_scale=a.prefill_load_scale if scale is None else scale)
    router = PrefixPinned(a.block_size) if policy == ORACLE else policy
    fleet = Fleet(sim, workers=a.workers, policy=router, max_model_len=a.max_model_len, kv=kv)
    return fleet.run([(len(s.prompt), s.max_tokens) for s in specs], prompts=[s.prompt for s in specs],
                     concurrency=a.concurrency)


def figures(results: list[Result], full_hit_tokens: int) -> dict:
    """Summary figures of one run; a request whose cached tokens cover its whole shared prefix
    (`full_hit_tokens`) is a full hit, one with none cached a miss."""
    s = summarize(results, max(r.start + r.e2e for r in results))
    hits = [r.ttft for r in results if r.cached_tokens >= full_hit_tokens]
    misses = [r.ttft for r in results if r.cached_tokens == 0]
    return {"ttft_p50": s["ttft_ms"]["p50"], "ttft_p99": s["ttft_ms"]["p99"], "e2e_p99": s["e2e_ms"]["p99"],
            "cached": s["cached_fraction"], "full_hits": len(hits) / len(results),
            "ttft_p50_hits": 1e3 * statistics.median(hits) if hits else None,
            "ttft_p50_misses": 1e3 * statistics.median(misses) if misses else None}


def median_of(runs: list[dict], key: str) -> float | None:
    xs = [f[key] for f in runs if f[key] is not None]
    return statistics.median(xs) if xs else None


def versus(kv: list[dict], rr: list[dict], key: str) -> dict:
    """kv's change against round robin in `key`, seed by seed (in %): median and range."""
    xs = [100.0 * (k[key] / r[key] - 1.0) for k, r in zip(kv, rr)]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def run_study(a) -> dict:
    t0 = time.perf_counter()
    full_hit = a.prefix_len // a.block_size * a.block_size   # the engines cache whole blocks only
    fig = functools.partial(figures, full_hit_tokens=full_hit)
    seeds = range(a.seed, a.seed + a.seeds)
    per = {p: [fig(run_once(a, p, s)) for s in seeds] for p in (*POLICIES, ORACLE)}
    rr = per["round_robin"]
    sweep = []
    for scale in a.scales:
        kv = per["kv"] if scale == a.prefill_load_scale else [fig(run_once(a, "kv", s, scale)) for s in seeds]
        sweep.append({"prefill_load_scale": scale, "ttft_p50_change": versus(kv, rr, "ttft_p50"),
                      "e2e_p99_change": versus(kv, rr, "e2e_p99")})
    steady = {p: [fig(run_once(a, p, s, requests=2 * a.requests)[a.requests:]) for s in seeds]
              for p in ("round_robin", "kv")}
    return {
        "args": {k: v for k, v in vars(a).items() if k not in ("func", "out")},
        "policies": {p: {k: median_of(per[p], k) for k in per[p][0]} for p in per},
        "kv_vs_round_robin": {"ttft_p50_change": versus(per["kv"], rr, "ttft_p50"),
                              "e2e_p99_change": versus(per["kv"], rr, "e2e_p99")},
        "oracle_vs_round_robin": {"ttft_p50_change": versus(per[ORACLE], rr, "ttft_p50"),
                                  "e2e_p99_change": versus(per[ORACLE], rr, "e2e_p99")},
        "scale_sweep": sweep,
        "steady_state": {
            "ttft_p50": {p: median_of(steady[p], "ttft_p50") for p in steady},
            "ttft_p50_change": versus(steady["kv"], steady["round_robin"], "ttft_p50")},
        "elapsed_s": time.perf_counter() - t0,
    }


def _pm(s: dict) -> str:
    return f"{s['median']:+.1f}% ({s['min']:+.1f} to {s['max']:+.1f})"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def markdown(study: dict) -> str:
    a = study["args"]
    lines = [f"{a['workers']} sim engines, {a['num_kv_blocks']} KV blocks of {a['block_size']} tokens; "
             f"{a['prefixes']} prefixes of {a['prefix_len']} + {a['suffix_len']} unique tokens, "
             f"{a['output_len']} out; {a['requests']} requests at concurrency {a['concurrency']}; "
             f"kv prefill_load_scale {a['prefill_load_scale']}; medians over {a['seeds']} seeds (virtual time).",
             "", "| policy | TTFT p50 (ms) | TTFT p99 (ms) | E2E p99 (ms) | cached fraction | full hits "
                 "| TTFT p50 of full hits / misses (ms) |", "|---|---|---|---|---|---|---|"]
    for p, f in study["policies"].items():
        lines.append(f"| {p} | {f['ttft_p50']:.1f} | {f['ttft_p99']:.1f} | {f['e2e_p99']:.0f} | {f['cached']:.3f} "
                     f"| {f['full_hits']:.0%} | {_ms(f['ttft_p50_hits'])} / {_ms(f['ttft_p50_misses'])} |")
    kv, oracle = study["kv_vs_round_robin"], study["oracle_vs_round_robin"]
    lines += ["", f"kv vs round_robin, per seed (median, range): TTFT p50 {_pm(kv['ttft_p50_change'])}, "
                  f"E2E p99 {_pm(kv['e2e_p99_change'])}.",
              f"The oracle (every prefix pinned to one engine) vs round_robin: TTFT p50 "
              f"{_pm(oracle['ttft_p50_change'])}, E2E p99 {_pm(oracle['e2e_p99_change'])}.",
              "", "| kv prefill_load_scale | TTFT p50 vs round_robin | E2E p99 vs round_robin |", "|---|---|---|"]
    for row in study["scale_sweep"]:
        lines.append(f"| {row['prefill_load_scale']:g} | {_pm(row['ttft_p50_change'])} | {_pm(row['e2e_p99_change'])} |")
    st = study["steady_state"]
    lines += ["", f"Steady state (the last {a['requests']} of {2 * a['requests']} requests): TTFT p50 round_robin "
                  f"{st['ttft_p50']['round_robin']:.1f} ms, kv {st['ttft_p50']['kv']:.1f} ms, "
                  f"{_pm(st['ttft_p50_change'])}."]
    return "\n".join(lines)


def check(a) -> str | None:
    """What makes these arguments unusable, if anything (before minutes of simulation)."""
    if a.prefix_len < a.block_size:
        return f"--prefix-len {a.prefix_len} is shorter than a block ({a.block_size} tokens): no prefix could be cached"
    need = a.prefix_len + a.suffix_len + a.output_len
    if need > a.max_model_len:
        return f"a request needs {need} tokens (prefix + suffix + output), over --max-model-len {a.max_model_len}"
    if a.num_kv_blocks * a.block_size < a.max_model_len:
        return (f"--num-kv-blocks {a.num_kv_blocks} of {a.block_size} tokens hold fewer than "
                f"--max-model-len {a.max_model_len} tokens")
    return None


def cmd_routing(a) -> int:
    problem = check(a)
    if problem:
        raise SystemExit(f"slurmserve bench routing: {problem}")
    study = run_study(a)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(study, indent=1))
    md = markdown(study)
    (a.out / "summary.md").write_text(md + "\n")
    print(md)
    print(f"\n{study['elapsed_s']:.0f} s; results in {a.out}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    # defaults: the KV-routing issue's workload (and bench/scenarios/routing-policies.yaml's)
    p.add_argument("--workers", type=positive_int, default=4)
    p.add_argument("--num-kv-blocks", type=positive_int, default=512)
    p.add_argument("--block-size", type=positive_int, default=64)
    p.add_argument("--prefixes", type=positive_int, default=32)
    p.add_argument("--prefix-len", type=positive_int, default=1792, help="at least a block")
    p.add_argument("--suffix-len", type=non_negative_int, default=256)
    p.add_argument("--output-len", type=positive_int, default=64)
    p.add_argument("--requests", type=positive_int, default=400)
    p.add_argument("--concurrency", type=positive_int, default=16)
    p.add_argument("--max-model-len", type=positive_int, default=4096)
    p.add_argument("--prefill-load-scale", type=non_negative_float, default=KVRoutingConfig().prefill_load_scale,
                   help="kv's weight of prefill work (default: the router's)")
    p.add_argument("--scales", type=non_negative_float, nargs="*", default=[1, 2, 3, 4, 5, 6, 8],
                   help="prefill_load_scale values to sweep")
    p.add_argument("--seeds", type=positive_int, default=12, help="runs per figure, each with its own dataset seed")
    p.add_argument("--seed", type=non_negative_int, default=0, help="the first seed")
    p.add_argument("--out", type=Path, default=Path("runs/routing-study"))


def register(sub) -> None:
    p = sub.add_parser("routing", help="routing policies on a shared-prefix workload, on virtual time")
    add_arguments(p)
    p.set_defaults(func=cmd_routing)
