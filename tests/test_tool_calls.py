"""Function calling (issue 22): a chat request's tools reach the chat template; tool_choice
"required" and a named function constrain the output to JSON made from the tools (vLLM's own
schema) and answer with tool_calls; "auto" reads calls from the model's text with vLLM's tool
parser (router.tool_call_parser). Whole and streamed, through the real openai client, against
real vLLM with the tiny model. The request rules are checked in-process first."""

from __future__ import annotations

import json

import pytest

from test_head_app import app, call, chat  # noqa: F401 - the in-process head fixture

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"$ref": "#/$defs/zone"}}, "required": ["zone"],
    "additionalProperties": False, "$defs": {"zone": {"type": "string", "enum": ["utc", "cet"]}}}}}
NO_PARAMS = {"type": "function", "function": {"name": "ping"}}


# ---- the request's rules, in-process ------------------------------------------------------------

@pytest.mark.parametrize("body,param", [
    (chat(tools=[{"type": "function"}]), "tools[0]"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": 3}}]), "tools[0]"),
    (chat(tools=[WEATHER], tool_choice="sometimes"), "tool_choice"),
    (chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (chat(tools=[WEATHER], tool_choice="auto"), "tool_choice"),        # no router.tool_call_parser here
    (chat(tool_choice="required"), "tool_choice"),                     # without tools
    (chat(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}), "response_format"),
    (chat(tools=[WEATHER], logprobs=True), "logprobs"),
])
def test_tool_requests_that_cannot_be_served_are_400s_naming_the_parameter(app, body, param):  # noqa: F811
    status, answer = call(app, "POST", "/v1/chat/completions", body)
    assert status == 400 and answer["error"]["param"] == param, answer


def test_tools_on_completions_are_a_400(app):  # noqa: F811
    status, answer = call(app, "POST", "/v1/completions",
                          {"model": "tiny-llama", "prompt": "x", "tools": [WEATHER]})
    assert status == 400 and answer["error"]["param"] == "tools"


def test_valid_tool_requests_pass_the_rules(app):  # noqa: F811
    """tool_choice none, required, a named function, and the default (none without a parser) get
    past every rule: the one instance of this head is not up, so they meet a 503."""
    for extra in ({}, {"tool_choice": "none"}, {"tool_choice": "required", "parallel_tool_calls": False},
                  {"tool_choice": {"type": "function", "function": {"name": "get_time"}}}):
        status, answer = call(app, "POST", "/v1/chat/completions", chat(tools=[WEATHER, TIME, NO_PARAMS], **extra))
        assert status == 503, (extra, answer)


# ---- vLLM's schema, and its parser, on a deployment ---------------------------------------------

@pytest.mark.vllm
def test_required_schema_is_vllms():
    """The JSON schema of tool_choice "required" (and of a named function) is the one vLLM's own
    server builds, $defs hoisted and parallel_tool_calls false included."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    from slurmserve.router.tool_calls import tools_schema

    tools = [WEATHER, TIME, NO_PARAMS]
    for parallel in (None, True, False):
        req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], tools=json.loads(json.dumps(tools)),
                                    tool_choice="required", parallel_tool_calls=parallel)
        assert tools_schema(json.loads(json.dumps(tools)), parallel) == \
            get_json_schema_from_tools(req.tool_choice, req.tools, parallel), parallel


TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\ntools: ' }}{% for t in tools %}{{ t['function']['name'] + ' ' }}"
    "{% endfor %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %}{{ c['function']['name'] + ' city ' + c['function']['arguments']['city'] }}"
    "{% endfor %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def dep(tiny_model_dir, tmp_path_factory):
    """A vLLM deployment of the tiny model with a template that writes the tools, and vLLM's
    pythonic tool parser (calls written as `[name(arg=value)]`)."""
    import shutil

    import vllm_cpu
    from test_serve_vllm import vllm_config

    model = tmp_path_factory.mktemp("tools-model") / "m"
    shutil.copytree(tiny_model_dir, model)
    tc = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps(dict(tc, chat_template=TEMPLATE)))
    cfg = vllm_config(model, workers=1)
    cfg["router"]["tool_call_parser"] = "pythonic"
    cfg["engine"]["args"] = dict(cfg["engine"]["args"], **vllm_cpu.COMPACT_JSON)
    with vllm_cpu.deployment(cfg, tmp_path_factory.mktemp("vllm-tools")) as d:
        yield d


def ask(dep, stream=False, **kw):
    from test_serve_vllm import MODEL
    c = dep.client(timeout=120)
    kw.setdefault("messages", [{"role": "user", "content": "what is the weather in paris ?"}])
    kw.setdefault("max_tokens", 60)
    return c.chat.completions.create(model=MODEL, temperature=0, stream=stream, **kw)


def streamed(chunks) -> tuple[str, dict[int, dict], str]:
    """(content, tool calls by index {id, name, arguments}, finish reason) of a streamed answer."""
    content, calls, finish = "", {}, None
    for ch in chunks:
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or ():
            c = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            c["id"] = c["id"] or tc.id
            if tc.function is not None:
                c["name"] += tc.function.name or ""
                c["arguments"] += tc.function.arguments or ""
        finish = ch.choices[0].finish_reason or finish
    return content, calls, finish


@pytest.mark.vllm
def test_named_function_answers_with_its_call(dep):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = ask(dep, tools=[WEATHER, TIME], tool_choice=choice)
    msg = r.choices[0].message
    assert msg.content is None and r.choices[0].finish_reason == "stop"   # OpenAI's, for a forced function
    (call_,) = msg.tool_calls
    assert call_.type == "function" and call_.function.name == "get_weather" and call_.id.startswith("call_")
    args = json.loads(call_.function.arguments)
    assert set(args) == {"city"} and isinstance(args["city"], str)
    content, calls, finish = streamed(ask(dep, stream=True, tools=[WEATHER, TIME], tool_choice=choice))
    assert content == "" and finish == "stop" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert calls[0]["arguments"] == call_.function.arguments      # greedy: the same arguments, in pieces


@pytest.mark.vllm
def test_required_answers_with_calls_of_the_tools(dep):
    r = ask(dep, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    (call_,) = r.choices[0].message.tool_calls
    args = json.loads(call_.function.arguments)
    assert (call_.function.name, set(args)) in (("get_weather", {"city"}), ("get_time", {"zone"}))
    content, calls, finish = streamed(ask(dep, stream=True, tools=[WEATHER, TIME], tool_choice="required",
                                          parallel_tool_calls=False))
    assert finish == "tool_calls" and content == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [(call_.function.name, args)]


PARIS = r'\[get_weather\(city="Paris"\)\]'     # the model is made to write a pythonic call


@pytest.mark.vllm
def test_auto_reads_the_models_call_with_vllms_parser(dep):
    r = ask(dep, tools=[WEATHER], extra_body={"structured_outputs": {"regex": PARIS}})
    assert r.choices[0].finish_reason == "tool_calls"
    (call_,) = r.choices[0].message.tool_calls
    assert call_.function.name == "get_weather" and json.loads(call_.function.arguments) == {"city": "Paris"}
    assert not r.choices[0].message.content
    content, calls, finish = streamed(ask(dep, stream=True, tools=[WEATHER],
                                          extra_body={"structured_outputs": {"regex": PARIS}}))
    assert finish == "tool_calls" and not content
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("get_weather", {"city": "Paris"})]
    # text that is no call stays text
    r = ask(dep, tools=[WEATHER], max_tokens=4)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content


@pytest.mark.vllm
def test_tools_and_tool_messages_reach_the_template(dep):
    """The template writes the tools' names (more prompt tokens), and a conversation that carries
    an assistant's tool call (arguments as a JSON string, handed to the template as an object) and
    the tool's answer is served."""
    plain = ask(dep, max_tokens=1).usage.prompt_tokens
    assert ask(dep, max_tokens=1, tools=[WEATHER, TIME]).usage.prompt_tokens > plain
    history = [{"role": "user", "content": "weather in paris ?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps({"city": "paris"})}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = ask(dep, max_tokens=1, tools=[WEATHER], messages=history, tool_choice="none")
    with_call = r.usage.prompt_tokens
    r2 = ask(dep, max_tokens=1, tools=[WEATHER], messages=[history[0], {"role": "assistant", "content": ""},
                                                          history[2]], tool_choice="none")
    assert with_call > r2.usage.prompt_tokens      # "get_weather city paris" was written
