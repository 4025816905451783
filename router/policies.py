"""Routing policies: pick one engine instance of a pool for a request.

A policy sees the live instances of one pool and the request's Route (prompt tokens, and block
hashes computed on first use), and returns its Choice: the instance, and how much of the prompt
that instance caches as far as the policy looked. `kv` asks the fleet KV index for that.
The Router (router/routing.py) holds one policy per pool; bench/fleet_sim.py drives them directly.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Protocol, Sequence

from slurmserve.kvfabric.block_hash import BlockHasher, event_hash
from slurmserve.kvfabric.kv_index import ApproxKVIndex


class Candidate(Protocol):
    """What a policy reads of an instance: at the head an Instance (router/instance.py), whose
    load ledger (HeadLoad) gives the block counts."""
    index: int
    inflight: int               # requests the head has sent and not yet seen finish
    running: int                # from the last heartbeat
    waiting: int
    kv_usage: float
    num_kv_blocks: int
    block_size: int
    prefill_blocks: int         # uncached prompt blocks routed here and not yet past first token
    decode_blocks: int          # prompt blocks of requests routed here and not yet finished,
                                # a block shared by several of them counted once
    held_hashes: dict[int, int]  # the hashes of those blocks -> requests holding each


@dataclass(frozen=True, slots=True)
class Choice:
    """The instance chosen for a request, and how many of the prompt's leading blocks it caches
    already (0: none, or the policy did not look)."""
    instance: Candidate
    overlap_blocks: int = 0


class Route:
    """One request as the router sees it. The block hashes (vLLM's chained hashes, so that they
    match the engines' KV events) are computed once, and only if a policy or the disaggregation
    decision needs them."""

    __slots__ = ("prompt_token_ids", "_hasher", "_hashes", "block_size")

    def __init__(self, prompt_token_ids: list[int], hasher: PrefixHasher | None = None):
        self.prompt_token_ids = prompt_token_ids
        self._hasher = hasher
        self._hashes: list[int] | None = None
        self.block_size = 0

    def hashes(self, block_size: int) -> list[int]:
        if self._hashes is None or block_size != self.block_size:
            self.block_size = block_size
            self._hashes = self._hasher.hashes(self.prompt_token_ids, block_size) if self._hasher else []
        return self._hashes

    def prompt_blocks(self, block_size: int) -> int:
        return -(-len(self.prompt_token_ids) // block_size) if block_size else 0

    def known_hashes(self, block_size: int) -> list[int] | None:
        """The block hashes if something has computed them already (they cost a hash per block)."""
        return self._hashes if self._hashes is not None and block_size == self.block_size else None


class PrefixHasher:
    """Hashes prompts exactly as the engines do (same seed and algorithm), per block size."""

    def __init__(self, hash_seed: str | None = None, algo: str = "sha256"):
        self.hash_seed, self.algo = hash_seed, algo
        self._by_size: dict[int, BlockHasher] = {}

    def hashes(self, token_ids: list[int], block_size: int) -> list[int]:
        hasher = self._by_size.get(block_size)
        if hasher is None:
            hasher = self._by_size[block_size] = BlockHasher(block_size, self.hash_seed, self.algo)
        return [event_hash(d) for d in hasher.chain(token_ids)]


class Policy:
    """One pool's policy. `choice` picks one of the pool's live candidates for a request and says
    what it found cached there; `choose` is that candidate alone, for callers that need no more."""

    def choice(self, candidates: Sequence[Candidate], route: Route) -> Choice:
        raise NotImplementedError

    def choose(self, candidates: Sequence[Candidate], route: Route) -> Candidate:
        return self.choice(candidates, route).instance


class RoundRobin(Policy):
    """Each live candidate in turn."""

    def __init__(self) -> None:
        self._next = 0

    def choice(self, candidates, route):
        chosen = candidates[self._next % len(candidates)]
        self._next += 1
        return Choice(chosen)


class LeastLoaded(Policy):
    """Fewest outstanding requests by the head's own count (fresh) with heartbeat load as the tie-break."""

    def choice(self, candidates, route):
        return Choice(min(candidates, key=lambda c: (c.inflight, c.waiting, c.kv_usage, c.index)))


def kv_usage_estimate(c: Candidate) -> float:
    """The heartbeat's KV usage, or the head's own count of blocks it has routed there since, if
    that is higher (heartbeats lag a burst of routing by up to an interval)."""
    routed = c.decode_blocks / c.num_kv_blocks if c.num_kv_blocks else 0.0
    return max(c.kv_usage, routed)


class KVAware(Policy):
    """Lowest cost wins, where for each instance

        cost = prefill_load_scale * max(prefill_blocks + prompt_blocks - overlap_blocks, 0)
               + decode_blocks + (prompt_blocks - shared_blocks)

    i.e. the prefill work it would queue (what it already caches is free) plus the KV it would
    hold. Requests that share a prefix read the same KV blocks, so the leading blocks that requests
    in flight there hold already (`shared_blocks`) add none, and `decode_blocks` counts each block
    once. Instances at or over `busy_threshold` KV usage are passed over while any other is free.
    `temperature` > 0 samples from softmax(-cost / (temperature * spread)) instead of taking the
    minimum, which spreads ties and near-ties.
    """

    def __init__(self, index, prefill_load_scale: float = 4.0, busy_threshold: float = 0.95,
                 temperature: float = 0.0, record_decisions: bool = False, seed: int | None = None,
                 in_flight_ttl_s: float = 2.0, clock=time.monotonic):
        self.index = index
        self.prefill_load_scale = prefill_load_scale
        self.busy_threshold = busy_threshold
        self.temperature = temperature
        self.record_decisions = record_decisions     # approximate mode: the index learns from us
        # An engine reports a prompt's blocks only once it has prefilled them; until then the
        # prefixes we just routed live here, so that a burst of one prefix does not scatter.
        self.in_flight = None if record_decisions else ApproxKVIndex(in_flight_ttl_s, clock)
        self._rng = random.Random(seed)
        self._turn = 0

    def choice(self, candidates, route):
        free = [c for c in candidates if kv_usage_estimate(c) < self.busy_threshold] or list(candidates)
        bs = free[0].block_size
        if not bs:   # no heartbeat has told us the block size yet
            return Choice(min(free, key=lambda c: (c.inflight, c.index)))
        hashes = route.hashes(bs)
        prompt_blocks = route.prompt_blocks(bs)
        indexes = [c.index for c in free]
        overlap = self.index.overlap(hashes, indexes)
        if self.in_flight is not None and len(self.in_flight):
            for i, n in self.in_flight.overlap(hashes, indexes).items():
                if n > overlap[i]:
                    overlap[i] = n
        scale = self.prefill_load_scale
        costs = [scale * max(c.prefill_blocks + prompt_blocks - overlap[c.index], 0)
                 + c.decode_blocks + prompt_blocks - _leading(hashes, c.held_hashes) for c in free]
        chosen = free[self._pick(costs)]
        (self.index if self.record_decisions else self.in_flight).record(chosen.index, hashes)
        return Choice(chosen, overlap[chosen.index])

    def _pick(self, costs: list[float]) -> int:
        low = min(costs)
        if self.temperature <= 0 or len(costs) == 1:
            # ties (say, a cold prompt on idle instances) rotate, so that distinct prefixes
            # spread over the fleet's caches instead of piling onto the first instance
            self._turn += 1
            n = len(costs)
            return next(i % n for i in range(self._turn, self._turn + n) if costs[i % n] == low)
        spread = (max(costs) - low) or 1.0
        weights = [math.exp(-(c - low) / (self.temperature * spread)) for c in costs]
        return self._rng.choices(range(len(costs)), weights)[0]


def _leading(hashes: list[int], held: dict[int, int]) -> int:
    """How many of the prompt's leading blocks are in `held`."""
    n = 0
    for h in hashes:
        if h not in held:
            break
        n += 1
    return n


def make_policies(name: str, roles: set[str], index=None, kv=None) -> dict[str, Policy]:
    """One policy object per pool. With `kv`, a decode pool is chosen by load alone: its prompt
    KV arrives from the prefill instance, so what it caches matters little. `kv` is the
    KVRoutingConfig; approximate mode makes the policy feed the index its own decisions."""
    simple = {"round_robin": RoundRobin, "least_loaded": LeastLoaded}
    if name in simple:
        return {role: simple[name]() for role in roles}
    if name != "kv":
        raise ValueError(f"unknown routing policy {name!r}")
    return {role: LeastLoaded() if role == "decode" else
            KVAware(index, kv.prefill_load_scale, kv.busy_threshold, kv.temperature,
                    record_decisions=kv.index == "approximate") for role in roles}
