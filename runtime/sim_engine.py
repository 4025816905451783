"""A simulated engine: vLLM-like continuous batching over paged KV blocks, with a step-time model.

Scheduling (one `_schedule_step` per engine step, modelled on vLLM v1):
  * Running requests first, in admission order: each gets the tokens it still has to compute (one
    for a decoding request, the rest of its prompt, chunked, for a prefilling one) within the
    step's `max_num_batched_tokens` budget. A request that needs a new KV block when none is free
    preempts the newest running request (its blocks are freed and it goes back to the front of the
    waiting queue to be recomputed), possibly itself.
  * Then, unless something was preempted this step, waiting requests are admitted in order while
    fewer than `max_num_seqs` run, the budget lasts and their blocks fit. A long prompt is prefilled
    over several steps when the budget is smaller than it.
  * Prefix caching: full blocks are keyed by the vLLM-compatible chained block hash
    (slurmserve.kvfabric.block_hash). A freed hashed block keeps its hash and sits in an LRU free
    list; a later request whose prefix hashes to it reuses it, and allocation evicts the least
    recently freed block first (freed unhashed blocks are handed out before any cached one). Like
    vLLM, the last prompt token is always computed, so a prompt is never entirely a cache hit.
  * KV events (vLLM wire format, via KVEventPublisher on ctx.kv_events_endpoint): BlockStored when a
    block becomes full and computed, BlockRemoved when a cached block is evicted. At most one batch
    per step: the step's removals first (they happen while scheduling), then its stores. A block
    whose hash another block already holds stays unhashed and announces nothing.

Step time: prefill_ms = a*T^2 + b*T + c where T is the number of tokens computed for prefilling
requests in the step (only when T > 0); decode_ms = max(1, a*u^2 + b*u + c) with u the KV
utilization (used blocks / total) after scheduling, charged when the step has any decoding request.
A mixed step costs prefill_ms + decode_ms; a step admitting remote-prefilled requests adds
`remote_block_transfer_ms` per block pulled. The total is divided by `speedup` and slept (measured
against a running clock, so scheduling CPU time and late wake-ups are absorbed); with speedup=inf
the loop only yields to the event loop between steps. A step's tokens are delivered when its time
has elapsed.

Output tokens are pseudo-random ids in [first non-special id, vocab_size), from a 64-bit LCG seeded
by (sim.seed, the request's seed if any, its prompt): the same request gives the same tokens on
any instance, which is what makes a disaggregated request's output equal an aggregated one's. When
the model has an EOS id and the request does not ignore it, EOS is drawn with probability
`eos_probability` per token once `min_tokens` are out (finish "stop"); stop_token_ids finish
"stop" when drawn after `min_tokens` and are never drawn before.

Logprobs (when asked for) are deterministic stand-ins (`_logprobs_at`): the sampled token is the
most likely one; prompt logprobs depend only on (sim.seed, the prompt). logit_bias acts only at its
extremes: +100 forces that token, -100 bans it. Structured outputs are refused.

Disaggregation: a prefill-only request (phase PREFILL_ONLY) prefills, yields exactly one token and
finishes "length" with a handoff (vLLM's kv_transfer_params format) describing where its KV lives. A
remote-prefill request (DECODE_WITH_HANDOFF) counts its whole prompt as already computed (reported
as cached tokens, and the part not already in its prefix cache as Load.external_kv_tokens, like
vLLM's external_kv_transfer prompt tokens) and starts decoding once it has the prompt's KV:
  * Real KV movement (prefill and decode instances given side-channel keys by the runtime, and
    `sim.kv_transfer` not "none"): every instance owns a kvfabric KVTransfer whose host buffer
    holds its KV blocks, `sim.kv_bytes_per_token` per token. A prefill instance writes each
    computed token's KV, bytes derived from (token id, position) only (kv_transfer.fill_kv), and
    `export_remote_kv` keeps the request's blocks (ref-counted, still prefix-cached) until the
    decode side's READ notifies it, or the export expires. A decode instance gives the request
    its blocks, pulls the uncached ones on the transfer's importer thread (the request waits in
    a loading state; the engine keeps stepping the others, so the request pays the real transfer
    time and no step pays a modelled one), checks every byte against the prompt, and then
    decodes. A failed pull (peer died, refused, timed out) or wrong bytes: the request frees its
    blocks and is prefilled locally, like a preempted one. `kv_transfers_verified` /
    `kv_transfers_failed` count both; the totals are logged at stop.
  * Otherwise (no keys, as in unit tests, or kv_transfer "none") no bytes move and the admitting
    step pays `remote_block_transfer_ms` per pulled block. The prefill side then holds no blocks
    for the decode side: they are freed (and stay prefix-cached) as soon as the prefill leg ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from slurmserve.kvfabric.block_hash import BlockHasher
from slurmserve.kvfabric.events import BlockRemoved, BlockStored, KVEventPublisher
from slurmserve.kvfabric.kv_transfer import KVTransfer, create_kv_transfer, fill_kv, kv_matches
from slurmserve.runtime.engine import Engine, EngineContext, EngineRequest, InvalidRequest
from slurmserve.runtime.protocol import Delta, EngineInfo, Load, Logprobs

log = logging.getLogger(__name__)

_M64 = (1 << 64) - 1
_MASK64 = _M64
_LCG_A = 6364136223846793005            # Knuth's MMIX linear congruential generator
_LCG_C = 1442695040888963407

KV_EVENTS_TOPIC = "kv-events"

# request states (_LOADING: blocks allocated, remote KV being pulled)
_WAITING, _RUNNING, _DONE, _LOADING = 0, 1, 2, 3


def _mix64(x: int) -> int:
    """splitmix64 finalizer: spreads a seed over all 64 bits."""
    x &= _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def read_model_info(model_dir: Path | str | None) -> tuple[int, list[int], set[int]]:
    """(vocab_size, eos ids, special ids) from a HF model dir; (32000, [], {}) when it is missing."""
    vocab, eos, specials = 32000, [], set()
    if model_dir is None:
        return vocab, eos, specials
    d = Path(model_dir)
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return vocab, eos, specials
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    vocab = int(cfg.get("vocab_size") or text_cfg.get("vocab_size") or vocab)

    def ids(v: Any) -> list[int]:
        if isinstance(v, int) and not isinstance(v, bool):
            return [v]
        if isinstance(v, list):
            return [x for x in v if isinstance(x, int) and not isinstance(x, bool)]
        return []

    eos += ids(cfg.get("eos_token_id", text_cfg.get("eos_token_id")))
    for key in ("bos_token_id", "pad_token_id", "eos_token_id"):
        specials.update(ids(cfg.get(key, text_cfg.get(key))))
    try:
        gen = json.loads((d / "generation_config.json").read_text())
        for x in ids(gen.get("eos_token_id")):
            if x not in eos:
                eos.append(x)
        specials.update(eos)
    except (OSError, ValueError):
        pass
    try:
        tok_cfg = json.loads((d / "tokenizer_config.json").read_text())
        for k, v in (tok_cfg.get("added_tokens_decoder") or {}).items():
            if isinstance(v, dict) and v.get("special"):
                specials.add(int(k))
    except (OSError, ValueError):
        pass
    return vocab, [e for e in eos if 0 <= e < vocab], {s for s in specials if 0 <= s < vocab}


def prefill_step_ms(coeffs: tuple[float, float, float], tokens: int) -> float:
    """The step model's cost of computing `tokens` prefill tokens in one step."""
    a, b, c = coeffs
    return max(0.0, a * tokens * tokens + b * tokens + c)


def decode_step_ms(coeffs: tuple[float, float, float], utilization: float) -> float:
    """The step model's cost of a decode step at this KV utilization (0..1)."""
    a, b, c = coeffs
    return max(1.0, a * utilization * utilization + b * utilization + c)


class _Req:
    __slots__ = ("req_id", "prompt_len", "tokens", "max_tokens", "min_tokens", "ignore_eos", "stop_ids",
                 "num_computed", "block_ids", "hashes", "num_stored", "num_cached", "num_out", "rng",
                 "out", "finish", "shown", "shown_finish", "error", "waiter", "first_sent", "prefill_only",
                 "remote", "kv_params", "kv_out", "state", "num_logprobs", "out_lp", "shown_lp",
                 "forced", "avoid")

    def __init__(self, request: EngineRequest, rng: int, max_tokens: int):
        p = request.params
        self.req_id = request.req_id
        self.tokens = list(request.prompt_token_ids)
        self.prompt_len = len(self.tokens)
        self.max_tokens = max_tokens
        self.min_tokens = p.min_tokens
        self.ignore_eos = p.ignore_eos
        self.stop_ids = frozenset(p.stop_token_ids) if p.stop_token_ids else None
        self.num_computed = 0          # tokens whose KV is computed
        self.block_ids: list[int] = []
        self.hashes: list[bytes] = []  # chained digests of the full blocks of `tokens` computed so far
        self.num_stored = 0            # leading blocks already registered in the prefix cache
        self.num_cached: int | None = None
        self.num_out = 0
        self.rng = rng
        self.out: list[int] = []       # tokens sampled in a step whose time has not elapsed yet
        self.finish: str | None = None
        self.shown: list[int] = []     # tokens delivered (their step is over), not yet streamed
        self.shown_finish: str | None = None
        self.error: str | None = None
        self.waiter: asyncio.Future | None = None
        self.first_sent = False
        self.prefill_only = request.prefill_only
        self.remote = request.remote_prefill
        self.kv_params = request.handoff
        self.kv_out: dict | None = None
        self.state = _WAITING
        self.num_logprobs = p.logprobs    # None: no logprobs; else top ones per sampled token
        self.out_lp: list[tuple] = []     # (logprob, top ids, top logprobs) of each token in `out`
        self.shown_lp: list[tuple] = []   # ... and in `shown`
        # logit_bias, at its extremes only: +100 makes that token the only one drawn, -100 bans it
        bias = p.logit_bias or {}
        self.forced = max((t for t, b in bias.items() if b >= 100), default=None)
        self.avoid = frozenset(t for t, b in bias.items() if b <= -100)


class SimEngine(Engine):
    eos_probability = 0.002            # per token, when the model has an EOS id and it is not ignored
    remote_block_transfer_ms = 0.02    # modelled cost of pulling one KV block from a prefill instance
    clock_slack_s = 0.005              # a step starting this late still counts from the previous deadline

    def __init__(self, cfg, ctx: EngineContext):
        super().__init__(ctx)
        sim = cfg.engine.sim
        self.sim = sim
        self.num_blocks = sim.num_kv_blocks
        self.block_size = sim.block_size
        self.max_num_seqs = sim.max_num_seqs
        self.max_num_batched_tokens = sim.max_num_batched_tokens
        self.max_model_len = cfg.model.max_model_len
        self._cap_tokens = min(self.max_model_len, self.num_blocks * self.block_size)
        self.speedup = float(sim.speedup)
        self.prefill_coeffs = tuple(sim.prefill_coeffs)
        self.decode_coeffs = tuple(sim.decode_coeffs)
        args = cfg.engine.args or {}
        self.hasher = BlockHasher(self.block_size, ctx.extra.get("hash_seed"),
                                  args.get("prefix_caching_hash_algo", "sha256"))

        vocab, eos, specials = read_model_info(getattr(cfg.model, "path", None))
        self.vocab_size = vocab
        self.eos_ids = eos
        self.eos_token_id = eos[0] if eos else None
        low = [s for s in specials if s < 1024]
        self._tok_lo = min(max(low) + 1 if low else 0, vocab - 1)
        self._tok_span = max(1, vocab - self._tok_lo)
        self._banned = frozenset(s for s in specials if s >= self._tok_lo)
        self._eos_threshold = int(self.eos_probability * 65536) if self.eos_token_id is not None else 0

        n = self.num_blocks
        self._ref = [0] * n
        self._bhash: list[bytes | None] = [None] * n
        self._cache: dict[bytes, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(n))
        self._waiting: deque[_Req] = deque()
        self._running: list[_Req] = []
        self._reqs: dict[str, _Req] = {}
        self._removed: list[int] = []
        self._stored: list[BlockStored] = []
        self._touched: list[_Req] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.publisher: KVEventPublisher | None = None
        self._vclock = 0.0
        self._stopped = False
        self.kv_transfer: KVTransfer | None = None
        self.kv_bytes_per_token = sim.kv_bytes_per_token
        self._loading: dict[str, _Req] = {}
        # counters, for tests and metrics
        self.steps = 0
        self.num_preemptions = 0
        self.prefix_hit_tokens = 0        # prompt tokens found in the prefix cache at admission...
        self.prefix_query_tokens = 0      # ...out of these (vLLM's prefix_cache_hits / _queries)
        # prompt tokens whose KV came from a prefill instance (vLLM's external_kv_transfer prompt
        # tokens): what the head's instance_prompt_tokens_external_total reports
        self.external_kv_tokens = 0
        self.kv_transfers_verified = 0
        self.kv_transfers_failed = 0
        self._mirror = None               # follower ranks mirroring our steps (runtime/sim_mirror.py)

    # ---- Engine interface -----------------------------------------------------------------------

    async def start(self) -> None:
        if self.sim.load_time_s:
            await asyncio.sleep(self.sim.load_time_s)
        if self.ctx.kv_events_endpoint:
            self.publisher = KVEventPublisher(self.ctx.kv_events_endpoint, KV_EVENTS_TOPIC)
        keys = self.ctx.extra.get("kv_side_channel_keys")
        if self.ctx.role in ("prefill", "decode") and keys and self.sim.kv_transfer != "none":
            self.kv_transfer = create_kv_transfer(
                self.sim.kv_transfer, name=f"sim-{self.ctx.instance}", host=self.ctx.host,
                port=self.ctx.kv_side_channel_port, num_blocks=self.num_blocks,
                block_bytes=self.kv_bytes_per_token * self.block_size, curve_keys=keys,
                peer_keys=self.ctx.extra.get("kv_peer_keys", {}))
            log.info("KV transfer: %s backend, %d blocks of %d bytes, side channel %s",
                     self.kv_transfer.backend, self.num_blocks, self.kv_transfer.block_bytes,
                     self.kv_transfer.address)
        comm = self.ctx.comm
        if comm is not None and comm.Get_size() > 1:
            from slurmserve.runtime.sim_mirror import StepMirror
            self._mirror = StepMirror(comm)
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="sim-engine")

    async def stop(self) -> None:
        self._stopped = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        for req in list(self._reqs.values()):
            if req.state != _DONE:
                self._finish_early(req, "abort")
        if self.publisher is not None:
            self.publisher.close()
            self.publisher = None
        mirror, self._mirror = self._mirror, None
        if mirror is not None:
            await asyncio.to_thread(mirror.close)
        transfer, self.kv_transfer = self.kv_transfer, None
        if transfer is not None:
            await asyncio.to_thread(transfer.close)   # waits for an in-flight pull to end
            log.info("KV transfers: %d verified, %d failed; %s", self.kv_transfers_verified,
                     self.kv_transfers_failed, transfer.stats)

    def load(self) -> Load:
        n = self.num_blocks
        return Load(running=len(self._running), waiting=len(self._waiting),
                    kv_usage=(n - len(self._free)) / n, num_kv_blocks=n, block_size=self.block_size,
                    prefix_cache_queries=self.prefix_query_tokens, prefix_cache_hits=self.prefix_hit_tokens,
                    external_kv_tokens=self.external_kv_tokens)

    def info(self) -> EngineInfo:
        comm = self.ctx.comm
        return EngineInfo(kind="sim", block_size=self.block_size, num_kv_blocks=self.num_blocks,
                          max_num_seqs=self.max_num_seqs, prefix_caching=True, hash_algo=self.hasher.algo,
                          hash_seed=self.hasher.hash_seed, ranks=comm.Get_size() if comm is not None else 1)

    async def follow(self) -> int:
        from slurmserve.runtime.sim_mirror import follow
        return await follow(self.ctx.comm)

    def abort(self, req_id: str) -> None:
        req = self._reqs.get(req_id)
        if req is not None and req.state != _DONE:
            self._finish_early(req, "abort")

    async def generate(self, request: EngineRequest) -> AsyncIterator[Delta]:
        req_id = request.req_id
        err = self._check(request)
        if err is not None:
            yield Delta(req_id, [], finish_reason="error", num_prompt_tokens=len(request.prompt_token_ids),
                        error=err)
            return
        req = _Req(request, self._seed_for(request), 1 if request.prefill_only else request.params.max_tokens)
        self._reqs[req_id] = req
        self._waiting.append(req)
        if self._wake is not None:
            self._wake.set()
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
                        delta.prompt_logprobs = self._prompt_logprobs(request.prompt_token_ids,
                                                                      request.params.prompt_logprobs)
                if req.num_logprobs is not None:
                    lps, req.shown_lp = req.shown_lp, []
                    delta.logprobs = Logprobs([x[0] for x in lps], [x[1] for x in lps], [x[2] for x in lps])
                yield delta
                if finish is not None:
                    return
        finally:
            if req.state != _DONE:
                self._finish_early(req, "abort", notify=False)
            if self._reqs.get(req_id) is req:
                del self._reqs[req_id]

    # ---- disaggregation hooks -------------------------------------------------------------------

    def export_remote_kv(self, req_id: str, block_ids: list[int], num_tokens: int) -> dict[str, Any]:
        """kv_transfer_params a prefill-only leg returns; with a real transfer, the blocks stay
        held until the decode side has read them (or the export expires)."""
        params = {"do_remote_prefill": True, "do_remote_decode": False,
                  "remote_engine_id": f"sim-{self.ctx.instance}", "remote_request_id": req_id,
                  "remote_host": self.ctx.host, "remote_port": self.ctx.kv_side_channel_port,
                  "remote_block_ids": list(block_ids), "num_tokens": num_tokens}
        if self.kv_transfer is None:
            return params
        held = list(block_ids)
        for bid in held:
            self._ref[bid] += 1
        loop = asyncio.get_running_loop()

        def read(_ok: bool) -> None:     # on the transfer's service thread
            try:
                loop.call_soon_threadsafe(self._unhold, held)
            except RuntimeError:         # the loop is gone: the engine stopped
                pass

        params.update(self.kv_transfer.export(req_id, held, num_tokens, read))
        return params

    def _unhold(self, block_ids: list[int]) -> None:
        if not self._stopped:
            self._release(block_ids)
            self._wake.set()

    def import_remote_kv(self, req_id: str, params: dict[str, Any] | None, block_ids: list[int],
                         num_blocks: int) -> float:
        """Modelled cost in ms of pulling `num_blocks` remote blocks, when no bytes really move."""
        return num_blocks * self.remote_block_transfer_ms

    def _pull_remote_kv(self, req: _Req, first: int) -> None:
        """Start pulling the request's blocks [first, ...) from the prefill instance."""
        req.state = _LOADING
        self._loading[req.req_id] = req
        local = req.block_ids[first:]
        remote = list(req.kv_params.get("remote_block_ids") or [])[first:first + len(local)]
        loop = asyncio.get_running_loop()
        fut = self.kv_transfer.import_async(req.kv_params, local, remote)
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(self._landed, req, first, f))

    def _landed(self, req: _Req, first: int, fut) -> None:
        """A pull ended: verify the bytes and decode, or fall back to prefilling locally."""
        if self._loading.get(req.req_id) is req:
            del self._loading[req.req_id]
        if req.state != _LOADING:          # aborted while loading: its blocks were kept until now
            self._free_blocks(req)
            self._wake.set()
            return
        err = fut.exception()
        bs, ntok = self.block_size, len(req.tokens)
        if err is None and not kv_matches(self.kv_transfer.buffer, bs, req.block_ids, req.tokens, first * bs, ntok):
            err = "the pulled KV bytes do not match the prompt"
        if err is None:
            self.kv_transfers_verified += 1
            self.external_kv_tokens += req.prompt_len - first * bs   # what the pull delivered
            log.debug("pulled and verified %d KV blocks of %s", len(req.block_ids) - first, req.req_id)
            req.num_computed = ntok
            if req.num_cached is None:
                req.num_cached = req.prompt_len
            req.state = _RUNNING
            self._running.append(req)
        else:
            self.kv_transfers_failed += 1
            log.warning("KV pull for %s failed (%s); prefilling it locally", req.req_id, err)
            self._free_blocks(req)
            req.num_computed = 0
            req.state = _WAITING
            self._waiting.appendleft(req)
        self._wake.set()

    # ---- request bookkeeping --------------------------------------------------------------------

    def _check(self, request: EngineRequest) -> str | None:
        """Why this engine cannot take the request now (stopped, a duplicate id), or None; raises
        InvalidRequest for a request that no engine could take as given."""
        if self._stopped:
            return "engine stopped"
        if request.req_id in self._reqs:
            return f"duplicate request id {request.req_id!r}"
        # The request's own faults: a 400 for the client, as vLLM's checks of a request are.
        n = len(request.prompt_token_ids)
        if n == 0:
            raise InvalidRequest("empty prompt")
        if n >= self.max_model_len:
            raise InvalidRequest(f"prompt of {n} tokens does not fit max_model_len={self.max_model_len}")
        if n + 1 > self.num_blocks * self.block_size:
            raise InvalidRequest(f"prompt of {n} tokens does not fit the instance's {self.num_blocks} KV blocks "
                                 f"of {self.block_size} tokens")
        if request.params.structured_outputs:
            raise InvalidRequest("the sim engine has no structured output (response_format, structured_outputs)")
        return None

    def _seed_for(self, request: EngineRequest) -> int:
        prompt = tuple(request.prompt_token_ids)
        seed = request.params.seed
        key = hash(prompt) if seed is None else hash((seed, prompt))
        return _mix64(_mix64(self.sim.seed + 0x9E3779B97F4A7C15) ^ (key & _M64))

    def _finish_early(self, req: _Req, reason: str, notify: bool = True) -> None:
        """End a request outside the normal step flow (abort, shutdown)."""
        if req.state == _WAITING:
            try:
                self._waiting.remove(req)
            except ValueError:
                pass
        elif req.state == _RUNNING:
            try:
                self._running.remove(req)
            except ValueError:
                pass
            self._free_blocks(req)
        # _LOADING: the pull may still be writing into its blocks; _landed frees them
        req.state = _DONE
        req.finish = reason
        self._show(req)
        if notify:
            self._notify(req)

    @staticmethod
    def _show(req: _Req) -> None:
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
    def _notify(req: _Req) -> None:
        w = req.waiter
        if w is not None:
            req.waiter = None
            if not w.done():
                w.set_result(None)

    # ---- KV blocks ------------------------------------------------------------------------------

    def _alloc(self, n: int) -> list[int]:
        """n blocks from the free list (the caller checked there are enough), evicting cached ones."""
        free, bhash, cache, ref = self._free, self._bhash, self._cache, self._ref
        out = []
        for _ in range(n):
            bid = free.popitem(last=False)[0]
            h = bhash[bid]
            if h is not None:
                bhash[bid] = None
                if cache.get(h) == bid:
                    del cache[h]
                self._removed.append(int.from_bytes(h, "big") & _MASK64)
            ref[bid] = 1
            out.append(bid)
        return out

    def _free_blocks(self, req: _Req) -> None:
        """Release a request's blocks, tail first, as vLLM does: the tail is evicted first."""
        self._release(req.block_ids)
        req.block_ids = []
        req.num_stored = 0

    def _release(self, block_ids: list[int]) -> None:
        free, bhash, ref = self._free, self._bhash, self._ref
        for bid in reversed(block_ids):
            r = ref[bid] - 1
            ref[bid] = r
            if r == 0:
                free[bid] = None
                if bhash[bid] is None:      # nothing cached in it: hand it out before cached blocks
                    free.move_to_end(bid, last=False)

    def _ensure_hashes(self, req: _Req, nblocks: int) -> None:
        hashes = req.hashes
        if len(hashes) < nblocks:
            hashes.extend(self.hasher.chain(req.tokens, hashes[-1] if hashes else None,
                                            len(hashes) * self.block_size))

    def _store(self, req: _Req, full: int) -> None:
        """Register the request's blocks [num_stored, full) in the prefix cache; queue BlockStored."""
        self._ensure_hashes(req, full)
        hashes, bids, bhash, cache = req.hashes, req.block_ids, self._bhash, self._cache
        run: list[int] = []
        first = 0
        for i in range(req.num_stored, full):
            h, bid = hashes[i], bids[i]
            if bhash[bid] is None and h not in cache:
                cache[h] = bid
                bhash[bid] = h
                if not run:
                    first = i
                run.append(int.from_bytes(h, "big") & _MASK64)
                continue
            if run:
                self._stored_event(req, first, run)
                run = []
        if run:
            self._stored_event(req, first, run)
        req.num_stored = full

    def _stored_event(self, req: _Req, first: int, run: list[int]) -> None:
        bs = self.block_size
        parent = int.from_bytes(req.hashes[first - 1], "big") & _MASK64 if first else None
        self._stored.append(BlockStored(run, parent, req.tokens[first * bs:(first + len(run)) * bs], bs,
                                        None, "GPU", None))

    def _prefix_hit(self, req: _Req, max_blocks: int) -> list[int]:
        """Cached blocks matching the request's leading full blocks, at most max_blocks."""
        if max_blocks <= 0 or not self._cache:
            return []
        self._ensure_hashes(req, max_blocks)
        cache, hits = self._cache, []
        for h in req.hashes[:max_blocks]:
            bid = cache.get(h)
            if bid is None:
                break
            hits.append(bid)
        return hits

    def _admit(self, req: _Req, budget: int) -> tuple[int, float] | None:
        """Give a waiting request its blocks; (tokens to compute this step, transfer ms) or None."""
        bs = self.block_size
        ntok = len(req.tokens)
        remote = req.remote
        hits = self._prefix_hit(req, ntok // bs if remote else (ntok - 1) // bs)
        hit_tokens = len(hits) * bs
        if remote:
            n = 0
            target = ntok
        else:
            n = min(ntok - hit_tokens, budget)
            if n <= 0:
                return None
            target = hit_tokens + n
        ref, free = self._ref, self._free
        need = -(-target // bs) - len(hits)
        hit_free = sum(1 for bid in hits if ref[bid] == 0)
        if need > len(free) - hit_free:
            return None
        for bid in hits:
            if ref[bid] == 0:
                del free[bid]
            ref[bid] += 1
        req.block_ids = hits + self._alloc(need) if need > 0 else hits
        req.num_stored = len(hits)
        transfer_ms = 0.0
        if remote and self.kv_transfer is not None and (req.kv_params or {}).get("remote_session"):
            req.remote = False          # if the pull fails or it is preempted, it is recomputed locally
            self.prefix_hit_tokens += hit_tokens
            self.prefix_query_tokens += ntok
            self._pull_remote_kv(req, len(hits))
            return 0, 0.0
        if remote:
            req.remote = False          # if preempted later, it is recomputed locally
            req.num_computed = ntok
            transfer_ms = self.import_remote_kv(req.req_id, req.kv_params, req.block_ids[len(hits):], need)
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

    def _preempt(self, req: _Req) -> None:
        self._free_blocks(req)
        req.num_computed = 0
        req.state = _WAITING
        self._waiting.appendleft(req)
        self.num_preemptions += 1

    # ---- one step -------------------------------------------------------------------------------

    def _schedule_step(self) -> float:
        """Schedule and account one engine step; returns its modelled duration in ms."""
        bs = self.block_size
        budget = self.max_num_batched_tokens
        running, free = self._running, self._free
        sched: list[tuple[_Req, int]] = []
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
                while len(free) < need:
                    victim = running.pop()
                    self._preempt(victim)
                    preempted = True
                    if victim is req:
                        break
                if req.state != _RUNNING:
                    break               # it preempted itself, so it was the last running request
                req.block_ids += self._alloc(need)
            sched.append((req, n))
            budget -= n
            i += 1

        if not preempted:
            waiting = self._waiting
            max_seqs = self.max_num_seqs
            while (waiting and len(running) + len(self._loading) < max_seqs
                   and (budget > 0 or waiting[0].remote)):
                req = waiting[0]
                got = self._admit(req, budget)
                if got is None:
                    break
                n, t_ms = got
                waiting.popleft()
                if req.state == _LOADING:
                    continue            # it runs once its KV has landed (_landed)
                req.state = _RUNNING
                running.append(req)
                sched.append((req, n))
                budget -= n
                transfer_ms += t_ms

        if not sched:
            return 0.0
        used = self.num_blocks - len(free)

        # compute: advance, announce full blocks, sample
        prefill_tokens = 0
        decoding = False
        finished = 0
        touched = self._touched
        kv_buffer = self.kv_transfer.buffer if self.kv_transfer is not None and self.ctx.role == "prefill" else None
        for req, n in sched:
            ntok = len(req.tokens)
            before = req.num_computed
            if n == 0 or (n == 1 and req.num_out and before + 1 == ntok):
                decoding = True
            else:
                prefill_tokens += n
            after = before + n
            if kv_buffer is not None and n:
                fill_kv(kv_buffer, bs, req.block_ids, req.tokens, before, after)
            req.num_computed = after
            full = after // bs
            if full > req.num_stored:
                self._store(req, full)
            if after == ntok:
                self._sample(req)
                touched.append(req)
                if req.finish is not None:
                    finished += 1
        if finished:
            for req, _ in sched:
                if req.finish is not None and req.state == _RUNNING:
                    req.state = _DONE
                    self._free_blocks(req)
            self._running = [r for r in running if r.state == _RUNNING]

        ms = transfer_ms
        if prefill_tokens:
            ms += prefill_step_ms(self.prefill_coeffs, prefill_tokens)
        if decoding:
            ms += decode_step_ms(self.decode_coeffs, used / self.num_blocks)
        self.steps += 1
        return ms

    def _sample(self, req: _Req) -> None:
        state = (req.rng * _LCG_A + _LCG_C) & _M64
        req.rng = state
        tok = self._tok_lo + (state >> 32) % self._tok_span
        n_out = req.num_out + 1
        finish = None
        banned = self._banned
        stop_ids = req.stop_ids
        may_stop = n_out >= req.min_tokens
        if req.avoid:
            banned = banned | req.avoid
        if banned or (stop_ids and not may_stop):
            span, lo = self._tok_span, self._tok_lo
            for _ in range(span):
                if tok in banned or (stop_ids and not may_stop and tok in stop_ids):
                    tok = lo + (tok - lo + 1) % span
                else:
                    break
        if req.forced is not None:
            tok = req.forced
            if may_stop and stop_ids and tok in stop_ids:
                finish = "stop"
        elif may_stop:
            if self._eos_threshold and not req.ignore_eos and ((state >> 16) & 0xFFFF) < self._eos_threshold:
                tok = self.eos_token_id
                finish = "stop"
            elif stop_ids and tok in stop_ids:
                finish = "stop"
        req.tokens.append(tok)
        req.out.append(tok)
        req.num_out = n_out
        if req.num_logprobs is not None:
            req.out_lp.append(self._logprobs_at(tok, state, True, req.num_logprobs))
        if finish is None and (n_out >= req.max_tokens or len(req.tokens) >= self._cap_tokens):
            finish = "length"
        if finish is not None:
            req.finish = finish
            if req.prefill_only:
                req.kv_out = self.export_remote_kv(req.req_id, req.block_ids, req.prompt_len)

    # ---- logprobs: deterministic, well-formed stand-ins ----------------------------------------------

    def _logprobs_at(self, tok: int, h: int, top1: bool, k: int) -> tuple[float, list[int], list[float]]:
        """(logprob of `tok`, the k most likely ids, their logprobs) at a position, from 64 bits `h`.
        `tok` is the most likely token when `top1` (it was sampled: the sim is greedy-like), with
        probability p in (0.37, 0.995]; otherwise some other token is, and `tok` has p < 0.3. The rest
        of the mass halves from rank to rank, so the top list is strictly decreasing."""
        lo, span = self._tok_lo, self._tok_span
        if top1:
            p = 0.995 - ((h >> 8) & 0xFF) / 256 * 0.62
            ids, probs = [tok], [p]
        else:
            p = 0.01 + ((h >> 8) & 0xFF) / 256 * 0.29
            other = lo + (tok - lo + 1 + (h >> 16) % (span - 1)) % span
            ids, probs = [other], [1.0 - p - 0.01]
        rest = 1.0 - sum(probs) - (0.0 if top1 else p)
        j = 1
        while len(ids) < k:
            t = lo + (tok - lo + 7 * j) % span
            j += 1
            if t in ids or t == tok:
                continue
            rest /= 2
            ids.append(t)
            probs.append(rest)
        if not top1 and k and p > probs[-1] and tok not in ids:   # it belongs in the list by rank
            at = next(i for i, q in enumerate(probs) if p > q)
            ids.insert(at, tok)
            probs.insert(at, p)
            ids, probs = ids[:k], probs[:k]
        log = math.log
        return log(p), ids[:k], [log(q) for q in probs[:k]]

    def _prompt_logprobs(self, prompt: list[int], k: int) -> Logprobs:
        """Prompt positions 1..n-1, each from (sim.seed, the previous token, the token, position):
        the same prompt gives the same values on any instance."""
        out = Logprobs([], [], [])
        base = _mix64(self.sim.seed ^ 0x5851F42D4C957F2D)
        for i in range(1, len(prompt)):
            h = _mix64(base ^ (prompt[i - 1] << 40) ^ (prompt[i] << 16) ^ i)
            lp, ids, lps = self._logprobs_at(prompt[i], h, h & 3 == 0, k)
            out.token.append(lp)
            out.top_ids.append(ids)
            out.top.append(lps)
        return out

    # ---- the loop -------------------------------------------------------------------------------

    def _publish(self) -> None:
        events: list = []
        if self._removed:
            events.append(BlockRemoved(self._removed, "GPU"))
            self._removed = []
        if self._stored:
            events.extend(self._stored)
            self._stored = []
        if events and self.publisher is not None:
            self.publisher.publish(events)

    def _deliver(self) -> None:
        touched, self._touched = self._touched, []
        show, notify = self._show, self._notify
        for req in touched:
            show(req)
            notify(req)

    async def _loop(self) -> None:
        perf = time.perf_counter
        inf = math.isinf(self.speedup)
        scale = 0.001 / self.speedup
        wake = self._wake
        try:
            while True:
                if not self._running and not self._waiting:
                    wake.clear()
                    await wake.wait()
                    continue
                t0 = perf()
                steps = self.steps
                ms = self._schedule_step()
                if self._mirror is not None and self.steps != steps:
                    self._mirror.step(self.steps, ms)
                if self._removed or self._stored:
                    self._publish()
                if self.steps == steps and (self._loading or self.kv_transfer is not None):
                    # nothing could run: it waits for a pull to land or held blocks to be read
                    wake.clear()
                    await wake.wait()
                    continue
                if inf or ms <= 0.0:
                    self._deliver()
                    await asyncio.sleep(0)
                    continue
                vc = self._vclock
                base = vc if 0.0 <= t0 - vc < self.clock_slack_s else t0
                self._vclock = end = base + ms * scale
                delay = end - perf()
                await asyncio.sleep(delay if delay > 0 else 0)
                self._deliver()
        except asyncio.CancelledError:
            self._deliver()
            raise
        except Exception:
            log.exception("simulated engine loop failed")
            for req in list(self._reqs.values()):
                if req.state != _DONE:
                    req.error = "simulated engine failed"
                    self._finish_early(req, "error")
            raise
