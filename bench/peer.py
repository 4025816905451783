"""`slurmserve bench peer FILE.yaml`: slurmserve's head against Dynamo's frontend, A/B interleaved.

A peer file (bench/scenarios/head-vs-dynamo.yaml is the one docs/benchmarks.md reports):

    name: head-vs-dynamo
    model: {path: ~/.cache/slurmserve/tiny-llama, name: tiny-llama, max_model_len: 4096}
    workers: 4                      # engine instances on each side
    rounds: 3                       # medians over rounds are reported
    setups:                         # engine settings, the same on both sides (bench/dynamo_peer.py)
      real-time: {speedup: 1.0, num_kv_blocks: 2048, block_size: 16}
    runs:                           # name -> setup, closed-loop concurrency, workload
      chat-c32: {setup: real-time, concurrency: 32,
                 workload: {dataset: chat, input_len: 512, output_len: 64, num_prompts: 640}}

Workloads: `chat` (one user turn of exactly input_len tokens of text), `random` (token-id prompts to
/v1/completions), `shared-prefix-chat` (text: num_prefixes shared prefixes of prefix_len tokens, each
request one of them plus suffix_len unique tokens). Each setup starts one slurmserve deployment
(LocalDeployment, kv policy) and one Dynamo (frontend --router-mode kv + mocker) side by side, both
kept up while it lasts; every round runs each of its runs on both, the first side alternating
between rounds, with the same requests (same seed) through the same load generator. Per run:
bench/loadgen's summary plus CPU per completed request of the front end (the head rank; Dynamo's
frontend process), the engines, this client, and the idle other side.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import platform
import random
import subprocess
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveInt, ValidationError

from slurmserve.bench import datasets, dynamo_peer
from slurmserve.bench.cli import load_tokenizer
from slurmserve.bench.loadgen import run_load, summarize
from slurmserve.bench.procstat import CpuSampler, cpu_seconds
from slurmserve.bench.scenario import _get, _median, _Strict
from slurmserve.config import ConfigError, DeploymentConfig, format_errors, read_yaml_mapping
from slurmserve.launcher.argtypes import positive_float, positive_int
from slurmserve.tools.local_deployment import LocalDeployment

SIDES = ("dynamo", "slurmserve")


class PeerModel(_Strict):
    path: str
    name: str
    max_model_len: PositiveInt = 4096


class PeerSetup(_Strict):
    speedup: float = Field(gt=0)            # .inf: engines that do not sleep
    num_kv_blocks: PositiveInt = 2048
    block_size: PositiveInt = 16
    max_num_seqs: PositiveInt = 256
    max_num_batched_tokens: PositiveInt = 8192
    http_workers: PositiveInt = 1           # slurmserve's front-end processes (Dynamo's frontend uses every core)


class PeerWorkload(_Strict):
    dataset: Literal["chat", "random", "shared-prefix-chat"] = "chat"
    num_prompts: PositiveInt = 200
    input_len: PositiveInt = 512
    output_len: PositiveInt = 64
    num_prefixes: PositiveInt = 32
    prefix_len: PositiveInt = 1792
    suffix_len: PositiveInt = 256


class PeerRun(_Strict):
    setup: str
    concurrency: PositiveInt
    workload: PeerWorkload
    warmup: NonNegativeInt = 16             # requests of another seed sent, unmeasured, before each run


class PeerFile(_Strict):
    name: str | None = None
    model: PeerModel
    workers: PositiveInt = 4
    rounds: PositiveInt = 3
    setups: dict[str, PeerSetup] = Field(min_length=1)
    runs: dict[str, PeerRun] = Field(min_length=1)


def load_peer_file(path: Path) -> PeerFile:
    try:
        peer = PeerFile.model_validate(read_yaml_mapping(path, str(path)))
    except ValidationError as e:
        raise ConfigError(format_errors(e, str(path))) from None
    unknown = [f"{path}: runs.{n}.setup: no setup {r.setup!r}" for n, r in peer.runs.items()
               if r.setup not in peer.setups]
    if unknown:
        raise ConfigError("\n".join(unknown))
    model = Path(peer.model.path).expanduser()
    if not model.is_absolute():
        model = Path(path).resolve().parent / model
    peer.model.path = str(model)
    for name, setup in peer.setups.items():     # the sim side's config, checked before anything starts
        try:
            DeploymentConfig.model_validate(_sim_config(peer, setup))
        except ValidationError as e:
            raise ConfigError(format_errors(e, f"{path}: setups.{name}")) from None
    return peer


def _sim_config(peer: PeerFile, setup: PeerSetup) -> dict:
    cfg = dynamo_peer.sim_config(peer.model.path, peer.model.name, workers=peer.workers,
                                 max_model_len=peer.model.max_model_len, **_engine_setup(setup))
    cfg["router"]["http_workers"] = setup.http_workers
    return cfg


def _engine_setup(setup: PeerSetup) -> dict:
    """What both sides' engines are given."""
    return setup.model_dump(exclude={"http_workers"})


def shared_prefix_chat(n: int, num_prefixes: int, prefix_len: int, suffix_len: int, output_len: int,
                       tokenizer, seed: int = 0) -> list[datasets.RequestSpec]:
    """The KV-routing workload as text chat: prefixes shared by num_prefixes groups, unique suffixes."""
    vocab = datasets._Vocab(tokenizer)
    rng = random.Random(seed)
    prefixes = [vocab.text(rng, prefix_len) for _ in range(num_prefixes)]
    specs = []
    for i in range(n):
        messages = [{"role": "user", "content": prefixes[i % num_prefixes] + vocab.text(rng, suffix_len)}]
        specs.append(datasets.RequestSpec(messages=messages, max_tokens=output_len,
                                          prompt_len=vocab.chat_len(messages)))
    rng.shuffle(specs)
    return specs


def build_specs(wl: PeerWorkload, n: int, tokenizer, seed: int) -> list[datasets.RequestSpec]:
    if wl.dataset == "shared-prefix-chat":
        return shared_prefix_chat(n, wl.num_prefixes, wl.prefix_len, wl.suffix_len, wl.output_len,
                                  tokenizer, seed)
    if wl.dataset == "chat":     # one conversation of one turn per request: a text prompt of input_len
        return datasets.build("multi-turn", n, turns=1, input_len=wl.input_len, output_len=wl.output_len,
                              tokenizer=tokenizer, seed=seed)
    return datasets.build("random", n, input_len=wl.input_len, output_len=wl.output_len,
                          tokenizer=tokenizer, seed=seed)


def for_dynamo(specs: list[datasets.RequestSpec]) -> list[datasets.RequestSpec]:
    """The same requests, each naming the mocker's replay row of its length (dynamo_peer)."""
    return [dataclasses.replace(s, extra={**s.extra, **dynamo_peer.replay_extra(s.max_tokens)}) for s in specs]


@dataclasses.dataclass
class Side:
    url: str
    key: str
    roots: dict[str, int]          # "front" and the engines' processes, for CpuSampler
    dynamo: bool = False

    def requests(self, specs: list[datasets.RequestSpec]) -> list[datasets.RequestSpec]:
        return for_dynamo(specs) if self.dynamo else specs


def measure(side: Side, other: Side, model: str, specs, concurrency: int) -> dict:
    """One closed-loop run: loadgen's summary plus CPU ms per completed request."""
    roots = {**side.roots, **{f"other.{k}": v for k, v in other.roots.items()}}
    sampler = CpuSampler(roots)
    client = cpu_seconds(os.getpid())
    sampler.start()
    results, wall = asyncio.run(run_load(side.url, side.key, model, specs, concurrency=concurrency))
    cpu = sampler.stop()
    client = cpu_seconds(os.getpid()) - client
    # the front's own process: with front-end processes (its children), the router's share alone
    router = sampler.own_seconds["front"]
    s = summarize(results, wall)
    n = max(1, s["completed"])
    groups = {"front": 0.0, "engines": 0.0, "other_side": 0.0}
    for name, secs in cpu.items():
        groups["front" if name == "front" else "other_side" if name.startswith("other.") else "engines"] += secs
    s["cpu_ms_per_request"] = {k: v * 1000 / n for k, v in {**groups, "client": client,
                                                            "front_process": router}.items()}
    s["output_tokens_per_request"] = s["output_tokens"] / n
    return s


HEADLINE = ("cpu_ms_per_request.front", "request_throughput", "ttft_ms.p50", "ttft_ms.p99", "tpot_ms.p50",
            "chunks_per_request", "output_tokens_per_request", "cpu_ms_per_request.engines",
            "cpu_ms_per_request.client", "cpu_ms_per_request.other_side", "cpu_ms_per_request.front_process",
            "failed", "prompt_tokens_mismatched")


def _machine() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    try:
        dyn = version("ai-dynamo")
    except PackageNotFoundError:
        dyn = None
    try:    # the build measured, "-dirty" when it has uncommitted changes
        commit = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "describe", "--always",
                                 "--dirty"], capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "ai-dynamo": dyn,
            "commit": commit}


def run_peer(path: Path, out_dir: Path, rounds: int | None = None, scale: float = 1.0,
             only: list[str] | None = None) -> dict:
    peer = load_peer_file(path)
    if only:
        unknown = sorted(set(only) - set(peer.runs))
        if unknown:
            raise SystemExit(f"slurmserve bench peer: {path} has no run {', '.join(unknown)} "
                             f"(runs: {', '.join(peer.runs)})")
        peer.runs = {n: r for n, r in peer.runs.items() if n in only}
    if not dynamo_peer.available():
        raise SystemExit("slurmserve bench peer: Dynamo is not installed: pip install 'slurmserve[dynamo]' "
                         "&& pip install --no-deps ai-dynamo==1.6.1")
    if not Path(peer.model.path).is_dir():
        raise SystemExit(f"slurmserve bench peer: no model at {peer.model.path} "
                         f"(slurmserve model make-tiny {peer.model.path})")
    rounds = rounds or peer.rounds
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(peer.model.path)
    lens = sorted({r.workload.output_len for r in peer.runs.values()})
    replies = {n: dynamo_peer.output_ids(tokenizer, n, seed=n) for n in lens}
    report = {"peer": peer.name or Path(path).stem, "file": str(path), "rounds": rounds, "scale": scale,
              "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": _machine(), "setups": {}, "rows": []}
    for setup_name, setup in peer.setups.items():
        runs = {n: r for n, r in peer.runs.items() if r.setup == setup_name}
        if runs:
            load_before = os.getloadavg()
            report["rows"] += _run_setup(peer, setup_name, runs, rounds, scale, tokenizer, replies, out_dir)
            report["setups"][setup_name] = {**setup.model_dump(), "loadavg_before": load_before,
                                            "loadavg_after": os.getloadavg()}
    (out_dir / "results.json").write_text(json.dumps(report, indent=2))
    (out_dir / "summary.md").write_text(markdown_table(report))
    print(markdown_table(report))
    return report


def _run_setup(peer: PeerFile, setup_name: str, runs: dict[str, PeerRun], rounds: int, scale: float,
               tokenizer, replies: dict[int, list[int]], out_dir: Path) -> list[dict]:
    """Both sides up for one setup; every round runs each of its runs on both, first side alternating."""
    setup = peer.setups[setup_name]
    dyn = dynamo_peer.DynamoPeer(out_dir / "deployments", peer.model.path, peer.model.name, workers=peer.workers,
                                 max_model_len=peer.model.max_model_len, output_ids_by_len=replies,
                                 name=f"dynamo-{setup_name}", **_engine_setup(setup))
    dep = LocalDeployment(out_dir / "deployments", _sim_config(peer, setup), name=f"slurmserve-{setup_name}")
    per_run: dict[str, dict[str, list]] = {n: {s: [] for s in SIDES} for n in runs}
    with dep, dyn:
        engines = {f"{i['role']}{i['index']}": i["pid"] for i in dep.info["instances"]}
        sides = {"slurmserve": Side(dep.info["url"], dep.api_key, {"front": dep.info["pid"], **engines}),
                 "dynamo": Side(dyn.url, "unused", {"front": dyn.pids["frontend"], "engines": dyn.pids["engines"]},
                                dynamo=True)}
        for rnd in range(rounds):
            order = SIDES if rnd % 2 == 0 else SIDES[::-1]     # drift hits both sides alike
            for run_name, run in runs.items():
                specs = build_specs(run.workload, max(1, math.ceil(run.workload.num_prompts * scale)), tokenizer, rnd)
                warm = build_specs(run.workload, run.warmup, tokenizer, 10_000 + rnd) if run.warmup else []
                for side_name in order:
                    side, other = sides[side_name], sides[SIDES[1 - SIDES.index(side_name)]]
                    if warm:
                        asyncio.run(run_load(side.url, side.key, peer.model.name, side.requests(warm),
                                             concurrency=min(run.concurrency, len(warm))))
                    s = measure(side, other, peer.model.name, side.requests(specs), run.concurrency)
                    s["round"] = rnd
                    per_run[run_name][side_name].append(s)
                    print(f"round {rnd} {run_name} {side_name}: front {s['cpu_ms_per_request']['front']:.2f} "
                          f"ms/req, {s['request_throughput']:.1f} req/s, TTFT p99 {_fmt(_get(s, 'ttft_ms.p99'))} "
                          f"ms, {_fmt(s['chunks_per_request'])} chunks/req, failed {s['failed']}", flush=True)
    return [{"run": name, "setup": setup_name, "concurrency": run.concurrency, "workload": run.workload.model_dump(),
             "sides": {side: {"runs": xs, "median": {m: _median([_get(x, m) for x in xs]) for m in HEADLINE}}
                       for side, xs in per_run[name].items()}}
            for name, run in runs.items()]


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def markdown_table(report: dict) -> str:
    m = report["machine"]
    lines = [f"## {report['peer']} ({report['date']}, median of {report['rounds']} interleaved rounds, "
             f"scale {report['scale']})", "",
             f"{m['cpus']} × {m['cpu']}; Python {m['python']}; ai-dynamo {m['ai-dynamo']}; commit {m['commit']}",
             "", "| run | c | Dynamo frontend CPU ms/req | slurmserve head CPU ms/req | head ÷ frontend "
             "| req/s D / S | TTFT p50 ms D / S | TTFT p99 ms D / S | chunks/req D / S | failed D / S "
             "| S router process ms/req |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        d, s = r["sides"]["dynamo"]["median"], r["sides"]["slurmserve"]["median"]
        df, sf = d["cpu_ms_per_request.front"], s["cpu_ms_per_request.front"]
        ratio = f"{sf / df:.2f}" if df and sf is not None else "-"
        pair = lambda k: f"{_fmt(d[k])} / {_fmt(s[k])}"  # noqa: E731
        lines.append(f"| {r['run']} | {r['concurrency']} | {_fmt(df)} | {_fmt(sf)} | {ratio} | "
                     f"{pair('request_throughput')} | {pair('ttft_ms.p50')} | {pair('ttft_ms.p99')} | "
                     f"{pair('chunks_per_request')} | {pair('failed')} | {_fmt(s['cpu_ms_per_request.front_process'])} |")
    lines.append("")
    for name, st in report["setups"].items():
        lines.append(f"- setup {name}: speedup {st['speedup']}, {st['num_kv_blocks']} KV blocks of "
                     f"{st['block_size']}, {st.get('http_workers', 1)} slurmserve front-end process(es); load average before {st['loadavg_before'][0]:.2f}, "
                     f"after {st['loadavg_after'][0]:.2f}")
    return "\n".join(lines) + "\n"


def register(bsub) -> None:
    p = bsub.add_parser("peer", help="slurmserve's head against Dynamo's frontend, A/B interleaved")
    p.add_argument("file", type=Path, help="peer file, e.g. bench/scenarios/head-vs-dynamo.yaml")
    p.add_argument("-o", "--out", type=Path, help="report directory (default: runs/bench/<file stem>)")
    p.add_argument("--rounds", type=positive_int, help="override the file's rounds")
    p.add_argument("--scale", type=positive_float, default=1.0,
                   help="multiply every run's num_prompts (e.g. 0.05 for a smoke run)")
    p.add_argument("--run", action="append", metavar="NAME",
                   help="only this run of the file (repeatable); its setup alone is started")
    p.set_defaults(func=lambda a: run_peer(a.file, a.out or Path("runs/bench") / a.file.stem,
                                           a.rounds, a.scale, a.run) and 0)
