"""One request's path through the engines: aggregated, or prefill on one pool and decode on another.
The Router (router/routing.py) chooses each leg's instance; the EngineClient sends it there.

Disaggregated requests first run a `prefill_only` leg (max_tokens=1) and hand the handoff it returns,
untouched and unread, to a decode instance as a `decode_with_handoff` leg: what a handoff holds is
the engines' business (vLLM's kv_transfer_params, TensorRT-LLM's DisaggregatedParams). Any failure
of the prefill leg falls back to prefilling on the decode instance, so the client still gets a
normal answer.

Remote prefill is conditional: the decode instance (chosen first, by load) prefills locally when
the prompt's part it does not cache is short, or a small fraction of the prompt, or when the prefill
pool is saturated, since then the transfer costs more than it saves.

Between heartbeats the head keeps its own account of each instance's load (HeadLoad, router/instance.py,
kept by `EngineClient.submit` and `release`): a request's uncached prompt blocks (what its Choice
says the instance does not cache) count as pending prefill until its first token, and its prompt
blocks as held KV until it finishes (a block that requests there share, once). The `kv` policy
reads both.

Migration: when the instance under a request dies or hangs, the request goes on on another live
instance of its pool (`RequestStream`), with the prompt plus the tokens generated so far as its
prompt and what is left of max_tokens, up to `migration_limit` times. The answer sees only more
deltas. A disaggregated request's new leg prefills on its decode instance.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

import msgspec

from slurmserve.config import DisaggConfig
from slurmserve.router.engine_client import DeltaStream, EngineClient
from slurmserve.router.instance import NoInstanceError
from slurmserve.router.metrics import HeadMetrics
from slurmserve.router.policies import Choice, Route, kv_usage_estimate
from slurmserve.router.routing import Router
from slurmserve.runtime import protocol as P

log = logging.getLogger(__name__)


class RequestStream:
    """One request's deltas, read with `attach(sink)` like a DeltaStream's, across the engine legs
    that serve it: when its instance is lost mid-request, the Orchestrator sends it on to another
    (`migrate`) and the sink gets only more deltas, with no error and no token twice.

    The generated tokens are kept in one list, extended per delta (no copy of what is there); the
    prompt + generated list that a new leg needs is built only when migrating."""

    __slots__ = ("req_id", "prompt", "params", "session", "interval", "role", "leg", "generated",
                 "migrations", "_orch", "_sink")

    def __init__(self, orch: Orchestrator, req_id: str, prompt: list[int], params: P.SamplingParams,
                 session: bytes | None, interval: int, role: str, leg: DeltaStream):
        self.req_id = req_id
        self.prompt = prompt
        self.params = params
        self.session = session
        self.interval = interval
        self.role = role
        self.leg = leg                       # the engine request now serving it
        self.generated: list[int] = []       # tokens passed to the sink so far
        self.migrations = 0
        self._orch = orch
        self._sink = None

    def attach(self, sink) -> None:
        self._sink = sink
        self.leg.attach(self._feed)

    def _feed(self, delta: P.Delta) -> None:
        finish = delta.finish_reason
        if finish is None:
            self.generated += delta.token_ids
        elif finish == "error" and self.leg.lost:
            tokens = delta.token_ids
            self.generated += tokens
            if self._orch.migrate(self):
                if tokens:   # what came before the loss; the rest comes from the new leg
                    self._sink(msgspec.structs.replace(delta, finish_reason=None, error=None))
                return
        self._sink(delta)


class Orchestrator:
    """Starts, migrates and releases requests: what HeadApp (router/http_app.py) calls."""

    def __init__(self, client: EngineClient, router: Router, metrics: HeadMetrics, disaggregated: bool,
                 disagg: DisaggConfig | None = None, busy_threshold: float = 0.95, migration_limit: int = 3):
        self.client = client
        self.router = router
        self.metrics = metrics
        self.disaggregated = disaggregated
        self.disagg = disagg or DisaggConfig()
        self.busy_threshold = busy_threshold     # a prefill pool all at or over it prefills nothing more
        self.migration_limit = migration_limit   # per request; 0: a lost instance fails its requests

    def ready(self) -> bool:
        """Every pool can serve (HeadApp's /health)."""
        return self.client.all_ready()

    async def start(self, req_id: str, prompt: list[int], params: P.SamplingParams,
                    session: bytes | None = None, interval: int = 1) -> RequestStream:
        """Route the request and send it to an engine; its deltas come on the returned stream, which
        the caller must `release`. Raises NoInstanceError if no engine can take it. Requests of one
        `session` (a client-chosen id) stay on one instance while it lives. After the first delta,
        the next comes once `interval` tokens have queued up, or at the end."""
        started = self.begin(req_id, prompt, params, session, interval)
        return started if isinstance(started, RequestStream) else await started

    def begin(self, req_id: str, prompt: list[int], params: P.SamplingParams, session: bytes | None = None,
              interval: int = 1) -> RequestStream | Coroutine[Any, Any, RequestStream]:
        """`start` without a task where none is needed: the stream, or, when a remote prefill leg
        must run first, the coroutine that runs it and returns the stream. (The router process of a
        multi-process head starts every request this way: most need no task.)"""
        route = self.router.route(prompt)
        role = "decode" if self.disaggregated else "worker"
        choice = self.router.choose(role, route, session)
        # a decode instance that pulls its KV never computes the prompt: prompt logprobs need it local
        if self.disaggregated and params.prompt_logprobs is None and self._remote_prefill_pays(route, choice):
            return self._start_after_prefill(req_id, prompt, params, session, interval, route, choice)
        leg = self._submit(choice, req_id, route, params, None, interval)
        return RequestStream(self, req_id, prompt, params, session, interval, role, leg)

    async def _start_after_prefill(self, req_id: str, prompt: list[int], params: P.SamplingParams,
                                   session: bytes | None, interval: int, route: Route,
                                   choice: Choice) -> RequestStream:
        handoff = await self._prefill(req_id, prompt, params, route)
        if not choice.instance.up:   # it died while the prefill leg ran: another one pulls the KV
            choice = self.router.choose("decode", route, session)
        leg = self._submit(choice, req_id, route, params, handoff, interval)
        return RequestStream(self, req_id, prompt, params, session, interval, "decode", leg)

    def engine_kinds(self) -> set[str]:
        """The kinds of engine the instances declared when they came up."""
        return {i.info.kind for i in self.client.instances if i.info is not None}

    def release(self, stream: RequestStream) -> None:
        """The request is over for its client: forget it, and abort it if the engine still runs it."""
        self.client.release(stream.leg)

    def migrate(self, stream: RequestStream) -> bool:
        """Its instance was lost: send the request on to another live instance of its pool, with the
        prompt plus the tokens generated so far as the prompt, the rest of max_tokens and min_tokens,
        and the same seed. False (it ends with the error) past `migration_limit` or with no
        instance left."""
        lost = stream.leg.instance.index
        n_out = len(stream.generated)
        params = stream.params
        if stream.migrations >= self.migration_limit or n_out >= params.max_tokens:
            log.warning("request %s lost instance %d after %d tokens; not migrated (%d migrations, limit %d)",
                        stream.req_id, lost, n_out, stream.migrations, self.migration_limit)
            return False
        route = self.router.route(stream.prompt + stream.generated)
        try:
            choice = self.router.choose(stream.role, route, stream.session)
        except NoInstanceError:
            log.warning("request %s lost instance %d after %d tokens; no %s instance is left to take it",
                        stream.req_id, lost, n_out, stream.role)
            return False
        self.client.release(stream.leg)   # its share of the lost instance's load account
        stream.migrations += 1
        # the answer has the first leg's prompt logprobs; the new leg's prompt is not the client's
        leg_params = msgspec.structs.replace(params, max_tokens=params.max_tokens - n_out,
                                             min_tokens=max(0, params.min_tokens - n_out), prompt_logprobs=None)
        stream.leg = self._submit(choice, f"{stream.req_id}-m{stream.migrations}", route, leg_params, None,
                                  stream.interval)
        stream.leg.attach(stream._feed)
        self.metrics.migrations.inc()
        log.info("request %s lost instance %d after %d tokens; continued on instance %d", stream.req_id,
                 lost, n_out, choice.instance.index)
        return True

    def _submit(self, choice: Choice, req_id: str, route: Route, params: P.SamplingParams,
                handoff: dict | None, interval: int) -> DeltaStream:
        inst = choice.instance
        bs = inst.block_size
        phase = P.AGGREGATED if handoff is None else P.DECODE_WITH_HANDOFF
        # with a handoff the instance only pulls the prompt's KV: it computes none of it
        uncached = _uncached_blocks(route, choice) if handoff is None else 0
        return self.client.submit(inst, req_id, route.prompt_token_ids, params, phase, handoff, interval,
                                  prefill_blocks=uncached, held_blocks=route.prompt_blocks(bs),
                                  held_hashes=route.known_hashes(bs))

    def _remote_prefill_pays(self, route: Route, decode: Choice) -> bool:
        tokens = len(route.prompt_token_ids)
        bs = decode.instance.block_size
        uncached = min(tokens, _uncached_blocks(route, decode) * bs) if bs else tokens
        if uncached < self.disagg.min_uncached_tokens:
            reason = "local_below_min_tokens"
        elif uncached < self.disagg.min_uncached_fraction * tokens:
            reason = "local_below_min_fraction"
        elif (prefill := self.client.pool("prefill")) and \
                all(kv_usage_estimate(i) >= self.busy_threshold for i in prefill):
            reason = "local_prefill_busy"
        else:
            return True
        self.metrics.disagg.labels(reason).inc()
        return False

    async def _prefill(self, req_id: str, prompt: list[int], params: P.SamplingParams,
                       route: Route) -> dict | None:
        """Run the prefill leg; the decode leg's handoff, or None to prefill locally."""
        try:
            choice = self.router.choose("prefill", route)
        except NoInstanceError:
            self.metrics.disagg.labels("fallback_no_prefill_instance").inc()
            return None
        inst = choice.instance
        leg = msgspec.structs.replace(params, max_tokens=1, min_tokens=0)
        stream = self.client.submit(inst, f"{req_id}-prefill", prompt, leg, P.PREFILL_ONLY,
                                    prefill_blocks=_uncached_blocks(route, choice))
        last = None
        try:
            async with asyncio.timeout(self.disagg.prefill_timeout_s):
                async for last in stream:
                    pass
        except TimeoutError:
            self.metrics.disagg.labels("fallback_prefill_timeout").inc()
            log.warning("prefill of %s on instance %d timed out; prefilling on decode", req_id, inst.index)
            return None
        finally:
            self.client.release(stream)
        if last is None or last.finish_reason in ("error", "abort") or not last.handoff:
            self.metrics.disagg.labels("fallback_prefill_failed").inc()
            log.warning("prefill of %s on instance %d failed (%s); prefilling on decode", req_id,
                        inst.index, last.error if last else "no output")
            return None
        self.metrics.disagg.labels("remote_prefill").inc()
        return last.handoff


def _uncached_blocks(route: Route, choice: Choice) -> int:
    """Prompt blocks the chosen instance would have to compute itself."""
    return route.prompt_blocks(choice.instance.block_size) - choice.overlap_blocks
