"""The simulated engine as an `Engine`: vLLM-like continuous batching over paged KV, on a step-time model.

The simulation itself lives in runtime/sim/ (scheduler, block pool, sampler, KV connector); this
file adapts it to the engine interface: start/stop, a stream per request (generate/abort), load and
info for the head, KV events on ctx.kv_events_endpoint, and the loop that runs the steps.

The loop: each `Scheduler.step()` returns its modelled time in ms; the loop divides it by `speedup`
and sleeps it (measured against a running clock, so scheduling CPU time and late wake-ups are
absorbed); with speedup=inf it only yields to the event loop between steps. A step's tokens are
delivered to their streams when its time has elapsed. Its KV events go out as one batch right
after the step is scheduled (vLLM's format, via KVEventPublisher).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator

from slurmserve.kvfabric.block_hash import BlockHasher
from slurmserve.kvfabric.events import KVEventPublisher
from slurmserve.runtime.engine import Engine, EngineContext, EngineRequest
from slurmserve.runtime.protocol import Delta, EngineInfo, Load, Logprobs
from slurmserve.runtime.sim.kv_connector import SimKVConnector
from slurmserve.runtime.sim.request import DONE, SimRequest
from slurmserve.runtime.sim.sampler import Sampler
from slurmserve.runtime.sim.scheduler import Scheduler, decode_step_ms, prefill_step_ms

__all__ = ["SimEngine", "decode_step_ms", "prefill_step_ms"]

log = logging.getLogger(__name__)

KV_EVENTS_TOPIC = "kv-events"


class SimEngine(Engine):
    clock_slack_s = 0.005              # a step starting this late still counts from the previous deadline

    def __init__(self, cfg, ctx: EngineContext):
        super().__init__(ctx)
        sim = cfg.engine.sim
        self.sim = sim
        self.speedup = float(sim.speedup)
        args = cfg.engine.args or {}
        self.hasher = BlockHasher(sim.block_size, ctx.extra.get("hash_seed"),
                                  args.get("prefix_caching_hash_algo", "sha256"))
        max_model_len = cfg.model.max_model_len
        # a request ends ("length") at max_model_len, or where it would no longer fit the KV blocks
        self.sampler = Sampler(getattr(cfg.model, "path", None), sim.seed,
                               min(max_model_len, sim.num_kv_blocks * sim.block_size))
        self.connector = SimKVConnector(ctx, sim.block_size, self._kick)
        self.scheduler = Scheduler(sim, max_model_len, self.hasher, self.sampler, self.connector)
        self._reqs: dict[str, SimRequest] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.publisher: KVEventPublisher | None = None
        self._vclock = 0.0
        self._stopped = False
        self._mirror = None               # follower ranks mirroring our steps (runtime/sim/mirror.py)

    def _kick(self) -> None:
        """Wake the loop: a request came, or a pulled request or held blocks came back."""
        if self._wake is not None:
            self._wake.set()

    # ---- Engine interface -----------------------------------------------------------------------

    async def start(self) -> None:
        if self.sim.load_time_s:
            await asyncio.sleep(self.sim.load_time_s)
        if self.ctx.kv_events_endpoint:
            self.publisher = KVEventPublisher(self.ctx.kv_events_endpoint, KV_EVENTS_TOPIC)
        self.connector.start(self.sim, self.sim.num_kv_blocks)
        comm = self.ctx.comm
        if comm is not None and comm.Get_size() > 1:
            from slurmserve.runtime.sim.mirror import StepMirror
            self._mirror = StepMirror(comm)
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="sim-engine")

    async def stop(self) -> None:
        self._stopped = True
        self.connector.stopped = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        for req in list(self._reqs.values()):
            if req.state != DONE:
                self._finish_early(req, "abort")
        if self.publisher is not None:
            self.publisher.close()
            self.publisher = None
        mirror, self._mirror = self._mirror, None
        if mirror is not None:
            await asyncio.to_thread(mirror.close)
        await self.connector.close()

    def load(self) -> Load:
        s = self.scheduler
        return Load(running=s.num_running, waiting=s.num_waiting, kv_usage=s.kv_usage,
                    num_kv_blocks=s.blocks.num_blocks, block_size=s.block_size,
                    prefix_cache_queries=s.prefix_query_tokens, prefix_cache_hits=s.prefix_hit_tokens,
                    external_kv_tokens=s.external_kv_tokens)

    def info(self) -> EngineInfo:
        comm = self.ctx.comm
        s = self.scheduler
        return EngineInfo(kind="sim", block_size=s.block_size, num_kv_blocks=s.blocks.num_blocks,
                          max_num_seqs=s.max_num_seqs, prefix_caching=True, hash_algo=self.hasher.algo,
                          hash_seed=self.hasher.hash_seed, ranks=comm.Get_size() if comm is not None else 1)

    async def follow(self) -> int:
        from slurmserve.runtime.sim.mirror import follow
        return await follow(self.ctx.comm)

    def abort(self, req_id: str) -> None:
        req = self._reqs.get(req_id)
        if req is not None and req.state != DONE:
            self._finish_early(req, "abort")

    async def generate(self, request: EngineRequest) -> AsyncIterator[Delta]:
        req_id = request.req_id
        err = self._check(request)
        if err is not None:
            yield Delta(req_id, [], finish_reason="error", num_prompt_tokens=len(request.prompt_token_ids),
                        error=err)
            return
        req = SimRequest(request, self.sampler.seed_for(request),
                         1 if request.prefill_only else request.params.max_tokens)
        self._reqs[req_id] = req
        self.scheduler.add(req)
        self._kick()
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not req.shown and req.shown_finish is None:
                    req.waiter = loop.create_future()
                    await req.waiter
                toks, req.shown = req.shown, []
                finish = req.shown_finish
                if req.first_sent:
                    delta = Delta(req_id, toks, finish, error=req.error, handoff=req.kv_out)
                else:
                    req.first_sent = True
                    delta = Delta(req_id, toks, finish, req.prompt_len, req.num_cached or 0, req.error,
                                  req.kv_out)
                    if request.params.prompt_logprobs is not None:
                        delta.prompt_logprobs = self.sampler.prompt_logprobs(request.prompt_token_ids,
                                                                             request.params.prompt_logprobs)
                if req.num_logprobs is not None:
                    lps, req.shown_lp = req.shown_lp, []
                    delta.logprobs = Logprobs([x[0] for x in lps], [x[1] for x in lps], [x[2] for x in lps])
                yield delta
                if finish is not None:
                    return
        finally:
            if req.state != DONE:
                self._finish_early(req, "abort", notify=False)
            if self._reqs.get(req_id) is req:
                del self._reqs[req_id]

    # ---- request streams ------------------------------------------------------------------------

    def _check(self, request: EngineRequest) -> str | None:
        """Why this engine cannot take the request now (stopped, a duplicate id), or None; raises
        InvalidRequest for a request that no engine could take as given."""
        if self._stopped:
            return "engine stopped"
        if request.req_id in self._reqs:
            return f"duplicate request id {request.req_id!r}"
        self.scheduler.check(request)
        return None

    def _finish_early(self, req: SimRequest, reason: str, notify: bool = True) -> None:
        """End a request outside the normal step flow (abort, shutdown)."""
        self.scheduler.finish(req, reason)
        self._show(req)
        if notify:
            self._notify(req)

    @staticmethod
    def _show(req: SimRequest) -> None:
        """Hand the stream what the request's finished step produced. The stream reads `shown`, not
        `out`: it only runs once the loop sleeps on the next step, whose token `out` holds by then."""
        if req.out:
            req.shown += req.out
            req.out = []
            if req.out_lp:
                req.shown_lp += req.out_lp
                req.out_lp = []
        req.shown_finish = req.finish

    @staticmethod
    def _notify(req: SimRequest) -> None:
        w = req.waiter
        if w is not None:
            req.waiter = None
            if not w.done():
                w.set_result(None)

    def _deliver(self, produced: list[SimRequest]) -> None:
        show, notify = self._show, self._notify
        for req in produced:
            show(req)
            notify(req)

    # ---- the loop -------------------------------------------------------------------------------

    async def _loop(self) -> None:
        perf = time.perf_counter
        inf = math.isinf(self.speedup)
        scale = 0.001 / self.speedup
        wake = self._wake
        sched = self.scheduler
        produced: list[SimRequest] = []    # the step's requests, until their tokens are delivered
        try:
            while True:
                if not sched.has_work:
                    wake.clear()
                    await wake.wait()
                    continue
                t0 = perf()
                steps = sched.steps
                ms, produced = sched.step()
                if self._mirror is not None and sched.steps != steps:
                    self._mirror.step(sched.steps, ms)
                events = sched.blocks.take_events()
                if events and self.publisher is not None:
                    self.publisher.publish(events)
                if sched.steps == steps and (sched.loading or self.connector.transfer is not None):
                    # nothing could run: it waits for a pull to land or held blocks to be read
                    wake.clear()
                    await wake.wait()
                    continue
                if inf or ms <= 0.0:
                    self._deliver(produced)
                    produced = []
                    await asyncio.sleep(0)
                    continue
                vc = self._vclock
                base = vc if 0.0 <= t0 - vc < self.clock_slack_s else t0
                self._vclock = end = base + ms * scale
                delay = end - perf()
                await asyncio.sleep(delay if delay > 0 else 0)
                self._deliver(produced)
                produced = []
        except asyncio.CancelledError:
            self._deliver(produced)
            raise
        except Exception:
            log.exception("simulated engine loop failed")
            for req in list(self._reqs.values()):
                if req.state != DONE:
                    req.error = "simulated engine failed"
                    self._finish_early(req, "error")
            raise
