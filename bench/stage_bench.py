"""`slurmserve bench stage`: weight staging on a Slurm cluster, MPI broadcast against every node
reading the shared source itself (`model.stage: node-local`), then a rerun that reuses the copies.

    slurmserve bench stage --gb 2 --shards 4 --nodes 4 --mb-per-s 100 --repeats 3

Each run is one `srun --mpi=pmix` step, one rank per node unless `--ranks-per-node`; the ranks run
`python -m slurmserve.bench.stage_bench ranks CONFIG`, which times `stage_weights` between two
barriers (so srun and MPI start-up are reported apart). `--mb-per-s` puts the source behind
bench/throttle_fs.py (a FUSE mirror with one bandwidth shared by all readers, a model of a busy
parallel filesystem); 0 reads it directly. At the end every node's copy is read back and hashed
against the source, independently of the staging code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

HASH_CHUNK = 16 << 20


# ---- the model --------------------------------------------------------------------------------

def make_model(out: Path, total_bytes: int, shards: int, seed: int = 0) -> Path:
    """The tiny Llama's config and tokenizer plus `shards` random safetensors files of about
    `total_bytes` together (one uint8 tensor each). Reused when already there with these sizes."""
    import numpy as np
    from safetensors.numpy import save_file

    from slurmserve.tools.tiny_model import make_tiny_model

    make_tiny_model(out)
    per = total_bytes // shards
    rng = np.random.default_rng(seed)
    for i in range(shards):
        p = out / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        if p.exists() and abs(p.stat().st_size - per) < 1 << 20:
            continue
        tmp = p.with_name(f".{p.name}.tmp")
        save_file({f"shard{i}.weight": rng.integers(0, 256, per, dtype=np.uint8)}, str(tmp))
        os.replace(tmp, p)
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(HASH_CHUNK):
            h.update(block)
    return h.hexdigest()


# ---- one rank (under srun) ----------------------------------------------------------------------

def rank_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="stage_bench ranks")
    ap.add_argument("config", type=Path)
    ap.add_argument("--result", type=Path, required=True, help="rank 0 writes the timings here")
    ap.add_argument("--chunk-bytes", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--head-rank", action="store_true",
                    help="rank 0 is a head that loads no weights (alone on its node: --head own-node)")
    a = ap.parse_args(argv)
    t_start = time.time()
    os.environ.setdefault("OMPI_MCA_btl", "self,tcp")   # what runtime/bootstrap.py gives a deployment
    from mpi4py import MPI

    from slurmserve.config import load_config
    from slurmserve.runtime.weight_stage import (CHUNK_BYTES, PROGRESS_FILE, StageError, resolve_mode,
                                                 stage_weights)

    t_init = time.time()
    comm = MPI.COMM_WORLD
    cfg = load_config(a.config, a.overrides)
    comm.Barrier()
    t0 = time.monotonic()
    error = None
    try:
        path = stage_weights(cfg, comm, a.chunk_bytes or CHUNK_BYTES,
                             needs_weights=not (a.head_rank and comm.Get_rank() == 0))
    except StageError as e:
        path, error = None, str(e)
    seconds = time.monotonic() - t0
    comm.Barrier()
    import socket
    ranks = comm.gather(dict(rank=comm.Get_rank(), host=socket.gethostname(), path=str(path) if path else None,
                             error=error, mpi_init_s=round(t_init - t_start, 3),
                             stage_s=round(seconds, 3)), root=0)
    if comm.Get_rank() == 0:
        try:
            progress = json.loads((cfg.log_dir / PROGRESS_FILE).read_text())
        except OSError:
            progress = None
        nodes = len({r["host"] for r in ranks})
        staged = len({r["host"] for r in ranks if not (a.head_rank and r["rank"] == 0)})
        a.result.write_text(json.dumps(dict(
            mode=resolve_mode(cfg.model.stage, staged), nodes=nodes, stage_s=max(r["stage_s"] for r in ranks),
            mpi_init_s=max(r["mpi_init_s"] for r in ranks), progress=progress, ranks=ranks), indent=1) + "\n")
    if error:
        print(f"slurmserve: {error}", file=sys.stderr)
        return 2
    return 0


# ---- the driver -------------------------------------------------------------------------------

def run_step(config: Path, nodes: int, result: Path, ranks_per_node: int = 1, overrides=(),
             chunk_bytes: int | None = None, timeout: float = 900,
             nodelist: str | None = None, head_rank: bool = False) -> tuple[dict, subprocess.CompletedProcess]:
    """One srun step of the rank driver; (rank 0's result, the finished srun). `head_rank`: rank 0
    stands for a head alone on the first node (pass ranks_per_node 1), which needs no copy."""
    cmd = ["srun", "--mpi=pmix", f"--nodes={nodes}", f"--ntasks={nodes * ranks_per_node}",
           f"--ntasks-per-node={ranks_per_node}", "--kill-on-bad-exit=1"]
    if nodelist:
        cmd.append(f"--nodelist={nodelist}")     # the same nodes again: a requeue's case
    cmd += [sys.executable, "-m", "slurmserve.bench.stage_bench", "ranks", str(config), "--result", str(result)]
    if chunk_bytes:
        cmd += ["--chunk-bytes", str(chunk_bytes)]
    if head_rank:
        cmd.append("--head-rank")
    for o in overrides:
        cmd += ["--set", o]
    result.unlink(missing_ok=True)
    t = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.monotonic() - t
    out = json.loads(result.read_text()) if result.exists() else {}
    out["srun_wall_s"] = round(wall, 3)
    return out, r


def node_names(nodes: int) -> list[str]:
    listed = subprocess.run(["sinfo", "-h", "-o", "%N"], capture_output=True, text=True, check=True).stdout.split()
    names = subprocess.run(["scontrol", "show", "hostnames", ",".join(listed)], capture_output=True, text=True,
                           check=True).stdout.split()
    return names[:nodes]


def node_dirs(template: str, names: list[str]) -> dict[str, Path]:
    """Each node's stage dir, as the node would expand `template` ($SLURMD_NODENAME)."""
    return {n: Path(template.replace("${SLURMD_NODENAME}", n).replace("$SLURMD_NODENAME", n)) for n in names}


def clear_copies(dirs: dict[str, Path]) -> None:
    for d in dirs.values():
        shutil.rmtree(d / f"slurmserve-stage-{os.getuid()}", ignore_errors=True)


class ThrottledSource:
    """bench/throttle_fs.py mounted over `src` while in use."""

    def __init__(self, src: Path, mnt: Path, mb_per_s: float):
        self.src, self.mnt, self.mb_per_s, self.proc = src, mnt, mb_per_s, None

    def __enter__(self) -> Path:
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "slurmserve.bench.throttle_fs", str(self.src),
                                      str(self.mnt), "--mb-per-s", str(self.mb_per_s)],
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read() if self.proc.poll() is not None else "timeout"
                raise SystemExit(f"bench stage: cannot mount the throttled source at {self.mnt}: {err.strip()[-300:]}")
            time.sleep(0.1)
        return self.mnt

    def __exit__(self, *exc) -> None:
        self.proc.terminate()          # libfuse unmounts on SIGTERM
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            subprocess.run(["umount", "-l", str(self.mnt)], check=False)


def cmd_stage(a) -> int:
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    src = make_model(work / "model" / "big-random", int(a.gb * 1e9), a.shards)
    total = sum(p.stat().st_size for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
    names = node_names(a.nodes)
    dirs = node_dirs(a.stage_dir, names)
    results: dict[str, list[dict]] = {}
    cfg_path = work / "stage.yaml"

    def step(mode: str, model_path: Path, label: str) -> dict:
        cfg = {"model": {"path": str(model_path), "name": "big-random", "stage": mode, "stage_dir": a.stage_dir},
               "engine": {"kind": "sim"}, "pools": {"workers": 1}, "log_dir": str(work / "logs")}
        cfg_path.write_text(yaml.safe_dump(cfg))
        out, r = run_step(cfg_path, a.nodes, work / "result.json", a.ranks_per_node)
        if r.returncode != 0 or "stage_s" not in out:
            raise SystemExit(f"bench stage: {label} failed (srun exit {r.returncode}): {r.stderr.strip()[-800:]}")
        print(f"{label}: {out['stage_s']:.2f} s staging ({total / 1e9 / out['stage_s']:.2f} GB/s per node), "
              f"srun {out['srun_wall_s']:.2f} s", file=sys.stderr)
        results.setdefault(label, []).append(out)
        return out

    def staged(mode: str, model_path: Path) -> None:
        for _ in range(a.repeats):
            clear_copies(dirs)
            step(mode, model_path, mode)

    if a.mb_per_s > 0:
        with ThrottledSource(src, work / "shared", a.mb_per_s) as mnt:
            for mode in a.modes:
                staged(mode, mnt)
            for _ in range(a.repeats):      # the copies of the last run are valid: a requeue reuses them
                step("broadcast", mnt, "requeue (reuse)")
        source = mnt
    else:
        for mode in a.modes:
            staged(mode, src)
        for _ in range(a.repeats):
            step("broadcast", src, "requeue (reuse)")
        source = src
    checks = verify_copies(src, source, dirs)
    report = dict(date=time.strftime("%Y-%m-%d"), host=os.uname().nodename, cpus=os.cpu_count(), gb=total / 1e9,
                  files=len([p for p in src.iterdir() if not p.name.startswith(".")]), nodes=a.nodes,
                  ranks_per_node=a.ranks_per_node, mb_per_s=a.mb_per_s, stage_dir=a.stage_dir,
                  medians={k: statistics.median(r["stage_s"] for r in v) for k, v in results.items()},
                  srun_medians={k: statistics.median(r["srun_wall_s"] for r in v) for k, v in results.items()},
                  mpi_init_medians={k: statistics.median(r["mpi_init_s"] for r in v) for k, v in results.items()},
                  runs={k: [r["stage_s"] for r in v] for k, v in results.items()}, checksums=checks,
                  command=" ".join(["slurmserve", "bench", "stage"] + sys.argv[sys.argv.index("stage") + 1:]))
    a.result_json.parent.mkdir(parents=True, exist_ok=True)
    a.result_json.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))
    return 0


def verify_copies(src: Path, staged_from: Path, dirs: dict[str, Path]) -> dict:
    """sha256 of every source file (read directly, not through the throttle) against each node's
    manifest and against the node's copy read back from its disk."""
    from slurmserve.runtime.weight_stage import MANIFEST, list_source, local_target, stage_root

    files = list_source(src)
    want = {f.path: sha256_file(src / f.path) for f in files}
    nodes = {}
    for name, d in dirs.items():
        target = local_target(stage_root(str(d)), staged_from)
        manifest = {e["path"]: e["sha256"] for e in json.loads((target / MANIFEST).read_text())["files"]}
        on_disk = {f.path: sha256_file(target / f.path) for f in files}
        nodes[name] = dict(dir=str(target), manifest_matches=manifest == want, disk_matches=on_disk == want)
    return dict(source=want, nodes=nodes)


def markdown(r: dict) -> str:
    med = r["medians"]
    lines = [f"{r['gb']:.2f} GB ({r['files']} files), {r['nodes']} nodes x {r['ranks_per_node']} rank(s), "
             f"source {'throttled to ' + format(r['mb_per_s'], 'g') + ' MB/s aggregate (FUSE)' if r['mb_per_s'] else 'unthrottled'}, "
             f"stage dir `{r['stage_dir']}`; median of {len(next(iter(r['runs'].values())))} runs.", "",
             "| run | staging, median (s) | runs (s) | srun wall, median (s) | MPI init, median (s) |",
             "|---|---|---|---|---|"]
    for k in med:
        lines.append(f"| {k} | {med[k]:.2f} | {', '.join(f'{x:.2f}' for x in r['runs'][k])} | "
                     f"{r['srun_medians'][k]:.2f} | {r['mpi_init_medians'][k]:.2f} |")
    lines += ["", "| file | sha256 |", "|---|---|"]
    lines += [f"| {p} | `{h}` |" for p, h in r["checksums"]["source"].items()]
    ok = all(n["manifest_matches"] and n["disk_matches"] for n in r["checksums"]["nodes"].values())
    lines += ["", f"Every node's manifest and its copy read back from disk match the source: {'yes' if ok else 'NO'} "
              f"({', '.join(r['checksums']['nodes'])})."]
    return "\n".join(lines)


def register(bsub) -> None:
    p = bsub.add_parser("stage", help="weight staging on Slurm: MPI broadcast vs every node reading the source")
    p.add_argument("--gb", type=float, default=2.0, help="size of the generated model (random safetensors shards)")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--ranks-per-node", type=int, default=1)
    p.add_argument("--mb-per-s", type=float, default=100.0,
                   help="aggregate bandwidth of the shared source (FUSE throttle); 0: read it directly")
    p.add_argument("--modes", nargs="+", default=["node-local", "broadcast"], choices=["node-local", "broadcast"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stage-dir", default="/var/spool/slurmd/$SLURMD_NODENAME/tmp",
                   help="model.stage_dir ($SLURMD_NODENAME: each test-cluster node's TmpFS)")
    p.add_argument("--work", type=Path, default=Path("runs/bench/stage"), help="model, logs, mount point")
    p.add_argument("--result-json", type=Path, default=Path("runs/bench/stage.json"))
    p.set_defaults(func=cmd_stage)


if __name__ == "__main__":
    if sys.argv[1:2] == ["ranks"]:
        raise SystemExit(rank_main(sys.argv[2:]))
    ap = argparse.ArgumentParser(prog="stage_bench")
    register(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args()
    raise SystemExit(args.func(args))
