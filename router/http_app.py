"""The head's OpenAI-compatible HTTP endpoint, served by `http_server`.

No web framework sits on the per-request path: routing is a dict lookup, bodies are decoded by
msgspec into typed structs, and streamed chunks are byte templates. Once a request is routed, its
answer is written from the engine-step fan-out (`DeltaStream.attach`): every drain of the control
socket detokenizes and writes each request's new tokens once, and the request's own task wakes only
when the answer is over. Every error a client can cause is an OpenAI-shaped JSON error with a 4xx
status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from itertools import repeat

import msgspec

from slurmserve.router import openai_api as oa
from slurmserve.router.bearer_app import JSON, BearerApp
from slurmserve.router.http_server import HTTPServer, Request, Response, listen
from slurmserve.router.instance import NoInstanceError
from slurmserve.router.metrics import HeadMetrics
from slurmserve.router.openai_api import APIError, ChunkWriter
from slurmserve.router.orchestrator import Orchestrator
from slurmserve.router.tokenizer import TextStream, Tokenizer, TooLong
from slurmserve.router.tool_calls import ToolCalling, check_parser
from slurmserve.runtime import protocol as P

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 << 20
WHOLE_ANSWER = 1 << 30    # a stream interval no answer reaches
SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


class HeadApp(BearerApp):
    def __init__(self, *, orchestrator: Orchestrator, tokenizer: Tokenizer, metrics: HeadMetrics,
                 model_name: str, max_model_len: int, api_key: str, max_concurrent: int = 4096,
                 session_header: str | None = None, stream_interval: int = 1,
                 tool_call_parser: str | None = None):
        super().__init__(api_key, metrics)
        if tool_call_parser is not None:
            check_parser(tool_call_parser)
        self.tool_call_parser = tool_call_parser     # vLLM's parser name, for tool_choice "auto"
        self.orch = orchestrator
        self._token_text: oa.TokenText | None = None
        self.stream_interval = stream_interval
        self.session_header = session_header.lower().encode() if session_header else None
        self.tok = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.max_concurrent = max_concurrent
        self.draining = False
        self.created = int(time.time())
        self.routes.update({
            ("POST", "/v1/completions"): self.completions,
            ("POST", "/v1/chat/completions"): self.chat_completions,
            ("GET", "/v1/models"): self.models,
            ("GET", "/health"): self.health,
        })

    @classmethod
    def from_config(cls, cfg, orchestrator, tokenizer: Tokenizer, metrics: HeadMetrics, api_key: str) -> HeadApp:
        """The app a head (or each front-end process of one) serves for a DeploymentConfig."""
        r = cfg.router
        return cls(orchestrator=orchestrator, tokenizer=tokenizer, metrics=metrics,
                   model_name=cfg.model.served_name, max_model_len=cfg.model.max_model_len, api_key=api_key,
                   max_concurrent=r.max_concurrent_requests, session_header=r.session_header,
                   stream_interval=r.stream_interval, tool_call_parser=r.tool_call_parser)

    def _engine_kinds(self) -> set[str]:
        """The kinds of engine the instances declared when they came up."""
        return self.orch.engine_kinds() if self.orch is not None else set()   # (None: tests that only prepare)

    @property
    def token_text(self) -> oa.TokenText:
        """Token texts for logprobs, made on first use: requests without logprobs never need it."""
        if self._token_text is None:
            self._token_text = oa.TokenText(self.tok)
        return self._token_text

    @property
    def inflight(self) -> int:
        """Requests being answered (the `slurmserve:num_requests_running` gauge)."""
        return self.metrics.requests.running

    # ---- simple routes --------------------------------------------------------------------------

    async def models(self, request: Request, response: Response) -> None:
        body = msgspec.json.encode({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "slurmserve",
            "root": self.model_name, "max_model_len": self.max_model_len}]})
        response.send(200, body, JSON)

    async def health(self, request: Request, response: Response) -> None:
        if self.draining:
            raise APIError(503, "draining", type_="service_unavailable", headers={"retry-after": "5"})
        if not self.orch.ready():
            raise APIError(503, "not every engine instance is up", type_="service_unavailable")
        response.send(200, b'{"status":"ok"}', JSON)

    # ---- generation -----------------------------------------------------------------------------

    async def completions(self, request: Request, response: Response) -> None:
        await self._generate(request, response, chat=False)

    async def chat_completions(self, request: Request, response: Response) -> None:
        await self._generate(request, response, chat=True)

    async def _prepare(self, body: bytes, chat: bool):
        req = oa.parse(body, chat)
        if req.model != self.model_name:
            raise APIError(404, f"The model `{req.model}` does not exist.", type_="NotFoundError",
                           param="model", code="model_not_found")
        oa.check_supported(req)
        stops = oa.stop_strings(req)
        structured, param = oa.structured_outputs(req)
        calling = ToolCalling(req, self.tool_call_parser, self.tok.hf) if chat and req.tools else None
        if calling is not None and (forced := calling.structured_outputs()) is not None:
            if structured is not None:
                raise APIError(400, f"{param} and tool_choice {calling.mode!r} both constrain the output: "
                                    f"send one", param=param)
            structured, param = forced, "tool_choice"
        if structured is not None and "sim" in self._engine_kinds():
            raise APIError(400, f"{param}: the simulated engine (engine.kind sim) has no structured "
                                f"output; it needs an engine such as vllm", param=param)
        tok, limit = self.tok, self.max_model_len
        # Template and tokenizer run off the event loop for a large body (Tokenizer.off_loop); a
        # prompt of `limit` tokens or more comes back as its token count (_job refuses it).
        if chat:
            try:
                template_kwargs = dict(req.chat_template_kwargs or {})
                if calling is not None:
                    template_kwargs["tools"] = calling.tools
                prompt = await tok.off_loop(len(body), tok.chat_prompt, req.messages, limit, template_kwargs)
            except TooLong as e:
                raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
            except (ValueError, TypeError, KeyError, RecursionError) as e:
                raise APIError(400, f"messages: {e}", param="messages") from None
            return req, [self._job(req, chat, prompt, "", structured)], stops, calling
        prompts = oa.completion_prompts(req, tok.vocab_size)
        texts = [p for p in prompts if isinstance(p, str)]
        if texts:
            max_chars = tok.max_prompt_chars(limit)
            longest = max(map(len, texts))
            if max_chars is not None and longest > max_chars:   # refused before any tokenization
                raise APIError(400, str(TooLong(longest, limit, max_chars)), param="prompt",
                               code="context_length_exceeded")
            encoded = iter(await tok.off_loop(sum(map(len, texts)), tok.encode_prompts, texts, limit))
        jobs = []
        for p in prompts:
            ids, params, echo = self._job(req, chat, next(encoded) if isinstance(p, str) else p, "", structured)
            if req.echo:   # (after _job: token ids are decoded only for a prompt that fits)
                echo = p if isinstance(p, str) else await tok.off_loop(len(ids), tok.decode, ids)
            jobs.append((ids, params, echo))
        return req, jobs, stops, None

    def _job(self, req, chat: bool, prompt: list[int] | int, echo: str, structured: dict | None = None) -> tuple:
        """(token ids, sampling params, echo) of one prompt; echo: with `echo`, its text, answered
        first. `prompt` may be a token count alone, of a prompt too long to serve: refused here."""
        n = prompt if isinstance(prompt, int) else len(prompt)
        if not n:
            raise APIError(400, "the prompt has no tokens", param="prompt")
        params = oa.sampling_params(req, n, self.max_model_len, self.tok.vocab_size,
                                    self.tok.eos_token_id, chat, structured)
        return prompt, params, echo

    async def _generate(self, request: Request, response: Response, chat: bool) -> None:
        if self.draining:
            raise APIError(503, "the deployment is draining; retry on another endpoint",
                           type_="service_unavailable", headers={"retry-after": "10"})
        if self.inflight >= self.max_concurrent:
            raise APIError(429, "too many requests in flight", type_="rate_limit_error",
                           headers={"retry-after": "1"})
        req, jobs, stops, calling = await self._prepare(request.body, chat)
        if response.disconnected:    # left while its prompt was tokenized off the loop
            self.metrics.requests.count("abort")
            return
        prompt, params, echo = jobs[0]
        rid = oa.new_id(chat)
        session = request.header(self.session_header) if self.session_header is not None else None
        # A whole answer needs delivering only at the end, unless stop strings are watched as it
        # grows. A request may raise the stream interval, not lower it (as in vLLM).
        interval = max(self.stream_interval, req.stream_interval or 1) if req.stream or stops \
            else WHOLE_ANSWER
        start = time.perf_counter()
        self.metrics.requests.running += 1
        response.on_disconnect = asyncio.current_task().cancel    # while routing: a prefill leg may be running
        try:
            stream = await self._start(response, rid, prompt, params, session, interval)
            if stream is None:
                return
            answer = (StreamedAnswer if req.stream else WholeAnswer)(self, response, req, rid, prompt,
                                                                       stops, chat, start, echo, calling)
            if req.n > 1 or len(jobs) > 1:
                await self._more_choices(answer, stream, req, rid, jobs, stops, session, interval)
                return
            response.on_disconnect = answer.client_left
            try:
                stream.attach(answer.feed)
                await answer.done
            finally:
                self.orch.release(stream)   # aborts the request in the engine if it is still running
        finally:
            self.metrics.requests.running -= 1
            self.metrics.requests.e2e.observe(time.perf_counter() - start)

    async def _start(self, response: Response, rid: str, prompt: list[int], params: P.SamplingParams,
                     session, interval: int):
        """Route and send one engine request; its RequestStream (which continues on another instance
        if its own dies), or None if the client left while it was routed (a remote prefill leg may run
        meanwhile), counted as an abort."""
        try:
            return await self.orch.start(rid, prompt, params, session, interval)
        except NoInstanceError as e:
            raise APIError(503, str(e), type_="service_unavailable", headers={"retry-after": "1"}) from None
        except asyncio.CancelledError:
            if not response.disconnected:
                raise
            asyncio.current_task().uncancel()
            self.metrics.requests.count("abort")
            return None

    async def _more_choices(self, first: _Answer, stream, req, rid: str, jobs: list, stops: list[str],
                            session, interval: int) -> None:
        """Several choices: n per prompt, for each of a completion request's prompts, in OpenAI's
        order (prompt k's choice i has index k * n + i). Each further choice is an engine request of
        its own, routed like the first (for the same prompt, to the instance that has just cached
        it, under `kv`), with seed + i when a seed is given (as vLLM's parallel sampling does).
        They share the response: `Choices` ends it."""
        choices = Choices(first, req.n * len(jobs))
        streams = [stream]
        try:
            for index in range(1, req.n * len(jobs)):
                prompt, params, echo = jobs[index // req.n]
                i = index % req.n
                p = params if params.seed is None or not i else msgspec.structs.replace(params, seed=params.seed + i)
                stream = await self._start(first.response, f"{rid}-{index}", prompt, p, session, interval)
                if stream is None:
                    return
                streams.append(stream)
                choices.add(type(first)(self, first.response, req, rid, prompt, stops, first.chat,
                                        first.start, echo, first.calling), counts_prompt=i == 0)
            first.response.on_disconnect = choices.stop_all
            for s, answer in zip(streams, choices.answers):
                s.attach(answer.feed)
            await asyncio.gather(*(a.done for a in choices.answers))
        finally:
            for s in streams:
                self.orch.release(s)


def _engine_failure(delta: P.Delta) -> APIError | None:
    """Why the engine ended the request without an answer, or None. An abort that reaches a client
    still being answered came from the engine's side (its rank got SIGTERM: scancel, the time
    limit): the request did not finish, so the client gets an error, not a short answer that looks
    complete. (A client that left is not answered.) A request the engine refused as given (a
    schema it cannot compile) is the client's to fix: a 400, not a 503 to retry."""
    if delta.finish_reason == "abort":
        return APIError(503, "the engine stopped before the request completed (the deployment is shutting down)",
                        type_="server_error")
    if delta.finish_reason == "error":
        if delta.rejected:
            return APIError(400, delta.error or "the engine refused the request")
        return APIError(503, delta.error or "engine failed", type_="server_error")
    return None


def _openai_finish(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop" if reason == "abort" else reason


class _Answer:
    """One request's answer, fed its deltas by the engine-step fan-out; `done` resolves when the
    response is complete or the client has left."""

    def __init__(self, app: HeadApp, response: Response, req, rid: str, prompt: list[int],
                 stops: list[str], chat: bool, start: float, echo: str = "", calling: ToolCalling | None = None):
        self.app = app
        self.echo = echo
        self.calling = calling      # the request's tools, if any; `tools` is this choice's own state
        self.tools = calling.answer() if calling is not None else None
        self.choices: Choices | None = None
        self.counts_prompt = True      # the first choice of its prompt: usage counts the prompt once
        self.response = response
        self.rid = rid
        self.chat = chat
        self.start = start
        self.n_prompt = len(prompt)
        self.n_out = 0
        self.n_cached = 0
        self.first = True
        self.t_first = 0.0
        # An engine's "stop" is a stop token (EOS or one of stop_token_ids), the delta's last: like
        # vLLM, its text is not part of the answer unless include_stop_str_in_output.
        self.keep_stop_token = req.include_stop_str_in_output
        self.text = TextStream(app.tok, stops, prompt_ids=prompt, skip_special_tokens=req.skip_special_tokens,
                               include_stop=req.include_stop_str_in_output)
        self.done = asyncio.get_running_loop().create_future()
        # echo with max_tokens 0: the prompt alone; the one token the engine made is left out
        self.echo_only = not chat and req.max_tokens == 0
        # Logprobs: None (the usual case) costs nothing per token; else each position of the answer
        # queues (token id, logprob, top ids, top logprobs) in `entries` until it is written.
        self.top = oa.logprobs_wanted(req, chat)
        if self.top is not None:
            self.entries: list[tuple] = []
            self.watch_stops = bool(stops)
            self.lp_offset = 0     # completions' text_offset of the next position
            # echo with logprobs: the prompt's positions come first, with the first delta
            self.prompt_lp = prompt if not chat and req.echo else None

    def feed(self, delta: P.Delta) -> None:
        if self.done.done():
            return
        try:
            if self.first:
                self.first = False
                self.n_cached = delta.num_cached_tokens
                self.t_first = time.perf_counter()
                if self.choices is None or self.choices.first_token():
                    self.app.metrics.requests.ttft.observe(self.t_first - self.start)
            if not self.echo_only:
                self.n_out += len(delta.token_ids)
            self._feed(delta)
        except Exception as e:   # a bug: fail this request, not the fan-out
            self.done.set_exception(e)

    def _feed(self, delta: P.Delta) -> None:
        raise NotImplementedError

    def _text(self, delta: P.Delta) -> tuple[str, bool]:
        """The delta's text, and whether a stop string ended it."""
        ids = delta.token_ids
        if delta.finish_reason == "stop" and not self.keep_stop_token:
            ids = ids[:-1]
        if self.echo_only:
            return "", False
        return self.text.feed(ids)

    def _text_logprobs(self, delta: P.Delta) -> tuple[str, bool]:
        """`_text` for a request with logprobs, which also queues the entries of the positions
        that are part of the answer: the prompt's (echo), then the tokens up to the one that
        completed a stop string, if one did (fed one by one to find it)."""
        entries, ids = self.entries, delta.token_ids
        prompt = self.prompt_lp
        if prompt is not None:
            self.prompt_lp = None
            entries.append((prompt[0], None, (), ()))    # the first prompt token has no logprob
            pl = delta.prompt_logprobs
            if pl is not None:
                entries.extend(zip(prompt[1:], pl.token, pl.top_ids or repeat(()), pl.top or repeat(())))
        if self.echo_only:
            return "", False
        used = len(ids)
        if self.watch_stops:
            parts, stopped = [], False
            end = used - 1 if delta.finish_reason == "stop" and not self.keep_stop_token else used
            for k in range(end):
                part, stopped = self.text.feed(ids[k:k + 1])
                parts.append(part)
                if stopped:
                    used = k + 1
                    break
            piece = "".join(parts)
        else:
            piece, stopped = self._text(delta)
        lp = delta.logprobs
        if lp is not None:
            entries.extend(zip(ids[:used], lp.token, lp.top_ids or repeat(()), lp.top or repeat(())))
        return piece, stopped

    def _logprobs(self) -> dict:
        """The logprobs object of the queued entries (which it takes)."""
        entries, self.entries = self.entries, []
        obj, self.lp_offset = oa.logprobs_object(self.chat, entries, self.app.token_text, self.lp_offset)
        return obj

    def set_index(self, index: int) -> None:
        """This answer is choice `index` of several (only a streamed answer writes it)."""

    def _fail(self, err: APIError) -> None:
        """Answer the whole request with the error: nothing of it has been sent yet."""
        self.app.metrics.http_errors.labels(err.status).inc()
        self.response.send(err.status, err.body(), JSON)
        self.done.set_result(None)
        if self.choices is not None:
            self.choices.stop_all()

    def _finished(self, finish: str) -> None:
        requests = self.app.metrics.requests
        first = self.counts_prompt       # a prompt counts once, whatever its n
        requests.count(finish, self.n_prompt if first else 0, self.n_cached if first else 0, self.n_out)
        if self.n_out > 1:
            requests.tpot.observe((time.perf_counter() - self.t_first) / (self.n_out - 1))
        self.done.set_result(None)

    def client_left(self) -> None:
        if not self.done.done():
            self.app.metrics.requests.count("abort")
            self.done.set_result(None)


class Choices:
    """The answers of a request with several choices (n > 1, or several prompts), in index order,
    sharing its response. The answer that ends last sends the whole body, or ends the stream with
    the usage of all of them."""

    def __init__(self, first: _Answer, count: int):
        first.choices = self
        self.answers = [first]
        self.left = count
        self._ttft_seen = False

    def add(self, answer: _Answer, counts_prompt: bool) -> None:
        answer.set_index(len(self.answers))
        answer.choices = self
        answer.counts_prompt = counts_prompt
        self.answers.append(answer)

    def prompt_tokens(self) -> tuple[int, int]:
        """(prompt tokens, cached prompt tokens) of the request: each prompt once."""
        firsts = [a for a in self.answers if a.counts_prompt]
        return sum(a.n_prompt for a in firsts), sum(a.n_cached for a in firsts)

    def first_token(self) -> bool:
        """True for the request's first token of any choice: its TTFT."""
        seen, self._ttft_seen = self._ttft_seen, True
        return not seen

    def ended(self) -> bool:
        """One more choice has its answer; True when it was the last."""
        self.left -= 1
        return self.left == 0

    def completion_tokens(self) -> int:
        return sum(a.n_out for a in self.answers)

    def whole_body(self) -> bytes:
        first = self.answers[0]
        prompt, cached = self.prompt_tokens()
        return oa.full_response(first.chat, first.rid, first.app.model_name, [a.result for a in self.answers],
                                oa.usage(prompt, self.completion_tokens(), cached))

    def stop_all(self) -> None:
        """The client left, or one choice failed and answered it with the error: all stop."""
        for a in self.answers:
            a.client_left()


class WholeAnswer(_Answer):
    """A non-streamed answer: text collected, one JSON body at the end."""

    def __init__(self, *args):
        super().__init__(*args)
        self.parts: list[str] = []

    def _feed(self, delta: P.Delta) -> None:
        piece, stopped = self._text(delta) if self.top is None else self._text_logprobs(delta)
        self.parts.append(piece)
        if (err := _engine_failure(delta)) is not None:
            self._fail(err)
            return
        if stopped:
            finish = "stop"
        elif delta.finish_reason is not None:
            finish = delta.finish_reason
            self.parts.append(self.text.finish())
        else:
            return
        if self.echo_only:
            finish = "length"
        text, finish = self.echo + "".join(self.parts), _openai_finish(finish)
        if self.tools is not None:       # the message carries tool calls instead of (or with) text
            text, finish = self.tools.message(text, finish)
        self.result = (text, finish, None if self.top is None else self._logprobs())
        if self.choices is None:
            body = oa.full_response(self.chat, self.rid, self.app.model_name, [self.result],
                                    oa.usage(self.n_prompt, self.n_out, self.n_cached))
            self.response.send(200, body, JSON)
        elif self.choices.ended():
            self.response.send(200, self.choices.whole_body(), JSON)
        self._finished(finish)


class StreamedAnswer(_Answer):
    """Server-sent events: what each drain brought, detokenized and written as one write."""

    def __init__(self, app, response, req, *args):
        super().__init__(app, response, req, *args)
        self.out = ChunkWriter(self.chat, self.rid, app.model_name)
        self.include_usage = req.stream_options is not None and req.stream_options.include_usage
        self.opened = False
        self.echo_sent = False
        # The detokenizer alone, for an answer whose chunks are its text and nothing else (no stop
        # strings to watch, logprobs or tools): each of its steps but the last takes the short way.
        self.plain_text = self.text.plain if self.top is None and self.tools is None and not self.echo_only \
            else None

    def set_index(self, index: int) -> None:
        self.out = ChunkWriter(self.chat, self.rid, self.app.model_name, index)

    def _feed(self, delta: P.Delta) -> None:
        if self.plain_text is not None and delta.finish_reason is None and self.opened:
            piece = self.plain_text.step(delta.token_ids)
            if piece:
                self.response.write(self.out.text(piece))
            return
        out, events = self.out, []
        failure = _engine_failure(delta)
        if failure is not None and not self.response.started:   # nothing sent yet: a plain error
            self._fail(failure)
            return
        if not self.opened:
            self.opened = True
            if not self.response.started:
                self.response.start(200, SSE)
            if self.chat:
                events.append(out.role())
            elif self.echo and self.top is None:
                events.append(out.text(self.echo))
        if self.top is None:
            piece, stopped = self._text(delta)
        else:
            piece, stopped = self._text_logprobs(delta)
            if self.echo and not self.echo_sent:   # the echo goes with its logprobs
                self.echo_sent = True
                piece = self.echo + piece
        finish = None
        if failure is not None:
            events.append(out.error(failure))
            finish = "error"
        else:
            if stopped:
                finish = "stop"
            elif delta.finish_reason is not None:
                finish = "length" if self.echo_only else delta.finish_reason
                piece += self.text.finish()
            if self.tools is not None:
                events.extend(out.delta(d) for d in self.tools.feed(piece, delta.token_ids, finish is not None))
            elif self.top is not None and self.entries:
                events.append(out.text(piece, None, msgspec.json.encode(self._logprobs())))
            elif piece:
                events.append(out.text(piece))
        if finish is None:
            self.response.write(b"".join(events))
            return
        if finish != "error":
            reason = _openai_finish(finish)
            events.append(out.finish(reason if self.tools is None else self.tools.finish_reason(reason)))
        choices = self.choices
        if choices is not None and finish != "error":
            if not choices.ended():       # the others still stream
                self.response.write(b"".join(events))
                self._finished(finish)
                return
            n_prompt, n_cached = choices.prompt_tokens()
            n_out = choices.completion_tokens()
        else:
            n_prompt, n_out, n_cached = self.n_prompt, self.n_out, self.n_cached
        if self.include_usage:
            events.append(out.usage(oa.usage(n_prompt, n_out, n_cached)))
        events.append(ChunkWriter.DONE)
        self.response.end(b"".join(events))
        self._finished(finish)
        if choices is not None and finish == "error":
            choices.stop_all()


class AppServer:
    """A HeadApp on its HTTP server, as a head (router.http_workers 1) or each of its front-end
    processes runs it: listen, drain, close."""

    def __init__(self, app: HeadApp, cfg):
        self.app = app
        self.server = HTTPServer(app, max_body=MAX_BODY_BYTES, keep_alive_s=30.0,
                                 read_timeout_s=cfg.router.http_read_timeout_s,
                                 max_connections_per_client=cfg.router.max_connections_per_client)

    async def start(self, host: str, port: int, reuse_port: bool = False) -> tuple[str, int]:
        listener = listen(host, port, reuse_port)
        await self.server.start(listener)
        return listener.getsockname()[:2]

    async def drain(self, grace_s: float) -> int:
        """Refuse new requests, wait up to `grace_s` for running ones; how many are left."""
        self.app.draining = True
        deadline = time.monotonic() + grace_s
        while self.app.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.app.inflight

    async def close(self) -> None:
        self.server.close()
