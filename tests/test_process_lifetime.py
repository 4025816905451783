"""A local deployment lives exactly as long as `slurmserve serve` (kill -9 and SIGHUP included), says
when its head did not end by itself, and keeps Open MPI's wire on this machine. Real mpirun, simulated
engines. The Slurm job script's Open MPI settings are checked on the rendered script."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import yaml

from slurmserve.config import load_config
from slurmserve.tools.local_deployment import LocalDeployment
from slurmserve.launcher.sbatch import render_sbatch
from slurmserve.slurm_config import SiteConfig, SlurmOptions

LOOPBACK = {"127.0.0.1", "::1"}


def sim_config(model_dir, workers: int = 2) -> dict:
    return {
        "model": {"path": str(model_dir), "name": "tiny-llama", "max_model_len": 512},
        "engine": {"kind": "sim", "sim": {"speedup": 1.0, "num_kv_blocks": 256, "block_size": 16}},
        "pools": {"workers": workers},
        "router": {"host": "127.0.0.1", "port": 0},
        "runtime": {"heartbeat_interval_s": 0.25, "heartbeat_timeout_s": 1.5, "shutdown_grace_s": 2},
    }


def wait_gone(dep: LocalDeployment, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while dep.pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    return dep.pids()


def serve_log(dep: LocalDeployment) -> str:
    return (dep.dir / "serve.log").read_text(errors="replace")


def test_kill9_of_serve_ends_the_whole_deployment(tiny_model_dir, tmp_path):
    """No orphaned deployment: mpirun gets SIGTERM from the kernel when serve dies, and the ranks
    end with mpirun."""
    dep = LocalDeployment(tmp_path, sim_config(tiny_model_dir)).start()
    try:
        assert len(dep.pids()) >= 5, dep.pids()     # serve, mpirun, head, 2 workers
        dep.proc.kill()
        dep.proc.wait()
        leftover = wait_gone(dep, 15)
    finally:
        dep.kill()
    assert leftover == [], f"left running after kill -9 of serve: {leftover}"


def test_sighup_drains_like_sigterm(tiny_model_dir, tmp_path):
    """An ssh disconnect (SIGHUP) drains the deployment and ends it, instead of killing serve alone."""
    dep = LocalDeployment(tmp_path, sim_config(tiny_model_dir)).start()
    try:
        rc = dep.stop(signal.SIGHUP, timeout=30)
        leftover = wait_gone(dep, 10)
    finally:
        dep.kill()
    assert rc == 0, serve_log(dep)[-4000:]
    assert leftover == [], leftover
    assert "draining" in (dep.dir / "logs" / "rank-0.log").read_text()


def test_serve_fails_when_the_head_is_killed(tiny_model_dir, tmp_path):
    """mpirun (recovery mode) exits 0 whatever its ranks did; a head that never wrote its exit code
    did not drain, and serve says so with a non-zero code."""
    dep = LocalDeployment(tmp_path, sim_config(tiny_model_dir)).start()
    try:
        os.kill(dep.info["pid"], signal.SIGKILL)
        rc = dep.proc.wait(timeout=60)
        leftover = wait_gone(dep, 10)
    finally:
        dep.kill()
    out = serve_log(dep)
    assert rc != 0, out[-4000:]
    assert "slurmserve serve: the head (rank 0) ended without an exit code (killed?)" in out, out[-4000:]
    assert leftover == [], leftover


def _listeners(pid: int) -> list[tuple[str, int]]:
    return [(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections("inet")
            if c.status == psutil.CONN_LISTEN]


def _uri_hosts(uri: str) -> list[str]:
    """Hosts of an Open MPI/PMIx contact URI, e.g. '123.0;tcp://127.0.0.1:4000,10.0.0.1:4000'."""
    hosts = []
    for part in uri.split(";")[1:]:
        for addr in part.split("//", 1)[-1].split(","):
            hosts.append(addr.rsplit(":", 1)[0].strip("[]"))
    return hosts


def test_open_mpi_stays_on_loopback(tiny_model_dir, tmp_path):
    """Ranks listen on loopback only (they talk over shared memory, not btl tcp), mpirun advertises
    loopback only, and its only other listeners are the out-of-band ones that Open MPI 4.1 binds to
    every address whatever oob_tcp_if_include says (README, "What MPI's wire protects")."""
    dep = LocalDeployment(tmp_path, sim_config(tiny_model_dir)).start()
    try:
        procs = [psutil.Process(pid) for pid in dep.pids()]
        mpirun = [p for p in procs if p.name() == "mpirun"]
        ranks = [p for p in procs if "run" in p.cmdline() and p.name() != "mpirun"]
        assert len(mpirun) == 1 and len(ranks) == 3, [p.cmdline() for p in procs]
        for rank in ranks:
            assert {ip for ip, _ in _listeners(rank.pid)} <= LOOPBACK, (rank.cmdline(), _listeners(rank.pid))
            env = rank.environ()
            for name in ("OMPI_MCA_orte_hnp_uri", "PMIX_SERVER_URI41"):
                assert name in env and set(_uri_hosts(env[name])) <= LOOPBACK, (name, env.get(name))
        hnp_port = int(ranks[0].environ()["OMPI_MCA_orte_hnp_uri"].rsplit(":", 1)[1])
        exposed = [(ip, port) for ip, port in _listeners(mpirun[0].pid) if ip not in LOOPBACK]
        assert {ip for ip, _ in exposed} <= {"0.0.0.0", "::"} and len(exposed) <= 2, exposed
        assert all(port == hnp_port for ip, port in exposed if ip == "0.0.0.0"), (exposed, hnp_port)
    finally:
        dep.stop()
        dep.kill()


def test_sbatch_script_keeps_open_mpi_on_the_jobs_interface(tiny_model_dir, tmp_path):
    cfg_path = tmp_path / "dep.yaml"
    cfg_path.write_text(yaml.safe_dump(dict(sim_config(tiny_model_dir), log_dir=str(tmp_path / "logs"))))
    cfg = load_config(cfg_path)

    def render(site: SiteConfig, overrides=()) -> str:
        return render_sbatch(load_config(cfg_path, list(overrides)), cfg_path, SlurmOptions(nodes=2), site,
                             list(overrides), cluster=None, warn=lambda m: None)

    script = render(SiteConfig(interface="ib0"))
    assert "export OMPI_MCA_btl_tcp_if_include=ib0\n" in script
    assert "export OMPI_MCA_oob_tcp_if_include=ib0\n" in script
    assert script.index("export OMPI_MCA_btl_tcp_if_include") < script.index("srun --mpi")
    # the config's runtime.interface wins over the site's
    script = render(SiteConfig(interface="ib0"), ["runtime.interface=hsn0"])
    assert "export OMPI_MCA_btl_tcp_if_include=hsn0\n" in script and "=ib0\n" not in script
    # no interface named: Open MPI chooses, and the script sets nothing
    assert cfg.runtime.interface is None and "OMPI_MCA_" not in render(SiteConfig())
