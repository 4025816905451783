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

Each deployment is started once, on this machine, and measured for every workload and load. The
file, every deployment's resolved config and every workload are checked before the first one
starts: a mistake is reported with its key path and costs no run.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError

from slurmserve.bench import datasets
from slurmserve.launcher.argtypes import positive_int
from slurmserve.bench.cli import load_tokenizer
from slurmserve.bench.loadgen import run_load, summarize
from slurmserve.bench.procstat import CpuSampler
from slurmserve.config import ConfigError, DeploymentConfig, apply_overrides, format_errors, read_yaml_mapping
from slurmserve.tools.local_deployment import LocalDeployment


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorkloadSpec(_Strict):
    """bench/datasets.build's options; those left out keep build's defaults."""
    dataset: Literal["random", "prefix-repetition", "multi-turn", "sharegpt", "mooncake"] = "random"
    num_prompts: PositiveInt = 200
    input_len: PositiveInt | None = None
    output_len: PositiveInt | None = None
    range_ratio: float | None = Field(None, ge=0, lt=1)
    num_prefixes: PositiveInt | None = None
    prefix_len: int | None = Field(None, ge=0)
    suffix_len: int | None = Field(None, ge=0)
    turns: PositiveInt | None = None
    vocab: PositiveInt | None = None
    dataset_path: Path | None = None
    block_tokens: PositiveInt | None = None


class LoadSpec(_Strict):
    """bench/loadgen.run_load's load: a closed loop of `concurrency` users, or arrivals at `rate`."""
    concurrency: PositiveInt | None = None
    rate: PositiveFloat | None = None
    burstiness: PositiveFloat = 1.0
    duration_s: PositiveFloat | None = None


class ScenarioFile(_Strict):
    name: str | None = None
    base: str                                        # deployment config, relative to the scenario file
    set: dict[str, Any] = {}
    deployments: dict[str, dict[str, Any] | None] = Field(min_length=1)
    workloads: dict[str, WorkloadSpec] = Field(min_length=1)
    loads: list[LoadSpec] = Field([LoadSpec(concurrency=8)], min_length=1)
    repeats: PositiveInt = 1
    goodput: dict[Literal["ttft", "tpot", "e2e"], PositiveFloat] | None = None


def load_scenario(path: Path) -> tuple[ScenarioFile, dict[str, dict]]:
    """The checked scenario and each deployment's config, or a ConfigError naming every mistake."""
    try:
        scenario = ScenarioFile.model_validate(read_yaml_mapping(path, str(path)))
    except ValidationError as e:
        raise ConfigError(format_errors(e, str(path))) from None
    base_dir = Path(path).resolve().parent
    configs = {name: _deployment_config(scenario, base_dir, overrides)
               for name, overrides in scenario.deployments.items()}
    problems = []
    for name, cfg in configs.items():
        try:
            DeploymentConfig.model_validate(cfg)
        except ValidationError as e:
            problems.append(format_errors(e, f"{path}: deployments.{name} (on {scenario.base})"))
    for name, wl in scenario.workloads.items():
        try:     # the same call as the runs make, for one prompt, so a missing file shows up now
            datasets.build(wl.dataset, 1, **wl.model_dump(exclude={"dataset", "num_prompts"}, exclude_none=True))
        except (ValueError, OSError) as e:
            problems.append(f"{path}: workloads.{name}: {e}")
    if problems:
        raise ConfigError("\n".join(problems))
    return scenario, configs

HEADLINE = ("ttft_ms.p50", "ttft_ms.p99", "tpot_ms.p50", "e2e_ms.p99", "request_throughput",
            "output_throughput", "chunks_per_request", "cached_fraction", "goodput",
            "cpu_ms_per_request.head")


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _deployment_config(scenario: ScenarioFile, base_dir: Path, overrides: dict | None) -> dict:
    base = base_dir / scenario.base
    cfg = read_yaml_mapping(base, f"base {scenario.base}")
    path = (cfg.get("model") or {}).get("path") if isinstance(cfg.get("model"), dict) else None
    if path is not None:      # (without one, validation below says what is missing)
        model_path = Path(str(path)).expanduser()
        cfg["model"]["path"] = str(model_path if model_path.is_absolute() else base.parent / model_path)
    items = {**scenario.set, **(overrides or {})}
    apply_overrides(cfg, [f"{k}={json.dumps(v)}" for k, v in items.items()])
    cfg.setdefault("router", {})["port"] = 0
    return cfg


def run_scenario(path: Path, out_dir: Path, repeats: int | None = None) -> dict:
    scenario, configs = load_scenario(path)
    repeats = repeats or scenario.repeats
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for dep_name, cfg in configs.items():
        with LocalDeployment(out_dir / "deployments", cfg, name=dep_name) as dep:
            key, info = dep.api_key, dep.info
            tokenizer = load_tokenizer(cfg["model"]["path"])
            roots = {"head": info["pid"], **{f"{i['role']}{i['index']}": i["pid"] for i in info["instances"]}}
            for wl_name, spec in scenario.workloads.items():
                wl = spec.model_dump(exclude={"dataset", "num_prompts"}, exclude_none=True)
                for load_spec in scenario.loads:
                    load = load_spec.model_dump(exclude_unset=True)   # as written: it labels the rows
                    runs = []
                    for rep in range(repeats):
                        specs = datasets.build(spec.dataset, spec.num_prompts, seed=rep, tokenizer=tokenizer, **wl)
                        sampler = CpuSampler(roots)
                        sampler.start()
                        results, wall = asyncio.run(run_load(info["url"], key, info["model"], specs,
                                                             seed=rep, **load))
                        cpu = sampler.stop()
                        s = summarize(results, wall, scenario.goodput)
                        s["cpu_ms_per_request"] = {k: v * 1000 / max(1, s["completed"]) for k, v in cpu.items()}
                        s["samples_ms"] = latency_samples(results)   # for the CDF plots
                        runs.append(s)
                    row = {"deployment": dep_name, "workload": wl_name, "load": load, "runs": runs,
                           "median": {m: _median([_get(r, m) for r in runs]) for m in HEADLINE}}
                    rows.append(row)
                    print(f"{dep_name} / {wl_name} / {load}: " +
                          ", ".join(f"{m}={_fmt(v)}" for m, v in row["median"].items() if v is not None),
                          flush=True)
    report = {"scenario": scenario.name or Path(path).stem, "file": str(path), "repeats": repeats,
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
    p.add_argument("--repeats", type=positive_int)
    p.set_defaults(func=lambda a: run_scenario(a.file, a.out or Path("runs/bench") / a.file.stem,
                                               a.repeats) and 0)
