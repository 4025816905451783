"""Deployment config: loading, overrides, and errors that name their key path."""

import subprocess
import sys

import pytest

from slurmserve.config import ConfigError, load_config

BAD = """\
model:
  path: /tmp/x
  max_model_len: -3
engine:
  kind: vlm
pools:
  workers: 2
  prefill: 1
router:
  port: 99999
  polcy: kv
"""


def validate(*args):
    return subprocess.run([sys.executable, "-m", "slurmserve", "config", "validate", *args],
                          capture_output=True, text=True, timeout=60)


def test_validate_prints_resolved_config(tmp_path):
    r = validate("examples/sim-disagg.yaml", "--set", "router.port=9000", "--set", "engine.sim.speedup=.inf")
    assert r.returncode == 0, r.stderr
    assert "port: 9000" in r.stdout and "speedup: .inf" in r.stdout
    assert "5 MPI ranks" in r.stderr


def test_validate_lists_every_error_with_key_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    r = validate(str(bad))
    assert r.returncode == 2
    for path in ("model.max_model_len", "engine.kind", "pools:", "router.port", "router.polcy"):
        assert path in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("text,needle", [
    ("model: [1, 2", "not valid YAML"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("pools: {workers: 1}\n", "model: Field required"),
])
def test_malformed_files(tmp_path, text, needle):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    r = validate(str(f))
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr


def test_overrides_and_relative_paths(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {path: models/m}\nlog_dir: logs\n")
    cfg = load_config(f, ["pools.prefill=2", "pools.decode=3", "pools.workers=null", "engine.sim.speedup=.inf"])
    assert cfg.model.path == tmp_path / "models" / "m"
    assert cfg.log_dir == tmp_path / "logs"
    assert cfg.pools.instances() == ["prefill"] * 2 + ["decode"] * 3
    assert cfg.world_size == 6
    assert cfg.engine.sim.speedup == float("inf")
    with pytest.raises(ConfigError, match="model.path is not a mapping|expected dotted.key=value"):
        load_config(f, ["model.path.x=1"])


def test_trtllm_ranks_per_gpu(tmp_path):
    """The planned TensorRT-LLM layout (one rank per GPU), on a config built past the refusal below."""
    from slurmserve.config import EngineConfig
    f = tmp_path / "c.yaml"
    f.write_text("model: {path: m}\nengine: {kind: vllm, tensor_parallel_size: 4}\npools: {workers: 2}\n")
    cfg = load_config(f)
    cfg.engine = EngineConfig.model_construct(**{**dict(cfg.engine), "kind": "trtllm"})
    assert cfg.world_size == 1 + 2 * 4


def test_engine_this_build_cannot_run_is_refused(tmp_path):
    """engine.kind=trtllm where the tensorrt_llm package does not import (as here): refused with its
    key path by `config validate`, and by every command that loads the config, before anything
    starts or is submitted (tests/test_trtllm_adapter.py: accepted, with a warning, where it does)."""
    f = tmp_path / "c.yaml"
    f.write_text(f"model: {{path: {tmp_path}}}\npools: {{workers: 1}}\nlog_dir: {tmp_path / 'logs'}\n")
    r = validate(str(f), "--set", "engine.kind=trtllm")
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == ""
    assert "engine.kind: 'trtllm' needs the tensorrt_llm package" in r.stderr, r.stderr
    with pytest.raises(ConfigError, match="engine.kind: 'trtllm' needs the tensorrt_llm package"):
        load_config(f, ["engine.kind=trtllm"])
    r = subprocess.run([sys.executable, "-m", "slurmserve", "serve", str(f), "--set", "engine.kind=trtllm"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "engine.kind: 'trtllm' needs the tensorrt_llm package" in r.stderr, r.stderr
    assert not (tmp_path / "logs").exists()          # nothing started
    assert load_config(f, ["engine.kind=vllm"]).engine.kind == "vllm"
