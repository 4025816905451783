"""One request's state in the simulated engine (nano-vllm's Sequence): its tokens, blocks and output.

The scheduler and block pool own the fields up to `rng`, the sampler fills `out`, `out_lp` and
`finish`, and the Engine adapter (runtime/sim_engine.py) moves what a finished step produced into
`shown` for the request's stream.
"""

from __future__ import annotations

import asyncio

from slurmserve.runtime.engine import EngineRequest

# states; LOADING: blocks allocated, the prompt's KV being pulled from a prefill instance
WAITING, RUNNING, DONE, LOADING = 0, 1, 2, 3


class SimRequest:
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
        self.num_cached: int | None = None   # prompt tokens it did not compute (set at first admission)
        self.num_out = 0
        self.rng = rng                 # the sampler's LCG state
        self.out: list[int] = []       # tokens sampled in a step whose time has not elapsed yet
        self.finish: str | None = None
        self.shown: list[int] = []     # tokens delivered (their step is over), not yet streamed
        self.shown_finish: str | None = None
        self.error: str | None = None
        self.waiter: asyncio.Future | None = None
        self.first_sent = False
        self.prefill_only = request.prefill_only
        self.remote = request.remote_prefill     # its prompt's KV comes from a prefill instance
        self.kv_params = request.handoff
        self.kv_out: dict | None = None          # the handoff a finished prefill-only request returns
        self.state = WAITING
        self.num_logprobs = p.logprobs    # None: no logprobs; else top ones per sampled token
        self.out_lp: list[tuple] = []     # (logprob, top ids, top logprobs) of each token in `out`
        self.shown_lp: list[tuple] = []   # ... and in `shown`
        # logit_bias, at its extremes only: +100 makes that token the only one drawn, -100 bans it
        bias = p.logit_bias or {}
        self.forced = max((t for t, b in bias.items() if b >= 100), default=None)
        self.avoid = frozenset(t for t, b in bias.items() if b <= -100)
