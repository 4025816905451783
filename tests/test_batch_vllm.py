"""`slurmserve batch` with a real vLLM CPU engine answers a chat batch file exactly like vLLM's own
`python -m vllm.entrypoints.openai.run_batch` on the same file and model, with greedy sampling:
the same message content, finish reason and token counts for every custom_id. Both run at once (one
engine start each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import vllm_cpu
from test_batch import records, write_config, write_jsonl
from vllm_cpu import BLOCK, CPU_ENV, ENGINE_ARGS, MAX_MODEL_LEN

pytestmark = pytest.mark.vllm

MODEL = "tiny-llama"
QUESTIONS = ["what is the capital of france ?", "tell me a story about a cat .", "how do birds fly ?",
             "name three colors .", "why is the sky blue ?", "count to ten ."]


def chat_lines() -> list[dict]:
    return [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": MODEL, "max_tokens": 16 + 4 * i, "temperature": 0,
                      "messages": [{"role": "system", "content": "you are a helpful assistant ."},
                                   {"role": "user", "content": q}]}}
            for i, q in enumerate(QUESTIONS)]


def run_batch_command(model_dir, inp, out) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(inp), "-o", str(out),
            "--model", str(model_dir), "--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN),
            "--dtype", ENGINE_ARGS["dtype"], "--enforce-eager", "--block-size", str(BLOCK),
            "--kv-cache-memory-bytes", str(256 << 20)]


def essentials(path) -> dict:
    out = {}
    for r in records(path):
        assert r["error"] is None and r["response"]["status_code"] == 200, r
        body = r["response"]["body"]
        out[r["custom_id"]] = (body["choices"][0]["message"]["content"], body["choices"][0]["finish_reason"],
                               body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"])
    return out


def test_batch_equals_vllm_run_batch(tiny_model_dir, tmp_path):
    inp = write_jsonl(tmp_path / "chat.jsonl", chat_lines())
    ref_out = tmp_path / "vllm.jsonl"
    env = {**os.environ, **CPU_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    vllm_proc = subprocess.Popen(run_batch_command(tiny_model_dir, inp, ref_out), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, env=env)
    try:
        cfg = write_config(tmp_path, {
            "model": {"path": str(tiny_model_dir), "name": MODEL, "max_model_len": MAX_MODEL_LEN},
            "engine": {"kind": "vllm", "args": ENGINE_ARGS}, "pools": {"workers": 1},
            "router": {"host": "127.0.0.1", "port": 0},
            "runtime": {"heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 5.0},
            "log_dir": str(tmp_path / "logs")})
        with vllm_cpu.cpu_env():
            r = subprocess.run([sys.executable, "-m", "slurmserve", "batch", str(cfg), "-i", str(inp), "-o",
                                str(tmp_path / "out.jsonl")], capture_output=True, text=True, timeout=480)
        assert r.returncode == 0, r.stderr[-5000:]
        log, _ = vllm_proc.communicate(timeout=480)
    finally:
        if vllm_proc.poll() is None:
            vllm_proc.kill()
            vllm_proc.communicate()
    assert vllm_proc.returncode == 0, log[-5000:]
    ours, theirs = essentials(tmp_path / "out.jsonl"), essentials(ref_out)
    assert set(ours) == {f"q{i}" for i in range(len(QUESTIONS))}
    assert ours == theirs
    assert any(finish == "length" for _, finish, _, _ in ours.values())
    summary = json.loads((tmp_path / "out.summary.json").read_text())   # stdout also has vLLM's logs
    assert summary["ok"] == len(QUESTIONS) and summary["completion_tokens"] == sum(v[3] for v in ours.values())
