"""The simulated engine's scheduler and step-time model: continuous batching as vLLM v1 does it.

One `step()` is one engine step:
  * Running requests first, in admission order: each gets the tokens it still has to compute (one
    for a decoding request, the rest of its prompt, chunked, for a prefilling one) within the
    step's `max_num_batched_tokens` budget. A request that needs a new KV block when none is free
    preempts the newest running request (its blocks are freed and it goes back to the front of the
    waiting queue to be recomputed), possibly itself.
  * Then, unless something was preempted this step, waiting requests are admitted in order while
    fewer than `max_num_seqs` run (or load), the budget lasts and their blocks fit (block_pool.py:
    a prefix-cache hit gives a request its cached blocks). A long prompt is prefilled over several
    steps when the budget is smaller than it. Like vLLM, the last prompt token is always computed,
    so a prompt is never entirely a cache hit.
  * The blocks a scheduled request fills in the step enter the prefix cache as it is scheduled, as
    in vLLM v1 (allocate_slots caches them): a request admitted after it in the same step can hit
    them. Then every scheduled request advances, and one whose tokens are all computed samples its
    next token (sampler.py).
  * A remote-prefilled request (its KV comes from a prefill instance) counts its whole prompt as
    computed: either the connector pulls the real bytes (kv_connector.py; it waits in LOADING and
    `loaded` puts it back) or the admitting step pays `remote_block_transfer_ms` per pulled block.

Step time: prefill_ms = a*T^2 + b*T + c where T is the number of tokens computed for prefilling
requests in the step (only when T > 0); decode_ms = max(1, a*u^2 + b*u + c) with u the KV
utilization (used blocks / total) after scheduling, charged when the step has any decoding request.
A mixed step costs prefill_ms + decode_ms, plus the modelled transfer. `step()` returns that time;
what the caller does with it (sleep it, or advance a virtual clock) is its own business.
"""

from __future__ import annotations

from collections import deque

from slurmserve.config import SimConfig
from slurmserve.kvfabric.block_hash import BlockHasher
from slurmserve.runtime.engine import EngineRequest, InvalidRequest
from slurmserve.runtime.sim.block_pool import BlockPool
from slurmserve.runtime.sim.kv_connector import SimKVConnector
from slurmserve.runtime.sim.request import DONE, LOADING, RUNNING, WAITING, SimRequest
from slurmserve.runtime.sim.sampler import Sampler


def prefill_step_ms(coeffs: tuple[float, float, float], tokens: int) -> float:
    """The step model's cost of computing `tokens` prefill tokens in one step."""
    a, b, c = coeffs
    return max(0.0, a * tokens * tokens + b * tokens + c)


def decode_step_ms(coeffs: tuple[float, float, float], utilization: float) -> float:
    """The step model's cost of a decode step at this KV utilization (0..1)."""
    a, b, c = coeffs
    return max(1.0, a * utilization * utilization + b * utilization + c)


class Scheduler:
    remote_block_transfer_ms = 0.02    # modelled cost of pulling one KV block from a prefill instance

    def __init__(self, sim: SimConfig, max_model_len: int, hasher: BlockHasher, sampler: Sampler,
                 connector: SimKVConnector):
        self.block_size = sim.block_size
        self.max_num_seqs = sim.max_num_seqs
        self.max_num_batched_tokens = sim.max_num_batched_tokens
        self.max_model_len = max_model_len
        self.prefill_coeffs = tuple(sim.prefill_coeffs)
        self.decode_coeffs = tuple(sim.decode_coeffs)
        self.blocks = BlockPool(sim.num_kv_blocks, sim.block_size, hasher)
        self.sampler = sampler
        self.connector = connector
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.loading: dict[str, SimRequest] = {}     # pulling their prompt's KV (kv_connector.py)
        # counters, for tests and metrics
        self.steps = 0
        self.num_preemptions = 0
        self.prefix_hit_tokens = 0        # prompt tokens found in the prefix cache at admission...
        self.prefix_query_tokens = 0      # ...out of these (vLLM's prefix_cache_hits / _queries)
        # prompt tokens whose KV came from a prefill instance (vLLM's external_kv_transfer prompt
        # tokens): what the head's instance_prompt_tokens_external_total reports
        self.external_kv_tokens = 0

    # ---- requests in and out --------------------------------------------------------------------

    def check(self, request: EngineRequest) -> None:
        """Raise InvalidRequest for a request that no engine like this one could take as given
        (the client gets a 400, as for vLLM's checks of a request)."""
        n = len(request.prompt_token_ids)
        if n == 0:
            raise InvalidRequest("empty prompt")
        if n >= self.max_model_len:
            raise InvalidRequest(f"prompt of {n} tokens does not fit max_model_len={self.max_model_len}")
        if n + 1 > self.blocks.num_blocks * self.block_size:
            raise InvalidRequest(f"prompt of {n} tokens does not fit the instance's {self.blocks.num_blocks} "
                                 f"KV blocks of {self.block_size} tokens")
        if request.params.structured_outputs:
            raise InvalidRequest("the sim engine has no structured output (response_format, structured_outputs)")

    def add(self, req: SimRequest) -> None:
        """Queue a request; a later step admits it."""
        self.waiting.append(req)

    def finish(self, req: SimRequest, reason: str) -> None:
        """End a request outside the step flow (abort, shutdown): out of the queues, blocks freed."""
        if req.state == WAITING:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        elif req.state == RUNNING:
            try:
                self.running.remove(req)
            except ValueError:
                pass
            self.blocks.free(req)
        # LOADING: the pull may still be writing into its blocks; `loaded` frees them
        req.state = DONE
        req.finish = reason

    def loaded(self, req: SimRequest, first: int, ok: bool) -> None:
        """A pull of the request's blocks [first, ...) ended: it decodes, or (`ok` False) it frees
        its blocks and is prefilled locally, like a preempted request."""
        if self.loading.get(req.req_id) is req:
            del self.loading[req.req_id]
        if req.state != LOADING:          # aborted while loading: its blocks were kept until now
            self.blocks.free(req)
            return
        if ok:
            self.external_kv_tokens += req.prompt_len - first * self.block_size   # what the pull delivered
            req.num_computed = len(req.tokens)
            if req.num_cached is None:
                req.num_cached = req.prompt_len
            req.state = RUNNING
            self.running.append(req)
        else:
            self.blocks.free(req)
            req.num_computed = 0
            req.state = WAITING
            self.waiting.appendleft(req)

    # ---- what the engine and the router read -------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def kv_usage(self) -> float:
        return self.blocks.usage

    @property
    def has_work(self) -> bool:
        """Whether a step could schedule anything (loading requests come back through `loaded`)."""
        return bool(self.running or self.waiting)

    # ---- admission and preemption ---------------------------------------------------------------

    def _admit(self, req: SimRequest, budget: int) -> tuple[int, float] | None:
        """Give a waiting request its blocks; (tokens to compute this step, transfer ms) or None."""
        bs = self.block_size
        ntok = len(req.tokens)
        remote = req.remote
        hits = self.blocks.prefix_hit(req, ntok // bs if remote else (ntok - 1) // bs)
        hit_tokens = len(hits) * bs
        if remote:
            n = 0
            target = ntok
        else:
            n = min(ntok - hit_tokens, budget)
            if n <= 0:
                return None
            target = hit_tokens + n
        need = -(-target // bs) - len(hits)
        if not self.blocks.allocate(req, hits, need):
            return None
        transfer_ms = 0.0
        if remote and self.connector.can_pull(req):
            req.remote = False          # if the pull fails or it is preempted, it is recomputed locally
            self.prefix_hit_tokens += hit_tokens
            self.prefix_query_tokens += ntok
            req.state = LOADING
            self.loading[req.req_id] = req
            self.connector.pull(req, len(hits), self.loaded)
            return 0, 0.0
        if remote:
            req.remote = False          # if preempted later, it is recomputed locally
            req.num_computed = ntok
            transfer_ms = need * self.remote_block_transfer_ms
            self.external_kv_tokens += ntok - hit_tokens            # modelled pull: counted as landed
            if req.num_cached is None:
                req.num_cached = req.prompt_len
        else:
            req.num_computed = hit_tokens
            if req.num_cached is None:
                req.num_cached = hit_tokens
        self.prefix_hit_tokens += hit_tokens
        self.prefix_query_tokens += ntok
        return n, transfer_ms

    def _cache_scheduled(self, req: SimRequest, n: int) -> None:
        """Enter the blocks that this step fills into the prefix cache now, while scheduling, as
        vLLM v1's allocate_slots does: a request admitted later in the same step can hit them (its
        attention reads them in the same forward pass)."""
        full = (req.num_computed + n) // self.block_size
        if full > req.num_stored:
            self.blocks.store(req, full)

    def _preempt(self, req: SimRequest) -> None:
        self.blocks.free(req)
        req.num_computed = 0
        req.state = WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    # ---- one step -------------------------------------------------------------------------------

    def step(self) -> tuple[float, list[SimRequest]]:
        """Schedule and run one engine step: (its modelled duration in ms, the requests that sampled
        a token in it). (0.0, []) when nothing could be scheduled; then `steps` does not advance."""
        bs = self.block_size
        blocks = self.blocks
        budget = self.max_num_batched_tokens
        running = self.running
        sched: list[tuple[SimRequest, int]] = []
        preempted = False
        transfer_ms = 0.0

        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            n = len(req.tokens) - req.num_computed
            if n > budget:
                n = budget
            need = -(-(req.num_computed + n) // bs) - len(req.block_ids)
            if need > 0:
                while blocks.num_free < need:
                    victim = running.pop()
                    self._preempt(victim)
                    preempted = True
                    if victim is req:
                        break
                if req.state != RUNNING:
                    break               # it preempted itself, so it was the last running request
                req.block_ids += blocks.alloc(need)
            sched.append((req, n))
            self._cache_scheduled(req, n)
            budget -= n
            i += 1

        if not preempted:
            waiting = self.waiting
            max_seqs = self.max_num_seqs
            while (waiting and len(running) + len(self.loading) < max_seqs
                   and (budget > 0 or waiting[0].remote)):
                req = waiting[0]
                got = self._admit(req, budget)
                if got is None:
                    break
                n, t_ms = got
                waiting.popleft()
                if req.state == LOADING:
                    continue            # it runs once its KV has landed (`loaded`)
                req.state = RUNNING
                running.append(req)
                sched.append((req, n))
                self._cache_scheduled(req, n)
                budget -= n
                transfer_ms += t_ms

        if not sched:
            return 0.0, []
        utilization = blocks.usage

        # compute: advance, announce full blocks, sample
        prefill_tokens = 0
        decoding = False
        finished = 0
        produced: list[SimRequest] = []
        connector = self.connector
        write_kv = connector.writes_kv
        for req, n in sched:
            ntok = len(req.tokens)
            before = req.num_computed
            if n == 0 or (n == 1 and req.num_out and before + 1 == ntok):
                decoding = True
            else:
                prefill_tokens += n
            after = before + n
            if write_kv and n:
                connector.write_kv(req, before, after)
            req.num_computed = after
            if after == ntok:
                self.sampler.sample(req)
                if req.finish is not None and req.prefill_only:
                    req.kv_out = connector.handoff(req, blocks)   # before its blocks are freed below
                produced.append(req)
                if req.finish is not None:
                    finished += 1
        if finished:
            for req, _ in sched:
                if req.finish is not None and req.state == RUNNING:
                    req.state = DONE
                    blocks.free(req)
            self.running = [r for r in running if r.state == RUNNING]

        ms = transfer_ms
        if prefill_tokens:
            ms += prefill_step_ms(self.prefill_coeffs, prefill_tokens)
        if decoding:
            ms += decode_step_ms(self.decode_coeffs, utilization)
        self.steps += 1
        return ms, produced
