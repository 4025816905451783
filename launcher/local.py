"""`slurmserve serve CONFIG`: run a deployment on this machine by starting `mpirun` itself.

mpirun gets its own session, so a terminal's Ctrl-C reaches only us; we then send SIGUSR2, which
Open MPI forwards to every rank, and the head drains and shuts the workers down. If that does not
finish in time, SIGTERM (and finally SIGKILL) goes to the whole mpirun process group.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

from slurmserve.config import DeploymentConfig
from slurmserve.runtime.rank_main import HEAD_EXIT_FILE


def mpirun_command(cfg: DeploymentConfig, config_path: str | None, overrides: list[str]) -> list[str]:
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise SystemExit("slurmserve serve: mpirun not found; install Open MPI (see README: make install)")
    cmd = [mpirun, "-n", str(cfg.world_size), "--oversubscribe", "--bind-to", "none",
           # keep serving when one engine rank dies instead of killing the whole job
           "--mca", "orte_enable_recovery", "1", "--mca", "orte_abort_on_non_zero_status", "0"]
    for name in ("PATH", "PYTHONPATH", "VIRTUAL_ENV", "PYTHONHASHSEED"):
        if name in os.environ:
            cmd += ["-x", name]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += [sys.executable, "-m", "slurmserve", "run"]
    if config_path is not None:
        cmd.append(config_path)
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def serve(cfg: DeploymentConfig, config_path: str | None, overrides: list[str]) -> int:
    """Run the deployment until it ends; the head's exit code (mpirun's own is 0 in recovery mode)."""
    head_exit = cfg.log_dir / HEAD_EXIT_FILE
    head_exit.unlink(missing_ok=True)
    rc = _run_mpirun(cfg, mpirun_command(cfg, config_path, overrides))
    try:
        return rc or int(head_exit.read_text())
    except (OSError, ValueError):   # the head never got to write it (killed): mpirun's word stands
        return rc


def _run_mpirun(cfg: DeploymentConfig, cmd: list[str]) -> int:
    env = dict(os.environ, OMPI_MCA_pmix_server_max_wait="10")
    proc = subprocess.Popen(cmd, start_new_session=True, env=env)
    stopping = {"at": None}

    def forward(signum, frame):
        if stopping["at"] is None:
            stopping["at"] = time.monotonic()
            _signal_group(proc, signal.SIGUSR2)
        else:   # a second Ctrl-C: stop now
            _signal_group(proc, signal.SIGTERM)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    grace = cfg.runtime.shutdown_grace_s + 5.0
    while True:
        try:
            return _exit_code(proc.wait(timeout=0.2))
        except subprocess.TimeoutExpired:
            pass
        if stopping["at"] is not None and time.monotonic() - stopping["at"] > grace:
            _signal_group(proc, signal.SIGTERM)
            try:
                return _exit_code(proc.wait(timeout=5))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                return _exit_code(proc.wait())


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        if sig == signal.SIGUSR2:
            proc.send_signal(sig)        # mpirun forwards USR1/USR2 to every rank
        else:
            os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _exit_code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc
