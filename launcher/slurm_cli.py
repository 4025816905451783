"""`slurmserve sbatch|submit|status|wait|logs|stop`: deployments as Slurm jobs, from the login node.

    slurmserve sbatch CONFIG [--nodes N ...] [-o FILE]   print (or write) the job script
    slurmserve submit CONFIG [--nodes N ...]             submit it; prints the job id
    slurmserve status [JOB] [--json]                     Slurm state, readiness, endpoint, time left
    slurmserve wait JOB [--timeout S]                    until the endpoint serves; prints its URL
    slurmserve logs JOB [--rank R] [-f]                  the batch log, or one rank's log
    slurmserve stop JOB                                  drain (SIGUSR2), then cancel

The job registry (`slurmserve.registry`) connects them: the head records its endpoint, API
key and readiness there. The functions below (`job_status`, `wait_ready`, `stop_job`, `connection`)
are also what the submitit `Deployment` uses.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from slurmserve import registry
from slurmserve.slurm_config import SlurmError, format_time, load_site


# ---- what the CLI and the submitit Deployment share -------------------------------------------------

def _entry(job_id: str) -> dict:
    entry = registry.read_entry(job_id)
    if entry is None:
        raise SlurmError(f"no slurmserve job {job_id} in the registry ({registry.jobs_dir(create=False)})")
    return entry


def _endpoint_fallback(entry: dict) -> dict:
    """For a head that never wrote the registry (`SLURMSERVE_REGISTRY=0`, or a head without the
    registry hook): the endpoint from `<log_dir>/endpoint.json`, when it was written by this job."""
    if entry.get("started") or not entry.get("log_dir"):
        return entry
    path = Path(entry["log_dir"]) / "endpoint.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return entry
    if float(info.get("started", 0)) < float(entry.get("submitted") or 0) - 5:
        return entry      # an earlier deployment's, in the same log directory
    key = None
    try:
        key = Path(info["api_key_file"]).read_text().strip()
    except (OSError, KeyError):
        pass
    return dict(entry, host=info.get("host"), port=info.get("port"), url=info.get("url"), api_key=key,
                endpoint_source=str(path))


def health(url: str | None, timeout: float = 2.0) -> int:
    """HTTP status of GET /health at the endpoint (`url` ends in /v1); 0 when unreachable."""
    if not url:
        return 0
    base = url.removesuffix("/").removesuffix("/v1")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # compute nodes: no proxy
    try:
        with opener.open(base + "/health", timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ValueError):
        return 0


def job_status(job_id: str, with_secret: bool = False) -> dict:
    """The registry entry with Slurm's view added: `slurm_state`, `time_left`, `nodes`, `ready`.
    The API key is left out unless `with_secret`."""
    from slurmserve.launcher.sbatch import job_state

    entry = _endpoint_fallback(_entry(job_id))
    st = job_state(job_id)
    status = entry.get("status")
    if st.ended and status not in ("exited", "failed"):
        status = "exited"              # the head did not get to say so (killed, node failure)
    ready = status == "ready"
    if not ready and st.state == "RUNNING" and status == "starting" and entry.get("endpoint_source"):
        ready = health(entry.get("url")) == 200
        status = "ready" if ready else status
    out = dict(entry, status=status, ready=ready, slurm_state=st.state, time_left=st.time_left,
               nodes=st.nodes, reason=st.reason)
    if status == "starting" and entry.get("log_dir"):
        from slurmserve.runtime.weight_stage import progress_summary
        out["stage"] = progress_summary(entry["log_dir"])     # weights being staged: GB, GB/s, ETA
    if not with_secret:
        out.pop("api_key", None)
    return out


def connection(job_id: str) -> tuple[str, str]:
    """(base URL, API key) of a running deployment, for an OpenAI client."""
    info = job_status(job_id, with_secret=True)
    if not info.get("url") or not info.get("api_key"):
        raise SlurmError(f"job {job_id} has no endpoint yet (Slurm: {info['slurm_state']}, "
                         f"status: {info['status']}); try `slurmserve wait {job_id}`")
    return info["url"], info["api_key"]


def wait_ready(job_id: str, timeout: float | None = None, poll_s: float = 0.5) -> dict:
    """Until the deployment serves; SlurmError when the job ends first or the timeout passes."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        info = job_status(job_id)
        if info["ready"]:
            return info
        if info["status"] == "failed":     # the head said why; the job is ending
            raise SlurmError(f"job {job_id} failed: {info.get('error') or 'see `slurmserve logs ' + job_id + '`'}")
        if info["slurm_state"] not in ("UNKNOWN",) and info["slurm_state"] not in _ACTIVE():
            raise SlurmError(f"job {job_id} ended ({info['slurm_state']}) before it was ready; see "
                             f"`slurmserve logs {job_id}`")
        if deadline is not None and time.monotonic() > deadline:
            raise SlurmError(f"job {job_id} not ready after {timeout:g} s (Slurm: {info['slurm_state']}"
                             f"{', ' + info['reason'] if info.get('reason') else ''}; status: {info['status']})")
        time.sleep(poll_s)


def _ACTIVE() -> set[str]:
    from slurmserve.launcher.sbatch import ACTIVE_STATES
    return ACTIVE_STATES


def stop_job(job_id: str, grace_s: float | None = None, say=lambda msg: None) -> str:
    """Drain, then cancel: mark the stop in the registry (so the head does not requeue), send SIGUSR2,
    wait up to the grace period for the head to report `exited` (or the job to end), then `scancel`
    whatever is left and wait for Slurm to finish the job. Returns how it ended."""
    from slurmserve.launcher.sbatch import cancel_job, job_state, signal_job

    entry = _entry(job_id)
    st = job_state(job_id)
    if st.ended or st.state == "UNKNOWN":
        _mark_exited(job_id)
        return f"job {job_id} had already ended ({st.state})"
    registry.write_entry(job_id, stop_requested=True)
    how = "cancelled"
    if st.state == "RUNNING":
        grace = float(grace_s if grace_s is not None else entry.get("grace_s") or 60)
        # sbatch scripts from our template trap SIGUSR2, so --full is safe there and also reaches a
        # batch-level wrapper; other batch shells (submitit's) would die of it and end the job at once.
        signal_job(job_id, "USR2", full=entry.get("launcher") == "sbatch")
        say(f"job {job_id}: draining (up to {grace:g} s)")
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            e = registry.read_entry(job_id) or {}
            if e.get("status") == "exited" or job_state(job_id).ended:
                how = "drained"
                break
            time.sleep(0.25)
        else:
            how = f"cancelled after a {grace:g} s drain"
        if how == "drained":      # the ranks are exiting: give the job a moment to end by itself
            settle = time.monotonic() + 10
            while time.monotonic() < settle and job_state(job_id).active:
                time.sleep(0.25)
    cancel_job(job_id)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        st = job_state(job_id)
        if not st.active:
            break
        time.sleep(0.25)
    else:
        raise SlurmError(f"job {job_id} is still {st.state} 120 s after scancel")
    _mark_exited(job_id)
    # the head counts the requests its drain (or scancel's SIGTERM) ended before they were done
    cut = int((registry.read_entry(job_id) or {}).get("cut_requests") or 0)
    if cut:
        how += f"; {cut} request(s) still running were cut"
    return f"job {job_id} stopped ({how}; Slurm: {st.state})"


def _mark_exited(job_id: str) -> None:
    """`exited`, unless the head recorded that the job failed: that stays, with its reason."""
    if (registry.read_entry(job_id) or {}).get("status") != "failed":
        registry.update_status(job_id, "exited")


# ---- the commands ------------------------------------------------------------------------------------

def _clean_errors(func):
    """One-line errors, no tracebacks: SlurmError/OSError print `slurmserve: ...` and exit 1."""
    @functools.wraps(func)
    def wrapper(args) -> int:
        try:
            return func(args)
        except SlurmError as e:
            print(f"slurmserve {args.command}: {e}", file=sys.stderr)
            return 1
        except OSError as e:
            print(f"slurmserve {args.command}: {e.strerror or e}: {e.filename or ''}".rstrip(": "),
                  file=sys.stderr)
            return 1
    return wrapper


def _opts_from_args(args) -> dict:
    keys = ("nodes", "partition", "account", "qos", "time", "gpus_per_node", "head", "mpi", "grace_s",
            "job_name", "cpus_per_task", "instances_per_node", "mem")
    out = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if args.requeue:
        out["requeue"] = True
    return out


def _prepare(args):
    from slurmserve.config import load_config
    from slurmserve.slurm_config import options_from
    if getattr(args, "batch", None):      # a batch run: its files travel as --set overrides
        from slurmserve.launcher.batch.cli import batch_overrides
        from slurmserve.launcher.batch.files import BatchError
        if not args.batch_output:
            raise SlurmError("--batch needs --batch-output OUT.jsonl")
        try:
            args.overrides = list(args.overrides) + batch_overrides(
                args.batch, args.batch_output, args.batch_errors, args.shard, args.ordered)
        except BatchError as e:
            raise SlurmError(str(e)) from None
    cfg = load_config(args.config, args.overrides)
    site = load_site(args.site)
    opts = options_from(_opts_from_args(args), "command line")
    return cfg, site, opts


@_clean_errors
def cmd_sbatch(args) -> int:
    from slurmserve.launcher.sbatch import render_sbatch
    cfg, site, opts = _prepare(args)
    script = render_sbatch(cfg, args.config, opts, site, args.overrides)
    if args.output:
        Path(args.output).write_text(script)
        print(f"wrote {args.output}; submit it with: sbatch {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(script)
    return 0


@_clean_errors
def cmd_submit(args) -> int:
    from slurmserve.launcher.sbatch import submit
    cfg, site, opts = _prepare(args)
    job_id = submit(cfg, args.config, opts, site, args.overrides)
    print(job_id)
    print(f"submitted job {job_id}; `slurmserve wait {job_id}` waits for the endpoint, "
          f"`slurmserve stop {job_id}` drains it", file=sys.stderr)
    return 0


def _age(ts) -> str:
    return format_time(max(0, time.time() - float(ts))) if ts else "-"


@_clean_errors
def cmd_status(args) -> int:
    if args.job:
        rows = [job_status(args.job)]
    else:
        rows = [job_status(e["job_id"]) for e in registry.list_entries()]
    if args.json:
        print(json.dumps(rows if not args.job else rows[0], indent=2, sort_keys=True))
        return 0
    if not rows:
        print(f"no jobs in {registry.jobs_dir(create=False)}", file=sys.stderr)
        return 0
    table = [("JOB", "SLURM", "STATUS", "ENDPOINT", "TIME LEFT", "MODEL", "NODES")]
    for r in rows:
        url = r.get("url") if r["status"] != "exited" else None
        table.append((str(r["job_id"]), r["slurm_state"], r["status"], url or "-",
                      r.get("time_left") or "-", r.get("model") or "-", r.get("nodes") or "-"))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    for r in rows:
        if r["status"] == "failed" and r.get("error"):
            print(f"job {r['job_id']} failed: {r['error']}")
        elif r["status"] == "starting" and r.get("stage"):
            print(f"job {r['job_id']}: {r['stage']}")
    return 0


@_clean_errors
def cmd_wait(args) -> int:
    info = wait_ready(args.job, args.timeout)
    print(info["url"])
    return 0


def _log_file(entry: dict, rank: int | None) -> Path:
    if rank is None:
        if entry.get("batch_log"):
            return Path(entry["batch_log"])
        if not entry.get("log_dir"):
            raise SlurmError(f"job {entry['job_id']} records no log directory")
        return Path(entry["log_dir"]) / f"slurm-{entry['job_id']}.out"
    ws = entry.get("world_size")
    if rank < 0 or (ws and rank >= ws):
        raise SlurmError(f"--rank {rank}: job {entry['job_id']} has ranks 0..{ws - 1}")
    return Path(entry["log_dir"]) / f"rank-{rank}.log"


@_clean_errors
def cmd_logs(args) -> int:
    from slurmserve.launcher.sbatch import job_state
    entry = _entry(args.job)
    path = _log_file(entry, args.rank)
    if not args.follow:
        if not path.exists():
            raise SlurmError(f"no log yet at {path} (Slurm: {job_state(args.job).state})")
        sys.stdout.write(path.read_text(errors="replace"))
        return 0
    pos, quiet_since = 0, None
    try:
        while True:
            if path.exists():
                with open(path, "rb") as f:
                    f.seek(pos)
                    data = f.read()
                if data:
                    pos += len(data)
                    sys.stdout.write(data.decode(errors="replace"))
                    sys.stdout.flush()
                    quiet_since = None
                    continue
            # Stop following 2 s after the job has ended and the file went quiet.
            if job_state(args.job).ended:
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since > 2:
                    return 0
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0


@_clean_errors
def cmd_stop(args) -> int:
    msg = stop_job(args.job, args.grace, say=lambda m: print(m, file=sys.stderr))
    print(msg)
    return 0


def _slurm_option_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="deployment YAML (default: the embedded default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable); passed on to every rank")
    g = p.add_argument_group("Slurm options (override the config's and the site file's)")
    g.add_argument("--nodes", "-N", type=int, help="nodes (default: the fewest the pools fit on)")
    g.add_argument("--partition", "-p")
    g.add_argument("--account", "-A")
    g.add_argument("--qos", "-q")
    g.add_argument("--time", "-t", help="time limit, e.g. 2:00:00 or 1-00:00:00")
    g.add_argument("--gpus-per-node", type=int, dest="gpus_per_node")
    g.add_argument("--cpus-per-task", type=int, dest="cpus_per_task")
    g.add_argument("--instances-per-node", type=int, dest="instances_per_node")
    g.add_argument("--mem", help="memory per node, e.g. 64G")
    g.add_argument("--head", choices=["shared", "own-node"], help="where the head runs (default: shared)")
    g.add_argument("--mpi", help="srun --mpi plugin (default: the site's, else pmix)")
    g.add_argument("--grace", type=int, dest="grace_s", metavar="SECONDS",
                   help="SIGUSR2 this long before the time limit (default: shutdown grace + 30, >= 60)")
    g.add_argument("--job-name", "-J", dest="job_name")
    g.add_argument("--requeue", action="store_true",
                   help="on the preemption warning, drain and requeue the job (else drain and exit)")
    g.add_argument("--site", metavar="FILE", help="site file (default: $SLURMSERVE_SITE or "
                                                  "~/.config/slurmserve/site.yaml)")
    g = p.add_argument_group("offline batch (`slurmserve batch` as a job; requeued jobs resume)")
    g.add_argument("--batch", metavar="IN.jsonl", help="run this OpenAI batch file, then exit")
    g.add_argument("--batch-output", metavar="OUT.jsonl", help="its answers (required with --batch)")
    g.add_argument("--batch-errors", metavar="ERR.jsonl", help="its error records (default: OUT)")
    g.add_argument("--shard", metavar="I/N", help="default: from the job array (sbatch --array=0-N-1)")
    g.add_argument("--ordered", action="store_true", help="records in input order")


def register(subparsers) -> None:
    """Adds sbatch, submit, status, wait, logs and stop to the `slurmserve` command line."""
    p = subparsers.add_parser("sbatch", help="print the Slurm job script for a deployment")
    _slurm_option_args(p)
    p.add_argument("-o", "--output", metavar="FILE", help="write the script to FILE")
    p.set_defaults(func=cmd_sbatch, command="sbatch")

    p = subparsers.add_parser("submit", help="submit a deployment as a Slurm job; prints the job id")
    _slurm_option_args(p)
    p.set_defaults(func=cmd_submit, command="submit")

    p = subparsers.add_parser("status", help="Slurm state, readiness, endpoint and time left of jobs")
    p.add_argument("job", nargs="?", help="job id (default: every job in the registry)")
    p.add_argument("--json", action="store_true", help="machine-readable (the API key is left out)")
    p.set_defaults(func=cmd_status, command="status")

    p = subparsers.add_parser("wait", help="wait until a job's endpoint serves; prints its URL")
    p.add_argument("job")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS")
    p.set_defaults(func=cmd_wait, command="wait")

    p = subparsers.add_parser("logs", help="a job's batch log, or one rank's log")
    p.add_argument("job")
    p.add_argument("--rank", "-r", type=int, help="rank R's log (0 is the head)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing as the log grows")
    p.set_defaults(func=cmd_logs, command="logs")

    p = subparsers.add_parser("stop", help="drain a job (SIGUSR2), then cancel it")
    p.add_argument("job")
    p.add_argument("--grace", type=float, default=None, metavar="SECONDS",
                   help="how long to let it drain before scancel (default: the job's grace)")
    p.set_defaults(func=cmd_stop, command="stop")


def main(argv: list[str] | None = None) -> int:
    """`python -m slurmserve.launcher.slurm_cli ...`: these commands without the rest of the CLI."""
    from slurmserve.config import ConfigError
    ap = argparse.ArgumentParser(prog="slurmserve")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register(sub)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"slurmserve: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
