"""One request must not be able to stall or kill a deployment (issue 20, items 3 and 6): a real
local deployment (mpirun, head, simulated engines) and the openai client.

Before: a 12 MB prompt was tokenized on the head's event loop for seconds; the engines, hearing
nothing, took the head for dead and quit, and every later request got 503. Deeply nested JSON was
a 500."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
import urllib.request

import httpx
import pytest

from slurmserve.tools.local_deployment import LocalDeployment
from slurmserve.router.tokenizer import Tokenizer

MODEL = "tiny-llama"
# Long enough that a prompt of a few MB passes the length cap (the tiny tokenizer's longest token is
# 13 characters: 3.9 M characters here) and is tokenized, for a second or more; 12 MB is far over it.
MAX_MODEL_LEN = 300_000
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world"]


@pytest.fixture(scope="module")
def dep(tiny_model_dir, tmp_path_factory):
    config = {
        "model": {"path": str(tiny_model_dir), "name": MODEL, "max_model_len": MAX_MODEL_LEN},
        "engine": {"kind": "sim", "sim": {"speedup": 1.0, "block_size": 16,
                                          "num_kv_blocks": MAX_MODEL_LEN // 16}},
        "pools": {"workers": 2},
        "router": {"host": "127.0.0.1", "port": 0},
        "runtime": {"heartbeat_interval_s": 0.25, "heartbeat_timeout_s": 1.5},
    }
    d = LocalDeployment(tmp_path_factory.mktemp("hardening"), config).start()
    yield d
    d.stop()
    d.kill()


def _text(chars: int) -> str:
    rng = random.Random(chars)
    return " ".join(rng.choice(WORDS) for _ in range(chars // 4 + 1))[:chars]


class Background:
    """Normal requests (the openai client) in a loop on a thread, while a test does its worst."""

    def __init__(self, dep: LocalDeployment):
        self.client = dep.client(timeout=30)
        self.ok, self.errors = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                r = self.client.completions.create(model=MODEL, prompt="hello world", max_tokens=4,
                                                   extra_body={"ignore_eos": True})
                assert r.usage.completion_tokens == 4
                self.ok += 1
            except Exception as e:   # noqa: BLE001 - collected, asserted on by the test
                self.errors.append(repr(e))
                time.sleep(0.2)

    def __enter__(self) -> Background:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)


def _post(dep: LocalDeployment, path: str, body: bytes, timeout: float = 60) -> httpx.Response:
    return httpx.post(dep.base + path, content=body, timeout=timeout,
                      headers={"authorization": f"Bearer {dep.api_key}", "content-type": "application/json"})


def _served(dep: LocalDeployment) -> None:
    """The deployment still answers: /health, a completion and a chat completion."""
    assert dep.health() == 200, dep.output()
    c = dep.client(timeout=30)
    assert c.completions.create(model=MODEL, prompt="the quick brown fox", max_tokens=3).usage.completion_tokens
    assert c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                     max_tokens=3).choices


def test_a_12_mb_prompt_gets_a_quick_400_and_requests_go_on(dep):
    prompt = _text(12_000_000)
    with Background(dep) as bg:
        time.sleep(0.5)
        for path, body, param in [
            ("/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 4}, "prompt"),
            ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": prompt}]},
             "messages"),
        ]:
            t0 = time.monotonic()
            r = _post(dep, path, json.dumps(body).encode())
            took = time.monotonic() - t0
            assert r.status_code == 400, r.text[:500]
            err = r.json()["error"]
            assert err["param"] == param and err["code"] == "context_length_exceeded", err
            assert "12000000 characters" in err["message"] or "characters long" in err["message"], err
            assert took < 3.0, f"the 400 took {took:.1f} s: the prompt was tokenized"
        time.sleep(1.0)   # longer than the engines' heartbeat timeout
    assert bg.ok > 0 and not bg.errors, bg.errors[:3]
    _served(dep)


def test_the_loop_stays_responsive_while_a_large_prompt_is_tokenized(dep, tiny_model_dir):
    """A prompt under the length cap but over the context: tokenized (a second or more here), then
    refused. Meanwhile /health and another request are answered, before it is."""
    tok = Tokenizer(tiny_model_dir)
    prompt = _text(3_000_000)
    assert len(prompt) <= tok.max_prompt_chars(MAX_MODEL_LEN)
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 4}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {dep.api_key}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode()
    port = dep.info["port"]
    events: list[tuple[str, float]] = []
    big_answer = []

    def big() -> None:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(head + body)
            events.append(("sent", time.monotonic()))
            s.settimeout(60)
            out = b""
            while b"}}" not in out:
                data = s.recv(65536)
                if not data:
                    break
                out += data
            events.append(("big answered", time.monotonic()))
            big_answer.append(out)

    t = threading.Thread(target=big)
    t.start()
    while not events:
        time.sleep(0.01)
    time.sleep(0.3)   # the head has the body and is tokenizing it
    with urllib.request.urlopen(dep.base + "/health", timeout=30) as r:
        assert r.status == 200
    events.append(("health", time.monotonic()))
    c = dep.client(timeout=30)
    assert c.completions.create(model=MODEL, prompt="hello", max_tokens=2).usage.completion_tokens == 2
    events.append(("completion", time.monotonic()))
    t.join(60)
    order = [name for name, _ in sorted(events, key=lambda e: e[1])]
    assert order == ["sent", "health", "completion", "big answered"], (order, events)
    out = big_answer[0]
    assert out.startswith(b"HTTP/1.1 400 "), out[:300]
    err = json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]
    assert err["code"] == "context_length_exceeded" and "maximum context length" in err["message"]
    _served(dep)


@pytest.mark.parametrize("body", [
    b'{"model": "tiny-llama", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"model": "tiny-llama", "prompt": ' + b"[" * 5000,
    b'{"model": "tiny-llama", "prompt": "x", "metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}",
], ids=["prompt", "unclosed", "other-field"])
def test_deeply_nested_json_is_a_400(dep, body):
    r = _post(dep, "/v1/completions", body)
    assert r.status_code == 400, r.text[:300]
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "nested too deeply" in err["message"]


def test_deeply_nested_messages_are_a_400(dep):
    body = b'{"model": "tiny-llama", "messages": [{"role": "user", "content": ' + b"[" * 5000 + b"]" * 5000 + b"}]}"
    r = _post(dep, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["type"] == "invalid_request_error"
    # nested as deep as the decoder takes, in a field the chat template sees: still a 400, not a 500
    deep = {"role": "user", "content": "hi", "extra": json.loads("[" * 400 + "]" * 400)}
    r = _post(dep, "/v1/chat/completions", json.dumps({"model": MODEL, "messages": [deep], "max_tokens": 2}).encode())
    assert r.status_code in (200, 400), r.text[:300]
    _served(dep)
