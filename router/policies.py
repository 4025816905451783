"""Routing policies: pick one engine instance of a pool for a request.

A policy sees the live instances of one pool and the request's prompt tokens. KV-aware routing
plugs in here as one more policy.
"""

from __future__ import annotations

from typing import Protocol, Sequence


class Candidate(Protocol):
    index: int
    inflight: int          # requests the head has sent and not yet seen finish
    running: int           # from the last heartbeat
    waiting: int
    kv_usage: float


class Policy(Protocol):
    def choose(self, candidates: Sequence[Candidate], prompt_token_ids: list[int]) -> Candidate: ...


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def choose(self, candidates, prompt_token_ids):
        chosen = candidates[self._next % len(candidates)]
        self._next += 1
        return chosen


class LeastLoaded:
    """Fewest outstanding requests by the head's own count (fresh) with heartbeat load as the tie-break."""

    def choose(self, candidates, prompt_token_ids):
        return min(candidates, key=lambda c: (c.inflight, c.waiting, c.kv_usage, c.index))


POLICIES = {"round_robin": RoundRobin, "least_loaded": LeastLoaded}


def make_policy(name: str) -> Policy:
    return POLICIES[name]()
