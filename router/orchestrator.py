"""One request's path through the engines: aggregated, or prefill on one pool and decode on another.

Disaggregated requests first run a `prefill_only` leg (max_tokens=1) and hand the handoff it returns,
untouched and unread, to a decode instance as a `decode_with_handoff` leg: what a handoff holds is
the engines' business (vLLM's kv_transfer_params, TensorRT-LLM's DisaggregatedParams). Any failure
of the prefill leg falls back to prefilling on the decode instance, so the client still gets a
normal answer.

Prompt block hashes (for the `kv` policy and the fleet KV index) use the scheme the instances
declared (EngineClient.prefix_hasher); `hasher` given here serves only until one has.

Remote prefill is conditional: the decode instance (chosen first, by load) prefills locally when
the prompt's part it does not cache is short, or a small fraction of the prompt, or when the prefill
pool is saturated, since then the transfer costs more than it saves.

Between heartbeats the head keeps its own account of each instance's load (`EngineClient.submit`):
a request's uncached prompt blocks count as pending prefill until its first token, and its prompt
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

import msgspec

from slurmserve.config import DisaggConfig
from slurmserve.router.engine_client import DeltaStream, EngineClient, Instance, NoInstanceError
from slurmserve.router.metrics import HeadMetrics
from slurmserve.router.policies import PrefixHasher, Route, kv_usage_estimate
from slurmserve.runtime import protocol as P

log = logging.getLogger(__name__)

MAX_SESSIONS = 100_000   # session-affinity entries kept (least recently used go first)


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
    def __init__(self, client: EngineClient, metrics: HeadMetrics, disaggregated: bool,
                 kv_index=None, hasher: PrefixHasher | None = None, disagg: DisaggConfig | None = None,
                 busy_threshold: float = 0.95, migration_limit: int = 3):
        self.client = client
        self.metrics = metrics
        self.disaggregated = disaggregated
        self.kv_index = kv_index              # fleet KV index (kvfabric.kv_index), if any
        self.hasher = hasher
        self.disagg = disagg or DisaggConfig()
        self.busy_threshold = busy_threshold
        self.prefill_timeout_s = self.disagg.prefill_timeout_s
        self.migration_limit = migration_limit   # per request; 0: a lost instance fails its requests
        self.sessions: dict[bytes, Instance] = {}   # session affinity, least recently used first

    def ready(self) -> bool:
        return self.client.all_ready()

    async def start(self, req_id: str, prompt: list[int], params: P.SamplingParams,
                    session: bytes | None = None, interval: int = 1) -> RequestStream:
        """Route the request and send it to an engine; its deltas come on the returned stream, which
        the caller must `release`. Raises NoInstanceError if no engine can take it. Requests of one
        `session` (a client-chosen id) stay on one instance while it lives. After the first delta,
        the next comes once `interval` tokens have queued up, or at the end."""
        route = Route(prompt, self._hasher())
        handoff = None
        role = "decode" if self.disaggregated else "worker"
        inst = self._choose(role, route, session)
        uncached = self._uncached_blocks(role, route, inst)
        # a decode instance that pulls its KV never computes the prompt: prompt logprobs need it local
        if self.disaggregated and params.prompt_logprobs is None and self._remote_prefill_pays(route, inst, uncached):
            handoff = await self._prefill(req_id, prompt, params, route)
            if not inst.up:   # it died while the prefill leg ran: another one pulls the KV
                inst = self._choose(role, route, session)
                uncached = self._uncached_blocks(role, route, inst)
        if handoff is not None:
            uncached = 0     # the decode instance only pulls KV; it computes nothing
        leg = self._submit(inst, req_id, route, params, handoff, interval, uncached)
        return RequestStream(self, req_id, prompt, params, session, interval, role, leg)

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
        route = Route(stream.prompt + stream.generated, self._hasher())
        try:
            inst = self._choose(stream.role, route, stream.session)
        except NoInstanceError:
            log.warning("request %s lost instance %d after %d tokens; no %s instance is left to take it",
                        stream.req_id, lost, n_out, stream.role)
            return False
        self.client.release(stream.leg)   # its share of the lost instance's load account
        stream.migrations += 1
        # the answer has the first leg's prompt logprobs; the new leg's prompt is not the client's
        leg_params = msgspec.structs.replace(params, max_tokens=params.max_tokens - n_out,
                                             min_tokens=max(0, params.min_tokens - n_out), prompt_logprobs=None)
        stream.leg = self._submit(inst, f"{stream.req_id}-m{stream.migrations}", route, leg_params, None,
                                  stream.interval, self._uncached_blocks(stream.role, route, inst))
        stream.leg.attach(stream._feed)
        self.metrics.migrations.inc()
        log.info("request %s lost instance %d after %d tokens; continued on instance %d", stream.req_id,
                 lost, n_out, inst.index)
        return True

    def _hasher(self) -> PrefixHasher | None:
        declared, hasher = self.client.prefix_hasher()
        return hasher if declared else self.hasher

    def _submit(self, inst: Instance, req_id: str, route: Route, params: P.SamplingParams,
                handoff: dict | None, interval: int, uncached: int) -> DeltaStream:
        bs = inst.block_size
        phase = P.AGGREGATED if handoff is None else P.DECODE_WITH_HANDOFF
        return self.client.submit(inst, req_id, route.prompt_token_ids, params, phase, handoff, interval,
                                  prefill_blocks=uncached, held_blocks=route.prompt_blocks(bs),
                                  held_hashes=route.known_hashes(bs))

    def _choose(self, role: str, route: Route, session: bytes | None) -> Instance:
        if session is None:
            return self.client.choose(role, route)
        sessions = self.sessions
        inst = sessions.pop(session, None)
        if inst is None or not inst.up:
            inst = self.client.choose(role, route)
        sessions[session] = inst           # most recently used last
        if len(sessions) > MAX_SESSIONS:
            del sessions[next(iter(sessions))]
        return inst

    def _uncached_blocks(self, role: str, route: Route, inst: Instance) -> int:
        """Prompt blocks `inst` would have to compute itself: by the overlap its policy found, or
        for a decode instance (chosen by load) by the fleet KV index."""
        blocks = route.prompt_blocks(inst.block_size)
        if role != "decode":
            return blocks - route.overlap_blocks
        if self.kv_index is None or not inst.block_size:
            return blocks
        return blocks - self.kv_index.overlap(route.hashes(inst.block_size), [inst.index])[inst.index]

    def _remote_prefill_pays(self, route: Route, decode: Instance, uncached_blocks: int) -> bool:
        tokens = len(route.prompt_token_ids)
        uncached = min(tokens, uncached_blocks * decode.block_size) if decode.block_size else tokens
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
            inst = self.client.choose("prefill", route)
        except NoInstanceError:
            self.metrics.disagg.labels("fallback_no_prefill_instance").inc()
            return None
        leg = msgspec.structs.replace(params, max_tokens=1, min_tokens=0)
        uncached = route.prompt_blocks(inst.block_size) - route.overlap_blocks
        stream = self.client.submit(inst, f"{req_id}-prefill", prompt, leg, P.PREFILL_ONLY,
                                    prefill_blocks=uncached)
        last = None
        try:
            async with asyncio.timeout(self.prefill_timeout_s):
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
