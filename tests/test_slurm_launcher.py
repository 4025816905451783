"""Slurm launcher: job-script rendering, validation before submission, the job registry, and (on the
test cluster, `slurm` mark) real deployments via sbatch and via submitit: ready, queried with the
openai client and the job's secret, stopped with nothing left behind, requeued after a preemption
warning.

Regenerate the recorded job scripts with `SLURMSERVE_REGEN_FIXTURES=1 pytest tests/test_slurm_launcher.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from slurmserve import __version__
from slurmserve.config import ConfigError, load_config
from slurmserve import registry
from slurmserve.launcher.sbatch import ClusterInfo, plan_layout, render_sbatch, resolved_for
from slurmserve.slurm_config import (SiteConfig, SlurmError, SlurmOptions, load_site, options_from,
                                              parse_time)

FIXTURES = Path(__file__).parent / "fixtures"
MODEL = "tiny-llama"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    """Every test gets its own registry (inherited by the jobs it submits)."""
    d = tmp_path / "state"
    monkeypatch.setenv("SLURMSERVE_STATE_DIR", str(d))
    monkeypatch.delenv("SLURMSERVE_SITE", raising=False)
    return d


def sim_dict(model_dir, log_dir, speedup: float = 20.0, **pools) -> dict:
    return {
        "model": {"path": str(model_dir), "name": MODEL, "max_model_len": 512},
        "engine": {"kind": "sim", "sim": {"speedup": speedup, "num_kv_blocks": 256, "block_size": 16}},
        "pools": pools or {"workers": 4},
        "router": {"port": 0, "policy": "round_robin"},   # host unset: the head node's address
        "runtime": {"heartbeat_interval_s": 0.25, "heartbeat_timeout_s": 1.5, "shutdown_grace_s": 10},
        "log_dir": str(log_dir),
    }


def write_config(tmp_path: Path, data: dict, name: str = "dep.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.fixture
def fake_model(tmp_path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    return d


# ---- rendering: recorded scripts ----------------------------------------------------------------

def normalize(script: str, tmp_path: Path, state_dir: Path) -> str:
    return (script.replace(str(state_dir), "{STATE_DIR}").replace(str(tmp_path), "{TMP}")
            .replace(sys.executable, "{PYTHON}").replace(f"slurmserve {__version__}", "slurmserve {VERSION}"))


def check_fixture(name: str, text: str) -> None:
    path = FIXTURES / name
    if os.environ.get("SLURMSERVE_REGEN_FIXTURES") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with SLURMSERVE_REGEN_FIXTURES=1"
    assert text == path.read_text(), f"rendered script differs from {path} (SLURMSERVE_REGEN_FIXTURES=1 updates it)"


def bash_syntax_ok(script: str, tmp_path: Path) -> None:
    f = tmp_path / "check.sbatch"
    f.write_text(script)
    r = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_render_sim_two_nodes_matches_fixture(tmp_path, state_dir, fake_model):
    data = sim_dict(fake_model, tmp_path / "logs")
    data["router"]["host"] = "127.0.0.1"
    cfg_path = write_config(tmp_path, data)
    cfg = load_config(cfg_path)
    site = SiteConfig(modules=["openmpi/4.1"], setup=["source /opt/venv/bin/activate"], account="proj")
    warnings = []
    script = render_sbatch(cfg, cfg_path, SlurmOptions(nodes=2, time="30", requeue=True, partition="debug"),
                           site, ["router.policy=least_loaded"], cluster=None, warn=warnings.append)
    check_fixture("sbatch-sim-2node.sbatch", normalize(script, tmp_path, state_dir))
    bash_syntax_ok(script, tmp_path)
    assert any("router.host=127.0.0.1" in w for w in warnings)
    # what the issue asks of the script, spelled out
    for line in ("#SBATCH --job-name=slurmserve-tiny-llama", "#SBATCH --nodes=2", "#SBATCH --ntasks=5",
                 "#SBATCH --ntasks-per-node=3", "#SBATCH --partition=debug", "#SBATCH --account=proj",
                 "#SBATCH --time=00:30:00", "#SBATCH --signal=USR2@60", "#SBATCH --requeue",
                 f"#SBATCH --output={tmp_path}/logs/slurm-%j.out", "module load openmpi/4.1",
                 "export SLURMSERVE_REQUEUE=scontrol"):
        assert line in script, line
    assert f"-m slurmserve run {cfg_path} --set router.policy=least_loaded" in script
    assert "--mpi=pmix" in script and "--distribution=arbitrary" in script
    assert "CUDA_VISIBLE_DEVICES" not in script          # no GPUs for the simulator


def test_render_vllm_gpus_own_node_head_matches_fixture(tmp_path, state_dir, fake_model):
    data = sim_dict(fake_model, tmp_path / "logs", workers=6)
    data["engine"] = {"kind": "vllm", "tensor_parallel_size": 2}
    cfg_path = write_config(tmp_path, data)
    cfg = load_config(cfg_path)
    site = SiteConfig(partition="gpu", gpus_per_node=4, container="apptainer exec --nv /images/vllm.sif",
                      mpi="pmix", interface="ib0", time="2:00:00")
    script = render_sbatch(cfg, cfg_path, SlurmOptions(head="own-node"), site, [], cluster=None,
                           warn=lambda m: None)
    check_fixture("sbatch-vllm-tp2-own-node.sbatch", normalize(script, tmp_path, state_dir))
    bash_syntax_ok(script, tmp_path)
    assert "#SBATCH --nodes=4" in script and "#SBATCH --gpus-per-node=4" in script
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --time=02:00:00" in script
    assert 'slots=("" "0,1" "2,3" "0,1" "2,3" "0,1" "2,3")' in script
    assert '"$RANK_WRAPPER" apptainer exec --nv /images/vllm.sif' in script
    assert "--set runtime.interface=ib0" in script


def test_config_slurm_section_is_honoured(tmp_path, fake_model):
    """A `slurm:` section of the deployment config (DeploymentConfig.slurm, when the config has the
    field) sits between the site file and the command line."""
    cfg = load_config(write_config(tmp_path, sim_dict(fake_model, tmp_path / "logs")))
    object.__setattr__(cfg, "slurm", SlurmOptions(nodes=2, partition="cfgpart", time="45"))
    site = SiteConfig(partition="sitepart", account="siteacct")
    script = render_sbatch(cfg, None, {"time": "20"}, site, [], cluster=None, warn=lambda m: None)
    assert "#SBATCH --nodes=2" in script and "#SBATCH --partition=cfgpart" in script
    assert "#SBATCH --account=siteacct" in script and "#SBATCH --time=00:20:00" in script


def test_uniform_layout_uses_block_distribution(tmp_path, fake_model):
    cfg = load_config(write_config(tmp_path, sim_dict(fake_model, tmp_path / "logs", workers=3)))
    script = render_sbatch(cfg, None, SlurmOptions(nodes=2), None, [], cluster=None, warn=lambda m: None)
    assert "--distribution=block" in script and "SLURM_HOSTFILE" not in script
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --ntasks=4" in script


# ---- layout -------------------------------------------------------------------------------------

def _layout(tmp_path, model, opts: dict, cluster=None, **engine):
    data = sim_dict(model, tmp_path / "logs", **engine.pop("pools", {"workers": 4}))
    planned = engine.get("kind") == "trtllm"     # the config refuses it (not in this build): its planned layout
    data["engine"].update(engine, **({"kind": "vllm"} if planned else {}))
    cfg = load_config(write_config(tmp_path, data, f"l{len(list(tmp_path.iterdir()))}.yaml"))
    if planned:
        from slurmserve.config import EngineConfig
        cfg.engine = EngineConfig.model_construct(**{**dict(cfg.engine), "kind": "trtllm"})
    return plan_layout(cfg, resolved_for(cfg, opts), cluster)


def test_layouts(tmp_path, fake_model):
    lay = _layout(tmp_path, fake_model, {"nodes": 2})
    assert lay.rank_node == [0, 0, 0, 1, 1] and lay.counts == [3, 2] and not lay.uniform
    lay = _layout(tmp_path, fake_model, {"nodes": 3, "head": "own-node"})
    assert lay.rank_node == [0, 1, 1, 2, 2]
    lay = _layout(tmp_path, fake_model, {})
    assert lay.nodes == 1 and lay.rank_node == [0] * 5
    # vLLM TP=2 on 4-GPU nodes: two instances per node, a GPU block each, none for the head
    lay = _layout(tmp_path, fake_model, {"gpus_per_node": 4}, kind="vllm", tensor_parallel_size=2)
    assert lay.nodes == 2 and lay.rank_node == [0, 0, 0, 1, 1]
    assert lay.rank_gpus == ["", "0,1", "2,3", "0,1", "2,3"]
    # TensorRT-LLM TP=2: two ranks per instance, one GPU each, an instance never split across nodes
    lay = _layout(tmp_path, fake_model, {"gpus_per_node": 4, "head": "own-node"}, kind="trtllm",
                  tensor_parallel_size=2, pools={"prefill": 1, "decode": 2})
    assert lay.nodes == 3 and lay.rank_node == [0, 1, 1, 1, 1, 2, 2]
    assert lay.rank_gpus == ["", "0", "1", "2", "3", "0", "1"]
    assert lay.rank_roles == ["head", "prefill", "prefill", "decode", "decode", "decode", "decode"]
    # CPUs: 4 per node, the head shares the first node
    lay = _layout(tmp_path, fake_model, {}, cluster=ClusterInfo("debug", 4, 4, 0), pools={"workers": 6})
    assert lay.counts == [4, 3]
    # vLLM TP=4 over nodes_per_instance=2 on 4-GPU nodes: an instance's two ranks on two nodes, two
    # GPUs each; two instances share the pair of nodes (it was all on one node before)
    lay = _layout(tmp_path, fake_model, {"gpus_per_node": 4}, kind="vllm", tensor_parallel_size=4,
                  nodes_per_instance=2, pools={"workers": 2})
    assert lay.nodes == 2 and lay.rank_node == [0, 0, 1, 0, 1]
    assert lay.rank_gpus == ["", "0,1", "0,1", "2,3", "2,3"] and lay.rank_instance == [None, 0, 0, 1, 1]
    lay = _layout(tmp_path, fake_model, {"gpus_per_node": 2, "head": "own-node"}, kind="vllm",
                  tensor_parallel_size=4, nodes_per_instance=2, pools={"workers": 2})
    assert lay.nodes == 5 and lay.rank_node == [0, 1, 2, 3, 4] and lay.rank_gpus[1:] == ["0,1"] * 4


# ---- validation before sbatch -------------------------------------------------------------------

@pytest.mark.parametrize("opts,engine,cluster,needle", [
    ({"gpus_per_node": 2}, {"kind": "vllm", "tensor_parallel_size": 4}, None,
     "gpus_per_node=2 is less than engine.tensor_parallel_size=4"),
    ({"nodes": 6}, {}, None, "nodes=6 is more than the deployment can use"),
    ({"nodes": 1, "head": "own-node"}, {}, None, "head=own-node needs at least 2 nodes"),
    ({"nodes": 1}, {}, ClusterInfo("debug", 4, 4, 4), "the head's node 3 (the head takes 1 CPU(s))); use --nodes=2"),
    ({"nodes": 1, "cpus_per_task": 2}, {}, ClusterInfo("debug", 4, 4, 4), "use --nodes=3"),
    ({"gpus_per_node": 8}, {"kind": "vllm"}, ClusterInfo("debug", 4, 4, 4), "have 4 GPU(s)"),
    ({"nodes": 2, "gpus_per_node": 2}, {"kind": "vllm", "tensor_parallel_size": 2},
     None, "do not fit on 2 node(s): a node holds at most 1 instance(s) (2 GPUs per node / 2 per instance)"),
    ({"time": "1:00"}, {}, None, "time limit 00:01:00 is not longer than the preemption warning"),
    ({}, {}, ClusterInfo("debug", 1, 2, 0), "needs 3 nodes, but partition debug has 1"),
])
def test_impossible_requests_are_refused(tmp_path, fake_model, opts, engine, cluster, needle):
    data = sim_dict(fake_model, tmp_path / "logs")
    data["engine"].update(engine)
    cfg = load_config(write_config(tmp_path, data))
    with pytest.raises(SlurmError) as e:
        render_sbatch(cfg, None, opts, SiteConfig(), [], cluster=cluster, warn=lambda m: None)
    assert needle in str(e.value), str(e.value)


def test_every_problem_is_listed(tmp_path):
    cfg = load_config(write_config(tmp_path, sim_dict(tmp_path / "nope", tmp_path / "logs")))
    with pytest.raises(SlurmError) as e:
        render_sbatch(cfg, None, {"time": "1", "nodes": 9}, None, [], cluster=None)
    msg = str(e.value)
    assert msg.startswith("3 problems:")
    assert "model.path" in msg and "time limit" in msg and "nodes=9" in msg


def test_option_and_site_errors_name_their_keys(tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as e:
        options_from({"nodez": 2, "head": "alone", "time": "soon"})
    msg = str(e.value)
    assert "slurm.nodez: Extra inputs are not permitted" in msg
    assert "slurm.head" in msg and "slurm.time" in msg
    site = tmp_path / "site.yaml"
    site.write_text("partition: gpu\nmodules: openmpi\ncontainr: x\n")
    monkeypatch.setenv("SLURMSERVE_SITE", str(site))
    with pytest.raises(ConfigError) as e:
        load_site()
    msg = str(e.value)
    assert f"site file {site}: 2 error(s)" in msg and "containr: Extra inputs" in msg and "modules:" in msg
    site.write_text("partition: [gpu\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_site()
    monkeypatch.setenv("SLURMSERVE_SITE", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_site()
    monkeypatch.delenv("SLURMSERVE_SITE")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    assert load_site() == SiteConfig()        # no site file: defaults
    (tmp_path / "cfg" / "slurmserve").mkdir(parents=True)
    (tmp_path / "cfg" / "slurmserve" / "site.yaml").write_text("partition: gpu\ntime: 90\n")
    assert load_site().partition == "gpu" and parse_time(load_site().time) == 90 * 60


def test_time_formats():
    assert parse_time("30") == 1800 and parse_time(30) == 1800 and parse_time("1:30") == 90
    assert parse_time("2:00:00") == 7200 and parse_time("1-0") == 86400
    assert parse_time("1-2:03") == 86400 + 7200 + 180 and parse_time("1-2:03:04") == 93784
    for bad in ("", "1h", "-1", "0", "1:2:3:4"):
        with pytest.raises(ValueError):
            parse_time(bad)


def cli(*args, timeout=180, **kw):
    """The Slurm commands as a user runs them: `slurmserve CMD` once the CLI registers them, else
    their module entry point."""
    cli_src = (REPO / "launcher" / "cli.py").read_text()
    entry = ["slurmserve"] if "slurm_cli" in cli_src else ["slurmserve.launcher.slurm_cli"]
    return subprocess.run([sys.executable, "-m", *entry, *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def test_submit_refuses_an_engine_this_build_cannot_run(tmp_path, fake_model, state_dir):
    """engine.kind=trtllm: refused with its key path before sbatch runs (no Slurm needed), nothing
    registered, rather than a job whose ranks fail to start."""
    cfg = write_config(tmp_path, sim_dict(fake_model, tmp_path / "logs"))
    for cmd in ("submit", "sbatch"):
        r = cli(cmd, str(cfg), "--nodes", "1", "--set", "pools.workers=1", "--set", "engine.kind=trtllm")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "engine.kind: 'trtllm' needs the tensorrt_llm package" in r.stderr, r.stderr
    assert registry.list_entries() == [] and not (tmp_path / "logs").exists()


def test_cli_errors_are_one_line(tmp_path, fake_model):
    cfg = write_config(tmp_path, sim_dict(fake_model, tmp_path / "logs"))
    r = cli("sbatch", str(cfg), "--set", "engine.kind=vllm", "--set", "engine.tensor_parallel_size=4",
            "--gpus-per-node", "2")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("slurmserve sbatch: gpus_per_node=2 is less than")
    r = cli("status", "424242")
    assert r.returncode == 1 and "no slurmserve job 424242" in r.stderr and "Traceback" not in r.stderr
    r = cli("sbatch", str(cfg), "--time", "soon")
    assert r.returncode == 2 and "slurm.time" in r.stderr and "Traceback" not in r.stderr
    r = cli("sbatch", str(cfg), "--nodes", "2", "-o", str(tmp_path / "job.sbatch"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "job.sbatch").read_text().startswith("#!/bin/bash")


# ---- the registry -------------------------------------------------------------------------------

def test_registry_entries_are_private_and_atomic(state_dir):
    e = registry.write_entry("17", status="starting", model=MODEL, log_dir="/x")
    assert e["job_id"] == "17" and e["restarts"] == 0 and e["stop_requested"] is False
    path = registry.entry_path("17")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((state_dir / "jobs").stat().st_mode) == 0o700
    registry.update_status("17", "ready", url="http://h:1/v1", api_key="sk-x")
    e = registry.read_entry("17")
    assert e["status"] == "ready" and e["model"] == MODEL and e["api_key"] == "sk-x"
    assert [p.name for p in (state_dir / "jobs").iterdir() if p.name.endswith(".tmp")] == []
    with pytest.raises(ValueError, match="status must be one of"):
        registry.update_status("17", "running")
    with pytest.raises(ValueError, match="unknown registry field"):
        registry.write_entry("17", colour="red")
    with pytest.raises(ValueError, match="not a job id"):
        registry.write_entry("../x")
    registry.write_entry("9")
    assert [x["job_id"] for x in registry.list_entries()] == ["9", "17"]
    registry.remove_entry("9")
    assert registry.read_entry("9") is None


def test_registry_concurrent_updates_are_not_lost(state_dir):
    registry.write_entry("5")
    fields = ["host", "port", "url", "api_key", "model", "head_node", "config", "log_dir"]

    def put(k):
        for i in range(20):
            registry.write_entry("5", **{k: f"{k}-{i}"})

    threads = [threading.Thread(target=put, args=(k,)) for k in fields]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    e = registry.read_entry("5")
    assert all(e[k] == f"{k}-19" for k in fields)


def _Cfg(tmp_path, model_dir):
    return load_config(write_config(tmp_path, sim_dict(model_dir, tmp_path / "logs"), "h.yaml"))


def test_head_registration(tmp_path, fake_model, monkeypatch):
    cfg = _Cfg(tmp_path, fake_model)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert registry.HeadRegistration.from_env(cfg) is None           # not in a Slurm job
    monkeypatch.setenv("SLURM_JOB_ID", "31")
    monkeypatch.setenv("SLURMSERVE_REGISTRY", "0")
    assert registry.HeadRegistration.from_env(cfg) is None
    monkeypatch.delenv("SLURMSERVE_REGISTRY")
    monkeypatch.delenv("SLURMSERVE_REQUEUE", raising=False)
    reg = registry.HeadRegistration.from_env(cfg)
    reg.serving({"host": "127.0.0.1", "port": 4321, "started": 5.0}, "sk-secret")
    e = registry.read_entry("31")
    assert (e["status"], e["url"], e["api_key"], e["launcher"]) == (
        "starting", "http://127.0.0.1:4321/v1", "sk-secret", "srun")
    assert e["pools"] == {"workers": 4} and e["world_size"] == 5
    import asyncio
    flips = iter([False, False, True])
    asyncio.run(reg.watch_ready(lambda: next(flips), interval_s=0.01))
    assert registry.read_entry("31")["status"] == "ready"
    reg.draining(signal.SIGUSR2)
    assert registry.read_entry("31")["drain_signal"] == "SIGUSR2"
    assert reg.finished(preempted=True) is False                         # requeue not enabled
    assert registry.read_entry("31")["status"] == "exited"


def test_head_registration_requeue(tmp_path, fake_model, monkeypatch):
    cfg = _Cfg(tmp_path, fake_model)
    monkeypatch.setenv("SLURM_JOB_ID", "32")
    # a fake scontrol records how it was called
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol.calls\n")
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURMSERVE_REQUEUE", "scontrol")
    reg = registry.HeadRegistration.from_env(cfg)
    reg.serving({"host": "0.0.0.0", "port": 1}, "k")
    assert registry.read_entry("32")["host"] not in ("0.0.0.0", "")   # a reachable address
    reg.draining(signal.SIGUSR2)
    assert reg.finished(preempted=True) is True
    e = registry.read_entry("32")
    assert e["status"] == "starting" and e["restarts"] == 1 and e["url"] is None
    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "32"]
    # `slurmserve stop` asked for the drain: no requeue
    registry.write_entry("32", stop_requested=True)
    assert reg.finished(preempted=True) is False and registry.read_entry("32")["status"] == "exited"
    # SIGTERM (not the preemption warning): no requeue
    registry.write_entry("32", stop_requested=False)
    assert reg.finished(preempted=False) is False
    # submitit requeues by itself: the head only records that it wants to
    monkeypatch.setenv("SLURMSERVE_REQUEUE", "submitit")
    reg = registry.HeadRegistration.from_env(cfg)
    assert reg.finished(preempted=True) is True
    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "32"]   # not called again


# ---- submitit: the job script it writes (no submission) -----------------------------------------

def test_submitit_parameters(tmp_path, fake_model, monkeypatch):
    import submitit
    from slurmserve.launcher import submitit_launch

    monkeypatch.setattr(submitit_launch, "cluster_info", lambda p: None, raising=False)
    import slurmserve.launcher.sbatch as sb
    monkeypatch.setattr(sb, "cluster_info", lambda p: None)
    ex = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    ex.update_parameters(timeout_min=20, slurm_partition="debug", slurm_srun_args=["--cpu-bind=none"])
    submitted = {}

    class FakeJob:
        job_id = "77"
        paths = submitit.core.utils.JobPaths(tmp_path / "submitit", job_id="77", task_id=0)

    def fake_submit(fn):
        submitted["fn"] = fn
        return FakeJob()

    monkeypatch.setattr(ex, "submit", fake_submit)
    dep = submitit_launch.launch(sim_dict(fake_model, tmp_path / "logs"), ex, nodes=2,
                                 overrides=["router.policy=least_loaded"])
    assert dep.job_id == "77"
    text = ex._executor._make_submission_file_text("python -u -m submitit.core._submit X", "uid")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=3", "#SBATCH --signal=USR2@60",
                 "#SBATCH --requeue", "#SBATCH --partition=debug", "#SBATCH --time=20",
                 "#SBATCH --job-name=slurmserve-tiny-llama"):
        assert line in text, (line, text)
    assert "--cpu-bind=none --mpi=pmix --kill-on-bad-exit=0 --ntasks=5 --distribution=arbitrary" in text
    assert "SLURM_HOSTFILE" in text and '"${SLURMSERVE_NODES[1]}" > "$SLURM_HOSTFILE"' in text
    fn = submitted["fn"]
    assert isinstance(fn, submitit.helpers.Checkpointable)
    assert fn.config["router"]["policy"] == "least_loaded" and fn.rank_gpus is None
    again = fn.checkpoint()
    assert isinstance(again, submitit.helpers.DelayedSubmission) and again.function is fn
    e = registry.read_entry("77")
    assert (e["launcher"], e["status"], e["requeue"], e["time_limit"]) == ("submitit", "starting",
                                                                          "submitit", "00:20:00")


# ==== on the test cluster ========================================================================

def _cluster_up() -> str | None:
    if shutil.which("sinfo") is None:
        return "no sinfo: Slurm is not installed (tests/cluster/start.sh)"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%P %t %D"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo does not answer"
    if r.returncode != 0 or not any(s in r.stdout for s in ("idle", "mix", "alloc")):
        return f"the test cluster is not up (tests/cluster/start.sh): {r.stderr.strip() or r.stdout.strip()}"
    return None


SHM_BEFORE: set[str] = set()


@pytest.fixture(scope="module")
def cluster():
    from slurmserve.tools.local_deployment import shm_files
    why = _cluster_up()
    assert why is None, why
    SHM_BEFORE.update(shm_files())
    r = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True)
    return r.stdout.split()[0].rstrip("*")


def job_processes(job_id: str, needle: str) -> list[str]:
    """Processes of a job on this host: its slurmstepds, or anything naming the test's own paths."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if cmd and (f"[{job_id}." in cmd or needle in cmd) and "pytest" not in cmd:
            out.append(f"{entry.name}: {cmd}")
    return out


def assert_nothing_left(job_id: str, needle: str, timeout: float = 20) -> None:
    from slurmserve.tools.local_deployment import shm_files
    deadline = time.time() + timeout
    while time.time() < deadline:
        left = job_processes(job_id, needle)
        if not left:
            break
        time.sleep(0.25)
    assert not left, f"job {job_id} left processes: {left}"
    q = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    assert q.stdout.strip() in ("",), q.stdout
    # every node of the test cluster shares this host's /dev/shm: none may keep an MPI segment
    left = shm_files() - SHM_BEFORE
    assert not left, f"job {job_id} left shared memory: {sorted(left)}"


def query(url: str, key: str) -> None:
    from openai import OpenAI
    import openai
    c = OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)
    assert [m.id for m in c.models.list().data] == [MODEL]
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi there"}],
                                  max_tokens=12, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=url, api_key="sk-wrong", max_retries=0).models.list()


def hostnames(nodelist: str) -> list[str]:
    r = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return r.stdout.split()


@pytest.mark.slurm
def test_submit_refuses_what_the_cluster_cannot_run(cluster, tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path, sim_dict(tiny_model_dir, tmp_path / "logs"))
    r = cli("submit", str(cfg), "--partition", "nosuchpartition")
    assert r.returncode == 1 and "partition 'nosuchpartition' does not exist" in r.stderr, r.stderr
    r = cli("submit", str(cfg), "--nodes", "5", "--set", "pools.workers=8")
    assert r.returncode == 1 and "has 4" in r.stderr, r.stderr
    r = cli("submit", str(cfg), "--set", "engine.kind=vllm", "--gpus-per-node", "8")
    assert r.returncode == 1 and "have 4 GPU(s)" in r.stderr, r.stderr
    r = cli("submit", str(cfg), "--nodes", "1", "--set", "pools.workers=4")
    assert r.returncode == 1 and "do not fit on 1 node(s)" in r.stderr, r.stderr
    assert registry.list_entries() == []        # nothing was queued


@pytest.mark.slurm
def test_sbatch_deployment_two_nodes(cluster, tmp_path, tiny_model_dir, state_dir):
    cfg = write_config(tmp_path, sim_dict(tiny_model_dir, tmp_path / "logs"))
    r = cli("submit", str(cfg), "--nodes", "2", "--time", "10", "--partition", cluster)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()
    assert job.isdigit()
    try:
        r = cli("wait", job, "--timeout", "150")
        assert r.returncode == 0, r.stderr + cli("logs", job).stdout
        url = r.stdout.strip()
        assert url.startswith("http://") and url.endswith("/v1")
        st = json.loads(cli("status", job, "--json").stdout)
        assert st["status"] == "ready" and st["slurm_state"] == "RUNNING"
        assert "api_key" not in st and st["time_left"]
        table = cli("status").stdout
        assert job in table and "ready" in table and url in table
        # head + 2 workers on the first node (n1 on an idle cluster), 2 workers on the second
        a, b = hostnames(st["nodes"])
        info = json.loads((tmp_path / "logs" / "endpoint.json").read_text())
        assert [i["hostname"] for i in info["instances"]] == [a, a, b, b]
        from slurmserve.launcher.slurm_cli import connection
        url2, key = connection(job)
        assert url2 == url and key.startswith("sk-")
        query(url, key)
        assert stat.S_IMODE(registry.entry_path(job).stat().st_mode) == 0o600
        logs = cli("logs", job, "--rank", "0")
        assert logs.returncode == 0 and "serving tiny-llama" in logs.stdout
        assert "0: " in cli("logs", job).stdout            # srun --label'd batch log
    finally:
        r = cli("stop", job)
    assert r.returncode == 0, r.stderr
    assert "drained" in r.stdout, r.stdout
    assert_nothing_left(job, str(cfg))
    assert registry.read_entry(job)["status"] == "exited"
    assert json.loads(cli("status", job, "--json").stdout)["slurm_state"] == "COMPLETED"


@pytest.mark.slurm
def test_gpu_blocks_and_own_node_head(cluster, tmp_path, tiny_model_dir):
    """Fake GPUs on the test nodes: each engine rank sees its own block of its node's GPUs."""
    data = sim_dict(tiny_model_dir, tmp_path / "logs")
    data["engine"]["tensor_parallel_size"] = 2
    cfg = write_config(tmp_path, data)
    r = cli("submit", str(cfg), "--head", "own-node", "--gpus-per-node", "4", "--time", "10")
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()
    try:
        assert cli("wait", job, "--timeout", "150").returncode == 0, cli("logs", job).stdout
        head, b, c = hostnames(json.loads(cli("status", job, "--json").stdout)["nodes"])
        info = json.loads((tmp_path / "logs" / "endpoint.json").read_text())
        assert [i["hostname"] for i in info["instances"]] == [b, b, c, c]        # none next to the head
        seen = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes()
                env = dict(kv.split(b"=", 1) for kv in (entry / "environ").read_bytes().split(b"\0") if b"=" in kv)
            except OSError:
                continue
            args = cmd.split(b"\0")
            if args[0] != b"srun" and args[1:5] == [b"-m", b"slurmserve", b"run", str(cfg).encode()] \
                    and env.get(b"SLURM_JOB_ID") == job.encode():    # a rank (not srun, not the wrapper)
                seen[int(env[b"SLURM_PROCID"])] = env.get(b"CUDA_VISIBLE_DEVICES", b"?").decode()
        assert seen == {0: "", 1: "0,1", 2: "2,3", 3: "0,1", 4: "2,3"}, seen
    finally:
        r = cli("stop", job)
    assert r.returncode == 0, r.stderr
    assert_nothing_left(job, str(cfg))


@pytest.mark.slurm
def test_submitit_deployment_two_nodes(cluster, tmp_path, tiny_model_dir):
    import submitit
    from slurmserve.launcher.submitit_launch import launch

    ex = submitit.AutoExecutor(folder=tmp_path / "submitit")
    ex.update_parameters(timeout_min=10, slurm_partition=cluster)
    dep = launch(sim_dict(tiny_model_dir, tmp_path / "logs"), ex, nodes=2)
    try:
        dep.wait_ready(150)
        st = dep.status()
        assert st["status"] == "ready" and st["launcher"] == "submitit"
        a, b = hostnames(st["nodes"])
        info = json.loads((tmp_path / "logs" / "endpoint.json").read_text())
        assert [i["hostname"] for i in info["instances"]] == [a, a, b, b]
        assert dep.endpoint == info["url"]
        query(dep.endpoint, dep.api_key)
        r = dep.client(max_retries=0).completions.create(model=MODEL, prompt="hello", max_tokens=4)
        assert r.usage.completion_tokens >= 1
    finally:
        msg = dep.stop()
    assert "drained" in msg, msg
    assert_nothing_left(dep.job_id, str(tmp_path / "submitit"))
    assert dep.status()["status"] == "exited"


def _inflight(client, n: int, results: list) -> list[threading.Thread]:
    def go():
        try:
            r = client.completions.create(model=MODEL, prompt="tell me a long story", max_tokens=400,
                                          extra_body={"ignore_eos": True})
            results.append((r.usage.completion_tokens, r.choices[0].finish_reason, time.time()))
        except Exception as e:          # noqa: BLE001 - recorded and asserted on below
            results.append(e)
    threads = [threading.Thread(target=go) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def _preempt_and_come_back(job: str, client_factory, wait_ready, full: bool) -> None:
    results: list = []
    threads = _inflight(client_factory(), 3, results)
    time.sleep(0.7)                     # requests are decoding (400 steps of >= 5.7 ms at speedup 1)
    signalled = time.time()
    subprocess.run(["scancel", "--signal=USR2", *(["--full"] if full else []), job], check=True)
    for t in threads:
        t.join(60)
    assert [r[:2] for r in results] == [(400, "length")] * 3, results   # in-flight requests completed
    assert all(r[2] > signalled for r in results), "the requests were not in flight at the signal"
    deadline = time.time() + 30
    while registry.read_entry(job)["restarts"] < 1 and time.time() < deadline:
        time.sleep(0.2)
    assert registry.read_entry(job)["restarts"] == 1
    wait_ready(180)                     # requeued (same job id) and serving again
    r = client_factory().completions.create(model=MODEL, prompt="again", max_tokens=5,
                                            extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5


@pytest.mark.slurm
def test_rank_crash_while_the_mpi_world_starts_is_retried_a_bounded_number_of_times(
        cluster, tmp_path, tiny_model_dir, monkeypatch):
    """Ranks that die of SIGSEGV before the MPI world is up (seen after several requeues: exit 139)
    end srun; the job script starts the world again in its allocation (a new job step), at most
    SLURMSERVE_START_RETRIES times. Fault injection: a site `container` wrapper that segfaults every
    rank of the first CRASH_STEPS job steps before it execs the rank."""
    wrapper = tmp_path / "crash.sh"
    wrapper.write_text('#!/bin/bash\nif [ "$SLURM_STEP_ID" -lt "$CRASH_STEPS" ]; then kill -SEGV $$; fi\n'
                       'exec "$@"\n')
    wrapper.chmod(0o755)
    jobs = {}
    for crash_steps in (1, 99):          # the first start crashes; every start crashes
        site = tmp_path / f"site-{crash_steps}.yaml"
        site.write_text(yaml.safe_dump({"container": str(wrapper), "setup": [
            f"export CRASH_STEPS={crash_steps}", "export SLURMSERVE_START_RETRIES=1"]}))
        monkeypatch.setenv("SLURMSERVE_SITE", str(site))
        cfg = write_config(tmp_path, sim_dict(tiny_model_dir, tmp_path / f"logs-{crash_steps}", workers=2),
                           f"dep-{crash_steps}.yaml")
        r = cli("submit", str(cfg), "--nodes", "1", "--time", "10")
        assert r.returncode == 0, r.stderr
        jobs[crash_steps] = (r.stdout.strip(), cfg)

    job, cfg = jobs[1]
    try:
        r = cli("wait", job, "--timeout", "150")
        assert r.returncode == 0, r.stderr + cli("logs", job).stdout
        query(r.stdout.strip(), cli_connection_key(job))
    finally:
        cli("stop", job)
    log = (tmp_path / "logs-1" / f"slurm-{job}.out").read_text()
    assert "slurmserve: srun exited with status 139" in log
    assert "a rank crashed while the MPI world started; starting again (1 of 1)" in log
    assert_nothing_left(job, str(cfg))

    job, cfg = jobs[99]
    deadline = time.time() + 120
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        assert time.time() < deadline, "a job whose ranks always crash at start must end"
        time.sleep(1)
    log = (tmp_path / "logs-99" / f"slurm-{job}.out").read_text()
    assert log.count("slurmserve: srun exited with status 139") == 2, log[-3000:]
    assert "a rank crashed while the MPI world started, 2 time(s); giving up" in log
    state = subprocess.run(["sacct", "-n", "-X", "-j", job, "-o", "State,ExitCode", "-P"], capture_output=True,
                           text=True).stdout.split()
    assert len(state) == 1 and state[0].startswith("FAILED|"), state
    assert not list((tmp_path / "logs-99").glob(".srun-start-*"))
    assert_nothing_left(job, str(cfg))


def cli_connection_key(job: str) -> str:
    from slurmserve.launcher.slurm_cli import connection
    return connection(job)[1]


@pytest.mark.slurm
def test_sbatch_preemption_requeues(cluster, tmp_path, tiny_model_dir):
    from openai import OpenAI
    from slurmserve.launcher.slurm_cli import connection, wait_ready

    cfg = write_config(tmp_path, sim_dict(tiny_model_dir, tmp_path / "logs", speedup=1.0))
    r = cli("submit", str(cfg), "--nodes", "2", "--time", "10", "--requeue")
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()
    try:
        wait_ready(job, 150)

        def client():
            url, key = connection(job)
            return OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)

        _preempt_and_come_back(job, client, lambda t: wait_ready(job, t), full=True)
    finally:
        r = cli("stop", job)
    assert r.returncode == 0 and "drained" in r.stdout, r.stdout + r.stderr
    assert_nothing_left(job, str(cfg))


@pytest.mark.slurm
def test_submitit_preemption_requeues(cluster, tmp_path, tiny_model_dir):
    import submitit
    from slurmserve.launcher.submitit_launch import launch

    ex = submitit.AutoExecutor(folder=tmp_path / "submitit")
    ex.update_parameters(timeout_min=10, slurm_partition=cluster)
    dep = launch(sim_dict(tiny_model_dir, tmp_path / "logs", speedup=1.0), ex, nodes=2)
    try:
        dep.wait_ready(150)
        _preempt_and_come_back(dep.job_id, lambda: dep.client(max_retries=0, timeout=60),
                               dep.wait_ready, full=False)
    finally:
        msg = dep.stop()
    assert "drained" in msg, msg
    assert_nothing_left(dep.job_id, str(tmp_path / "submitit"))


@pytest.mark.slurm
@pytest.mark.vllm
def test_vllm_tensor_parallel_across_two_nodes(cluster, tmp_path, tiny_model_dir):
    """engine.nodes_per_instance 2, tensor_parallel_size 2, on two Slurm nodes: the instance's
    leader rank (next to the head) and its follower rank (the second node) run vLLM's multi-node
    executor, and the greedy text equals one process's offline LLM.generate."""
    import vllm_cpu
    from test_serve_vllm import vllm_config

    from openai import OpenAI

    from slurmserve.launcher.slurm_cli import connection
    from slurmserve.router.tokenizer import Tokenizer

    prompt = [(5 * i + 3) % 300 + 10 for i in range(40)]
    offline = vllm_cpu.Offline(tiny_model_dir, [prompt], max_tokens=12)
    data = vllm_config(tiny_model_dir, workers=1)
    data["engine"] = dict(data["engine"], nodes_per_instance=2, tensor_parallel_size=2)
    data["router"]["host"] = None
    data["log_dir"] = str(tmp_path / "logs")
    cfg = write_config(tmp_path, data)
    env = {**os.environ, **vllm_cpu.CPU_ENV}                # sbatch exports the submitting environment
    r = cli("submit", str(cfg), "--nodes", "2", "--time", "10", "--partition", cluster, env=env)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()
    try:
        r = cli("wait", job, "--timeout", "240")
        assert r.returncode == 0, r.stderr + cli("logs", job).stdout
        logs = cli("logs", job, "--rank", "2").stdout
        assert "follows instance 0 (instance rank 1" in logs and "node rank 1 of 2" in logs, logs[-3000:]
        url, key = connection(job)
        got = OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120).completions.create(
            model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        (want_ids, want_finish), = offline.result()
        assert (got.usage.completion_tokens, got.choices[0].finish_reason) == (len(want_ids), want_finish)
        assert got.choices[0].text == Tokenizer(tiny_model_dir).decode(want_ids)
    finally:
        offline.kill()
        r = cli("stop", job)
    assert r.returncode == 0, r.stderr
    assert "drained" in r.stdout, r.stdout + r.stderr       # the follower ends with its leader
    assert_nothing_left(job, str(cfg))
    assert json.loads(cli("status", job, "--json").stdout)["slurm_state"] == "COMPLETED"
