"""OpenAI request schemas, validation into engine requests, and response/chunk encoding.

Requests are decoded with msgspec straight into typed structs: a wrong type or range becomes a
400 whose message names the field. Streamed chunks are written from per-request byte templates,
so a chunk costs one JSON string escape, not a dict build and a full encode.
"""

from __future__ import annotations

import functools
import re
import time
import uuid
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from slurmserve.runtime.protocol import SamplingParams


class APIError(Exception):
    """An error the client caused or must be told about, rendered as OpenAI's error object."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> bytes:
        return msgspec.json.encode({"error": {"message": self.message, "type": self.type,
                                              "param": self.param, "code": self.code}})


class StreamOptions(Struct, forbid_unknown_fields=False):
    include_usage: bool = False


MAX_N = 64             # choices per prompt: each is an engine request of its own
MAX_CHOICES = 256      # choices per request, over all its prompts
MAX_LOGPROBS = 20      # top logprobs per position (OpenAI's chat limit; vLLM's default max_logprobs)
LOGPROB_FLOOR = -9999.0   # what -inf becomes in JSON (vLLM's and OpenAI's)


class _Common(Struct, kw_only=True, forbid_unknown_fields=False):
    model: str
    max_tokens: Annotated[int, Meta(ge=0)] | None = None     # 0: completions with echo only
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Meta(ge=-1)] | None = None
    seed: int | None = None
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[float, Meta(gt=0.0)] | None = None     # vLLM's; 1 = off
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None           # vLLM's; 0 = off
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None           # vLLM's: tokens that end the answer
    include_stop_str_in_output: bool = False          # vLLM's: keep the stop string or token's text
    skip_special_tokens: bool = True                  # vLLM's
    ignore_eos: bool = False
    min_tokens: Annotated[int, Meta(ge=0)] = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    stream_interval: Annotated[int, Meta(ge=1)] | None = None   # vLLM's: tokens per streamed chunk
    n: Annotated[int, Meta(ge=1, le=MAX_N)] = 1
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    # vLLM's structured-output extras: StructuredOutputsParams fields, and the older guided_* names
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    tools: list[Any] | None = None
    user: str | None = None


class CompletionRequest(_Common, kw_only=True):
    prompt: str | list[Any]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)] | None = None   # top logprobs per token


class ChatRequest(_Common, kw_only=True):
    messages: Annotated[list[dict[str, Any]], Meta(min_length=1)]
    max_completion_tokens: Annotated[int, Meta(ge=1)] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)] | None = None
    tool_choice: str | dict[str, Any] | None = None    # checked by router.tool_calls
    parallel_tool_calls: bool | None = None


_completion_decoder = msgspec.json.Decoder(CompletionRequest)
_chat_decoder = msgspec.json.Decoder(ChatRequest)
_LOC = re.compile(r" - at `\$\.?([^`]*)`$")
# msgspec's decoder recurses per level of nesting: a body like `[[[[...` thousands deep ends in
# RecursionError, which is the client's mistake, not the server's.
NESTED_TOO_DEEP = "request body is not valid JSON: nested too deeply"


def parse(body: bytes, chat: bool) -> CompletionRequest | ChatRequest:
    try:
        return (_chat_decoder if chat else _completion_decoder).decode(body)
    except msgspec.ValidationError as e:
        text = str(e)
        m = _LOC.search(text)
        param = m.group(1) if m else None
        msg = _LOC.sub("", text)
        raise APIError(400, f"{param}: {msg}" if param else msg, param=param) from None
    except msgspec.DecodeError as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, NESTED_TOO_DEEP) from None


def check_supported(req: _Common) -> None:
    # Accepted by the OpenAI API but not served here: refused, rather than silently ignored.
    if req.tools and not isinstance(req, ChatRequest):
        raise APIError(400, "tools (function calling) are for chat completions", param="tools")
    if getattr(req, "tool_choice", None) is not None and not req.tools:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    if req.tools and getattr(req, "logprobs", False):
        raise APIError(400, "logprobs together with tools are not supported", param="logprobs")
    if getattr(req, "suffix", None):
        raise APIError(400, "suffix is not supported", param="suffix")
    if (getattr(req, "best_of", None) or 1) != 1:
        raise APIError(400, "only best_of=1 is supported", param="best_of")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    if req.min_tokens and req.max_tokens is not None and req.min_tokens > req.max_tokens:
        raise APIError(400, "min_tokens must be at most max_tokens", param="min_tokens")
    if req.max_tokens == 0 and not getattr(req, "echo", False):
        raise APIError(400, "max_tokens must be at least 1 (0 only with echo: the prompt alone)",
                       param="max_tokens")
    if getattr(req, "top_logprobs", None) is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")


def logprobs_wanted(req: _Common, chat: bool) -> int | None:
    """Top logprobs per output token the request asks for (0: the sampled token's only), or None."""
    if chat:
        return (req.top_logprobs or 0) if req.logprobs else None
    return req.logprobs


def structured_outputs(req: _Common) -> tuple[dict[str, Any] | None, str]:
    """The request's structured-output constraint as vLLM's StructuredOutputsParams fields (or
    None), and the parameter that set it: response_format (OpenAI's), or vLLM's
    structured_outputs or guided_* extras."""
    rf, spec, param = req.response_format, None, "response_format"
    if rf is not None:
        kind = rf.get("type", "text")
        if kind == "json_object":
            spec = {"json_object": True}
        elif kind == "json_schema":
            js = rf.get("json_schema")
            schema = js.get("schema", {}) if isinstance(js, dict) else None
            if not isinstance(schema, dict):
                raise APIError(400, "response_format: json_schema must be an object with a `schema` object "
                                    "(JSON Schema)", param="response_format")
            spec = {"json": schema}
        elif kind != "text":
            raise APIError(400, f"response_format: type must be text, json_object or json_schema, not "
                                f"{kind!r}", param="response_format")
    guided = {k: v for k, v in (("json", req.guided_json), ("regex", req.guided_regex),
                                ("choice", req.guided_choice), ("grammar", req.guided_grammar)) if v is not None}
    if guided and spec is not None:
        param = "guided_" + next(iter(guided))
        raise APIError(400, f"{param} and response_format both constrain the output: send one", param=param)
    if req.structured_outputs is not None:
        # as in vLLM: its options (disable_any_whitespace, ...) also apply to a response_format
        spec, param = {**req.structured_outputs, **guided, **(spec or {})}, "structured_outputs"
    elif guided:
        spec, param = guided, "guided_" + next(iter(guided))
    if spec is None:
        return None, param
    unknown = sorted(set(spec) - _STRUCTURED_FIELDS)
    if unknown:
        raise APIError(400, f"{param}: unknown field(s) {', '.join(unknown)}", param=param)
    if sum(spec.get(k) is not None for k in _STRUCTURED_KINDS) != 1:
        raise APIError(400, f"{param}: exactly one of {', '.join(_STRUCTURED_KINDS)} is needed",
                       param=param)
    return spec, param


_STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
_STRUCTURED_FIELDS = frozenset(_STRUCTURED_KINDS + ("disable_any_whitespace", "disable_additional_properties",
                                                    "whitespace_pattern"))


def completion_prompts(req: CompletionRequest, vocab_size: int) -> list[str | list[int]]:
    """The prompts of a completion request, each text or token ids within the vocabulary: one
    (a string, a list of ids) or several (a list of strings, a list of lists of ids)."""
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if p and all(isinstance(x, str) for x in p):
        prompts = list(p)
    elif p and all(isinstance(x, list) for x in p):
        prompts = [_token_ids(x, vocab_size, f"prompt[{i}]") for i, x in enumerate(p)]
    else:
        prompts = [_token_ids(p, vocab_size, "prompt")]
    if len(prompts) * req.n > MAX_CHOICES:
        raise APIError(400, f"{len(prompts)} prompts x n={req.n} is over {MAX_CHOICES} choices a request",
                       param="prompt")
    if any(not x for x in prompts):
        raise APIError(400, "prompt must not be empty", param="prompt")
    return prompts


def _token_ids(p: list, vocab_size: int, where: str) -> list[int]:
    if not p:
        raise APIError(400, f"{where} must not be empty", param="prompt")
    try:
        msgspec.convert(p, _token_ids_type(vocab_size))   # one check in C: a Python loop costs ~0.1 ms per 2k ids
        return p
    except msgspec.ValidationError:
        pass
    if all(type(t) is int for t in p):
        bad = next(t for t in p if not 0 <= t < vocab_size)
        raise APIError(400, f"{where}: token id {bad} is out of vocabulary (size {vocab_size})", param="prompt")
    raise APIError(400, "prompt must be a string, a list of token ids, or a list of either", param="prompt")


def sampling_params(req: _Common, prompt_len: int, max_model_len: int, vocab_size: int,
                    eos_token_id: int | None, chat: bool, structured: dict | None = None) -> SamplingParams:
    max_tokens = req.max_completion_tokens if chat and req.max_completion_tokens else req.max_tokens
    if max_tokens is None:
        # OpenAI's completions default is 16; chat defaults to the rest of the context, as vLLM does.
        max_tokens = max_model_len - prompt_len if chat else 16
    echo_only = max_tokens == 0        # echo the prompt (and its logprobs) only: the engine makes one
    max_tokens = max(max_tokens, 1)    # token, which the answer leaves out (as vLLM does)
    if prompt_len + max(max_tokens, 1) > max_model_len or max_tokens < 1:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, "
                            f"you requested {prompt_len + max_tokens} tokens ({prompt_len} in the "
                            f"messages, {max_tokens} in the completion). Please reduce the length of "
                            f"the messages or completion.", param="messages" if chat else "prompt",
                       code="context_length_exceeded")
    if req.seed is not None and not (-(2**63) <= req.seed < 2**63):
        raise APIError(400, "seed is out of range", param="seed")
    top_k = req.top_k if req.top_k not in (None, 0) else -1
    stop_ids = [] if req.ignore_eos or eos_token_id is None else [eos_token_id]
    for t in req.stop_token_ids or ():     # (ignore_eos ignores EOS only, as in vLLM)
        if not 0 <= t < vocab_size:
            raise APIError(400, f"stop_token_ids: {t} is not a token id of this model (vocabulary {vocab_size})",
                           param="stop_token_ids")
        if t not in stop_ids:
            stop_ids.append(t)
    bias = None
    if req.logit_bias:
        try:
            bias = {int(k): v for k, v in req.logit_bias.items()}
        except ValueError:
            raise APIError(400, "logit_bias: keys must be token ids", param="logit_bias") from None
        if not all(0 <= t < vocab_size for t in bias):
            raise APIError(400, f"logit_bias: token ids must be below {vocab_size}", param="logit_bias")
        if not all(-100.0 <= b <= 100.0 for b in bias.values()):
            raise APIError(400, "logit_bias: biases must be from -100 to 100", param="logit_bias")
    top = logprobs_wanted(req, chat)
    echo_logprobs = None if chat or not req.echo or top is None else top
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=top_k,
        seed=req.seed,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        min_p=req.min_p or 0.0,
        min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos,
        stop_token_ids=stop_ids,
        logprobs=None if echo_only else top,
        prompt_logprobs=echo_logprobs,
        logit_bias=bias,
        structured_outputs=structured,
    )


@functools.lru_cache(maxsize=8)
def _token_ids_type(vocab_size: int):
    return list[Annotated[int, Meta(ge=0, lt=vocab_size)]]


def stop_strings(req: _Common) -> list[str]:
    if req.stop is None:
        return []
    stops = [req.stop] if isinstance(req.stop, str) else req.stop
    if any(not s for s in stops):
        raise APIError(400, "stop strings must not be empty", param="stop")
    return stops


# ---- responses ----------------------------------------------------------------------------------

def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def full_response(chat: bool, rid: str, model: str, choices: list[tuple[str | dict, str, Any]],
                  usage_: dict) -> bytes:
    """The body of a whole answer; `choices`: (text, finish reason, logprobs object or None) of
    each, in index order. A chat choice's text may be its whole message instead (tool calls)."""
    if chat:
        out = [{"index": i, "message": text if isinstance(text, dict) else {"role": "assistant", "content": text},
                "logprobs": lp, "finish_reason": finish} for i, (text, finish, lp) in enumerate(choices)]
        obj = "chat.completion"
    else:
        out = [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}
               for i, (text, finish, lp) in enumerate(choices)]
        obj = "text_completion"
    return msgspec.json.encode({"id": rid, "object": obj, "created": int(time.time()), "model": model,
                                "choices": out, "usage": usage_})


class ChunkWriter:
    """SSE chunks of one choice of a streamed response, built from byte templates made once per
    request (the usage chunk belongs to the whole response)."""

    __slots__ = ("_head", "_chat", "_usage_head", "_text_head", "_text_tail")

    def __init__(self, chat: bool, rid: str, model: str, index: int = 0):
        obj = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())
        enc = msgspec.json.encode
        self._chat = chat
        self._usage_head = (b'data: {"id":' + enc(rid) + b',"object":"' + obj.encode() + b'","created":'
                            + str(created).encode() + b',"model":' + enc(model) + b',"choices":[')
        self._head = self._usage_head + b'{"index":' + str(index).encode() + b","
        # a text chunk: _text_head, the text as JSON, then (after the delta's "}") logprobs and
        # finish_reason; _text_tail is that rest for the chunk of nearly every token, with neither
        self._text_head = self._head + (b'"delta":{"content":' if chat else b'"text":')
        self._text_tail = (b"}" if chat else b"") + b',"logprobs":null,"finish_reason":null}]}\n\n'

    def role(self) -> bytes:
        return self._head + b'"delta":{"role":"assistant","content":""},"logprobs":null,' \
                            b'"finish_reason":null}]}\n\n'

    def text(self, text: str, finish_reason: str | None = None, logprobs: bytes = b"null") -> bytes:
        t = msgspec.json.encode(text)
        if finish_reason is None and logprobs == b"null":
            return self._text_head + t + self._text_tail
        fr = b"null" if finish_reason is None else b'"' + finish_reason.encode() + b'"'
        return (self._text_head + t + (b"}" if self._chat else b"") + b',"logprobs":' + logprobs
                + b',"finish_reason":' + fr + b"}]}\n\n")

    def delta(self, delta: dict) -> bytes:
        """A chat chunk with any delta object (tool calls)."""
        return self._head + b'"delta":' + msgspec.json.encode(delta) + b',"logprobs":null,"finish_reason":null}]}\n\n'

    def finish(self, finish_reason: str) -> bytes:
        fr = b'"' + finish_reason.encode() + b'"'
        if self._chat:
            body = b'"delta":{},"logprobs":null,"finish_reason":' + fr
        else:
            body = b'"text":"","logprobs":null,"finish_reason":' + fr
        return self._head + body + b"}]}\n\n"

    def usage(self, usage_: dict) -> bytes:
        return self._usage_head + b'],"usage":' + msgspec.json.encode(usage_) + b"}\n\n"

    @staticmethod
    def error(err: APIError) -> bytes:
        return b"data: " + err.body() + b"\n\n"

    DONE = b"data: [DONE]\n\n"


# ---- logprobs -----------------------------------------------------------------------------------

class TokenText:
    """Each token id's own text, as logprobs show it (vLLM's: decode([id]), with the leading
    spaces that a SentencePiece decode strips put back), cached per id."""

    def __init__(self, tok):
        self._decode = tok.hf.decode
        self._raw = tok.backend.id_to_token
        self._marker = _metaspace_marker(tok.backend)
        self._cache: dict[int, str] = {}

    def __call__(self, tid: int) -> str:
        text = self._cache.get(tid)
        if text is None:
            text = self._decode([tid]) or ""
            if self._marker:
                raw = self._raw(tid) or ""
                markers = len(raw) - len(raw.lstrip(self._marker))
                missing = markers - (len(text) - len(text.lstrip(" ")))
                if missing > 0:
                    text = " " * missing + text
            self._cache[tid] = text
        return text


def _metaspace_marker(backend) -> str | None:
    import json
    try:
        pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    except (ValueError, AttributeError):
        return None
    for p in [pre] + list(pre.get("pretokenizers") or ()):
        if p.get("type") == "Metaspace":
            return p.get("replacement", "\u2581")
    return None


def _lp(x: float) -> float:
    return x if x >= LOGPROB_FLOOR else LOGPROB_FLOOR    # (also maps NaN... never sent by engines)


def logprobs_object(chat: bool, entries: list[tuple], text: TokenText, offset: int = 0) -> tuple[dict, int]:
    """OpenAI's logprobs object of positions `entries`, each (token id, logprob or None, top ids,
    top logprobs), and the text offset after them. Chat: {"content": [{token, logprob, bytes,
    top_logprobs}]}; completions: tokens, token_logprobs, top_logprobs (the top ones plus the
    position's own token) and text_offset (from `offset`)."""
    if chat:
        content = []
        for tid, lp, top_ids, top_lps in entries:
            t = text(tid)
            content.append({"token": t, "logprob": _lp(lp), "bytes": list(t.encode("utf-8", "replace")),
                            "top_logprobs": [{"token": (u := text(i)), "logprob": _lp(x),
                                              "bytes": list(u.encode("utf-8", "replace"))}
                                             for i, x in zip(top_ids, top_lps)]})
        return {"content": content}, offset
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, lp, top_ids, top_lps in entries:
        t = text(tid)
        tokens.append(t)
        offsets.append(offset)
        offset += len(t)
        if lp is None:      # a prompt's first token
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(_lp(lp))
        top = {text(i): _lp(x) for i, x in zip(top_ids, top_lps)}
        top.setdefault(t, _lp(lp))
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}, offset
