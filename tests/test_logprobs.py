"""Logprobs, logit_bias and structured-output parameters in batch files (`slurmserve batch`, simulated
engines): the same answers as the endpoint gives, and the same 400s."""

from __future__ import annotations

import json

from test_batch import records, run_batch, sim_config, write_config


def test_batch_lines_take_logprobs_echo_and_logit_bias(tiny_model_dir, tmp_path):
    completion = {"model": "tiny-llama", "prompt": "the quick brown fox", "max_tokens": 0, "echo": True,
                  "logprobs": 1}
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "logprobs": True, "top_logprobs": 2, "logit_bias": {"50": 100}, "ignore_eos": True}
    structured = dict(chat, response_format={"type": "json_object"})
    lines = [{"custom_id": "echo", "method": "POST", "url": "/v1/completions", "body": completion},
             {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions", "body": chat},
             {"custom_id": "json", "method": "POST", "url": "/v1/chat/completions", "body": structured}]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = write_config(tmp_path, sim_config(tiny_model_dir, tmp_path / "logs", speedup=20.0, workers=1))
    r = run_batch(cfg, "-i", str(inp), "-o", str(tmp_path / "out.jsonl"), "--errors", str(tmp_path / "err.jsonl"))
    assert r.returncode == 0, r.stderr[-4000:]
    ok = {x["custom_id"]: x["response"]["body"] for x in records(tmp_path / "out.jsonl")}
    echo = ok["echo"]["choices"][0]
    assert echo["text"] == completion["prompt"] and ok["echo"]["usage"]["completion_tokens"] == 0
    assert echo["logprobs"]["token_logprobs"][0] is None and "".join(echo["logprobs"]["tokens"]) == echo["text"]
    content = ok["chat"]["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(len(c["top_logprobs"]) == 2 for c in content)
    assert len({c["token"] for c in content}) == 1     # logit_bias +100: one token, three times
    # the sim engine has no structured output: the line fails with the endpoint's 400
    (err,) = records(tmp_path / "err.jsonl")
    assert err["custom_id"] == "json" and err["response"]["status_code"] == 400
    assert err["response"]["body"]["error"]["param"] == "response_format"
