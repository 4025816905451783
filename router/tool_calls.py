"""Function calling on the head: a chat request's `tools` and `tool_choice`, the way vLLM's OpenAI
server serves them.

- The tools go to the chat template (`tools=`), which tells the model about them.
- tool_choice "required" or a named function: the output is constrained to JSON by a schema made
  from the tools (vLLM's own construction: an array of {name, parameters} for "required", the
  function's parameters for a named one), and that JSON becomes `tool_calls`.
- tool_choice "auto" (the default when the deployment names a parser): the model writes calls in
  its own format, which vLLM's tool parser for that model (`router.tool_call_parser`, e.g. hermes,
  llama3_json, pythonic, mistral) finds in the text. vLLM is imported for this only.
- "none", or tools without a parser: the tools reach the template; the answer is text.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from slurmserve.router.openai_api import APIError

def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _params(tool: dict) -> dict:
    # Missing or empty parameters still constrain the arguments to a JSON object (as vLLM does).
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def tools_schema(tools: list[dict], parallel: bool | None) -> dict:
    """The JSON schema of tool_choice "required": one call or more (one, with parallel_tool_calls
    false), each {"name": one of the tools, "parameters": its parameters}; `$defs` of the tools'
    parameters are hoisted to the top."""
    defs: dict[str, Any] = {}
    variants = []
    for tool in tools:
        params = dict(_params(tool))
        for name, schema in (params.pop("$defs", None) or {}).items():
            if defs.setdefault(name, schema) != schema:
                raise APIError(400, f"tools: definition {name!r} has two different schemas", param="tools")
        variants.append({"properties": {"name": {"type": "string", "enum": [tool["function"]["name"]]},
                                        "parameters": params},
                         "required": ["name", "parameters"]})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": variants}}
    if parallel is False:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


class ToolCalling:
    """A request's function-calling settings, checked; `answer()` makes one choice's state."""

    def __init__(self, req, parser_name: str | None, tokenizer):
        tools, choice = req.tools, req.tool_choice
        if not isinstance(tools, list) or not tools:
            raise APIError(400, "tools must be a non-empty list of functions", param="tools")
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict) \
                    or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise APIError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                               param=f"tools[{i}]")
            if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
                raise APIError(400, f"tools[{i}].function.parameters must be a JSON Schema object",
                               param=f"tools[{i}]")
        self.tools = tools
        self.parallel = req.parallel_tool_calls
        self.name: str | None = None
        if choice is None:                       # vLLM's default: auto when it can parse calls
            choice = "auto" if parser_name else "none"
        if isinstance(choice, dict):
            fn = choice.get("function")
            name = fn.get("name") if isinstance(fn, dict) else None
            if choice.get("type", "function") != "function" or not isinstance(name, str):
                raise APIError(400, 'tool_choice must be "none", "auto", "required" or '
                                    '{"type": "function", "function": {"name": ...}}', param="tool_choice")
            if name not in {t["function"]["name"] for t in tools}:
                raise APIError(400, f"tool_choice: function {name!r} is not one of the tools", param="tool_choice")
            self.mode, self.name = "named", name
        elif choice in ("none", "auto", "required"):
            self.mode = choice
        else:
            raise APIError(400, 'tool_choice must be "none", "auto", "required" or a named function',
                           param="tool_choice")
        if self.mode == "auto" and not parser_name:
            raise APIError(400, 'tool_choice "auto" needs a tool-call parser for this model: set '
                                'router.tool_call_parser (e.g. hermes, llama3_json, pythonic, mistral)',
                           param="tool_choice")
        self._parser_cls = _parser_class(parser_name) if self.mode == "auto" else None
        self._tokenizer = tokenizer
        self.vllm_request = None      # vLLM's own request object, which its parsers read (auto only)

    def structured_outputs(self) -> dict | None:
        """The constraint of a forced choice, as vLLM's StructuredOutputsParams fields."""
        if self.mode == "named":
            tool = next(t for t in self.tools if t["function"]["name"] == self.name)
            return {"json": _params(tool)}
        if self.mode == "required":
            return {"json": tools_schema(self.tools, self.parallel)}
        return None

    def answer(self) -> ToolAnswer:
        parser = None
        if self._parser_cls is not None:
            if self.vllm_request is None:
                self.vllm_request = _vllm_request(self.tools, self.parallel)
            parser = self._parser_cls(self._tokenizer, self.vllm_request.tools)
        return ToolAnswer(self, parser)


class ToolAnswer:
    """One choice's text turned into tool calls: whole (`message`) or streamed (`feed`)."""

    def __init__(self, calling: ToolCalling, parser):
        self.c = calling
        self.parser = parser
        self.called = False
        # streaming state
        self._text, self._ids = "", []
        self._id = _call_id()
        self._named_sent = False   # named: the first tool_calls delta (id, name) went out

    # ---- whole answers --------------------------------------------------------------------------

    def message(self, text: str, finish: str) -> tuple[dict, str]:
        """The assistant message of a finished choice and its finish reason."""
        c = self.c
        if c.mode == "named":
            self.called = True
            return _message(None, [_call(self._id, c.name, text)]), finish
        if c.mode == "required":
            calls = _required_calls(text)
            if calls is None:           # cut by max_tokens: no JSON to read
                return _message(text, None), finish
            self.called = True
            return _message(None, [_call(_call_id(), n, a) for n, a in calls]), "tool_calls"
        if c.mode == "auto":
            info = self.parser.extract_tool_calls(text, c.vllm_request)
            if info.tools_called:
                self.called = True
                calls = [_call(tc.id or _call_id(), tc.function.name, tc.function.arguments)
                         for tc in info.tool_calls]
                return _message(info.content or None, calls), "tool_calls"
        return _message(text, None), finish

    # ---- streamed answers -----------------------------------------------------------------------

    def feed(self, piece: str, ids: list[int], final: bool) -> list[dict]:
        """The `delta` objects for the next piece of text (and its token ids) of a streamed choice."""
        c = self.c
        if c.mode == "named":
            if not piece and self._named_sent:
                return []
            self.called = True
            fn = {"arguments": piece}
            call = {"index": 0, "function": fn}
            if not self._named_sent:
                self._named_sent = True
                call.update(id=self._id, type="function")
                fn["name"] = c.name
            return [{"tool_calls": [call]}]
        if c.mode == "required":
            # The array is read once it is complete: partial JSON names no call reliably.
            self._text += piece
            if not final:
                return []
            calls = _required_calls(self._text)
            if calls is None:
                return [{"content": self._text}] if self._text else []
            self.called = True
            return [{"tool_calls": [{"index": i, "id": _call_id(), "type": "function",
                                     "function": {"name": n, "arguments": a}}]} for i, (n, a) in enumerate(calls)]
        if c.mode == "auto":
            prev_text, prev_ids = self._text, self._ids
            self._text, self._ids = prev_text + piece, prev_ids + list(ids)
            if not piece and not final:
                return []
            d = self.parser.extract_tool_calls_streaming(prev_text, self._text, piece, prev_ids, self._ids,
                                                         list(ids), c.vllm_request)
            if d is None:
                return []
            out = d.model_dump(exclude_none=True)
            if out.get("tool_calls"):
                self.called = True
            return [out] if out else []
        return [{"content": piece}] if piece else []

    def finish_reason(self, finish: str) -> str:
        """A streamed choice's finish reason: tool_calls when calls were made, except for a named
        function (OpenAI's "stop")."""
        return "tool_calls" if self.called and finish == "stop" and self.c.mode != "named" else finish


def _message(content: str | None, calls: list[dict] | None) -> dict:
    m: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        m["tool_calls"] = calls
    return m


def _call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _required_calls(text: str) -> list[tuple[str, str]] | None:
    try:
        items = json.loads(text)
    except ValueError:
        return None
    if not isinstance(items, list):
        return None
    return [(it["name"], json.dumps(it.get("parameters", {}), ensure_ascii=False))
            for it in items if isinstance(it, dict) and isinstance(it.get("name"), str)]


def _parser_class(name: str):
    try:
        from vllm.tool_parsers import ToolParserManager
    except ImportError:
        raise APIError(400, f"router.tool_call_parser {name!r} needs vLLM installed where the head runs",
                       param="tool_choice") from None
    return ToolParserManager.get_tool_parser(name)


def _vllm_request(tools: list[dict], parallel: bool | None):
    """vLLM's parsers read the request (its tools); only they see this one."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    return ChatCompletionRequest(model="", messages=[{"role": "user", "content": ""}], tools=tools,
                                 tool_choice="auto", parallel_tool_calls=parallel)


def check_parser(name: str) -> None:
    """At the head's start: router.tool_call_parser must name one of vLLM's parsers (ValueError)."""
    try:
        from vllm.tool_parsers import ToolParserManager
    except ImportError:
        raise ValueError(f"router.tool_call_parser {name!r}: vLLM's tool parsers are not installed "
                         f"where the head runs") from None
    known = ToolParserManager.list_registered()
    if name not in known:
        raise ValueError(f"router.tool_call_parser {name!r} is not one of vLLM's: {', '.join(sorted(known))}")
