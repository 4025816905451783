"""`slurmserve bench ...` commands."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from slurmserve.bench import datasets
from slurmserve.launcher.argtypes import non_negative_float, non_negative_int, positive_float, positive_int
from slurmserve.bench.loadgen import run_load, summarize
from slurmserve.bench.procstat import CpuSampler


def _slos(text: list[str] | None) -> dict[str, float] | None:
    if not text:
        return None
    out = {}
    for item in text:
        name, _, ms = item.partition(":")
        if name not in ("ttft", "tpot", "e2e") or not ms:
            raise SystemExit(f"--goodput {item!r}: expected ttft:MS, tpot:MS or e2e:MS")
        out[name] = float(ms)
    return out


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    target = p.add_argument_group("target")
    target.add_argument("--url", help="OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
    target.add_argument("--endpoint-file", type=Path,
                        help="a deployment's endpoint.json: URL, key file, model and pids in one")
    target.add_argument("--api-key-file", type=Path, help="file holding the API key (never pass keys as args)")
    target.add_argument("--model", help="served model name (default: the server's first model)")
    load = p.add_argument_group("load")
    load.add_argument("--concurrency", type=positive_int, help="closed loop with this many users")
    load.add_argument("--rate", type=positive_float, help="open loop: requests per second")
    load.add_argument("--burstiness", type=positive_float, default=1.0, help="gamma shape; 1 = Poisson")
    load.add_argument("--num-prompts", type=positive_int, default=200)
    load.add_argument("--duration", type=positive_float, help="stop sending after this many seconds")
    load.add_argument("--warmup", type=non_negative_int, default=0, help="requests sent and discarded first")
    data = p.add_argument_group("dataset")
    data.add_argument("--dataset", default="random",
                      choices=["random", "prefix-repetition", "multi-turn", "sharegpt", "mooncake"])
    data.add_argument("--dataset-path", type=Path)
    data.add_argument("--input-len", type=positive_int, default=256)
    data.add_argument("--output-len", type=positive_int, default=64)
    data.add_argument("--range-ratio", type=non_negative_float, default=0.0)
    data.add_argument("--num-prefixes", type=positive_int, default=8)
    data.add_argument("--prefix-len", type=non_negative_int, default=1024)
    data.add_argument("--suffix-len", type=non_negative_int, default=128)
    data.add_argument("--turns", type=positive_int, default=4)
    data.add_argument("--block-tokens", type=positive_int, default=512, help="mooncake: tokens per hash id")
    data.add_argument("--tokenizer", type=Path,
                      help="the served model's directory (its tokenizer): ids from its vocabulary, chat "
                           "prompts of exact token counts, ShareGPT replies counted in tokens")
    data.add_argument("--vocab", type=positive_int, default=400, help="without --tokenizer: token ids are drawn below this")
    data.add_argument("--seed", type=non_negative_int, default=0)
    out = p.add_argument_group("output")
    out.add_argument("--goodput", nargs="+", metavar="SLO", help="e.g. ttft:200 tpot:50 e2e:5000 (ms)")
    out.add_argument("--cpu-pid", action="append", default=[], metavar="NAME=PID",
                     help="sample CPU time of this process tree (repeatable); with --endpoint-file "
                          "the head and engine ranks are sampled automatically")
    out.add_argument("--result-json", type=Path,
                     help="write the result here, with the markdown summary (.md) and TTFT/E2E CDFs "
                          "(.latency_cdf.png) beside it")


def load_tokenizer(path: Path | None):
    if path is None:
        return None
    from slurmserve.router.tokenizer import Tokenizer
    return Tokenizer(Path(path).expanduser())


def build_specs(a) -> list:
    try:
        return datasets.build(a.dataset, a.num_prompts + a.warmup, input_len=a.input_len,
                              output_len=a.output_len, range_ratio=a.range_ratio,
                              num_prefixes=a.num_prefixes, prefix_len=a.prefix_len,
                              suffix_len=a.suffix_len, turns=a.turns, vocab=a.vocab, seed=a.seed,
                              dataset_path=a.dataset_path, block_tokens=a.block_tokens,
                              tokenizer=load_tokenizer(a.tokenizer))
    except ValueError as e:
        raise SystemExit(f"slurmserve bench: {e}") from None


def _first_model(url: str, key: str) -> str:
    """The served model name, from GET /models."""
    import httpx
    try:
        r = httpx.get(url + "/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
        raise SystemExit(f"slurmserve bench serve: cannot list the models at {url}/models "
                         f"({type(e).__name__}: {e}); give --model, or check --url and the key") from None


def cmd_serve(a) -> int:
    roots: dict[str, int] = {}
    key = ""
    if a.endpoint_file:
        try:
            info = json.loads(a.endpoint_file.read_text())
            a.url = a.url or info["url"]
            a.model = a.model or info["model"]
            a.api_key_file = a.api_key_file or Path(info["api_key_file"])
            roots["head"] = info["pid"]
            for inst in info.get("instances", []):
                roots[f"{inst['role']}{inst['index']}"] = inst["pid"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"slurmserve bench serve: --endpoint-file {a.endpoint_file}: "
                             f"not a deployment's endpoint.json ({type(e).__name__}: {e})") from None
    for item in a.cpu_pid:
        name, _, pid = item.partition("=")
        if not pid.isdigit():
            raise SystemExit(f"slurmserve bench serve: --cpu-pid {item!r}: expected NAME=PID")
        roots[name] = int(pid)
    if not a.url:
        raise SystemExit("give --url or --endpoint-file")
    if a.api_key_file:
        try:
            key = a.api_key_file.read_text().strip()
        except OSError as e:
            raise SystemExit(f"slurmserve bench serve: --api-key-file: {e}") from None
    if not a.model:
        a.model = _first_model(a.url, key)
    specs = build_specs(a)
    warm, specs = specs[:a.warmup], specs[a.warmup:]
    if warm:
        asyncio.run(run_load(a.url, key, a.model, warm, concurrency=a.concurrency or 8))
    sampler = CpuSampler(roots)
    sampler.start()
    results, wall = asyncio.run(run_load(a.url, key, a.model, specs, concurrency=a.concurrency, rate=a.rate,
                                         burstiness=a.burstiness, duration_s=a.duration, seed=a.seed))
    cpu = sampler.stop()
    summary = summarize(results, wall, _slos(a.goodput))
    n = max(1, summary["completed"])
    summary["cpu_ms_per_request"] = {name: s * 1000 / n for name, s in cpu.items()}
    summary["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "func"}
    summary["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    table = markdown(summary)
    if a.result_json:   # beside it: the markdown summary and the latency CDFs
        from slurmserve.bench.scenario import latency_samples, plot_latency_cdfs
        a.result_json.write_text(json.dumps(summary, indent=2))
        a.result_json.with_suffix(".md").write_text(table)
        load = f"concurrency {a.concurrency}" if a.concurrency else f"rate {a.rate}/s"
        plot_latency_cdfs({f"{a.model} / {a.dataset} / {load}": latency_samples(results)},
                          a.result_json.with_suffix(".latency_cdf.png"))
    print(table)
    return 0 if summary["failed"] == 0 else 1


def markdown(s: dict) -> str:
    f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    lines = [f"completed {s['completed']}, failed {s['failed']} in {s['wall_s']:.1f} s: "
             f"{s['request_throughput']:.2f} req/s, {s['output_throughput']:.1f} output tok/s",
             "", "| metric (ms) | mean | p50 | p90 | p99 |", "|---|---|---|---|---|"]
    for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        d = s[k]
        lines.append(f"| {k[:-3].upper()} | {f(d['mean'])} | {f(d['p50'])} | {f(d['p90'])} | {f(d['p99'])} |")
    if s.get("chunks_per_request") is not None:
        lines.append(f"\ntext chunks per request: {s['chunks_per_request']:.1f}")
    if s.get("cached_fraction") is not None:
        lines.append(f"cached prompt-token fraction: {s['cached_fraction']:.3f}")
    if "goodput" in s:
        lines.append(f"goodput: {s['goodput']:.2f} req/s under {s['slos_ms']}")
    for name, ms in s.get("cpu_ms_per_request", {}).items():
        lines.append(f"cpu {name}: {ms:.3f} ms/request")
    if s["errors"]:
        lines.append("errors: " + "; ".join(s["errors"]))
    return "\n".join(lines)


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="bench_command", required=True, metavar="SUBCOMMAND")
    s = bsub.add_parser("serve", help="load-test an OpenAI-compatible endpoint")
    add_serve_arguments(s)
    s.set_defaults(func=cmd_serve)
    from slurmserve.bench.scenario import register as register_scenario
    register_scenario(bsub)
    from slurmserve.bench.kv_transfer import register as register_kv_transfer
    register_kv_transfer(bsub)
    from slurmserve.bench.fleet_study import register as register_fleet
    register_fleet(bsub)
    from slurmserve.bench.routing_study import register as register_routing
    register_routing(bsub)
    from slurmserve.bench.stage_bench import register as register_stage
    register_stage(bsub)
    from slurmserve.bench.ready_bench import register as register_ready
    register_ready(bsub)
    from slurmserve.bench.peer import register as register_peer
    register_peer(bsub)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    register(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args()
    sys.exit(args.func(args))
