"""`slurmserve submit --batch` on the test cluster: a batch job preempted (SIGUSR2) in the middle of
its file drains, requeues itself, resumes where its output ends, and completes with every custom_id
exactly once. Also: the rendered job script carries the batch settings as `--set` overrides."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time

import pytest

from test_batch import line, records, write_jsonl
from test_slurm_launcher import (assert_nothing_left, cli, cluster, sim_dict, state_dir,  # noqa: F401
                                 write_config)

from slurmserve import registry
from slurmserve.launcher.sbatch import ACTIVE_STATES, job_state


def test_sbatch_script_runs_the_batch(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path, sim_dict(tiny_model_dir, tmp_path / "logs", workers=2))
    inp = write_jsonl(tmp_path / "in.jsonl", [line(f"r{i}", i) for i in range(3)] + [line("r1", 7)])
    r = cli("sbatch", str(cfg), "--nodes", "2", "--batch", str(inp), "--batch-output",
            str(tmp_path / "out.jsonl"), "--shard", "1/2", "--ordered")
    assert r.returncode == 0, r.stderr
    sets = [shlex.quote(f"batch.input='{inp}'"), shlex.quote(f"batch.output='{tmp_path}/out.jsonl'"),
            shlex.quote("batch.shard='1/2'"), "batch.ordered=true"]
    assert " ".join(f"--set {s}" for s in sets) in r.stdout, r.stdout
    assert "duplicate custom_id 'r1' on lines 2, 4" in r.stderr        # reported before submitting
    r = cli("sbatch", str(cfg), "--batch", str(inp))
    assert r.returncode == 1 and "--batch needs --batch-output" in r.stderr, r.stderr


@pytest.mark.slurm
def test_preempted_batch_job_requeues_and_completes(cluster, tmp_path, tiny_model_dir):  # noqa: F811
    n = 40
    data = sim_dict(tiny_model_dir, tmp_path / "logs", speedup=1.0, workers=2)
    cfg = write_config(tmp_path, data)
    inp = write_jsonl(tmp_path / "in.jsonl", [line(f"id-{i}", i, max_tokens=150) for i in range(n)])
    out = tmp_path / "out.jsonl"
    r = cli("submit", str(cfg), "--nodes", "2", "--time", "10", "--requeue", "--batch", str(inp),
            "--batch-output", str(out), "--set", "batch.max_inflight=4", "--set", "batch.checkpoint_records=1")
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()
    try:
        deadline = time.monotonic() + 180
        while len(records(out)) < 8 and time.monotonic() < deadline:
            assert job_state(job).active, cli("logs", job).stdout[-3000:]
            time.sleep(0.2)
        at_signal = len(records(out))
        assert 8 <= at_signal < n, at_signal
        subprocess.run(["scancel", "--signal=USR2", "--full", job], check=True)
        deadline = time.monotonic() + 60
        while (registry.read_entry(job) or {}).get("restarts", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert registry.read_entry(job)["restarts"] == 1, cli("logs", job).stdout[-3000:]
        deadline = time.monotonic() + 240
        while job_state(job).active and time.monotonic() < deadline:
            time.sleep(0.5)
        st = job_state(job)
        assert st.state == "COMPLETED", (st, cli("logs", job).stdout[-4000:])
    finally:
        if job_state(job).active:
            cli("stop", job)
    recs = records(out)
    ids = [rec["custom_id"] for rec in recs]
    assert sorted(ids) == sorted(f"id-{i}" for i in range(n)) and len(set(ids)) == n
    assert all(rec["response"]["body"]["usage"]["completion_tokens"] == 150 for rec in recs)
    summary = json.loads((tmp_path / "out.summary.json").read_text())     # the requeued run's
    assert summary["complete"] and summary["skipped"] >= at_signal and summary["ok"] >= 1, summary
    assert registry.read_entry(job)["status"] == "exited"
    assert_nothing_left(job, str(cfg))


@pytest.mark.slurm
def test_job_array_shards_then_merge(cluster, tmp_path, tiny_model_dir):  # noqa: F811
    """`sbatch --array=0-1` of one rendered script: each task takes its shard from the array and
    keeps its own logs and endpoint; `batch merge` then finds every line answered once."""
    n = 10
    logs = tmp_path / "logs"
    cfg = write_config(tmp_path, sim_dict(tiny_model_dir, logs, workers=1))
    inp = write_jsonl(tmp_path / "in.jsonl", [line(f"a{i}", i) for i in range(n)])
    out = tmp_path / "out.jsonl"
    r = cli("sbatch", str(cfg), "--nodes", "1", "--batch", str(inp), "--batch-output", str(out))
    assert r.returncode == 0, r.stderr
    script = tmp_path / "array.sbatch"
    script.write_text(r.stdout)
    logs.mkdir(mode=0o700)
    sub = subprocess.run(["sbatch", "--parsable", "--array=0-1", str(script)], capture_output=True, text=True)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    # Wait on the accounting record, not squeue: slurmdbd learns a task's end a moment after
    # squeue stops listing it, so a task can still read RUNNING in sacct once squeue is empty.
    deadline = time.monotonic() + 240
    while True:
        states = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job, "-o", "JobID,State"],
                                capture_output=True, text=True).stdout.splitlines()
        ended = len(states) == 2 and not any(s.split("|")[1] in ACTIVE_STATES for s in states)
        if ended or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sorted(states) == [f"{job}_0|COMPLETED", f"{job}_1|COMPLETED"], states
    for task in (0, 1):
        task_dir = logs / f"array-task-{task}"
        assert (task_dir / "rank-0.log").exists() and (task_dir / "rank-1.log").exists()
        assert json.loads((task_dir / "endpoint.json").read_text())["api_key_file"] == str(task_dir / "api_key")
    merged = subprocess.run([sys.executable, "-m", "slurmserve", "batch", "merge", "-i", str(inp), "-o", str(out)],
                            capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr
    assert sorted(rec["custom_id"] for rec in records(out)) == sorted(f"a{i}" for i in range(n))


@pytest.mark.slurm
def test_submitit_batch_job(cluster, tmp_path, tiny_model_dir):  # noqa: F811
    import submitit
    from slurmserve.launcher.submitit_launch import launch_batch

    inp = write_jsonl(tmp_path / "in.jsonl", [line(f"s{i}", i) for i in range(12)] + ["not json"])
    ex = submitit.AutoExecutor(folder=tmp_path / "submitit")
    ex.update_parameters(timeout_min=10, slurm_partition=cluster)
    dep = launch_batch(sim_dict(tiny_model_dir, tmp_path / "logs", workers=2), ex, inp, tmp_path / "out.jsonl",
                       errors=tmp_path / "err.jsonl", nodes=2)
    deadline = time.monotonic() + 240
    while job_state(dep.job_id).active and time.monotonic() < deadline:
        time.sleep(0.5)
    assert job_state(dep.job_id).state == "COMPLETED", dep.job.stdout()
    assert sorted(r["custom_id"] for r in records(tmp_path / "out.jsonl")) == sorted(f"s{i}" for i in range(12))
    assert [r["error"]["line"] for r in records(tmp_path / "err.jsonl")] == [13]
    assert json.loads((tmp_path / "out.summary.json").read_text())["complete"]
    assert_nothing_left(dep.job_id, str(tmp_path / "submitit"))
