"""Discrete-event fleet simulator on virtual time: many SimEngines in one process.

Each engine is a real `runtime.sim_engine.SimEngine`, never started: the fleet adds requests to its
scheduler (`runtime.sim.scheduler.Scheduler`) and calls its `step()` (the same scheduling, paged
KV, prefix caching, chunked prefill, preemption and step-cost code the served simulator runs) and,
instead of sleeping the step's modelled duration, advances a virtual clock by it. There is
therefore one step model, and the results depend neither on this machine's speed nor on its load:
the same seed gives the same numbers.

Event loop: arrivals (Poisson or gamma gaps, `bench.loadgen.arrival_times`) are routed to an
engine; an idle engine with work starts a step at once; a step scheduled at t delivers its tokens
at t + step_ms, and the engine then starts its next step. Requests arriving during a step wait for
the next one, as in the served engine.

Aggregated fleet: `workers` engines, router `least_loaded`, `round_robin` or `kv` (the head's own
policy classes from `router.policies`, fed the simulator's exact load), or any other
`router.policies.Policy` (`bench routing`'s oracle). For `kv`, every step's KV
events go straight into a fleet `KVIndex`, and the fleet keeps the head's load account (prefill
blocks until the first token, held blocks until the end) as the Orchestrator does.

Requests either arrive at given times (open loop) or, with `concurrency`, as a closed loop: that
many at time 0, and each completion sends the next one at once (what `bench serve --concurrency`
does against a served deployment).

Disaggregated fleet: `prefill` + `decode` engines, as the head's orchestrator does it: a
prefill-only leg (max_tokens=1, `do_remote_decode`) on a prefill engine, then the returned
kv_transfer_params go to a decode engine, whose admitting step pays `remote_block_transfer_ms` per
pulled block (the scheduler's modelled transfer; settable here) and samples the first token the
client sees. TTFT = arrival -> that first token (prefill + queueing on both sides + transfer); TPOT =
(E2E - TTFT) / (output tokens - 1). Unlike the orchestrator, the fleet always disaggregates (no
local prefill of short prompts).

Per request the fleet returns `bench.loadgen.Result`s (virtual seconds), so `summarize` and
`meets_slos` (DistServe goodput) apply unchanged.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass
from typing import Any

from slurmserve.bench.datasets import RequestSpec, _length
from slurmserve.bench.loadgen import Result, arrival_times, meets_slos, summarize
from slurmserve.config import DeploymentConfig, KVRoutingConfig, SimConfig
from slurmserve.kvfabric.kv_index import KVIndex
from slurmserve.router.instance import HeadLoad
from slurmserve.router.policies import KVAware, LeastLoaded, Policy, PrefixHasher, RoundRobin, Route
from slurmserve.runtime.engine import EngineContext, EngineRequest
from slurmserve.runtime.protocol import SamplingParams
from slurmserve.runtime.sim.request import SimRequest
from slurmserve.runtime.sim_engine import SimEngine, decode_step_ms, prefill_step_ms

POLICIES = ("least_loaded", "round_robin", "kv")


def step_prefill_ms(sim: SimConfig, tokens: int) -> float:
    """The step model's prefill cost of `tokens` prefill tokens in one step (as SimEngine charges)."""
    return prefill_step_ms(sim.prefill_coeffs, tokens)


def step_decode_ms(sim: SimConfig, used_blocks: int) -> float:
    """The step model's decode cost at `used_blocks` KV blocks in use (as SimEngine charges)."""
    return decode_step_ms(sim.decode_coeffs, used_blocks / sim.num_kv_blocks)


@dataclass
class Workload:
    """Requests with lengths like `bench.datasets.random_dataset` (uniform within +-range_ratio),
    arriving for `duration_s` virtual seconds: n = rate * duration_s, within [min_n, max_n]. A run
    must span many request lifetimes: a fixed count sent at an absurd rate is a burst the fleet
    may absorb, which would pass any SLO."""
    input_len: int
    output_len: int
    duration_s: float = 60.0
    min_n: int = 100
    max_n: int = 20000
    range_ratio: float = 0.0
    burstiness: float = 1.0
    seed: int = 0

    def count(self, rate: float) -> int:
        return max(self.min_n, min(self.max_n, math.ceil(rate * self.duration_s)))

    def lengths(self, n: int) -> list[tuple[int, int]]:
        """The first n requests' (input, output) lengths; the same seed gives the same prefix."""
        rng = random.Random(self.seed)
        return [(_length(rng, self.input_len, self.range_ratio), _length(rng, self.output_len, self.range_ratio))
                for _ in range(n)]

    def arrivals(self, rate: float, n: int) -> list[float]:
        """n arrival times at `rate` req/s; the same seed scales one set of gaps (common random numbers)."""
        return arrival_times([RequestSpec() for _ in range(n)], rate, self.burstiness, self.seed)


class _Engine(HeadLoad):
    """One SimEngine's scheduler stepped on virtual time; also the router's Candidate."""

    def __init__(self, index: int, role: str, sim: SimConfig, max_model_len: int, transfer_ms: float | None):
        HeadLoad.__init__(self)
        cfg = DeploymentConfig.model_validate({
            "model": {"path": "/nonexistent/fleet-sim-model", "max_model_len": max_model_len},
            "engine": {"kind": "sim", "sim": sim.model_dump()}})
        # built as the served engine builds it (config -> sampler, block pool, connector), never started
        engine = SimEngine(cfg, EngineContext(instance=index, role=role, host="127.0.0.1",
                                              kv_events_endpoint="", kv_side_channel_port=0))
        self.scheduler = engine.scheduler
        if transfer_ms is not None:
            self.scheduler.remote_block_transfer_ms = transfer_ms
        self.index = index
        self.role = role
        self.inflight = 0
        self.busy = False
        self.num_kv_blocks = sim.num_kv_blocks
        self.block_size = sim.block_size

    # Candidate attributes read by the router's policies
    @property
    def waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def running(self) -> int:
        return self.scheduler.num_running

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.scheduler.blocks.num_free / self.num_kv_blocks


@dataclass
class _Leg:
    """One request's leg on one engine, and its share of that engine's HeadLoad."""
    i: int                       # the request's index
    last: bool                   # the leg the client's tokens come from
    prefill_blocks: int
    held_blocks: int
    held_hashes: list[int] | None


class Fleet:
    """An aggregated (`workers`) or disaggregated (`prefill` + `decode`) fleet of sim engines."""

    def __init__(self, sim: SimConfig | None = None, *, workers: int = 0, prefill: int = 0, decode: int = 0,
                 policy: str | Policy = "least_loaded", transfer_ms: float | None = None, max_model_len: int = 32768,
                 kv: KVRoutingConfig | None = None):
        if workers and (prefill or decode):
            raise ValueError("either workers or prefill + decode")
        if not workers and not (prefill and decode):
            raise ValueError("need workers, or both prefill and decode engines")
        if isinstance(policy, str) and policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {policy!r}")
        if (policy == "kv" or not isinstance(policy, str)) and not workers:
            raise ValueError(f"the {policy} policy is simulated for aggregated fleets only")
        self.sim = sim or SimConfig(speedup=float("inf"))
        self.disagg = not workers
        mk = lambda i, role: _Engine(i, role, self.sim, max_model_len, transfer_ms)  # noqa: E731
        if self.disagg:
            self.pools = {"prefill": [mk(i, "prefill") for i in range(prefill)],
                          "decode": [mk(prefill + i, "decode") for i in range(decode)]}
        else:
            self.pools = {"worker": [mk(i, "worker") for i in range(workers)]}
        self.now = 0.0                                   # the virtual clock, in seconds
        self.index = KVIndex() if policy == "kv" else None
        self.hasher = PrefixHasher()                     # the engines' (no hash seed, sha256)
        if not isinstance(policy, str):
            self.policies = {"worker": policy}
        elif policy == "kv":
            kv = kv or KVRoutingConfig()
            self.policies = {"worker": KVAware(self.index, kv.prefill_load_scale, kv.busy_threshold,
                                               kv.temperature, seed=0, clock=lambda: self.now)}
        else:
            self.policies = {name: (LeastLoaded if policy == "least_loaded" else RoundRobin)()
                             for name in self.pools}

    @property
    def name(self) -> str:
        if self.disagg:
            return f"{len(self.pools['prefill'])}P:{len(self.pools['decode'])}D"
        return f"{len(self.pools['worker'])}x agg"

    def run(self, lengths: list[tuple[int, int]], arrivals: list[float] | None = None, *,
            prompts: list[list[int]] | None = None, concurrency: int = 0) -> list[Result]:
        """Simulate requests of (prompt_len, output_len) arriving at `arrivals` (virtual seconds),
        or, with `concurrency`, as a closed loop. `prompts` gives their token ids (shared prefixes
        then hit the prefix caches); without it every prompt starts with a distinct token, so no
        two share a block."""
        if (arrivals is None) == (concurrency <= 0):
            raise ValueError("give either arrivals or a concurrency")
        heap: list[tuple[float, int, int, Any]] = []
        seq = 0
        results = [Result(ok=False, index=i) for i in range(len(lengths))]
        legs: dict[str, _Leg] = {}
        ARRIVE, STEP_END = 0, 1
        bases: dict[int, list[int]] = {}

        def prompt_of(i: int) -> list[int]:
            if prompts is not None:
                return prompts[i]
            n = lengths[i][0]
            if n not in bases:
                bases[n] = [100 + j % 30000 for j in range(n)]
            prompt = list(bases[n])
            prompt[0] = 100 + i % 30000
            return prompt

        def push(t: float, kind: int, payload: Any) -> None:
            nonlocal seq
            heapq.heappush(heap, (t, seq, kind, payload))
            seq += 1

        def submit(t: float, pool: str, i: int, kv: dict | None, max_tokens: int, last: bool) -> None:
            prompt = prompt_of(i)
            route = Route(prompt, self.hasher)
            choice = self.policies[pool].choice(self.pools[pool], route)
            eng = choice.instance
            rid = f"{pool}-{i}"
            request = EngineRequest(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), kv)
            eng.scheduler.check(request)                  # InvalidRequest (a ValueError) if it cannot fit
            eng.scheduler.add(SimRequest(request, i + 1, max_tokens))
            eng.inflight += 1
            # the head's load account, as Orchestrator.submit keeps it
            bs = eng.block_size
            leg = _Leg(i, last, route.prompt_blocks(bs) - choice.overlap_blocks, route.prompt_blocks(bs),
                       route.known_hashes(bs))
            eng.add(leg)
            legs[rid] = leg
            start(eng, t)

        def start(eng: _Engine, t: float) -> None:
            if eng.busy:
                return
            ms, produced = eng.scheduler.step()
            events = eng.scheduler.blocks.take_events()
            if self.index is not None and events:
                # what the engine publishes this step; the head applies it at once
                self.index.apply(eng.index, events)
            if ms > 0.0:
                eng.busy = True
                push(t + ms / 1000.0, STEP_END, (eng, produced))

        def arrive(t: float, i: int) -> None:
            results[i].start = t
            results[i].prompt_tokens = lengths[i][0]
            if self.disagg:
                submit(t, "prefill", i, {"do_remote_decode": True}, 1, False)
            else:
                submit(t, "worker", i, None, lengths[i][1], True)

        if concurrency:
            for i in range(min(concurrency, len(lengths))):
                push(0.0, ARRIVE, i)
            sent = min(concurrency, len(lengths))
        else:
            for i, t in enumerate(arrivals):
                push(t, ARRIVE, i)
        while heap:
            t, _, kind, payload = heapq.heappop(heap)
            self.now = t
            if kind == ARRIVE:
                arrive(t, payload)
                continue
            eng, produced = payload
            eng.busy = False
            for req in produced:
                leg = legs[req.req_id]
                r = results[leg.i]
                req.out.clear()                                 # no stream reads them here
                if req.num_out and leg.prefill_blocks:
                    eng.prefilled(leg)                          # past its first token
                if leg.last and not r.ttft and req.num_out:
                    r.ttft = t - r.start
                    r.cached_tokens = req.num_cached or 0
                if req.finish is None:
                    continue
                eng.inflight -= 1
                eng.remove(leg)
                del legs[req.req_id]
                if leg.last:
                    r.ok, r.e2e, r.output_tokens = True, t - r.start, req.num_out
                    if concurrency and sent < len(lengths):
                        push(t, ARRIVE, sent)
                        sent += 1
                else:
                    submit(t, "decode", leg.i, req.kv_out, lengths[leg.i][1], True)
            start(eng, t)
        return results

    def stats(self) -> dict:
        engines = [e for pool in self.pools.values() for e in pool]
        return {"steps": sum(e.scheduler.steps for e in engines),
                "preemptions": sum(e.scheduler.num_preemptions for e in engines)}


def simulate(fleet_kwargs: dict, workload: Workload, rate: float, slos: dict[str, float] | None = None,
             sim: SimConfig | None = None) -> tuple[list[Result], dict]:
    """One run at `rate`: the per-request results and `bench.loadgen.summarize`'s summary (virtual
    seconds; wall_s = the last completion)."""
    fleet = Fleet(sim, **fleet_kwargs)
    n = workload.count(rate)
    results = fleet.run(workload.lengths(n), workload.arrivals(rate, n))
    wall = max((r.start + r.e2e for r in results if r.ok), default=0.0)
    summary = summarize(results, wall, slos)
    summary.update(fleet.stats(), rate=rate, fleet=fleet.name)
    return results, summary


def attainment(results: list[Result], slos: dict[str, float]) -> float:
    """Share of the requests sent that met every SLO (DistServe)."""
    return sum(meets_slos(r, slos) for r in results) / len(results) if results else 0.0


class GoodputSearch:
    """DistServe's goodput: the highest request rate at which at least `target` of the requests meet
    every SLO. Rates are searched on a fixed geometric grid (start * step**k): doubling until the
    attainment drops below target, then bisection on the grid in between. Every rate is simulated
    once and shared by all SLO pairs; since a looser SLO meets the target wherever a tighter one
    does, and both searches walk the same grid, a looser SLO never gets a lower rate.

    Rates above `ceiling` are not simulated and count as missed: there a capped request count
    would arrive as a burst too short to measure (Workload). `capped(rate)` says whether a result
    stopped at that ceiling, i.e. the goodput is at least that rate."""

    def __init__(self, run_at, start: float, target: float = 0.9, step: float = 2 ** 0.25, max_doublings: int = 8,
                 ceiling: float = math.inf):
        self.run_at = run_at                 # rate -> list[Result]
        self.start, self.target, self.step, self.max_doublings = start, target, step, max_doublings
        self.ceiling = ceiling
        self.cache: dict[int, list[Result]] = {}

    def rate(self, k: int) -> float:
        return self.start * self.step ** k

    def results(self, k: int) -> list[Result]:
        if k not in self.cache:
            self.cache[k] = self.run_at(self.rate(k))
        return self.cache[k]

    def ok(self, k: int, slos: dict[str, float]) -> bool:
        if self.rate(k) > self.ceiling * (1 + 1e-9):
            return False
        return attainment(self.results(k), slos) >= self.target

    def capped(self, rate: float) -> bool:
        """Did the search stop at `rate` only because the next grid rate is over the ceiling?"""
        return rate > 0 and rate * self.step > self.ceiling * (1 + 1e-9)

    def max_rate(self, slos: dict[str, float]) -> float:
        """The goodput rate (req/s); 0 when even start / 2**max_doublings misses the target."""
        per = max(1, round(math.log(2) / math.log(self.step)))     # grid points per doubling
        lo, hi = 0, None
        for _ in range(self.max_doublings):     # halve until the target is met
            if self.ok(lo, slos):
                break
            lo, hi = lo - per, lo
        else:
            return 0.0
        if hi is None:
            for _ in range(self.max_doublings):     # double until it is missed
                if self.ok(lo + per, slos):
                    lo += per
                else:
                    hi = lo + per
                    break
            else:
                return self.rate(lo)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.ok(mid, slos):
                lo = mid
            else:
                hi = mid
        return self.rate(lo)

    def curve(self) -> list[tuple[float, list[Result]]]:
        return [(self.rate(k), self.cache[k]) for k in sorted(self.cache)]
