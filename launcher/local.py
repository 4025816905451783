"""`slurmserve serve CONFIG`: run a deployment on this machine by starting `mpirun` itself.

mpirun gets its own session, so a terminal's Ctrl-C reaches only us; we then send SIGUSR2, which
Open MPI forwards to every rank, and the head drains and shuts the workers down. SIGTERM and SIGHUP
(the terminal or the ssh connection went away) do the same. If that does not finish in time, SIGTERM
(and finally SIGKILL) goes to the whole mpirun process group.

The deployment never outlives us: the kernel sends mpirun SIGTERM when we die, even by kill -9
(PR_SET_PDEATHSIG), mpirun then stops its ranks, and a rank whose mpirun was killed outright aborts
on its own within seconds (it loses its PMIx server).

Open MPI's wire stays on this machine: the ranks talk over shared memory (btl vader: no TCP listener
at all) and mpirun's out-of-band TCP uses loopback. Open MPI 4.1's mpirun still binds that listener
to every address (it only advertises loopback): README, "What MPI's wire protects".
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slurmserve.config import DeploymentConfig
from slurmserve.job_secret import SECRET_ENV, write_job_secret
from slurmserve.stale_dirs import remove_stale_dirs
from slurmserve.launcher.rank_main import HEAD_EXIT_FILE, array_task_log_dir

PR_SET_PDEATHSIG = 1
SHM_PREFIX = "slurmserve-mpi-"


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
    """Run the deployment until it ends; the head's exit code (mpirun's own is 0 in recovery mode).
    Non-zero whenever the head did not end by itself: a head that never wrote its exit code was
    killed or never started."""
    head_exit = array_task_log_dir(cfg.log_dir) / HEAD_EXIT_FILE    # where rank 0 writes it
    head_exit.unlink(missing_ok=True)
    rc = _run_mpirun(cfg, mpirun_command(cfg, config_path, overrides))
    try:    # the head's word: whether the deployment ended cleanly (an engine rank killed on the way
        return int(head_exit.read_text())       # may or may not change mpirun's own status)
    except (OSError, ValueError):
        print(f"slurmserve serve: the head (rank 0) ended without an exit code (killed?); see "
              f"{head_exit.parent / 'rank-0.log'}", file=sys.stderr)
        return rc or 1


def mpi_env(shm_dir: str) -> dict[str, str]:
    """Open MPI settings for a deployment on this machine; the user's own OMPI_MCA_* win."""
    defaults = {
        "OMPI_MCA_pmix_server_max_wait": "10",
        # one host: shared memory between ranks, so no rank listens on TCP (btl tcp binds every
        # address whatever btl_tcp_if_include says). In a private directory: a killed job's segments
        # are removed with it instead of piling up in /dev/shm. No single-copy: CMA needs ptrace rights
        # that containers often lack, and MPI only carries a few small allgathers here.
        "OMPI_MCA_btl": "self,vader",
        "OMPI_MCA_btl_vader_backing_directory": shm_dir,
        "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
        "OMPI_MCA_btl_tcp_if_include": "lo",     # should someone choose btl tcp after all
        "OMPI_MCA_oob_tcp_if_include": "lo",     # mpirun <-> ranks control traffic
    }
    return dict(defaults, **os.environ)


def _die_with_us():
    """A preexec_fn that makes the kernel send the child SIGTERM when we die (Linux), or None.
    PR_SET_PDEATHSIG fires when the *thread* that forked the child ends: call Popen from the thread
    that lives as long as we do (serve runs mpirun from the main thread)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl   # looked up before the fork
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:      # we died before prctl took effect: nobody would signal it
            os.kill(os.getpid(), signal.SIGTERM)
    return preexec


def _shm_base() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else Path(tempfile.gettempdir())


def _run_mpirun(cfg: DeploymentConfig, cmd: list[str]) -> int:
    base = _shm_base()
    remove_stale_dirs(base, SHM_PREFIX)     # of earlier serves that were killed
    shm_dir = tempfile.mkdtemp(prefix=f"{SHM_PREFIX}{os.getpid()}-", dir=base)    # mode 0700
    try:
        # the ranks derive the deployment's CURVE keys from this (slurmserve/job_secret.py)
        secret = write_job_secret(Path(shm_dir) / "job_secret")
        return _supervise(cfg, cmd, dict(mpi_env(shm_dir), **{SECRET_ENV: str(secret)}))
    finally:
        shutil.rmtree(shm_dir, ignore_errors=True)


def _supervise(cfg: DeploymentConfig, cmd: list[str], env: dict[str, str]) -> int:
    proc = subprocess.Popen(cmd, start_new_session=True, env=env, preexec_fn=_die_with_us())
    stopping = {"at": None}

    def forward(signum, frame):
        if stopping["at"] is None:
            stopping["at"] = time.monotonic()
            _signal_group(proc, signal.SIGUSR2)
        else:   # a second Ctrl-C: stop now
            _signal_group(proc, signal.SIGTERM)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):   # SIGHUP: the terminal went away
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
