"""The OpenAI API's rules, checked in-process (issue 23, item 6): a real HeadApp with the real
tokenizer, an Orchestrator over a real Router, EngineClient and ZeroMQ socket, and the answer caught in a
BufferedResponse. No deployment starts, so each rule costs milliseconds; the end-to-end tests in
test_serve_sim.py keep checking the same rules through the openai client."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest
import zmq

from slurmserve.router.engine_client import EngineClient
from slurmserve.router.http_app import HeadApp
from slurmserve.router.http_server import BufferedResponse, Request
from slurmserve.router.instance import Instance
from slurmserve.router.metrics import HeadMetrics
from slurmserve.router.orchestrator import Orchestrator
from slurmserve.router.policies import make_policies
from slurmserve.router.routing import Router
from slurmserve.router.tokenizer import Tokenizer

MODEL = "tiny-llama"
KEY = "sk-test"


@pytest.fixture(scope="module")
def app(tiny_model_dir):
    """A head with one worker instance that never comes up: every rule before routing applies, and
    a valid request meets "no instance available"."""
    zctx = zmq.Context()
    sock = zctx.socket(zmq.ROUTER)
    metrics = HeadMetrics(MODEL)
    instance = Instance(index=0, role="worker", identity=b"instance-0", address="127.0.0.1")
    client = EngineClient(sock, [instance], metrics, 2.0)
    router = Router([instance], make_policies("round_robin", {"worker"}))
    head = HeadApp(orchestrator=Orchestrator(client, router, metrics, disaggregated=False),
                   tokenizer=Tokenizer(tiny_model_dir), metrics=metrics, model_name=MODEL,
                   max_model_len=512, api_key=KEY, max_concurrent=8)
    yield head
    sock.close(0)
    zctx.term()


def call(app: HeadApp, method: str, path: str, body=None, key: str | None = KEY) -> tuple[int, dict]:
    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    raw = body if isinstance(body, bytes) else msgspec.json.encode(body) if body is not None else b""
    response = BufferedResponse()
    asyncio.run(app(Request(method, path, headers, raw), response))
    text = b"".join(response.parts)
    return response.status, json.loads(text) if text else {}


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "hello there", "max_tokens": 4, **fields}


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}


def test_routes_methods_and_the_key(app):
    assert call(app, "GET", "/v1/models")[1]["data"][0]["id"] == MODEL
    status, body = call(app, "GET", "/v1/models", key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert call(app, "GET", "/v1/models", key="sk-wrong")[0] == 401
    assert call(app, "GET", "/v1/nothing")[0] == 404
    assert call(app, "GET", "/v1/completions")[0] == 405
    status, body = call(app, "GET", "/health", key=None)      # open, and honest about readiness
    assert status == 503 and body["error"]["type"] == "service_unavailable"


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", completion(model="other"), "model"),
    ("/v1/completions", completion(temperature=-1), "temperature"),
    ("/v1/completions", completion(max_tokens=-1), "max_tokens"),
    ("/v1/completions", completion(max_tokens=10_000), "prompt"),       # prompt + max_tokens > context
    ("/v1/completions", completion(n=65), "n"),
    ("/v1/completions", completion(logprobs=21), "logprobs"),
    ("/v1/completions", completion(max_tokens=0), "max_tokens"),          # without echo
    ("/v1/completions", completion(prompt=""), "prompt"),
    ("/v1/completions", completion(prompt="x " * 5000), "prompt"),        # past max_model_len
    ("/v1/completions", completion(prompt=[600, 601]), "prompt"),          # outside the vocabulary
    ("/v1/completions", completion(logit_bias={"5": 101}), "logit_bias"),
    ("/v1/chat/completions", chat(top_logprobs=3), "top_logprobs"),        # without logprobs
    ("/v1/completions", completion(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    ("/v1/chat/completions", chat(messages=[]), "messages"),
])
def test_bad_requests_are_openai_400s_naming_the_parameter(app, path, body, param):
    status, answer = call(app, "POST", path, body)
    assert status in (400, 404), answer
    assert answer["error"]["param"] == param, answer


@pytest.mark.parametrize("raw", [b"{", b"[]", b"\xff", b"[" * 5000, b'{"model": "tiny-llama", "prompt": 5}'])
def test_bodies_that_are_not_requests_are_400s(app, raw):
    status, answer = call(app, "POST", "/v1/completions", raw)
    assert status == 400 and answer["error"]["type"], answer


def test_a_valid_request_without_a_live_instance_is_a_503_to_retry(app):
    status, answer = call(app, "POST", "/v1/completions", completion())
    assert status == 503 and "no worker instance" in answer["error"]["message"], answer
    app.draining = True
    try:
        assert call(app, "POST", "/v1/chat/completions", chat())[0] == 503
    finally:
        app.draining = False
