"""`slurmserve bench ready`: sbatch -> ready of a real deployment, broken into its phases.

    slurmserve bench ready --engine sim --nodes 2 --workers 2 --repeats 3

Each run submits the deployment as `slurmserve submit` does, polls `/health` until it answers 200,
then stops the job. The breakdown joins three clocks:
- this process: before the submission, and the first `/health` 200;
- Slurm: the job's start (`scontrol show job`, else `sacct`; whole seconds);
- rank 0's `timeline` in the job registry (slurmserve/registry.py): its process start, the end of the
  MPI bootstrap, of weight staging, and when every engine instance was up.

Phases (consecutive, so they sum to the total): queue wait (the sbatch call included), srun/rank
start, MPI bootstrap (Python start-up and imports included), weight staging, engine start, first
health. Every node's staged copy is removed before each run, so every run stages (the test
cluster's node dirs are all on this host). The issue's target, bootstrap + staging overhead
<= 5 s + bytes/bandwidth, is checked with the bandwidth of one plain copy of the model into a node's
stage dir, measured first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

PHASES = ("queue wait", "srun/rank start", "MPI bootstrap", "weight staging", "engine start", "first health")
POLL_S = 0.05           # /health and registry polling: the resolution of "first health"
TARGET_FIXED_S = 5.0    # issue 24: bootstrap + staging overhead <= 5 s + bytes/bandwidth
# vLLM on a CPU-only test node (tests/vllm_cpu.py): fp32, eager, a small KV cache
VLLM_CPU_ARGS = {"dtype": "float32", "enforce_eager": True, "block_size": 32, "kv_cache_memory_bytes": "256MiB"}


def deployment(a, log_dir: Path) -> dict:
    engine: dict = {"kind": a.engine}
    if a.engine == "sim":
        engine["sim"] = {"speedup": 20.0, "num_kv_blocks": 256, "block_size": 16}
    else:
        engine["args"] = json.loads(a.engine_args) if a.engine_args else VLLM_CPU_ARGS
    return {"model": {"path": str(a.model), "name": a.model.name, "max_model_len": 1024,
                      "stage": a.stage, "stage_dir": a.stage_dir},
            "engine": engine, "pools": {"workers": a.workers},
            "router": {"port": 0, "policy": "round_robin"},
            "runtime": {"heartbeat_interval_s": 0.25, "heartbeat_timeout_s": 30.0, "shutdown_grace_s": 5},
            "log_dir": str(log_dir)}


def slurm_times(job_id: str) -> tuple[float | None, float | None]:
    """(submit, start) in epoch seconds, as Slurm records them (whole seconds)."""
    r = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    fields = dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)
    pair = (fields.get("SubmitTime"), fields.get("StartTime"))
    if None in pair:      # the controller forgot the job: accounting still has it
        r = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "Submit,Start"],
                           capture_output=True, text=True)
        pair = tuple((r.stdout.strip().splitlines() or ["|"])[0].split("|")[:2])

    def epoch(s: str | None) -> float | None:
        try:
            return time.mktime(time.strptime(s, "%Y-%m-%dT%H:%M:%S"))
        except (TypeError, ValueError):
            return None
    return epoch(pair[0]), epoch(pair[1])


def wait_health(job_id: str, timeout: float) -> float:
    """Epoch seconds of the first GET /health 200. Reads the registry (a local file) for the URL
    and checks Slurm only every 2 s, so the polling costs little on a small machine."""
    from slurmserve import registry
    from slurmserve.launcher.sbatch import job_state
    from slurmserve.launcher.slurm_cli import health

    deadline = time.monotonic() + timeout
    next_slurm = 0.0
    while time.monotonic() < deadline:
        entry = registry.read_entry(job_id) or {}
        if entry.get("url") and health(entry["url"], timeout=2.0) == 200:
            return time.time()
        if entry.get("status") == "failed":
            raise SystemExit(f"bench ready: job {job_id} failed: {entry.get('error')}")
        if time.monotonic() > next_slurm:
            next_slurm = time.monotonic() + 2.0
            st = job_state(job_id)
            if st.ended:
                raise SystemExit(f"bench ready: job {job_id} ended ({st.state}) before it was ready; "
                                 f"`slurmserve logs {job_id}`")
        time.sleep(POLL_S)
    raise SystemExit(f"bench ready: job {job_id} not ready after {timeout:g} s")


def breakdown(t0: float, slurm_start: float | None, timeline: dict, healthy: float) -> dict:
    """Consecutive phases (seconds) from the anchors; they sum to healthy - t0 by construction.
    Slurm's start has whole seconds: it is kept between the submission and the rank's start.
    The registry's `ready` is stamped by a 0.1 s poll in the head: a /health 200 proves it was earlier."""
    rank_start = timeline["rank_start"]
    start = min(max(slurm_start if slurm_start is not None else t0, t0), rank_start)
    anchors = [t0, start, rank_start, timeline["bootstrapped"], timeline["staged"],
               min(timeline["ready"], healthy), healthy]
    return {name: round(b - a, 3) for name, a, b in zip(PHASES, anchors, anchors[1:])}


def one_run(a, work: Path, k: int, dirs: dict) -> dict:
    from slurmserve.bench.stage_bench import clear_copies
    from slurmserve.config import load_config
    from slurmserve import registry
    from slurmserve.launcher.sbatch import submit
    from slurmserve.launcher.slurm_cli import stop_job
    from slurmserve.slurm_config import SlurmError
    from slurmserve.runtime.weight_stage import PROGRESS_FILE

    log_dir = work / f"run-{k}"
    shutil.rmtree(log_dir, ignore_errors=True)
    cfg_path = work / f"ready-{k}.yaml"
    cfg_path.write_text(yaml.safe_dump(deployment(a, log_dir)))
    cfg = load_config(cfg_path, a.overrides)
    clear_copies(dirs)
    opts = {"nodes": a.nodes, "time": a.time, "head": a.head, **({"partition": a.partition} if a.partition else {})}
    t0 = time.time()
    try:
        job = submit(cfg, cfg_path, opts, None, a.overrides)
    except SlurmError as e:
        raise SystemExit(f"bench ready: {e}") from None
    submitted = time.time()
    try:
        healthy = wait_health(job, a.timeout)
        submit_s, start_s = slurm_times(job)
        deadline = time.monotonic() + 10     # the head stamps `ready` on a 0.1 s poll: it may trail the 200
        while "ready" not in ((entry := registry.read_entry(job) or {}).get("timeline") or {}) \
                and time.monotonic() < deadline:
            time.sleep(POLL_S)
    finally:
        stop_job(job, grace_s=10)
    timeline = entry.get("timeline") or {}
    missing = [p for p in ("rank_start", "bootstrapped", "staged", "ready") if timeline.get(p) is None]
    if missing:
        raise SystemExit(f"bench ready: job {job}'s registry timeline lacks {missing}: {timeline}")
    try:
        stage = json.loads((log_dir / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        stage = {}    # model.stage none: nothing staged
    phases = breakdown(t0, start_s, timeline, healthy)
    run = dict(job=job, phases=phases, total_s=round(healthy - t0, 3), sbatch_call_s=round(submitted - t0, 3),
               slurm_queue_s=None if None in (submit_s, start_s) else start_s - submit_s,
               head_listening_after_staging_s=round(timeline.get("listening", timeline["staged"])
                                                     - timeline["staged"], 3),
               stage_mode=stage.get("mode", "none"), stage_state=stage.get("state"),
               stage_bytes=stage.get("bytes_total", 0), timeline=timeline)
    print(f"run {k + 1}: job {job}, {run['total_s']:.2f} s: "
          + ", ".join(f"{p} {s:.2f}" for p, s in phases.items()), file=sys.stderr)
    return run


def copy_bandwidth(src: Path, dest_root: Path) -> float:
    """Bytes/s of one plain copy of the model's files into a node's stage dir, flushed to disk."""
    dest_root.mkdir(parents=True, exist_ok=True)
    files = [p for p in src.rglob("*") if p.is_file() and not p.name.startswith(".")]
    with tempfile.TemporaryDirectory(dir=dest_root, prefix=".bench-ready-copy-") as tmp:
        t = time.monotonic()
        for i, p in enumerate(files):
            out = Path(tmp) / f"{i}"
            shutil.copyfile(p, out)
            with open(out, "rb+") as f:
                os.fsync(f.fileno())
        seconds = time.monotonic() - t
    return sum(p.stat().st_size for p in files) / max(seconds, 1e-6)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cmd_ready(a) -> int:
    from slurmserve.bench.stage_bench import node_dirs, node_names

    a.model = a.model.expanduser().resolve()
    if not a.model.is_dir():
        from slurmserve.tools.tiny_model import make_tiny_model
        make_tiny_model(a.model)
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True, mode=0o700)
    dirs = node_dirs(a.stage_dir, node_names(1 << 20))   # all: Slurm picks the job's nodes
    bandwidth = copy_bandwidth(a.model, next(iter(dirs.values())))
    load_before = load_average()
    runs = [one_run(a, work, k, dirs) for k in range(a.repeats)]
    med = {p: statistics.median(r["phases"][p] for r in runs) for p in PHASES}
    nbytes = max(r["stage_bytes"] for r in runs)
    # the part of start-up the target is about: from Slurm's start to the staged weights
    overhead = statistics.median(sum(r["phases"][p] for p in PHASES[1:4]) for r in runs)
    allowed = TARGET_FIXED_S + nbytes / bandwidth
    report = dict(
        date=time.strftime("%Y-%m-%d %H:%M %Z"), host=os.uname().nodename, cpus=os.cpu_count(),
        load_before=load_before, load_after=load_average(), engine=a.engine, nodes=a.nodes,
        workers=a.workers, model=str(a.model), model_bytes=nbytes, copy_bandwidth_mb_s=round(bandwidth / 1e6, 1),
        medians=med, total_median_s=statistics.median(r["total_s"] for r in runs),
        overhead_median_s=round(overhead, 3), target_s=round(allowed, 3), target_met=overhead <= allowed,
        runs=runs, command=" ".join(["slurmserve", "bench", "ready"] + sys.argv[sys.argv.index("ready") + 1:]))
    a.result_json.parent.mkdir(parents=True, exist_ok=True)
    a.result_json.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))
    return 0


def markdown(r: dict) -> str:
    n = len(r["runs"])
    lines = [f"{r['engine']}, {r['workers']} worker(s) on {r['nodes']} node(s), model {r['model_bytes'] / 1e6:.2f} MB "
             f"staged {r['runs'][0]['stage_mode']}; {r['host']} ({r['cpus']} CPUs), load {r['load_before']} before, "
             f"{r['load_after']} after; {r['date']}.", "",
             "| phase (s) | " + " | ".join(f"run {i + 1}" for i in range(n)) + (" | median |" if n > 1 else " |"),
             "|---|" + "---|" * (n + (n > 1))]
    for p in PHASES + ("total",):
        vals = [run["phases"][p] if p != "total" else run["total_s"] for run in r["runs"]]
        med = r["medians"][p] if p != "total" else r["total_median_s"]
        lines.append(f"| {p} | " + " | ".join(f"{v:.2f}" for v in vals) + (f" | {med:.2f} |" if n > 1 else " |"))
    lines += ["", f"Bootstrap + staging overhead (srun/rank start + MPI bootstrap + weight staging), median: "
              f"{r['overhead_median_s']:.2f} s; target 5 s + {r['model_bytes'] / 1e6:.2f} MB / "
              f"{r['copy_bandwidth_mb_s']:.0f} MB/s = {r['target_s']:.2f} s: {'met' if r['target_met'] else 'NOT met'}."]
    return "\n".join(lines)


def register(bsub) -> None:
    p = bsub.add_parser("ready", help="sbatch -> ready on Slurm, broken into queue wait, bootstrap, staging, "
                                      "engine start and first health")
    p.add_argument("--engine", choices=["sim", "vllm"], default="sim")
    p.add_argument("--model", type=Path, default=Path("~/.cache/slurmserve/tiny-llama"),
                   help="model directory (the tiny Llama is generated there when missing)")
    p.add_argument("--engine-args", help="vllm: engine.args as JSON (default: a CPU-only set)")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--head", choices=["shared", "own-node"], default="shared",
                   help="own-node: the first node runs only the head (one worker on 2 nodes, say)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stage", default="auto", choices=["auto", "broadcast", "node-local", "none"])
    p.add_argument("--stage-dir", default="/var/spool/slurmd/$SLURMD_NODENAME/tmp",
                   help="model.stage_dir ($SLURMD_NODENAME: each test-cluster node's TmpFS)")
    p.add_argument("--partition")
    p.add_argument("--time", default="15", help="each job's time limit (minutes or Slurm format)")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for each run's /health 200")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="deployment config overrides (repeatable)")
    p.add_argument("--work", type=Path, default=Path("runs/bench/ready"), help="configs and log dirs")
    p.add_argument("--result-json", type=Path, default=Path("runs/bench/ready.json"))
    p.set_defaults(func=cmd_ready)
