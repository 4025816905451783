"""The head's OpenAI-compatible HTTP endpoint as a bare ASGI app.

No web framework sits on the per-request path: routing is a dict lookup, bodies are decoded by
msgspec into typed structs, and streamed chunks are byte templates. Every error a client can cause
is an OpenAI-shaped JSON error with a 4xx status.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

import msgspec

from slurmserve.router import openai_api as oa
from slurmserve.router.engine_client import NoInstanceError
from slurmserve.router.metrics import HeadMetrics
from slurmserve.router.openai_api import APIError, ChunkWriter
from slurmserve.router.orchestrator import Orchestrator
from slurmserve.router.tokenizer import TextStream, Tokenizer

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 << 20
WHOLE_ANSWER = 1 << 30    # a stream interval no answer reaches
_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


class HeadApp:
    def __init__(self, *, orchestrator: Orchestrator, tokenizer: Tokenizer, metrics: HeadMetrics,
                 model_name: str, max_model_len: int, api_key: str, max_concurrent: int = 4096,
                 session_header: str | None = None, stream_interval: int = 1):
        self.orch = orchestrator
        self.stream_interval = stream_interval
        self.session_header = session_header.lower().encode() if session_header else None
        self.tok = tokenizer
        self.metrics = metrics
        self.model_name = model_name
        self.max_model_len = max_model_len
        self._api_key = api_key.encode()
        self.max_concurrent = max_concurrent
        self.inflight = 0
        self.draining = False
        self.created = int(time.time())
        self.routes = {
            ("POST", "/v1/completions"): self.completions,
            ("POST", "/v1/chat/completions"): self.chat_completions,
            ("GET", "/v1/models"): self.models,
            ("GET", "/health"): self.health,
            ("GET", "/metrics"): self.prometheus,
        }
        self.open_paths = {"/health"}

    # ---- ASGI entry -----------------------------------------------------------------------------

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        handler = self.routes.get((method, path))
        try:
            if handler is None:
                if any(p == path for _, p in self.routes):
                    raise APIError(405, f"method {method} is not allowed on {path}")
                raise APIError(404, f"no route for {method} {path}", code="not_found")
            if path not in self.open_paths:
                self._authorize(scope)
            await handler(scope, receive, send)
        except APIError as e:
            self.metrics.http_errors.labels(e.status).inc()
            await _respond(send, e.status, e.body(), _JSON + [(k.encode(), v.encode())
                                                             for k, v in e.headers.items()])

    async def _lifespan(self, receive, send):
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _authorize(self, scope) -> None:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._api_key):
                    return
                break
        raise APIError(401, "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                       code="invalid_api_key")

    # ---- simple routes --------------------------------------------------------------------------

    async def models(self, scope, receive, send):
        body = msgspec.json.encode({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "slurmserve",
            "root": self.model_name, "max_model_len": self.max_model_len}]})
        await _respond(send, 200, body, _JSON)

    async def health(self, scope, receive, send):
        if self.draining:
            raise APIError(503, "draining", type_="service_unavailable", headers={"retry-after": "5"})
        if not self.orch.ready():
            raise APIError(503, "not every engine instance is up", type_="service_unavailable")
        await _respond(send, 200, b'{"status":"ok"}', _JSON)

    async def prometheus(self, scope, receive, send):
        await _respond(send, 200, self.metrics.render(),
                       [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")])

    # ---- generation -----------------------------------------------------------------------------

    async def completions(self, scope, receive, send):
        await self._generate(scope, receive, send, chat=False)

    async def chat_completions(self, scope, receive, send):
        await self._generate(scope, receive, send, chat=True)

    def _prepare(self, body: bytes, chat: bool):
        req = oa.parse(body, chat)
        if req.model != self.model_name:
            raise APIError(404, f"The model `{req.model}` does not exist.", type_="NotFoundError",
                           param="model", code="model_not_found")
        oa.check_supported(req)
        stops = oa.stop_strings(req)
        if chat:
            try:
                prompt = self.tok.apply_chat_template(req.messages, **(req.chat_template_kwargs or {}))
            except (ValueError, TypeError, KeyError) as e:
                raise APIError(400, f"messages: {e}", param="messages") from None
        else:
            p = oa.completion_prompt(req)
            if isinstance(p, str):
                prompt = self.tok.encode(p)
            else:
                oa.check_token_ids(p, self.tok.vocab_size)
                prompt = p
        if not prompt:
            raise APIError(400, "the prompt has no tokens", param="prompt")
        params = oa.sampling_params(req, len(prompt), self.max_model_len, self.tok.vocab_size,
                                    self.tok.eos_token_id, chat)
        return req, prompt, params, stops

    async def _generate(self, scope, receive, send, chat: bool):
        if self.draining:
            raise APIError(503, "the deployment is draining; retry on another endpoint",
                           type_="service_unavailable", headers={"retry-after": "10"})
        if self.inflight >= self.max_concurrent:
            raise APIError(429, "too many requests in flight", type_="rate_limit_error",
                           headers={"retry-after": "1"})
        body = await _read_body(receive)
        req, prompt, params, stops = self._prepare(body, chat)
        rid = oa.new_id(chat)
        start = time.perf_counter()
        self.inflight += 1
        self.metrics.running.inc()
        watcher = _DisconnectWatcher(receive)
        session = None
        if self.session_header is not None:
            session = next((v for k, v in scope["headers"] if k == self.session_header), None)
        # A whole answer needs waking only at the end, unless stop strings are watched as it grows.
        # A request may raise the stream interval, not lower it (as in vLLM).
        interval = max(self.stream_interval, req.stream_interval or 1) if req.stream or stops \
            else WHOLE_ANSWER
        deltas = self.orch.generate(rid, prompt, params, session, interval)
        try:
            try:
                first = await anext(deltas)   # no response has started yet: errors are still 4xx/5xx
            except NoInstanceError as e:
                raise APIError(503, str(e), type_="service_unavailable",
                               headers={"retry-after": "1"}) from None
            self.metrics.ttft.observe(time.perf_counter() - start)
            if req.stream:
                await self._stream(send, req, rid, deltas, first, prompt, stops, chat)
            else:
                await self._complete(send, rid, deltas, first, prompt, stops, chat)
        except asyncio.CancelledError:
            if not watcher.fired:
                raise
            asyncio.current_task().uncancel()   # the client left: nothing to answer
            self.metrics.requests.labels("abort").inc()
        finally:
            watcher.cancel()
            await deltas.aclose()   # aborts the request in the engine if it is still running
            self.inflight -= 1
            self.metrics.running.dec()
            self.metrics.e2e.observe(time.perf_counter() - start)

    async def _complete(self, send, rid, deltas, first, prompt, stops, chat):
        n_prompt = len(prompt)
        text = TextStream(self.tok, stops, prompt_ids=prompt)
        parts, n_out, finish = [], 0, None
        delta = first
        while True:
            n_out += len(delta.token_ids)
            piece, stopped = text.feed(delta.token_ids)
            parts.append(piece)
            if delta.finish_reason == "error" or self._cut_by_shutdown(delta):
                raise APIError(503, self._failure(delta), type_="server_error")
            if stopped:
                finish = "stop"
                break
            if delta.finish_reason is not None:
                finish = delta.finish_reason
                parts.append(text.finish())
                break
            delta = await anext(deltas)
        self._count(finish, n_prompt, n_out, first.num_cached_tokens)
        body = oa.full_response(chat, rid, self.model_name, "".join(parts), _openai_finish(finish),
                                oa.usage(n_prompt, n_out, first.num_cached_tokens))
        await _respond(send, 200, body, _JSON)

    async def _stream(self, send, req, rid, deltas, first, prompt, stops, chat):
        n_prompt = len(prompt)
        out = ChunkWriter(chat, rid, self.model_name)
        text = TextStream(self.tok, stops, prompt_ids=prompt)
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        n_out, finish = 0, None
        try:
            if chat:
                await _chunk(send, out.role())
            delta = first
            while True:
                n_out += len(delta.token_ids)
                piece, stopped = text.feed(delta.token_ids)
                if delta.finish_reason == "error" or self._cut_by_shutdown(delta):
                    await _chunk(send, out.error(APIError(503, self._failure(delta), type_="server_error")))
                    finish = "error"
                    break
                if stopped:
                    finish = "stop"
                elif delta.finish_reason is not None:
                    finish = delta.finish_reason
                    piece += text.finish()
                if finish is not None:
                    if piece:
                        await _chunk(send, out.text(piece))
                    await _chunk(send, out.finish(_openai_finish(finish)))
                    break
                if piece:
                    await _chunk(send, out.text(piece))
                delta = await anext(deltas)
            if req.stream_options is not None and req.stream_options.include_usage:
                await _chunk(send, out.usage(oa.usage(n_prompt, n_out, first.num_cached_tokens)))
            await _chunk(send, ChunkWriter.DONE)
        finally:
            if finish is not None:
                self._count(finish, n_prompt, n_out, first.num_cached_tokens)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    def _cut_by_shutdown(delta) -> bool:
        """An abort that reaches a client still being answered came from the engine's side (its rank
        got SIGTERM: scancel, the time limit): the request did not finish, so the client gets an
        error, not a short answer that looks complete. (A client that left is not answered.)"""
        return delta.finish_reason == "abort"

    @staticmethod
    def _failure(delta) -> str:
        if delta.finish_reason == "abort":
            return "the engine stopped before the request completed (the deployment is shutting down)"
        return delta.error or "engine failed"

    def _count(self, finish: str | None, n_prompt: int, n_out: int, n_cached: int) -> None:
        m = self.metrics
        m.requests.labels(finish or "unknown").inc()
        m.prompt_tokens.inc(n_prompt)
        m.cached_tokens.inc(n_cached)
        m.generation_tokens.inc(n_out)


def _openai_finish(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop" if reason == "abort" else reason


async def _chunk(send, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def _respond(send, status: int, body: bytes, headers) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive) -> bytes:
    chunks, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise APIError(400, "client disconnected")
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"request body exceeds {MAX_BODY_BYTES >> 20} MiB")
        chunks.append(chunk)
        if not msg.get("more_body"):
            return b"".join(chunks)


class _DisconnectWatcher:
    """Cancels the request's handler when the client disconnects, so the engine aborts it."""

    __slots__ = ("fired", "_task")

    def __init__(self, receive):
        self.fired = False
        handler = asyncio.current_task()

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            self.fired = True
            handler.cancel()

        self._task = asyncio.get_running_loop().create_task(watch())

    def cancel(self) -> None:
        self._task.cancel()
