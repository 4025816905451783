"""One request's path through the engines: aggregated, or prefill on one pool and decode on another.

Disaggregated requests first run a prefill-only leg (max_tokens=1, `do_remote_decode`) and hand the
`kv_transfer_params` it returns, untouched, to a decode instance. Any failure of the prefill leg
falls back to prefilling on the decode instance, so the client still gets a normal answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import msgspec

from slurmserve.router.engine_client import EngineClient, NoInstanceError
from slurmserve.router.metrics import HeadMetrics
from slurmserve.runtime import protocol as P

log = logging.getLogger(__name__)

REMOTE_DECODE = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                 "remote_block_ids": None, "remote_host": None, "remote_port": None}


class Orchestrator:
    def __init__(self, client: EngineClient, metrics: HeadMetrics, disaggregated: bool,
                 prefill_timeout_s: float = 30.0):
        self.client = client
        self.metrics = metrics
        self.disaggregated = disaggregated
        self.prefill_timeout_s = prefill_timeout_s

    def ready(self) -> bool:
        return self.client.all_ready()

    async def generate(self, req_id: str, prompt: list[int], params: P.SamplingParams
                       ) -> AsyncIterator[P.Delta]:
        """Deltas of the request; raises NoInstanceError before the first one if no engine can take it."""
        kv_params = None
        if self.disaggregated:
            kv_params = await self._prefill(req_id, prompt, params)
        role = "decode" if self.disaggregated else "worker"
        stream = self.client.submit(self.client.choose(role, prompt), req_id, prompt, params, kv_params)
        try:
            async for delta in stream:
                yield delta
        finally:
            self.client.release(stream)

    async def _prefill(self, req_id: str, prompt: list[int], params: P.SamplingParams) -> dict | None:
        """Run the prefill leg; the decode leg's kv_transfer_params, or None to prefill locally."""
        try:
            inst = self.client.choose("prefill", prompt)
        except NoInstanceError:
            self.metrics.disagg.labels("fallback_no_prefill_instance").inc()
            return None
        leg = msgspec.structs.replace(params, max_tokens=1, min_tokens=0)
        stream = self.client.submit(inst, f"{req_id}-prefill", prompt, leg, dict(REMOTE_DECODE))
        last = None
        try:
            async with asyncio.timeout(self.prefill_timeout_s):
                async for last in stream:
                    pass
        except TimeoutError:
            self.metrics.disagg.labels("fallback_prefill_timeout").inc()
            log.warning("prefill of %s on instance %d timed out; prefilling on decode", req_id, inst.index)
            return None
        finally:
            self.client.release(stream)
        if last is None or last.finish_reason in ("error", "abort") or not last.kv_transfer_params:
            self.metrics.disagg.labels("fallback_prefill_failed").inc()
            log.warning("prefill of %s on instance %d failed (%s); prefilling on decode", req_id,
                        inst.index, last.error if last else "no output")
            return None
        self.metrics.disagg.labels("remote_prefill").inc()
        return last.kv_transfer_params
