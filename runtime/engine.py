"""The engine interface that the simulator, vLLM and TensorRT-LLM adapters implement.

An engine rank owns one engine instance. The worker loop (runtime/worker.py) calls `generate` once
per request and forwards the deltas; everything engine-specific stays behind this interface.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from slurmserve.runtime.protocol import Delta, Load, SamplingParams


@dataclass
class EngineRequest:
    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # None: ordinary request. {"do_remote_decode": True, ...}: prefill only, hold the KV for a
    # decode instance and return where it lives. {"do_remote_prefill": True, ...}: the prompt's KV
    # lives on a prefill instance; pull it instead of computing it.
    kv_transfer_params: dict[str, Any] | None = None

    @property
    def prefill_only(self) -> bool:
        return bool(self.kv_transfer_params and self.kv_transfer_params.get("do_remote_decode"))

    @property
    def remote_prefill(self) -> bool:
        return bool(self.kv_transfer_params and self.kv_transfer_params.get("do_remote_prefill"))


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
        """Stream token-id deltas; the last one has finish_reason set."""

    @abc.abstractmethod
    def abort(self, req_id: str) -> None:
        """Stop a request; its stream ends with finish_reason "abort"."""

    @abc.abstractmethod
    def load(self) -> Load:
        """Current running/waiting requests and KV usage, sent with every heartbeat."""


def create_engine(cfg, ctx: EngineContext) -> Engine:
    """Engines are imported lazily so that a sim deployment never imports vLLM or TensorRT-LLM."""
    kind = cfg.engine.kind
    if kind == "sim":
        from slurmserve.runtime.sim_engine import SimEngine
        return SimEngine(cfg, ctx)
    if kind == "vllm":
        from slurmserve.runtime.vllm_engine import VllmEngine
        return VllmEngine(cfg, ctx)
    raise NotImplementedError(f"engine.kind={kind!r} is not available in this build")
