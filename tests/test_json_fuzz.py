"""Fuzzing the JSON decode paths (issue 20, item 6): whatever the bytes, the head's request path
(`openai_api.parse`, then `HeadApp._prepare` with the real tokenizer and chat template) and the
gateway's (`gateway.model_of`) give either a request or an APIError with a 4xx status: never
another exception, which the client would see as a 500."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slurmserve.router import openai_api as oa
from slurmserve.gateway.server import model_of
from slurmserve.router.http_app import HeadApp
from slurmserve.router.metrics import HeadMetrics
from slurmserve.router.openai_api import APIError
from slurmserve.router.tokenizer import Tokenizer

MODEL = "tiny-llama"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEYS = ["model", "prompt", "messages", "role", "content", "type", "text", "max_tokens", "n", "stop",
        "stream", "stream_options", "include_usage", "temperature", "top_p", "top_k", "seed", "echo",
        "logprobs", "logit_bias", "min_tokens", "stop_token_ids", "chat_template_kwargs",
        "max_completion_tokens", "response_format", "tools", "best_of", "suffix", "ignore_eos",
        "add_generation_prompt", "tokenize", "name"]

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.integers(-3, 600)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
           | st.sampled_from(["tiny-llama", "user", "assistant", "system", "text", "image_url", ""]))
values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4)
                      | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), kids, max_size=5),
                      max_leaves=24)
parts = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "x"])},
                                       optional={"text": st.text(max_size=12) | values}), max_size=3)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system"]) | values},
    optional={"content": st.none() | st.text(max_size=40) | parts | values, "name": values}), max_size=4)
ids = st.integers(-2, 520)
# requests with fields of the right shape, values at and past their limits (more reach the tokenizer)
shaped = {
    "max_tokens": st.integers(-1, 600), "max_completion_tokens": st.integers(-1, 600),
    "n": st.integers(0, 70), "min_tokens": st.integers(-1, 600), "top_k": st.integers(-2, 50),
    "temperature": st.floats(-0.1, 2.2), "top_p": st.floats(0, 1.1), "seed": st.integers(-(2**65), 2**65),
    "stop": st.none() | st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=3),
    "stop_token_ids": st.lists(ids, max_size=3), "stream": st.booleans(), "echo": st.booleans(),
    "stream_options": st.none() | st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(), "logprobs": st.none() | st.booleans() | st.integers(0, 3),
    "chat_template_kwargs": st.none() | st.dictionaries(
        st.sampled_from(["add_generation_prompt", "tokenize", "enable_thinking", "chat_template", "documents",
                         "tools", "x"]), values, max_size=2),
    "prompt": st.text(max_size=60) | st.lists(st.text(max_size=20), max_size=3) | st.lists(ids, max_size=10)
    | st.lists(st.lists(ids, max_size=5), max_size=3),
    "messages": messages,
}
shaped_requests = st.one_of(   # (body, chat)
    st.tuples(st.fixed_dictionaries({"model": st.just(MODEL), "prompt": shaped["prompt"]},
                                    optional={k: v for k, v in shaped.items() if k != "prompt"}), st.just(False)),
    st.tuples(st.fixed_dictionaries({"model": st.just(MODEL), "messages": messages},
                                    optional={k: v for k, v in shaped.items() if k != "messages"}), st.just(True)))
requests = st.fixed_dictionaries(
    {"model": st.just(MODEL) | values},
    optional={k: values for k in KEYS if k != "model"}
    | {"messages": messages, "prompt": st.text(max_size=60) | values})


def nested(depth: int, inner: str = "") -> str:
    return "[" * depth + inner + "]" * depth


# bodies with deep nesting somewhere, closed or not
deep_bodies = st.builds(
    lambda depth, field, closed: json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                             "prompt": "x"})[:-1].encode()
    + b', "' + field.encode() + b'": ' + (nested(depth) if closed else "[" * depth).encode() + (b"}" if closed else b""),
    st.integers(1, 20_000), st.sampled_from(["prompt", "messages", "stop", "extra", "chat_template_kwargs"]),
    st.booleans())


@pytest.fixture(scope="module")
def app(tiny_model_dir):
    return HeadApp(orchestrator=None, tokenizer=Tokenizer(tiny_model_dir), metrics=HeadMetrics(MODEL),
                   model_name=MODEL, max_model_len=512, api_key="unused")


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _client_error_or_ok(fn, *args):
    try:
        return fn(*args)
    except APIError as e:
        assert 400 <= e.status < 500, (e.status, e.message)
        assert json.loads(e.body())["error"]["message"]
        return None


@FUZZ
@given(body=st.binary(max_size=300), chat=st.booleans())
def test_parse_any_bytes(body, chat):
    _client_error_or_ok(oa.parse, body, chat)


@FUZZ
@given(req=requests, chat=st.booleans())
def test_prepare_any_json_request(app, loop, req, chat):
    body = json.dumps(req).encode()
    _client_error_or_ok(lambda: loop.run_until_complete(app._prepare(body, chat)))


@FUZZ
@given(case=shaped_requests)
def test_prepare_well_shaped_requests(app, loop, case):
    req, chat = case
    body = json.dumps(req).encode()
    _client_error_or_ok(lambda: loop.run_until_complete(app._prepare(body, chat)))


@settings(max_examples=60, deadline=None)
@given(body=deep_bodies, chat=st.booleans())
def test_prepare_deeply_nested_bodies(app, loop, body, chat):
    _client_error_or_ok(lambda: loop.run_until_complete(app._prepare(body, chat)))


@FUZZ
@given(body=st.binary(max_size=300) | requests.map(lambda r: json.dumps(r).encode()) | deep_bodies)
def test_gateway_model_of_any_body(body):
    model = _client_error_or_ok(model_of, body)
    assert model is None or isinstance(model, str)


@pytest.mark.parametrize("chat", [False, True])
def test_five_thousand_brackets_are_a_400(app, loop, chat):
    for body in (b'{"model": "tiny-llama", "prompt": ' + nested(5000).encode() + b"}",
                 b'{"model": "tiny-llama", "messages": [{"role": "user", "content": ' + nested(5000).encode() + b"}]}",
                 b'{"model": "tiny-llama", "prompt": ' + b"[" * 5000):
        with pytest.raises(APIError) as e:
            loop.run_until_complete(app._prepare(body, chat))
        assert e.value.status == 400
        with pytest.raises(APIError) as e:
            model_of(body)
        assert e.value.status == 400
