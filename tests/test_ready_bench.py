"""`slurmserve bench ready` (bench/ready_bench.py): sbatch -> ready broken into phases. On the test
cluster (`slurm` mark), one real run: every phase is there, in order, and they sum to the total.
No timing thresholds: the figures belong in docs/benchmarks.md, not in a test."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from slurmserve.bench.ready_bench import PHASES, breakdown
from test_slurm_launcher import cluster  # noqa: F401  (fixture: the test cluster is up)


def test_breakdown_keeps_slurms_whole_seconds_and_the_lagging_ready_mark_in_order():
    timeline = {"rank_start": 100.6, "bootstrapped": 101.5, "staged": 102.0, "ready": 103.2}
    # Slurm's start (whole seconds) before the submission; the head's ready mark after the first 200
    phases = breakdown(t0=100.2, slurm_start=100.0, timeline=timeline, healthy=103.1)
    assert list(phases) == list(PHASES) and min(phases.values()) >= 0
    assert phases["queue wait"] == 0 and phases["first health"] == 0
    assert sum(phases.values()) == pytest.approx(103.1 - 100.2)


@pytest.mark.slurm
def test_one_sim_run_reports_every_phase(cluster, tmp_path, tiny_model_dir, monkeypatch):  # noqa: F811
    monkeypatch.setenv("SLURMSERVE_STATE_DIR", str(tmp_path / "state"))     # the job inherits it
    out = tmp_path / "ready.json"
    r = subprocess.run([sys.executable, "-m", "slurmserve", "bench", "ready", "--repeats", "1", "--nodes", "2",
                        "--workers", "2", "--model", str(tiny_model_dir), "--timeout", "150",
                        "--stage-dir", str(tmp_path / "nodes" / "$SLURMD_NODENAME"),
                        "--work", str(tmp_path / "work"), "--result-json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run = json.loads(out.read_text())["runs"][0]
    assert list(run["phases"]) == list(PHASES) and min(run["phases"].values()) >= 0
    assert sum(run["phases"].values()) == pytest.approx(run["total_s"], abs=0.01)
    t = run["timeline"]          # rank 0's own marks, before the bench's clamping
    assert t["rank_start"] <= t["bootstrapped"] <= t["staged"] <= t["listening"] <= t["ready"]
    assert run["stage_mode"] == "broadcast" and run["stage_state"] == "done"   # 2 nodes: staged, not reused
    assert "| weight staging |" in r.stdout
