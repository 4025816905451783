"""What the head knows of one engine instance: its address, liveness, declared engine, the load its
heartbeats report, and the head's own load ledger (HeadLoad), which the `kv` policy reads between
heartbeats.

EngineClient keeps these up to date (heartbeats, requests sent and released); the Router and the
policies read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from slurmserve.runtime import protocol as P

if TYPE_CHECKING:
    from slurmserve.router.engine_client import DeltaStream


class NoInstanceError(Exception):
    """No live engine instance in the pool a request needs."""


class LoadShare(Protocol):
    """One request's share of an instance's HeadLoad (a DeltaStream at the head)."""
    prefill_blocks: int                # uncached prompt blocks, pending until its first token
    held_blocks: int                   # KV blocks held until it ends
    held_hashes: list[int] | None      # the hashes of those blocks that are full, if known


@dataclass(eq=False, kw_only=True)
class HeadLoad:
    """The head's own load ledger of an instance between heartbeats: KV blocks still to prefill,
    and KV blocks held, by requests routed there. A request's share goes in with `add` when it is
    sent, its prefill leaves with `prefilled` at its first token, and the rest with `remove` when
    it is released."""

    prefill_blocks: int = 0
    decode_blocks: int = 0
    # Prompt blocks (by hash) of requests in flight there -> how many of them hold it: requests
    # that share a prefix share its KV, so decode_blocks counts such a block once.
    held_hashes: dict[int, int] = field(default_factory=dict)

    def add(self, share: LoadShare) -> None:
        """Count a request routed here: its prefill as pending, its blocks as held, except those
        among its full blocks' hashes that another request here holds already."""
        self.prefill_blocks += share.prefill_blocks
        blocks = share.held_blocks
        if share.held_hashes:
            held = self.held_hashes
            for h in share.held_hashes:
                n = held.get(h, 0)
                held[h] = n + 1
                if n:
                    blocks -= 1
        self.decode_blocks += blocks

    def prefilled(self, share: LoadShare) -> None:
        """The request's first token: its prefill is no longer pending."""
        self.prefill_blocks -= share.prefill_blocks
        share.prefill_blocks = 0

    def remove(self, share: LoadShare) -> None:
        """Undo what is left of `add` for a request that ended, once (the share is emptied): blocks
        another request here still holds stay counted."""
        self.prefill_blocks -= share.prefill_blocks
        blocks = share.held_blocks
        if share.held_hashes:
            held = self.held_hashes
            for h in share.held_hashes:
                n = held[h]
                if n > 1:
                    held[h] = n - 1
                    blocks -= 1
                else:
                    del held[h]
        self.decode_blocks -= blocks
        share.prefill_blocks = share.held_blocks = 0
        share.held_hashes = None


@dataclass(eq=False)
class Instance(HeadLoad):
    """One engine instance as the head sees it; a policy's Candidate (router/policies.py)."""

    index: int
    role: str
    identity: bytes
    address: str
    up: bool = False
    ever_up: bool = False
    failed: str | None = None       # why it gave up before it was ever up (one line, for the user)
    down_reason: str = ""           # why it last left rotation
    last_seen: float = 0.0
    heard: bool = False             # it has sent heartbeats and not yet left: close() awaits its goodbye
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    num_kv_blocks: int = 0
    block_size: int = 0
    info: P.EngineInfo | None = None   # what its engine declared when it came up
    # Output flow control (protocol.Consumed): StepOutputs read from it, and confirmed to it.
    outputs_read: int = 0
    outputs_confirmed: int = 0
    streams: dict[str, DeltaStream] = field(default_factory=dict)

    @property
    def inflight(self) -> int:
        return len(self.streams)
