"""Faults at start-up and while serving (issue 20): a job that fails ends fast and says why, and a
stall of the head does not make the engines leave it. Real mpirun, real ranks; the Slurm cases run
on the test cluster (`slurm` mark)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from slurmserve.tools.local_deployment import LocalDeployment
from slurmserve.launcher.rank_main import HEAD_ERROR_FILE, KV_DIR_PREFIX, kv_private_dir
from test_serve_sim import MODEL, sim_config
from test_slurm_launcher import cluster  # noqa: F401 - the test cluster fixture


def kv_dirs() -> set[str]:
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith(KV_DIR_PREFIX)}


def wait_exit(dep: LocalDeployment, timeout: float) -> int:
    try:
        return dep.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        dep.kill()
        pytest.fail(f"serve still running after {timeout} s:\n{dep.output()}")


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"{what} within {timeout} s"
        time.sleep(0.1)


# ---- start-up failures --------------------------------------------------------------------------

def test_an_engine_that_fails_to_start_ends_the_deployment_with_its_cause(tiny_model_dir, tmp_path):
    """vLLM refuses an unknown engine argument. The job used to hang until its time limit with the
    head "serving"; now `serve` ends with a failure code and one line naming the cause, the rank and
    its log, and nothing is left running (no rank, no private KV-event directory)."""
    cfg = sim_config(tiny_model_dir, workers=1)
    cfg["engine"] = {"kind": "vllm", "args": {"bogus_arg": 1, "max_num_seqs": 4}}
    dep = LocalDeployment(tmp_path, cfg).launch()
    assert wait_exit(dep, 120) == 1, dep.output()
    out = dep.output()
    line = "engine instance 0 failed to start on rank 1: ValueError: engine.args: not vLLM engine arguments: bogus_arg"
    assert line in out
    assert f"(log: {dep.dir / 'logs' / 'rank-1.log'})" in out
    assert (dep.dir / "logs" / HEAD_ERROR_FILE).read_text().startswith(line)
    wait_for(lambda: dep.pids() == [], 10, "every process gone")
    ranks = [i["pid"] for i in json.loads((dep.dir / "logs" / "endpoint.json").read_text())["instances"]]
    assert [d for d in kv_dirs() if d[len(KV_DIR_PREFIX):].split("-")[0] in map(str, ranks)] == [], \
        "a failed rank left its KV-event directory"


def test_a_rank_that_dies_while_starting_fails_the_job_unless_min_instances_allows(tiny_model_dir, tmp_path):
    """An engine rank killed during its (simulated) model load sends nothing: its heartbeats stop.
    By default the job fails; with runtime.min_instances=1 the other instance serves alone."""
    for min_instances in (None, 1):
        cfg = sim_config(tiny_model_dir, workers=2)
        cfg["engine"]["sim"]["load_time_s"] = 12.0
        if min_instances:
            cfg["runtime"]["min_instances"] = min_instances
        dep = LocalDeployment(tmp_path, cfg, name=f"min-{min_instances}").launch()
        endpoint = dep.dir / "logs" / "endpoint.json"
        wait_for(endpoint.exists, 60, "the head listens")
        victim = json.loads(endpoint.read_text())["instances"][0]["pid"]
        time.sleep(1.0)   # its first heartbeats reach the head
        os.kill(victim, signal.SIGKILL)
        if min_instances is None:
            assert wait_exit(dep, 60) == 1, dep.output()
            assert "engine instance 0 (worker) fell silent while starting" in dep.output()
            wait_for(lambda: dep.pids() == [], 10, "every process gone")
        else:
            try:
                wait_for(lambda: dep.health() == 200, 60, "the partly started pool serves")
                dep.info = json.loads(endpoint.read_text())
                r = dep.client().completions.create(model=MODEL, prompt="still here", max_tokens=3)
                assert r.usage.completion_tokens == 3
            finally:
                assert dep.stop() == 0, dep.output()
                dep.kill()


def test_an_engine_start_that_hangs_ends_the_job_after_engine_start_timeout_s(tiny_model_dir, tmp_path):
    """An engine whose start never ends (vLLM waits for ever when its NIXL side-channel port was
    taken; here a simulated load far longer than the limit) used to keep the job "starting" until
    its time limit, its rank heartbeating ready=False. Now the start fails after
    runtime.engine_start_timeout_s and the job ends with that reason."""
    cfg = sim_config(tiny_model_dir, workers=1)
    cfg["engine"]["sim"]["load_time_s"] = 600.0
    cfg["runtime"]["engine_start_timeout_s"] = 3.0
    dep = LocalDeployment(tmp_path, cfg).launch()
    assert wait_exit(dep, 60) == 1, dep.output()
    line = "engine instance 0 failed to start on rank 1: TimeoutError: the engine did not start within 3 s"
    assert line in dep.output()
    assert (dep.dir / "logs" / HEAD_ERROR_FILE).read_text().startswith(line)
    wait_for(lambda: dep.pids() == [], 10, "every process gone")


def test_engine_ports_are_picked_outside_the_ephemeral_range():
    """The ports an engine binds itself (NIXL side channel, KV events) are picked free but bound a
    moment later; outside the kernel's ephemeral range no outgoing connection on the node can take
    one meanwhile (before: bind to port 0, right inside that range)."""
    from slurmserve.runtime.bootstrap import PRIVATE_PORTS_FROM, _ephemeral_low, free_port
    low = _ephemeral_low()
    ports = [free_port("127.0.0.1") for _ in range(50)]
    assert all(PRIVATE_PORTS_FROM <= p < low for p in ports), (low, ports)
    assert len(set(ports)) > 10


def test_a_head_that_fails_at_startup_ends_the_job_at_once(tiny_model_dir, tmp_path):
    """An empty tokenizer.json kills the head while it loads the tokenizer, before it has spoken to
    any engine. The engines used to wait a minute for it; its closed port now tells them at once."""
    model = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, model)
    (model / "tokenizer.json").write_text("")
    cfg = sim_config(model, workers=2)
    started = time.time()
    dep = LocalDeployment(tmp_path, cfg).launch()
    assert wait_exit(dep, 60) == 1, dep.output()
    assert time.time() - started < 30, "the engines waited for a head that had gone"
    error = (dep.dir / "logs" / HEAD_ERROR_FILE).read_text()
    assert error.startswith("the head failed: ") and "rank-0.log" in error
    wait_for(lambda: dep.pids() == [], 10, "every process gone")


def test_an_empty_api_key_file_is_one_line_at_once(tiny_model_dir, tmp_path):
    key = tmp_path / "key"
    key.write_text("\n")
    cfg = dict(sim_config(tiny_model_dir, workers=1), api_key_file=str(key))
    dep = LocalDeployment(tmp_path, cfg).launch()
    assert wait_exit(dep, 20) == 2
    out = dep.output()
    assert f"api_key_file {key} is empty" in out and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1, out
    assert dep.pids() == []


def test_stale_kv_directories_are_cleaned_at_start(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{KV_DIR_PREFIX}{dead.pid}-abc"
    live = tmp_path / f"{KV_DIR_PREFIX}{os.getpid()}-def"
    stale.mkdir()
    live.mkdir()
    mine = Path(kv_private_dir(str(tmp_path)))
    assert not stale.exists() and live.exists()
    assert mine.name.startswith(f"{KV_DIR_PREFIX}{os.getpid()}-") and (mine.stat().st_mode & 0o777) == 0o700


# ---- while serving ------------------------------------------------------------------------------

def test_a_pool_that_loses_every_instance_ends_the_deployment(tiny_model_dir, tmp_path):
    """Nothing restarts an engine rank: a deployment whose only worker was killed used to answer 503
    forever. Now it ends, says why, and `serve` exits 1."""
    dep = LocalDeployment(tmp_path, sim_config(tiny_model_dir, workers=1)).start()
    try:
        os.kill(dep.info["instances"][0]["pid"], signal.SIGKILL)
        assert wait_exit(dep, 30) == 1, dep.output()
    finally:
        dep.kill()
    assert (dep.dir / "logs" / HEAD_ERROR_FILE).read_text().startswith("no worker instance is left (")
    wait_for(lambda: dep.pids() == [], 10, "every process gone")


def test_engines_do_not_leave_a_head_that_stalls(tiny_model_dir, tmp_path):
    """The head's process is stopped for 9 s (longer than the engines' old 5 s silence limit), as a
    loop blocked by a huge request would be. Its connections stay open, so the engines wait; once it
    runs again, it serves as before."""
    cfg = sim_config(tiny_model_dir, workers=2)
    with LocalDeployment(tmp_path, cfg) as dep:
        c = dep.client()
        os.kill(dep.info["pid"], signal.SIGSTOP)
        try:
            time.sleep(9)
        finally:
            os.kill(dep.info["pid"], signal.SIGCONT)
        wait_for(lambda: dep.health() == 200, 10, "healthy again")
        for i in range(4):
            r = c.completions.create(model=MODEL, prompt=f"after the stall {i}", max_tokens=4)
            assert r.usage.completion_tokens == 4
        assert "shutting down" not in dep.output()


# ---- on Slurm: the registry says why, and `stop` says what a short grace cut -------------------

@pytest.fixture
def slurm_state(tmp_path, monkeypatch):
    d = tmp_path / "state"
    monkeypatch.setenv("SLURMSERVE_STATE_DIR", str(d))
    monkeypatch.delenv("SLURMSERVE_SITE", raising=False)
    return d


@pytest.mark.slurm
def test_a_failed_job_ends_and_status_and_wait_say_why(cluster, slurm_state, tmp_path, tiny_model_dir):
    """The head dies loading an empty tokenizer.json. `wait` used to return after about a minute with
    only FAILED / NonZeroExitCode; now the registry holds the head's error and the job has ended."""
    from test_slurm_launcher import assert_nothing_left, cli, sim_dict, write_config
    model = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, model)
    (model / "tokenizer.json").write_text("")
    cfg = write_config(tmp_path, sim_dict(model, tmp_path / "logs", workers=2))
    r = cli("submit", str(cfg), "--nodes", "1", "--time", "5", "--partition", cluster)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()
    try:
        r = cli("wait", job, "--timeout", "60")
        assert r.returncode == 1 and f"job {job} failed: the head failed: " in r.stderr, r.stderr
        # the log that holds the traceback: the head's, or its front end's when it runs several
        assert re.search(r"(rank-0|frontend-\d)\.log", r.stderr) and len(r.stderr.strip().splitlines()) == 1
        st = json.loads(cli("status", job, "--json").stdout)
        assert st["status"] == "failed" and st["error"].startswith("the head failed: ")
        assert f"job {job} failed: the head failed" in cli("status").stdout
        wait_for(lambda: json.loads(cli("status", job, "--json").stdout)["slurm_state"] == "FAILED", 30,
                 "the job ended as FAILED")
    finally:
        cli("stop", job)
    assert_nothing_left(job, str(cfg))
    assert registry_status(job) == "failed", "stop must not overwrite the recorded failure"


def registry_status(job: str) -> str:
    from slurmserve import registry
    return registry.read_entry(job)["status"]


@pytest.mark.slurm
def test_stop_says_how_many_requests_a_short_grace_cut(cluster, slurm_state, tmp_path, tiny_model_dir):
    from openai import OpenAI
    from slurmserve.launcher.slurm_cli import connection, wait_ready
    from test_slurm_launcher import _inflight, assert_nothing_left, cli, sim_dict, write_config

    data = sim_dict(tiny_model_dir, tmp_path / "logs", speedup=0.2, workers=2)
    data["runtime"]["shutdown_grace_s"] = 1     # the head's own drain: shorter than the requests
    cfg = write_config(tmp_path, data)
    r = cli("submit", str(cfg), "--nodes", "1", "--time", "5", "--partition", cluster)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()
    try:
        wait_ready(job, 150)
        url, key = connection(job)
        results: list = []
        threads = _inflight(OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60), 2, results)
        time.sleep(1.0)     # 400 tokens at ~30 ms each: far longer than the grace
        r = cli("stop", job, "--grace", "20")
    finally:
        cli("stop", job)
    for t in threads:
        t.join(60)
    assert r.returncode == 0 and "drained; 2 request(s) still running were cut" in r.stdout, \
        r.stdout + r.stderr
    assert_nothing_left(job, str(cfg))
