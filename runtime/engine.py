"""The engine interface that the simulator, vLLM and TensorRT-LLM adapters implement.

An engine rank owns one engine instance. The worker loop (runtime/worker.py) calls `generate` once
per request and forwards the deltas; everything engine-specific stays behind this interface.

What crosses it is engine-neutral: an engine declares what the head must know (`info`: block size,
block-hash scheme, batch capacity, prefix caching), disaggregated requests come as a phase with an
opaque handoff (protocol.PREFILL_ONLY / DECODE_WITH_HANDOFF), and an instance that spans several
ranks runs `follow` on every rank but its first (launcher/rank_main.py).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from slurmserve.runtime import protocol as P
from slurmserve.runtime.protocol import Delta, EngineInfo, Load, SamplingParams


class InvalidRequest(ValueError):
    """The engine refuses a request as given (a JSON schema it cannot compile, a parameter out of
    range): the client gets a 400 naming the problem, not a 503 to retry, and the deployment goes
    on. Raised by `generate` before its first delta."""


@dataclass
class EngineRequest:
    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # vLLM's kv_transfer_params, as engine-level callers (tests, bench) write a phase: read below as
    # {"do_remote_decode": True} -> PREFILL_ONLY, {"do_remote_prefill": True, ...} -> DECODE_WITH_HANDOFF.
    kv_transfer_params: dict[str, Any] | None = None
    phase: str = P.AGGREGATED
    handoff: dict[str, Any] | None = None    # DECODE_WITH_HANDOFF: what the prefill leg returned

    def __post_init__(self) -> None:
        kv = self.kv_transfer_params
        if kv and self.phase == P.AGGREGATED:
            if kv.get("do_remote_decode"):
                self.phase = P.PREFILL_ONLY
            elif kv.get("do_remote_prefill"):
                self.phase, self.handoff = P.DECODE_WITH_HANDOFF, kv

    @property
    def prefill_only(self) -> bool:
        return self.phase == P.PREFILL_ONLY

    @property
    def remote_prefill(self) -> bool:
        return self.phase == P.DECODE_WITH_HANDOFF


@dataclass
class EngineContext:
    """What the runtime assigns an instance: its identity, role and network endpoints."""

    instance: int                # engine-instance index across the deployment
    role: str                    # "worker" | "prefill" | "decode"
    host: str                    # address other ranks reach this instance at
    kv_events_endpoint: str      # ZeroMQ PUB endpoint this instance binds for KV events
    kv_side_channel_port: int    # KV-transfer side channel (NIXL handshake) port
    comm: Any = None             # the instance's MPI sub-communicator (TensorRT-LLM uses it)
    extra: dict[str, Any] = field(default_factory=dict)


class Engine(abc.ABC):
    """An inference engine instance. All methods run on the worker's event loop."""

    def __init__(self, ctx: EngineContext):
        self.ctx = ctx

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model and begin publishing KV events on ctx.kv_events_endpoint."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Release every resource; after this no thread or child process of the engine remains."""

    @abc.abstractmethod
    def generate(self, request: EngineRequest) -> AsyncIterator[Delta]:
        """Stream token-id deltas; the last one has finish_reason set. A request the engine cannot
        take as given raises InvalidRequest before the first delta."""

    @abc.abstractmethod
    def abort(self, req_id: str) -> None:
        """Stop a request; its stream ends with finish_reason "abort"."""

    @abc.abstractmethod
    def load(self) -> Load:
        """Current running/waiting requests and KV usage, sent with every heartbeat."""

    def info(self) -> EngineInfo:
        """What the head must know, once started (sent in the first ready heartbeat). This default
        declares no block-hash scheme: the head then routes the instance by load alone."""
        load = self.load()
        return EngineInfo(block_size=load.block_size, num_kv_blocks=load.num_kv_blocks)

    async def follow(self) -> int:
        """A follower rank's loop (instance_rank > 0; ctx.comm is the instance's communicator): take
        part in the instance until its leader stops it; the rank's exit code."""
        raise NotImplementedError(f"{type(self).__name__} cannot span several ranks")


def create_engine(cfg, ctx: EngineContext) -> Engine:
    """Engines are imported lazily so that a sim deployment never imports vLLM or TensorRT-LLM."""
    kind = cfg.engine.kind
    if kind == "sim":
        from slurmserve.runtime.sim_engine import SimEngine
        return SimEngine(cfg, ctx)
    if kind == "vllm":
        from slurmserve.runtime.vllm_engine import VllmEngine
        return VllmEngine(cfg, ctx)
    if kind == "trtllm":
        from slurmserve.runtime.trtllm_engine import TrtllmEngine
        return TrtllmEngine(cfg, ctx)
    raise NotImplementedError(f"engine.kind={kind!r} is not available in this build")
