"""End to end over real mpirun: head + simulated engines, driven through the openai client."""

from __future__ import annotations

import concurrent.futures as cf
import os
import random
import signal
import time

import httpx
import openai
import pytest

from slurmserve.tools.local_deployment import LocalDeployment, shm_files
from slurmserve.tools.local_deployment import metric_value as metric
from slurmserve.router.tokenizer import Tokenizer

MODEL = "tiny-llama"


def sim_config(model_dir, **pools):
    return {
        "model": {"path": str(model_dir), "name": MODEL, "max_model_len": 512},
        "engine": {"kind": "sim", "sim": {"speedup": 1.0, "num_kv_blocks": 256, "block_size": 16}},
        "pools": pools or {"workers": 4},
        "router": {"host": "127.0.0.1", "port": 0, "policy": "round_robin", "session_header": "X-Session-Id"},
        "runtime": {"heartbeat_interval_s": 0.25, "heartbeat_timeout_s": 1.5},
    }


@pytest.fixture(scope="module")
def agg(tiny_model_dir, tmp_path_factory):
    dep = LocalDeployment(tmp_path_factory.mktemp("agg"), sim_config(tiny_model_dir)).start()
    yield dep
    dep.stop()
    dep.kill()


# ---- happy paths --------------------------------------------------------------------------------

def test_models(agg):
    assert [m.id for m in agg.client().models.list().data] == [MODEL]


def test_completion_matches_stream(agg, tiny_model_dir):
    c = agg.client()
    prompt = "the quick brown fox jumps over the lazy dog"
    full = c.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                extra_body={"ignore_eos": True})
    n_prompt = len(Tokenizer(tiny_model_dir).encode(prompt))
    assert full.usage.prompt_tokens == n_prompt
    assert full.usage.completion_tokens == 24
    assert full.choices[0].finish_reason == "length"

    chunks = list(c.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True}))
    text_chunks = [ch for ch in chunks if ch.choices]
    assert len(text_chunks) > 2, "tokens must arrive over several chunks"
    assert "".join(ch.choices[0].text for ch in text_chunks) == full.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == n_prompt


def test_echo_returns_the_prompt_first(agg, tiny_model_dir):
    """Completions with `echo`: the prompt's text, then the answer, streamed or not; a token-id
    prompt echoes as its text."""
    c = agg.client()
    prompt = "the quick brown fox"
    args = dict(model=MODEL, max_tokens=6, extra_body={"ignore_eos": True})
    plain = c.completions.create(prompt=prompt, **args).choices[0].text
    echoed = c.completions.create(prompt=prompt, echo=True, **args)
    assert echoed.choices[0].text == prompt + plain and echoed.usage.completion_tokens == 6
    chunks = [ch for ch in c.completions.create(prompt=prompt, echo=True, stream=True, **args) if ch.choices]
    assert chunks[0].choices[0].text == prompt
    assert "".join(ch.choices[0].text for ch in chunks) == prompt + plain
    ids = Tokenizer(tiny_model_dir).encode(prompt)
    assert c.completions.create(prompt=ids, echo=True, **args).choices[0].text.startswith(
        Tokenizer(tiny_model_dir).decode(ids))


def test_penalties_are_accepted_and_unsupported_options_refused(agg):
    """vLLM's sampling options pass (the simulator's tokens do not depend on them); options this
    head does not serve are a 400 naming the parameter, not silently dropped."""
    c = agg.client()
    r = c.completions.create(model=MODEL, prompt="hello", max_tokens=4, presence_penalty=1.0,
                             frequency_penalty=-0.5, extra_body={"repetition_penalty": 1.2, "min_p": 0.05})
    assert r.usage.completion_tokens >= 1
    refused = [(dict(presence_penalty=2.5), "presence_penalty"), (dict(extra_body={"min_p": 1.5}), "min_p"),
               (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
               (dict(logit_bias={"999999": 10}), "logit_bias"), (dict(logit_bias={"5": 101}), "logit_bias"),
               (dict(suffix="end"), "suffix"),
               (dict(best_of=2), "best_of")]
    for kw, param in refused:
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=MODEL, prompt="hello", max_tokens=4, **kw)
        assert e.value.body["param"] == param, (kw, e.value.body)
    msgs = [{"role": "user", "content": "hi"}]
    for kw, param in ((dict(response_format={"type": "json_object"}), "response_format"),
                      # a forced tool choice constrains the output, which the sim cannot
                      (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
                            tool_choice="required"), "tool_choice")):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, **kw)
        assert e.value.body["param"] == param
    ok = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, response_format={"type": "text"})
    assert ok.choices[0].message.content is not None
    # tools without a parser (router.tool_call_parser): the template gets them, the answer is text
    ok = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4,
                                   tools=[{"type": "function", "function": {"name": "f"}}])
    assert ok.choices[0].message.content and ok.choices[0].message.tool_calls is None


def test_logprobs_whole_streamed_and_echoed(agg, tiny_model_dir):
    """Logprobs in OpenAI's formats (the sim's values are deterministic stand-ins): the same in a
    whole answer and a stream, cut where a stop string ends the text, and for `echo` with
    `max_tokens: 0` (lm-eval's loglikelihood request) one position per prompt token, the first null."""
    c = agg.client()
    prompt = "the quick brown fox"
    args = dict(model=MODEL, prompt=prompt, max_tokens=8, logprobs=2, extra_body={"ignore_eos": True})
    whole = c.completions.create(**args).choices[0]
    lp = whole.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert "".join(lp.tokens) == whole.text and lp.text_offset[0] == 0
    for t, x, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert x < 0 and len(top) in (2, 3) and top[t] == x
    assert c.completions.create(**args).choices[0].logprobs == lp   # deterministic
    chunks = [ch.choices[0].logprobs for ch in c.completions.create(stream=True, **args) if ch.choices[0].logprobs]
    assert [t for ch in chunks for t in ch.tokens] == lp.tokens
    assert [x for ch in chunks for x in ch.token_logprobs] == lp.token_logprobs
    assert [o for ch in chunks for o in ch.text_offset] == lp.text_offset
    # a stop string: the positions end with the token that completed it
    stop = lp.tokens[3]
    cut = c.completions.create(stop=[stop], **args).choices[0]
    assert cut.logprobs.tokens == lp.tokens[:lp.tokens.index(stop) + 1]
    assert cut.text == whole.text[:whole.text.index(stop)]

    ids = Tokenizer(tiny_model_dir).encode(prompt)
    echo = c.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    e = echo.choices[0]
    assert e.text == prompt and echo.usage.completion_tokens == 0 and e.finish_reason == "length"
    assert len(e.logprobs.tokens) == len(ids) and "".join(e.logprobs.tokens) == prompt
    assert e.logprobs.token_logprobs[0] is None and e.logprobs.top_logprobs[0] is None
    assert all(x < 0 for x in e.logprobs.token_logprobs[1:])
    # several prompts (lm-eval batches them), token ids, and echo followed by the answer
    two = c.completions.create(model=MODEL, prompt=[ids, ids[:3]], max_tokens=1, echo=True, logprobs=1,
                               extra_body={"ignore_eos": True})
    assert two.choices[0].logprobs.token_logprobs[:len(ids)] == e.logprobs.token_logprobs
    assert [len(ch.logprobs.tokens) for ch in two.choices] == [len(ids) + 1, 4]

    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                     logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True}).choices[0]
    content = chat.logprobs.content
    assert "".join(x.token for x in content) == chat.message.content and len(content) == 4
    for x in content:
        assert [t.token for t in x.top_logprobs][0] == x.token and len(x.top_logprobs) == 3
        assert bytes(x.bytes).decode() == x.token
    plain = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert plain.choices[0].logprobs is None
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}
    for body, param in (({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                        ({"response_format": schema}, "response_format"), ({"guided_regex": "a+"}, "guided_regex"),
                        ({"structured_outputs": {"choice": ["a"]}}, "structured_outputs")):
        msgs = [{"role": "user", "content": "hi"}]
        r = _post(agg, "/v1/chat/completions", {"model": MODEL, "messages": msgs, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


def test_logit_bias_extremes_in_the_sim(agg, tiny_model_dir):
    tok = Tokenizer(tiny_model_dir)
    forced = tok.encode("x")[-1]
    r = agg.client().completions.create(model=MODEL, prompt="hello", max_tokens=3, logit_bias={str(forced): 100})
    assert r.choices[0].text == tok.decode([forced] * 3)


def test_n_choices_whole_and_streamed(agg):
    """n > 1: one choice per index, each the answer a single request with seed + index gets (vLLM's
    parallel sampling); the prompt counted once in the usage, the completion tokens of all choices."""
    c = agg.client()
    args = dict(model=MODEL, prompt="one two three", max_tokens=6, extra_body={"ignore_eos": True})
    singles = [c.completions.create(seed=7 + i, **args).choices[0].text for i in range(3)]
    assert len(set(singles)) == 3, "the seeds must give different answers for this test to mean anything"
    r = c.completions.create(n=3, seed=7, **args)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert [ch.text for ch in r.choices] == singles and {ch.finish_reason for ch in r.choices} == {"length"}
    assert r.usage.completion_tokens == 18 and r.usage.prompt_tokens == c.completions.create(
        **args).usage.prompt_tokens

    msgs = [{"role": "user", "content": "name three colours"}]
    chat = dict(model=MODEL, messages=msgs, max_tokens=5, seed=3, extra_body={"ignore_eos": True})
    whole = c.chat.completions.create(n=2, **chat)
    chunks = list(c.chat.completions.create(n=2, stream=True, stream_options={"include_usage": True}, **chat))
    by_index = {0: [], 1: []}
    for ch in chunks:
        for choice in ch.choices:
            by_index[choice.index].append(choice)
    for i, parts in by_index.items():
        assert parts[0].delta.role == "assistant"                      # each choice opens with its role
        assert "".join(p.delta.content or "" for p in parts) == whole.choices[i].message.content
        assert [p.finish_reason for p in parts if p.finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 10 == whole.usage.completion_tokens
    for n in (0, 65):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(n=n, **args)
        assert e.value.body["param"] == "n"


def test_several_prompts_in_one_completion_request(agg, tiny_model_dir):
    """A list of prompts (text or token ids), as lm-eval's batched completions send: choice k * n + i
    answers prompt k as a request of its own would; usage counts every prompt once."""
    c = agg.client()
    tok = Tokenizer(tiny_model_dir)
    texts = ["the quick brown fox", "hello there", "one two three four"]
    args = dict(model=MODEL, max_tokens=5, seed=2, extra_body={"ignore_eos": True})
    singles = [[c.completions.create(prompt=t, **{**args, "seed": 2 + i}).choices[0].text for i in range(2)]
               for t in texts]
    r = c.completions.create(prompt=texts, n=2, **args)
    assert [ch.index for ch in r.choices] == list(range(6))
    assert [ch.text for ch in r.choices] == [t for pair in singles for t in pair]
    assert r.usage.prompt_tokens == sum(len(tok.encode(t)) for t in texts) and r.usage.completion_tokens == 30
    ids = [tok.encode(t) for t in texts[:2]]
    r = c.completions.create(prompt=ids, echo=True, **args)
    assert [ch.text for ch in r.choices] == [tok.decode(i) + s[0] for i, s in zip(ids, singles)]
    chunks = list(c.completions.create(prompt=texts, stream=True, stream_options={"include_usage": True}, **args))
    streamed = ["".join(ch.choices[0].text for ch in chunks if ch.choices and ch.choices[0].index == k)
                for k in range(3)]
    assert streamed == [s[0] for s in singles] and chunks[-1].usage.completion_tokens == 15
    for bad in ([[]], [[1, 2], []], ["a", ""], [[1, 2], [tok.vocab_size]], ["x"] * 129):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(prompt=bad, n=2, **args)
        assert e.value.body["param"] == "prompt", bad


def test_stop_token_ids(agg, tiny_model_dir):
    """vLLM's stop_token_ids: every id a stop token, so the first token ends the answer ("stop");
    its text is left out unless include_stop_str_in_output, as in vLLM. ignore_eos does not lift it."""
    c = agg.client()
    tok = Tokenizer(tiny_model_dir)
    every = [i for i in range(tok.vocab_size) if i not in tok.special_ids]
    args = dict(model=MODEL, prompt="count: one two", max_tokens=8, seed=3)
    plain = c.completions.create(**args, extra_body={"ignore_eos": True})
    r = c.completions.create(**args, extra_body={"ignore_eos": True, "stop_token_ids": every})
    assert (r.choices[0].finish_reason, r.usage.completion_tokens, r.choices[0].text) == ("stop", 1, "")
    kept = c.completions.create(**args, extra_body={"stop_token_ids": every, "include_stop_str_in_output": True})
    assert kept.choices[0].text and plain.choices[0].text.startswith(kept.choices[0].text)
    chunks = list(c.completions.create(**args, stream=True, extra_body={"stop_token_ids": every}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == ""
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(**args, extra_body={"stop_token_ids": [tok.vocab_size]})
    assert e.value.body["param"] == "stop_token_ids"


def test_stream_interval(agg):
    """vLLM's stream_interval: the first token at once, then a chunk per 8 tokens; same text."""
    c = agg.client()
    args = dict(model=MODEL, prompt="one two three", max_tokens=64, temperature=0)
    full = c.completions.create(**args, extra_body={"ignore_eos": True})
    chunks = [ch for ch in c.completions.create(**args, stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True, "stream_interval": 8})]
    text_chunks = [ch for ch in chunks if ch.choices and ch.choices[0].text]
    assert 2 <= len(text_chunks) <= 1 + -(-63 // 8)   # the first token, then 8 at a time
    assert "".join(ch.choices[0].text for ch in text_chunks) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 64
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(**args, stream=True, extra_body={"ignore_eos": True, "stream_interval": 0})
    assert e.value.body["param"] == "stream_interval"


def test_chat_stream_and_not(agg):
    c = agg.client()
    msgs = [{"role": "system", "content": "you are a helpful assistant ."},
            {"role": "user", "content": "what is the capital of france ?"}]
    full = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, seed=7,
                                     extra_body={"ignore_eos": True})
    assert full.choices[0].message.role == "assistant"
    assert full.usage.completion_tokens == 12
    stream = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, seed=7, stream=True,
                                       extra_body={"ignore_eos": True})
    parts = [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
    assert "".join(parts) == full.choices[0].message.content


def test_token_id_prompt_and_prefix_cache(agg):
    c = agg.client()
    ids = list(range(10, 10 + 100))
    first = c.completions.create(model=MODEL, prompt=ids, max_tokens=4, extra_body={"ignore_eos": True})
    assert first.usage.prompt_tokens == 100
    # round robin over 4 workers: the fourth repeat lands on the first worker again
    cached = [c.completions.create(model=MODEL, prompt=ids, max_tokens=4,
                                   extra_body={"ignore_eos": True}).usage.prompt_tokens_details.cached_tokens
              for _ in range(4)]
    assert max(cached) >= 96


def test_session_affinity_header(agg):
    """Round robin would spread a conversation's turns over the 4 workers; with the session header
    every turn lands where the previous ones are cached."""
    c = agg.client()
    history = random_tokens(64, seed=11)

    def turn(session):
        nonlocal history
        history = history + random_tokens(16, seed=len(history))
        headers = {"x-session-id": session} if session else {}
        return c.completions.create(model=MODEL, prompt=history, max_tokens=1, extra_headers=headers,
                                    extra_body={"ignore_eos": True}).usage.prompt_tokens_details.cached_tokens

    turn("conversation-1")
    assert min(turn("conversation-1") for _ in range(6)) >= 64   # every earlier turn was cached
    history = random_tokens(64, seed=12)
    turn(None)
    assert min(turn(None) for _ in range(6)) < 64    # control: without it, turns land elsewhere


def test_stop_string(agg):
    c = agg.client()
    base = c.completions.create(model=MODEL, prompt="hello world", max_tokens=40, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    assert len(base) > 10
    stop = base[len(base) // 2: len(base) // 2 + 3]
    cut = c.completions.create(model=MODEL, prompt="hello world", max_tokens=40, temperature=0, stop=[stop],
                               extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == base[:base.index(stop)]
    kept = c.completions.create(model=MODEL, prompt="hello world", max_tokens=40, temperature=0, stop=[stop],
                                extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert kept.choices[0].text == base[:base.index(stop) + len(stop)]


@pytest.mark.parametrize("chat", [True, False])
def test_a_plain_stream_and_a_watched_one_give_the_same_chunks(agg, chat):
    """A stream with nothing to watch takes the head's short way per token (StreamedAnswer.plain_text);
    a stop string that never matches sends it the general way: the same chunks either way."""
    c = agg.client()

    def chunks(**extra):
        args = dict(model=MODEL, max_tokens=40, temperature=0, stream=True, extra_body={"ignore_eos": True}, **extra)
        if chat:
            stream = c.chat.completions.create(messages=[{"role": "user", "content": "hello world"}], **args)
            return [(ch.choices[0].delta.role, ch.choices[0].delta.content, ch.choices[0].finish_reason)
                    for ch in stream]
        stream = c.completions.create(prompt="hello world", **args)
        return [(ch.choices[0].text, ch.choices[0].finish_reason) for ch in stream]

    plain = chunks()
    assert len(plain) > 20 and plain[-1][-1] == "length"
    assert chunks(stop=["\u2603 never"]) == plain


def test_min_tokens_and_sampling_params(agg):
    r = agg.client().completions.create(model=MODEL, prompt="one two", max_tokens=8, temperature=0.7,
                                        top_p=0.9, seed=3, extra_body={"top_k": 5, "min_tokens": 8})
    assert r.usage.completion_tokens == 8


def test_concurrent_requests(agg):
    c = agg.client()

    def one(i):
        return c.completions.create(model=MODEL, prompt=f"request {i}", max_tokens=8,
                                    extra_body={"ignore_eos": True}).usage.completion_tokens

    with cf.ThreadPoolExecutor(16) as pool:
        assert list(pool.map(one, range(48))) == [8] * 48


# ---- bad input ----------------------------------------------------------------------------------

def _post(dep, path, body, key=True, raw=None):
    headers = {"Authorization": f"Bearer {dep.api_key}"} if key else {}
    if raw is not None:
        headers["content-type"] = "application/json"
        return httpx.post(dep.base + path, content=raw, headers=headers, timeout=10)
    return httpx.post(dep.base + path, json=body, headers=headers, timeout=10)


@pytest.mark.parametrize("body,raw,status,param", [
    (None, b'{"model": "tiny-llama", "prompt": ', 400, None),
    ({"model": "nope", "prompt": "x"}, None, 404, "model"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, None, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, None, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "ten"}, None, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "n": 65}, None, 400, "n"),
    ({"model": MODEL, "prompt": "x", "logprobs": 21}, None, 400, "logprobs"),
    ({"model": MODEL, "prompt": [999999]}, None, 400, "prompt"),
    ({"model": MODEL, "prompt": "x " * 600}, None, 400, "prompt"),
    ({"model": MODEL}, None, 400, None),
    ({"model": MODEL, "prompt": "x", "stop": [""]}, None, 400, "stop"),
])
def test_bad_completion_requests(agg, body, raw, status, param):
    r = _post(agg, "/v1/completions", body, raw=raw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param:
        assert err["param"] == param
    assert "Traceback" not in r.text


def test_bad_chat_requests(agg):
    r = _post(agg, "/v1/chat/completions", {"model": MODEL, "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = _post(agg, "/v1/chat/completions",
              {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]


def test_prompt_too_long_through_openai(agg):
    with pytest.raises(openai.BadRequestError) as e:
        agg.client().completions.create(model=MODEL, prompt="x " * 600, max_tokens=4)
    assert e.value.code == "context_length_exceeded"


def test_auth_and_routes(agg):
    assert _post(agg, "/v1/completions", {"model": MODEL, "prompt": "x"}, key=False).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=agg.info["url"], api_key="sk-wrong", max_retries=0).models.list()
    assert httpx.get(agg.base + "/v1/nothing", headers={"Authorization": f"Bearer {agg.api_key}"}).status_code == 404
    assert httpx.get(agg.base + "/v1/completions", headers={"Authorization": f"Bearer {agg.api_key}"}).status_code == 405
    assert httpx.get(agg.base + "/health").status_code == 200


def test_api_key_file_private(agg):
    key_file = agg.info["api_key_file"]
    assert os.stat(key_file).st_mode & 0o777 == 0o600
    assert os.stat(os.path.dirname(key_file)).st_mode & 0o777 == 0o700


@pytest.mark.parametrize("n", [1, 3])
def test_client_disconnect_aborts(agg, n):
    """A client that leaves mid-stream: every choice's engine request is aborted."""
    before = metric(agg.metrics(), "slurmserve:requests_total", finish_reason="abort")
    with httpx.stream("POST", agg.base + "/v1/completions", timeout=30,
                      headers={"Authorization": f"Bearer {agg.api_key}"},
                      json={"model": MODEL, "prompt": "long one", "max_tokens": 400, "stream": True,
                            "ignore_eos": True, "n": n}) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    deadline = time.time() + 5
    while time.time() < deadline:
        m = agg.metrics()
        if (metric(m, "slurmserve:requests_total", finish_reason="abort") == before + n
                and metric(m, "slurmserve:instance_num_requests_running") == 0):
            return
        time.sleep(0.1)
    pytest.fail(f"a disconnected stream of {n} choice(s) was not aborted in the engine")


def _handshake_events(endpoint: str, socket_type: int, curve: bool) -> set[int]:
    """Connect like a stranger would (plain, or CURVE with a guessed server key); the monitor
    events seen in 1.5 s."""
    import zmq
    from zmq.utils.monitor import recv_monitor_message
    ctx = zmq.Context()
    s = ctx.socket(socket_type)
    if socket_type == zmq.SUB:
        s.setsockopt(zmq.SUBSCRIBE, b"")
    if curve:
        s.curve_serverkey = zmq.curve_keypair()[0]
        s.curve_publickey, s.curve_secretkey = zmq.curve_keypair()
    mon = s.get_monitor_socket()
    s.connect(endpoint)
    events = set()
    deadline = time.time() + 1.5
    while time.time() < deadline:
        if mon.poll(100):
            events.add(recv_monitor_message(mon)["event"])
    s.disable_monitor()
    mon.close(linger=0)
    s.close(linger=0)
    ctx.term()
    return events


@pytest.mark.parametrize("curve", [False, True])
def test_strangers_cannot_join_the_control_plane_or_read_kv_events(agg, curve):
    """Another cluster user who finds the head's ZeroMQ port, or an engine's KV-event port (token
    ids of prompts), can reach it but cannot complete a handshake."""
    import zmq
    targets = [(agg.info["control"], zmq.DEALER)]
    targets += [(i["kv_events"], zmq.SUB) for i in agg.info["instances"]]
    for endpoint, kind in targets:
        events = _handshake_events(endpoint, kind, curve)
        assert zmq.EVENT_CONNECTED in events, (endpoint, events)              # reachable...
        assert zmq.EVENT_HANDSHAKE_SUCCEEDED not in events, (endpoint, events)  # ...but closed
    assert metric(agg.metrics(), "slurmserve:instance_up") == 4


def test_metrics(agg):
    before = agg.metrics()
    prompt = "the quick brown fox jumps over the lazy dog " * 4      # fills KV blocks of 16 tokens
    chunks = list(agg.client().completions.create(model=MODEL, prompt=prompt, max_tokens=8,
                                                  extra_body={"ignore_eos": True}, stream=True))
    assert sum(len(c.choices[0].text) > 0 for c in chunks if c.choices) > 1
    m = agg.metrics()
    grew = lambda name, **labels: metric(m, name, **labels) - metric(before, name, **labels)  # noqa: E731
    assert grew("slurmserve:requests_total", finish_reason="length") == 1
    assert grew("slurmserve:generation_tokens_total") == 8
    assert metric(m, "slurmserve:instance_up") == 4
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
              "request_time_per_output_token_seconds"):
        assert grew(f"slurmserve:{h}_count") == 1, h
        assert grew(f"slurmserve:{h}_bucket", le="+Inf") == 1, h
    # at speedup 1 a sim step takes milliseconds: the 7 tokens after the first took some
    tpot = grew("slurmserve:request_time_per_output_token_seconds_sum")
    assert 0.001 < tpot < grew("slurmserve:e2e_request_latency_seconds_sum")
    # the engines' KV events reach the head (this request's prompt filled blocks, published at its prefill)
    assert metric(m, "slurmserve:kv_events_total", type="BlockStored") > 0
    assert metric(m, "slurmserve:kv_event_gaps_total") == 0


# ---- failures and shutdown ----------------------------------------------------------------------

def test_worker_killed_midstream(tiny_model_dir, tmp_path):
    cfg = sim_config(tiny_model_dir, workers=2)
    cfg["engine"]["sim"]["speedup"] = 0.5   # ~12 ms a token: streams outlive the kill
    shm_before = shm_files()
    dep = LocalDeployment(tmp_path, cfg).start()
    try:
        c = dep.client()
        victim = dep.info["instances"][0]["pid"]

        def stream(i):
            try:
                for _ in c.completions.create(model=MODEL, prompt=f"stream {i}", max_tokens=300, stream=True,
                                              extra_body={"ignore_eos": True}):
                    pass
                return "ok"
            except openai.APIError:
                return "error"

        with cf.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(stream, i) for i in range(4)]
            time.sleep(1.0)
            killed_at = time.time()
            os.kill(victim, signal.SIGKILL)
            results = [f.result(timeout=60) for f in futures]
        assert results == ["ok"] * 4, results   # the killed worker's streams migrate
        while metric(dep.metrics(), "slurmserve:instance_up", instance="0") != 0:
            assert time.time() - killed_at < 3.0, "dead worker still in rotation after 3 s"
            time.sleep(0.05)
        for i in range(6):
            r = c.completions.create(model=MODEL, prompt=f"after {i}", max_tokens=4)
            assert r.choices[0].text is not None
        assert dep.health() == 200
    finally:
        assert dep.stop() == 0, dep.output()
        leftover = dep.pids()
        dep.kill()
    assert leftover == [], f"processes left after shutdown: {leftover}"
    assert shm_files() - shm_before == set(), "a killed rank left shared memory behind"


def test_shutdown_leaves_no_process(tiny_model_dir, tmp_path):
    shm_before = shm_files()
    dep = LocalDeployment(tmp_path, sim_config(tiny_model_dir, workers=2)).start()
    assert len(dep.pids()) >= 4   # serve, mpirun, head, 2 workers
    started = time.time()
    assert dep.stop(signal.SIGTERM) == 0, dep.output()
    assert time.time() - started < 10
    deadline = time.time() + 3
    while dep.pids() and time.time() < deadline:
        time.sleep(0.1)
    assert dep.pids() == []
    assert shm_files() - shm_before == set()


# ---- disaggregated ------------------------------------------------------------------------------

def test_disaggregated_with_fallback(tiny_model_dir, tmp_path):
    cfg = sim_config(tiny_model_dir, prefill=1, decode=1)
    cfg["router"]["disagg"] = {"min_uncached_tokens": 0, "min_uncached_fraction": 0.0}   # always remote
    dep = LocalDeployment(tmp_path, cfg).start()
    try:
        c = dep.client()
        msgs = [{"role": "user", "content": "paris is the capital . " * 8}]
        r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 8
        # the decode instance received the prompt's KV from the prefill instance
        assert r.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens - 1
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model=MODEL, messages=msgs, max_tokens=8, stream=True, extra_body={"ignore_eos": True})
            if ch.choices)
        assert streamed == r.choices[0].message.content
        m = dep.metrics()
        assert metric(m, "slurmserve:disagg_requests_total", path="remote_prefill") == 2

        prefill = next(i for i in dep.info["instances"] if i["role"] == "prefill")
        os.kill(prefill["pid"], signal.SIGKILL)
        for i in range(3):
            again = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8,
                                              extra_body={"ignore_eos": True})
            assert again.choices[0].message.content == r.choices[0].message.content
        m = dep.metrics()
        assert metric(m, "slurmserve:disagg_requests_total", path="remote_prefill") == 2
        assert sum(metric(m, "slurmserve:disagg_requests_total", path=p) for p in
                   ("fallback_prefill_failed", "fallback_no_prefill_instance")) == 3
    finally:
        assert dep.stop() == 0, dep.output()
        dep.kill()


def test_head_failure_ends_the_job(tiny_model_dir, tmp_path):
    """The router's port is taken: the head says so without a traceback, tells the workers to
    stop, and `serve` ends promptly with a failure code instead of leaving the workers waiting."""
    import socket
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        cfg = sim_config(tiny_model_dir, workers=2)
        dep = LocalDeployment(tmp_path, dict(cfg, router=dict(cfg["router"], port=port)))
        started = time.time()
        with pytest.raises(RuntimeError, match="serve exited with 1"):
            dep.start(timeout=60)
    assert time.time() - started < 45
    out = dep.output()
    assert f"router: cannot listen on 127.0.0.1:{port}" in out
    assert "Traceback" not in out
    assert out.count("shutdown requested by the head: the head failed") == 2
    assert dep.pids() == []


# ---- KV-aware routing ---------------------------------------------------------------------------

def random_tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 500) for _ in range(n)]   # the tiny model's vocabulary is 512


def test_kv_policy_follows_cached_prefixes_and_spreads_load(tiny_model_dir, tmp_path):
    cfg = sim_config(tiny_model_dir)
    cfg["router"]["policy"] = "kv"
    dep = LocalDeployment(tmp_path, cfg).start()
    try:
        c = dep.client()

        def cached(prompt):
            return c.completions.create(model=MODEL, prompt=prompt, max_tokens=2, extra_body={
                "ignore_eos": True}).usage.prompt_tokens_details.cached_tokens

        # every repeat of a prompt lands where its prefix is cached (round robin: 1 in 4)
        prefixes = [random_tokens(160, seed=p) for p in range(4)]
        for p in prefixes:
            assert cached(p) == 0
        assert [cached(p + [7, 8]) for p in prefixes for _ in range(3)] == [160] * 12
        # the engines' own prefix-cache counters, mirrored from heartbeats, say the same
        def engine_counts():
            m = dep.metrics()
            return [sum(metric(m, f"slurmserve:instance_prefix_cache_{kind}_total", instance=i)
                        for i in range(4)) for kind in ("queries", "hits")]
        deadline = time.time() + 5
        while engine_counts() != [4 * 160 + 12 * 162, 12 * 160] and time.time() < deadline:
            time.sleep(0.1)
        assert engine_counts() == [4 * 160 + 12 * 162, 12 * 160]
        # four cold prefixes went to four different workers: load counts when no cache helps
        m = dep.metrics()
        assert sorted(metric(m, "slurmserve:kv_events_total", type="BlockStored", instance=i) > 0
                      for i in range(4)) == [True] * 4
    finally:
        assert dep.stop() == 0, dep.output()
        dep.kill()


def test_conditional_disaggregation(tiny_model_dir, tmp_path):
    cfg = sim_config(tiny_model_dir, prefill=1, decode=1)
    cfg["router"].update(policy="kv", disagg={"min_uncached_tokens": 64, "min_uncached_fraction": 0.3})
    dep = LocalDeployment(tmp_path, cfg).start()
    try:
        c = dep.client()

        def run(prompt):
            return c.completions.create(model=MODEL, prompt=prompt, max_tokens=4, extra_body={"ignore_eos": True})

        def paths():
            m = dep.metrics()
            return {p: metric(m, "slurmserve:disagg_requests_total", path=p) for p in
                    ("remote_prefill", "local_below_min_tokens", "local_below_min_fraction")}

        run(random_tokens(30, seed=1))                  # 30 tokens: not worth a transfer
        assert paths() == {"remote_prefill": 0, "local_below_min_tokens": 1, "local_below_min_fraction": 0}
        long = random_tokens(200, seed=2)
        first = run(long)                               # 200 uncached tokens: prefilled remotely
        assert paths()["remote_prefill"] == 1
        assert first.usage.prompt_tokens_details.cached_tokens >= 192   # arrived by transfer
        time.sleep(0.5)                                 # the decode instance's KV events reach the head
        again = run(long[:192] + random_tokens(80, seed=3))  # 80 uncached of 272: > 64 tokens, < 30 %
        assert paths() == {"remote_prefill": 1, "local_below_min_tokens": 1, "local_below_min_fraction": 1}
        assert again.usage.prompt_tokens_details.cached_tokens == 192
    finally:
        assert dep.stop() == 0, dep.output()
        dep.kill()


def test_rank_count_mismatch_is_clear(tiny_model_dir, tmp_path):
    import subprocess
    import sys
    import yaml
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(dict(sim_config(tiny_model_dir), log_dir=str(tmp_path / "logs"))))
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    r = subprocess.run(["mpirun", "-n", "2", "--oversubscribe", sys.executable, "-m", "slurmserve", "run",
                        str(cfg_path)], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode != 0
    # both ranks say it (their lines may interleave, so count the phrase, not lines)
    assert r.stderr.count("the config needs 5 MPI ranks") == 2, r.stderr
    assert r.stderr.count("but the job has 2") == 2, r.stderr
    assert "Traceback" not in r.stderr
