"""`slurmserve bench scenario FILE.yaml`: deployments x workloads x loads, one report directory.

A scenario file:

    name: routing
    base: ../../examples/sim-agg.yaml          # deployment config, relative to this file
    set: {engine.sim.speedup: 1.0}             # overrides for every deployment
    deployments:                               # name -> overrides
      round_robin: {router.policy: round_robin}
      least_loaded: {router.policy: least_loaded}
    workloads:                                 # name -> dataset options (bench/datasets.build)
      shared-prefix: {dataset: prefix-repetition, num_prefixes: 32, prefix_len: 1792,
                      suffix_len: 256, output_len: 64, num_prompts: 400}
    loads: [{concurrency: 16}]                 # or {rate: 4.0, burstiness: 1.0}
    repeats: 3                                 # medians over repeats are reported
    goodput: {ttft: 500, tpot: 50}             # optional SLOs in ms

Each deployment is started once, on this machine, and measured for every workload and load.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path

import yaml

from slurmserve.bench import datasets
from slurmserve.bench.cli import load_tokenizer
from slurmserve.bench.loadgen import run_load, summarize
from slurmserve.bench.procstat import CpuSampler
from slurmserve.config import apply_overrides
from slurmserve.launcher.local_deployment import LocalDeployment

HEADLINE = ("ttft_ms.p50", "ttft_ms.p99", "tpot_ms.p50", "e2e_ms.p99", "request_throughput",
            "output_throughput", "chunks_per_request", "cached_fraction", "goodput",
            "cpu_ms_per_request.head")


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _deployment_config(scenario: dict, base_dir: Path, overrides: dict) -> dict:
    cfg = yaml.safe_load((base_dir / scenario["base"]).read_text())
    model_path = Path(cfg["model"]["path"]).expanduser()
    cfg["model"]["path"] = str(model_path if model_path.is_absolute() else (base_dir / scenario["base"]).parent / model_path)
    items = {**scenario.get("set", {}), **(overrides or {})}
    apply_overrides(cfg, [f"{k}={json.dumps(v)}" for k, v in items.items()])
    cfg.setdefault("router", {})["port"] = 0
    return cfg


def run_scenario(path: Path, out_dir: Path, repeats: int | None = None) -> dict:
    scenario = yaml.safe_load(Path(path).read_text())
    base_dir = Path(path).resolve().parent
    repeats = repeats or scenario.get("repeats", 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for dep_name, overrides in scenario["deployments"].items():
        cfg = _deployment_config(scenario, base_dir, overrides)
        with LocalDeployment(out_dir / "deployments", cfg, name=dep_name) as dep:
            key, info = dep.api_key, dep.info
            tokenizer = load_tokenizer(cfg["model"]["path"])
            roots = {"head": info["pid"], **{f"{i['role']}{i['index']}": i["pid"] for i in info["instances"]}}
            for wl_name, wl in scenario["workloads"].items():
                wl = dict(wl)
                n = wl.pop("num_prompts", 200)
                for load in scenario.get("loads", [{"concurrency": 8}]):
                    runs = []
                    for rep in range(repeats):
                        specs = datasets.build(wl.get("dataset", "random"), n, seed=rep, tokenizer=tokenizer,
                                               **{k: v for k, v in wl.items() if k != "dataset"})
                        sampler = CpuSampler(roots)
                        sampler.start()
                        results, wall = asyncio.run(run_load(info["url"], key, info["model"], specs,
                                                             seed=rep, **load))
                        cpu = sampler.stop()
                        s = summarize(results, wall, scenario.get("goodput"))
                        s["cpu_ms_per_request"] = {k: v * 1000 / max(1, s["completed"]) for k, v in cpu.items()}
                        s["samples_ms"] = latency_samples(results)   # for the CDF plots
                        runs.append(s)
                    row = {"deployment": dep_name, "workload": wl_name, "load": load, "runs": runs,
                           "median": {m: _median([_get(r, m) for r in runs]) for m in HEADLINE}}
                    rows.append(row)
                    print(f"{dep_name} / {wl_name} / {load}: " +
                          ", ".join(f"{m}={_fmt(v)}" for m, v in row["median"].items() if v is not None),
                          flush=True)
    report = {"scenario": scenario.get("name", Path(path).stem), "file": str(path), "repeats": repeats,
              "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "rows": rows}
    (out_dir / "results.json").write_text(json.dumps(report, indent=2))
    (out_dir / "summary.md").write_text(markdown_table(report))
    _plots(report, out_dir)
    return report


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def markdown_table(report: dict) -> str:
    head = "| deployment | workload | load | " + " | ".join(HEADLINE) + " |"
    lines = [f"## {report['scenario']} ({report['date']}, median of {report['repeats']})", "", head,
             "|" + "---|" * (3 + len(HEADLINE))]
    for r in report["rows"]:
        load = ", ".join(f"{k}={v}" for k, v in r["load"].items())
        vals = " | ".join("-" if r["median"][m] is None else _fmt(r["median"][m]) for m in HEADLINE)
        lines.append(f"| {r['deployment']} | {r['workload']} | {load} | {vals} |")
    return "\n".join(lines) + "\n"


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install 'slurmserve[bench]'): no plots written")
        return None
    return plt


def latency_samples(results) -> dict[str, list[float]]:
    """Sorted TTFT and E2E of the successful requests, in ms: what the CDF plots draw."""
    return {m: sorted(round(getattr(r, m) * 1000, 3) for r in results if r.ok) for m in ("ttft", "e2e")}


def plot_latency_cdfs(curves: dict[str, dict[str, list[float]]], path: Path) -> Path | None:
    """TTFT and E2E CDFs side by side, one curve per label (label -> latency_samples())."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, samples in curves.items():
        for ax, metric in zip(axes, ("ttft", "e2e")):
            xs = samples.get(metric) or []
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)
    for ax, metric in zip(axes, ("TTFT", "E2E latency")):
        ax.set_xlabel(f"{metric} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def _plots(report: dict, out_dir: Path) -> list[Path]:
    """latency_cdf.png: TTFT and E2E CDFs of each row's median-throughput run; vs_load.png: request
    throughput, TTFT p50 and E2E p99 (medians over runs) against the load, one line per
    deployment x workload."""
    plt = _pyplot()
    if plt is None:
        return []
    curves = {}
    for r in report["rows"]:
        label = f"{r['deployment']} / {r['workload']} / " + ",".join(f"{k}={v}" for k, v in r["load"].items())
        run = sorted(r["runs"], key=lambda x: x["request_throughput"])[len(r["runs"]) // 2]
        curves[label] = run.get("samples_ms", {})
    written = [plot_latency_cdfs(curves, out_dir / "latency_cdf.png")]

    series: dict[str, list] = {}
    for r in report["rows"]:
        kind = "concurrency" if "concurrency" in r["load"] and "rate" not in r["load"] else "rate"
        if kind in r["load"]:
            series.setdefault(f"{r['deployment']} / {r['workload']}", []).append((kind, r["load"][kind], r["median"]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, pts in series.items():
        pts.sort(key=lambda p: p[1])
        for ax, metric in zip(axes, ("request_throughput", "ttft_ms.p50", "e2e_ms.p99")):
            ax.plot([p[1] for p in pts], [p[2][metric] for p in pts], marker="o", label=label)
    kinds = {p[0] for pts in series.values() for p in pts}
    for ax, name in zip(axes, ("requests/s", "TTFT p50 (ms)", "E2E p99 (ms)")):
        ax.set_xlabel(" / ".join(sorted(kinds)) or "load")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    written.append(_save(fig, out_dir / "vs_load.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def register(bsub) -> None:
    p = bsub.add_parser("scenario", help="run a scenario matrix and write a report directory")
    p.add_argument("file", type=Path)
    p.add_argument("-o", "--out", type=Path, help="report directory (default: runs/bench/<scenario>)")
    p.add_argument("--repeats", type=int)
    p.set_defaults(func=lambda a: run_scenario(a.file, a.out or Path("runs/bench") / a.file.stem,
                                               a.repeats) and 0)
