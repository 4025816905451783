"""Routing: which live instance of a pool serves a request, and how much of its prompt that
instance caches already. The Router is the one owner of that decision; the Orchestrator asks it,
then sends the request through the EngineClient.

It holds one policy per pool (router/policies.py, make_policies), session affinity, and the
choice of prompt hasher: prompts are hashed with the block-hash scheme the instances declared
(protocol.EngineInfo), so that their hashes match those in the engines' KV events; a `hasher`
given here serves only until an instance has declared.

A decode instance is chosen by load alone (its prompt's KV comes from a prefill instance), so what
it caches is looked up in the fleet KV index rather than taken from its policy.
"""

from __future__ import annotations

from slurmserve.router.instance import Instance, NoInstanceError
from slurmserve.router.policies import Choice, Policy, PrefixHasher, Route

MAX_SESSIONS = 100_000   # session-affinity entries kept (least recently used go first)


class Router:
    """`route` a prompt, then `choose` its instance: the whole routing decision, for every pool."""

    def __init__(self, instances: list[Instance], policies: dict[str, Policy], kv_index=None,
                 hasher: PrefixHasher | None = None):
        self.instances = instances
        self.policies = policies              # one per pool (role)
        self.kv_index = kv_index              # fleet KV index (kvfabric.kv_index), if any
        self.hasher = hasher                  # until an instance declares its scheme
        self.sessions: dict[bytes, Instance] = {}   # session affinity, least recently used first
        self._hashers: dict[tuple[str, str | None], PrefixHasher] = {}   # one per declared scheme

    def route(self, prompt_token_ids: list[int]) -> Route:
        """The request as the policies see it, its blocks hashed as the engines hash them."""
        return Route(prompt_token_ids, self.prefix_hasher())

    def prefix_hasher(self) -> PrefixHasher | None:
        """The prompt hasher that matches the block hashes in the instances' KV events: `hasher`
        until an instance has declared its engine, then None if it declared no scheme the head can
        reproduce. The instances of a deployment run one engine configuration, so the first
        declaration speaks for all."""
        for inst in self.instances:
            info = inst.info
            if info is not None:
                if info.hash_algo is None or not info.prefix_caching:
                    return None
                key = (info.hash_algo, info.hash_seed)
                hasher = self._hashers.get(key)
                if hasher is None:
                    hasher = self._hashers[key] = PrefixHasher(info.hash_seed, info.hash_algo)
                return hasher
        return self.hasher

    def choose(self, role: str, route: Route, session: bytes | None = None) -> Choice:
        """The live instance of pool `role` that serves the request, and the prompt blocks it
        caches; NoInstanceError if the pool has none. Requests of one `session` (a client-chosen
        id) stay on one instance while it lives."""
        sticky = self.sessions.pop(session, None) if session is not None else None
        if sticky is not None and sticky.up:
            choice = Choice(sticky)   # no policy looked at what it caches
        else:
            live = [i for i in self.instances if i.up and i.role == role]
            if not live:
                raise NoInstanceError(f"no {role} instance is available")
            choice = self.policies[role].choice(live, route)
        if session is not None:
            self.sessions[session] = choice.instance   # most recently used last
            if len(self.sessions) > MAX_SESSIONS:
                del self.sessions[next(iter(self.sessions))]
        if role == "decode":
            choice = Choice(choice.instance, self._indexed_overlap(route, choice.instance))
        return choice

    def _indexed_overlap(self, route: Route, inst: Instance) -> int:
        """The prompt's leading blocks that the fleet KV index says `inst` caches."""
        bs = inst.block_size
        if self.kv_index is None or not bs:
            return 0
        return self.kv_index.overlap(route.hashes(bs), [inst.index])[inst.index]
