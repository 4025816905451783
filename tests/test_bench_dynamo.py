"""`slurmserve bench peer`: the head and Dynamo's frontend side by side (bench/peer.py, dynamo_peer.py).

A short run of the machinery with real components: a slurmserve sim deployment and Dynamo 1.6.1's
frontend with mocker workers, both up, the same few requests through the same load generator, the
report parsed. Nothing here asserts how fast either side is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from slurmserve.bench import dynamo_peer
from slurmserve.bench.peer import load_peer_file, run_peer
from slurmserve.config import ConfigError

OUT = 16
RUNS = {
    "chat": {"setup": "instant", "concurrency": 4, "warmup": 2,
             "workload": {"dataset": "chat", "input_len": 48, "output_len": OUT, "num_prompts": 8}},
    "ids": {"setup": "instant", "concurrency": 4, "warmup": 0,
            "workload": {"dataset": "random", "input_len": 48, "output_len": OUT, "num_prompts": 8}},
    "prefix": {"setup": "instant", "concurrency": 2, "warmup": 0,
               "workload": {"dataset": "shared-prefix-chat", "num_prefixes": 2, "prefix_len": 64,
                            "suffix_len": 8, "output_len": OUT, "num_prompts": 6}},
    # the head with two front-end processes and its router process
    "chat-fe2": {"setup": "instant-fe2", "concurrency": 4, "warmup": 0,
                 "workload": {"dataset": "chat", "input_len": 48, "output_len": OUT, "num_prompts": 8}},
}


def peer_file(tmp_path, model_dir, **changes):
    doc = {"name": "smoke", "model": {"path": str(model_dir), "name": "tiny-llama", "max_model_len": 512},
           "workers": 2, "rounds": 1,
           "setups": {"instant": {"speedup": float("inf"), "num_kv_blocks": 256, "block_size": 16},
                      "instant-fe2": {"speedup": float("inf"), "num_kv_blocks": 256, "block_size": 16,
                                      "http_workers": 2}},
           "runs": RUNS, **changes}
    path = tmp_path / "peer.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_peer_file_mistakes_are_named_before_anything_starts(tmp_path, tiny_model_dir):
    bad = dict(RUNS, chat=dict(RUNS["chat"], setup="nope"))
    with pytest.raises(ConfigError, match="runs.chat.setup: no setup 'nope'"):
        load_peer_file(peer_file(tmp_path, tiny_model_dir, runs=bad))
    with pytest.raises(ConfigError, match="concurrency"):
        load_peer_file(peer_file(tmp_path, tiny_model_dir, runs={"x": dict(RUNS["ids"], concurrency=0)}))


def test_a_run_that_the_file_lacks_is_named_before_anything_starts(tmp_path, tiny_model_dir):
    with pytest.raises(SystemExit, match=r"has no run nope \(runs: chat, chat-fe2, ids, prefix\)"):
        run_peer(peer_file(tmp_path, tiny_model_dir), tmp_path / "out", only=["ids", "nope"])
    assert not (tmp_path / "out").exists()


def test_shipped_peer_file_checks():
    peer = load_peer_file(Path(__file__).resolve().parent.parent / "bench/scenarios/head-vs-dynamo.yaml")
    assert peer.workers == 4 and peer.rounds == 3
    assert {(r.workload.dataset, r.concurrency) for r in peer.runs.values()} >= {
        ("chat", 32), ("chat", 128), ("random", 128), ("chat", 256), ("chat", 1), ("shared-prefix-chat", 16)}


def test_sim_side_gets_the_mocker_step_model(tmp_path, tiny_model_dir):
    cfg = dynamo_peer.sim_config(str(tiny_model_dir), "tiny-llama", workers=4, speedup=1.0,
                                 num_kv_blocks=512, block_size=64)
    sim = cfg["engine"]["sim"]
    assert tuple(sim["prefill_coeffs"]) == dynamo_peer.PREFILL_COEFFS
    assert tuple(sim["decode_coeffs"]) == dynamo_peer.DECODE_COEFFS
    assert (sim["num_kv_blocks"], sim["block_size"], cfg["router"]["policy"]) == (512, 64, "kv")


def test_both_sides_serve_the_same_requests(tmp_path, tiny_model_dir):
    out = tmp_path / "report"
    run_peer(peer_file(tmp_path, tiny_model_dir), out)
    report = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in report["rows"]] == [n for n, r in RUNS.items() if r["setup"] == "instant"] + \
        [n for n, r in RUNS.items() if r["setup"] == "instant-fe2"]
    for row in report["rows"]:
        n = RUNS[row["run"]]["workload"]["num_prompts"]
        runs = {side: row["sides"][side]["runs"] for side in ("dynamo", "slurmserve")}
        for side, (s,) in runs.items():
            assert (s["completed"], s["failed"]) == (n, 0), (side, s["errors"])
            assert s["output_tokens"] == n * OUT, side
            # the server's prompt count is the one the workload was built to (same chat template)
            assert s["prompt_tokens_mismatched"] == 0, side
            # text arrived (Dynamo's mocker answers in replayed vocabulary ids, not empty chunks)
            assert s["ttft_ms"]["p50"] > 0 and s["chunks_per_request"] >= 1, side
            cpu = s["cpu_ms_per_request"]
            assert set(cpu) == {"front", "engines", "client", "other_side", "front_process"}
            assert all(v >= 0 for v in cpu.values())
            if side == "slurmserve" and row["setup"] == "instant-fe2":   # the front ends are children
                assert cpu["front_process"] < cpu["front"], cpu
            else:
                assert cpu["front_process"] == cpu["front"], cpu
        assert runs["dynamo"][0]["prompt_tokens"] == runs["slurmserve"][0]["prompt_tokens"]
    summary = (out / "summary.md").read_text()
    assert all(f"| {name} |" in summary for name in RUNS)
