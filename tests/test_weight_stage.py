"""Weight staging (runtime/weight_stage.py): the pieces on their own, then real `srun --mpi=pmix`
steps on the test cluster (`slurm` mark), each node staging into a directory of its own
($SLURMD_NODENAME: the nodes of the test cluster share one host's disk)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from slurmserve.config import ConfigError, load_config
from slurmserve.runtime.weight_stage import (MANIFEST, PROGRESS_FILE, SourceFile, StageError, list_source,
                                             local_target, progress_summary, resolve_mode, stage_root,
                                             valid_copy)

CHUNK = 1 << 20          # small chunks: several per shard, so the read-ahead ring turns over


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """The tiny Llama plus three random ~3 MB safetensors shards and an empty file (~11 MB)."""
    from slurmserve.bench.stage_bench import make_model
    d = make_model(tmp_path_factory.mktemp("stage-src") / "tiny", 9_000_000, 3)
    (d / "empty.txt").write_bytes(b"")
    (d / ".cache").mkdir(exist_ok=True)
    (d / ".cache" / "lock").write_text("not staged")
    return d


# ==== without MPI ================================================================================

def test_config_stage_fields_and_errors():
    cfg = load_config(None)
    assert (cfg.model.stage, cfg.model.stage_dir) == ("auto", None)
    cfg = load_config(None, ["model.stage=node-local", "model.stage_dir=$SLURM_TMPDIR/w"])
    assert (cfg.model.stage, cfg.model.stage_dir) == ("node-local", "$SLURM_TMPDIR/w")
    with pytest.raises(ConfigError, match=r"model.stage_dir: 'rel/x' must be an absolute path"):
        load_config(None, ["model.stage_dir=rel/x"])
    with pytest.raises(ConfigError, match=r"model.stage: Input should be"):
        load_config(None, ["model.stage=fast"])


def test_resolve_mode_and_stage_root(monkeypatch, tmp_path):
    assert [resolve_mode("auto", n) for n in (1, 2)] == ["none", "broadcast"]
    assert resolve_mode("node-local", 1) == "node-local"
    monkeypatch.setenv("SLURMD_NODENAME", "n7")
    assert stage_root("/local/$SLURMD_NODENAME") == Path("/local/n7")
    monkeypatch.setenv("SLURMSERVE_STAGE_DIR", str(tmp_path))
    assert stage_root(None) == tmp_path                       # the site's choice
    monkeypatch.delenv("SLURMSERVE_STAGE_DIR")
    monkeypatch.setenv("TMPDIR", "/scratch/job")
    assert stage_root(None) == Path("/scratch/job")
    monkeypatch.delenv("TMPDIR")
    assert stage_root(None) == Path("/tmp")
    with pytest.raises(StageError, match=r"model.stage_dir '\$NOPE_UNSET/x' is '\$NOPE_UNSET/x' on .*unset variable"):
        stage_root("$NOPE_UNSET/x")


def test_source_listing_and_manifest_check(model, tmp_path):
    files = list_source(model)
    names = [f.path for f in files]
    assert ".cache/lock" not in names and "slurmserve-tiny-model.json" in names and "empty.txt" in names
    assert names == sorted(names)
    target = local_target(tmp_path, model)
    assert target.name == model.name                          # the served name stays the same
    assert valid_copy(target, files) is None
    shutil.copytree(model, target)
    manifest = {"format": 1, "files": [dict(f.__dict__, sha256="x") for f in files]}
    (target / MANIFEST).write_text(json.dumps(manifest))
    assert valid_copy(target, files) is not None
    with open(target / names[0], "ab") as f:                  # a local file of the wrong size
        f.write(b"!")
    assert valid_copy(target, files) is None
    changed = [SourceFile(f.path, f.size, f.mtime_ns + (f.path == names[1])) for f in files]
    assert valid_copy(target, changed) is None                # the source changed since
    with pytest.raises(StageError, match=r"model.path .*/nope: not a directory"):
        list_source(tmp_path / "nope")


def test_progress_summary(tmp_path):
    assert progress_summary(tmp_path) is None
    (tmp_path / PROGRESS_FILE).write_text(json.dumps(dict(
        state="staging", mode="broadcast", nodes=4, bytes_done=1.5e9, bytes_total=4e9, gb_per_s=0.5, eta_s=5.0)))
    assert progress_summary(tmp_path) == "weights staging (broadcast, 4 node(s)): 1.50/4.00 GB, 0.50 GB/s, ETA 5 s"


# ==== on the test cluster ========================================================================

def _cluster_up() -> str | None:
    if shutil.which("srun") is None:
        return "no srun: Slurm is not installed (tests/cluster/start.sh)"
    r = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    if r.returncode != 0 or not any(s in r.stdout for s in ("idle", "mix")):
        return f"the test cluster is not up (tests/cluster/start.sh): {r.stderr.strip() or r.stdout.strip()}"
    return None


@pytest.fixture(scope="module")
def cluster():
    why = _cluster_up()
    assert why is None, why


def stage(tmp_path: Path, model: Path, mode: str, nodes: int = 2, per_node: int = 2, *overrides: str,
          stage_dir: str | None = None, head_rank: bool = False) -> tuple[dict, subprocess.CompletedProcess]:
    from slurmserve.bench.stage_bench import run_step
    cfg = {"model": {"path": str(model), "name": "tiny", "stage": mode,
                     "stage_dir": stage_dir or str(tmp_path / "nodes" / "$SLURMD_NODENAME")},
           "pools": {"workers": 1}, "log_dir": str(tmp_path / "logs")}
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # pinned to n1..nN: the tests name nodes, and other jobs may hold some of the cluster
    return run_step(path, nodes, tmp_path / "result.json", per_node, overrides, CHUNK, timeout=120,
                    nodelist=f"n[1-{nodes}]" if nodes > 1 else "n1", head_rank=head_rank)


def copies(tmp_path: Path, model: Path) -> dict[str, Path]:
    return {d.name: local_target(d, model) for d in sorted((tmp_path / "nodes").iterdir())}


@pytest.mark.slurm
def test_broadcast_stages_verifies_and_reuses(cluster, tmp_path, model):
    out, r = stage(tmp_path, model, "broadcast", 3, 2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert out["mode"] == "broadcast" and out["nodes"] == 3
    targets = copies(tmp_path, model)
    assert sorted(targets) == ["n1", "n2", "n3"]
    for rank in out["ranks"]:          # every rank, leader or not, loads from its own node's copy
        assert rank["path"] == str(targets[rank["host"]]), rank
    want = {f.path: sha256(model / f.path) for f in list_source(model)}
    for host, t in targets.items():
        manifest = json.loads((t / MANIFEST).read_text())
        assert {e["path"]: e["sha256"] for e in manifest["files"]} == want, host
        assert {p: sha256(t / p) for p in want} == want, host
        assert not (t / ".cache").exists()
        assert [p.name for p in t.parent.iterdir()] == [model.name]     # no partial copy left
    progress = json.loads((tmp_path / "logs" / PROGRESS_FILE).read_text())
    assert (progress["state"], progress["files_done"], progress["bytes_done"]) == (
        "done", len(want), sum(f.size for f in list_source(model)))
    assert "weights done (broadcast, 3 node(s))" in progress_summary(tmp_path / "logs")

    # a requeue on the same nodes: nothing is read or written, every copy is reused
    mtimes = {h: (t / MANIFEST).stat().st_mtime_ns for h, t in targets.items()}
    out, r = stage(tmp_path, model, "broadcast", 3, 2)
    assert r.returncode == 0 and out["progress"]["state"] == "reused", r.stderr[-2000:]
    assert {h: (t / MANIFEST).stat().st_mtime_ns for h, t in targets.items()} == mtimes

    # one node lost a file (a partial copy or a wiped disk): only that node copies again
    (targets["n2"] / "model-00002-of-00003.safetensors").write_bytes(b"torn")
    out, r = stage(tmp_path, model, "broadcast", 3, 2)
    assert r.returncode == 0 and out["progress"]["state"] == "done", r.stderr[-2000:]
    assert sha256(targets["n2"] / "model-00002-of-00003.safetensors") == want["model-00002-of-00003.safetensors"]
    assert (targets["n1"] / MANIFEST).stat().st_mtime_ns == mtimes["n1"]
    assert (targets["n2"] / MANIFEST).stat().st_mtime_ns != mtimes["n2"]


@pytest.mark.slurm
def test_a_head_only_node_gets_no_copy(cluster, tmp_path, model):
    """With the head alone on the first node (--head own-node), that node is not staged: the head
    reads the tokenizer from model.path, and the copies go to the engines' nodes only (before: to
    every node of the job)."""
    out, r = stage(tmp_path, model, "broadcast", 3, 1, head_rank=True)
    assert r.returncode == 0, r.stderr[-2000:]
    targets = copies(tmp_path, model)
    assert sorted(targets) == ["n2", "n3"]
    paths = {x["host"]: x["path"] for x in out["ranks"]}
    assert paths == {"n1": str(model), "n2": str(targets["n2"]), "n3": str(targets["n3"])}
    assert out["progress"]["nodes"] == 2 and out["progress"]["state"] == "done"
    # two nodes with engines, the head's alone: auto still broadcasts between the two; one: none
    shutil.rmtree(tmp_path / "nodes")
    out, r = stage(tmp_path, model, "auto", 2, 1, head_rank=True)
    assert r.returncode == 0 and out["mode"] == "none", r.stderr[-2000:]
    assert {x["path"] for x in out["ranks"]} == {str(model)}


@pytest.mark.slurm
def test_node_local_and_auto(cluster, tmp_path, model):
    out, r = stage(tmp_path, model, "node-local", 2, 1)
    assert r.returncode == 0, r.stderr[-2000:]
    want = {f.path: sha256(model / f.path) for f in list_source(model)}
    for t in copies(tmp_path, model).values():
        assert {p: sha256(t / p) for p in want} == want
    shutil.rmtree(tmp_path / "nodes")
    out, r = stage(tmp_path, model, "auto", 1, 2)             # one node: load from model.path
    assert r.returncode == 0 and out["mode"] == "none", r.stderr[-2000:]
    assert {x["path"] for x in out["ranks"]} == {str(model)} and not (tmp_path / "nodes").exists()
    out, r = stage(tmp_path, model, "auto", 2, 1)
    assert r.returncode == 0 and out["mode"] == "broadcast", r.stderr[-2000:]


@pytest.mark.slurm
def test_bad_stage_dir_and_model_fail_every_rank_in_one_line(cluster, tmp_path, model):
    out, r = stage(tmp_path, model, "broadcast", 2, 2, stage_dir="$NOPE_UNSET/x")
    assert r.returncode != 0
    errors = {x["error"] for x in out["ranks"]}
    assert len(errors) == 1 and "model.stage_dir '$NOPE_UNSET/x'" in errors.pop()
    assert r.stderr.count("slurmserve: model.stage_dir '$NOPE_UNSET/x'") >= 1, r.stderr[-2000:]

    out, r = stage(tmp_path, tmp_path / "missing", "broadcast", 2, 1)
    assert r.returncode != 0 and f"model.path {tmp_path / 'missing'}: not a directory" in r.stderr

    # a node whose stage dir cannot be written: every rank stops with the same line, naming the node
    (tmp_path / "nodes").mkdir()
    (tmp_path / "nodes" / "n2").write_text("a file, not a directory")
    out, r = stage(tmp_path, model, "broadcast", 2, 1)
    assert r.returncode != 0
    errors = {x["error"] for x in out["ranks"]}
    assert len(errors) == 1 and "on n2" in next(iter(errors)), errors
