"""Disaggregation for one simulated instance (vLLM's KV connector): the handoff a prefill leg returns,
and, with a kvfabric KVTransfer, the real movement of its KV bytes to a decode instance.

A prefill-only request (phase PREFILL_ONLY) prefills, yields exactly one token and finishes
"length" with a handoff (vLLM's kv_transfer_params format, `handoff`) describing where its KV
lives. A remote-prefill request (DECODE_WITH_HANDOFF) counts its whole prompt as already computed
and starts decoding once it has the prompt's KV:
  * Real KV movement (prefill and decode instances given side-channel keys by the runtime, and
    `sim.kv_transfer` not "none"): every instance owns a KVTransfer whose host buffer holds its KV
    blocks, `sim.kv_bytes_per_token` per token. A prefill instance writes each computed token's
    KV, bytes derived from (token id, position) only (runtime/sim/kv_bytes.py), and `handoff`
    keeps the request's blocks (ref-counted, still prefix-cached) until the decode side's READ
    notifies it, or the export expires. A decode instance gives the request its blocks, pulls the
    uncached ones on the transfer's importer thread (`pull`: the request waits in a loading state;
    the engine keeps stepping the others, so the request pays the real transfer time and no step
    pays a modelled one), checks every byte against the prompt, and then decodes. A failed pull
    (peer died, refused, timed out) or wrong bytes: the request frees its blocks and is prefilled
    locally, like a preempted one. `verified` / `failed` count both; the totals are logged at close.
  * Otherwise (no keys, as in unit tests and the fleet simulator, or kv_transfer "none") no bytes
    move and the scheduler charges a modelled cost per pulled block. The prefill side then holds
    no blocks for the decode side: they are freed (and stay prefix-cached) as soon as the prefill
    leg ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from slurmserve.config import SimConfig
from slurmserve.kvfabric.kv_transfer import KVTransfer, create_kv_transfer
from slurmserve.runtime.engine import EngineContext
from slurmserve.runtime.sim.block_pool import BlockPool
from slurmserve.runtime.sim.kv_bytes import fill_kv, kv_matches
from slurmserve.runtime.sim.request import LOADING, SimRequest

log = logging.getLogger(__name__)


class SimKVConnector:
    def __init__(self, ctx: EngineContext, block_size: int, wake: Callable[[], None]):
        self.ctx = ctx
        self.block_size = block_size
        self.wake = wake                  # tells the engine loop that a request or blocks came back
        self.transfer: KVTransfer | None = None
        self.stopped = False              # the engine is stopping: blocks read late stay held
        self.verified = 0                 # pulls whose bytes matched the prompt
        self.failed = 0                   # pulls that failed or brought wrong bytes

    def start(self, sim: SimConfig, num_blocks: int) -> None:
        """Open the KVTransfer when this instance moves real bytes (see the module docstring)."""
        ctx = self.ctx
        keys = ctx.extra.get("kv_side_channel_keys")
        if ctx.role in ("prefill", "decode") and keys and sim.kv_transfer != "none":
            self.transfer = create_kv_transfer(
                sim.kv_transfer, name=f"sim-{ctx.instance}", host=ctx.host,
                port=ctx.kv_side_channel_port, num_blocks=num_blocks,
                block_bytes=sim.kv_bytes_per_token * self.block_size, curve_keys=keys,
                peer_keys=ctx.extra.get("kv_peer_keys", {}))
            log.info("KV transfer: %s backend, %d blocks of %d bytes, side channel %s",
                     self.transfer.backend, num_blocks, self.transfer.block_bytes, self.transfer.address)

    async def close(self) -> None:
        transfer, self.transfer = self.transfer, None
        if transfer is not None:
            await asyncio.to_thread(transfer.close)   # waits for an in-flight pull to end
            log.info("KV transfers: %d verified, %d failed; %s", self.verified, self.failed, transfer.stats)

    # ---- prefill side ---------------------------------------------------------------------------

    @property
    def writes_kv(self) -> bool:
        """Whether computed tokens' KV bytes must be written (a prefill instance that exports)."""
        return self.transfer is not None and self.ctx.role == "prefill"

    def write_kv(self, req: SimRequest, start: int, end: int) -> None:
        fill_kv(self.transfer.buffer, self.block_size, req.block_ids, req.tokens, start, end)

    def handoff(self, req: SimRequest, blocks: BlockPool) -> dict[str, Any]:
        """kv_transfer_params a finished prefill-only request returns; with a real transfer, its
        blocks stay held until the decode side has read them (or the export expires)."""
        params = {"do_remote_prefill": True, "do_remote_decode": False,
                  "remote_engine_id": f"sim-{self.ctx.instance}", "remote_request_id": req.req_id,
                  "remote_host": self.ctx.host, "remote_port": self.ctx.kv_side_channel_port,
                  "remote_block_ids": list(req.block_ids), "num_tokens": req.prompt_len}
        if self.transfer is None:
            return params
        held = list(req.block_ids)
        blocks.hold(held)
        loop = asyncio.get_running_loop()

        def read(_ok: bool) -> None:     # on the transfer's service thread
            try:
                loop.call_soon_threadsafe(self._unhold, blocks, held)
            except RuntimeError:         # the loop is gone: the engine stopped
                pass

        params.update(self.transfer.export(req.req_id, held, req.prompt_len, read))
        return params

    def _unhold(self, blocks: BlockPool, block_ids: list[int]) -> None:
        if not self.stopped:
            blocks.release(block_ids)
            self.wake()

    # ---- decode side ----------------------------------------------------------------------------

    def can_pull(self, req: SimRequest) -> bool:
        """Whether the request's KV really moves (else the scheduler charges the modelled cost)."""
        return self.transfer is not None and bool((req.kv_params or {}).get("remote_session"))

    def pull(self, req: SimRequest, first: int, done: Callable[[SimRequest, int, bool], None]) -> None:
        """Pull the request's blocks [first, ...) from the prefill instance; `done(req, first, ok)`
        runs on the event loop when the pull has ended and its bytes are checked."""
        local = req.block_ids[first:]
        remote = list(req.kv_params.get("remote_block_ids") or [])[first:first + len(local)]
        loop = asyncio.get_running_loop()
        fut = self.transfer.import_async(req.kv_params, local, remote)
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(self._landed, req, first, f, done))

    def _landed(self, req: SimRequest, first: int, fut, done: Callable[[SimRequest, int, bool], None]) -> None:
        err = None
        if req.state == LOADING:           # else aborted while loading: `done` only frees its blocks
            err = fut.exception()
            bs, ntok = self.block_size, len(req.tokens)
            if err is None and not kv_matches(self.transfer.buffer, bs, req.block_ids, req.tokens, first * bs, ntok):
                err = "the pulled KV bytes do not match the prompt"
            if err is None:
                self.verified += 1
                log.debug("pulled and verified %d KV blocks of %s", len(req.block_ids) - first, req.req_id)
            else:
                self.failed += 1
                log.warning("KV pull for %s failed (%s); prefilling it locally", req.req_id, err)
        done(req, first, err is None)
        self.wake()
