"""Prefill/decode with two vLLM adapters joined by vLLM's NixlConnector (CPU buffers, UCX loopback).

Both engines live in this process: an AsyncLLM frontend is light and each engine core is its own
child process, which inherits the NIXL side-channel variables set just before it starts. The
prefill leg returns kv_transfer_params; the decode leg pulls the prompt's KV with them and must
produce exactly the tokens an ordinary request produces.
"""

from __future__ import annotations

import asyncio
import os

import pytest

pytestmark = pytest.mark.vllm

from vllm_cpu import BLOCK, CPU_ENV, ENGINE_ARGS  # noqa: E402

from slurmserve.config import DeploymentConfig  # noqa: E402
from slurmserve.runtime.bootstrap import free_port  # noqa: E402
from slurmserve.runtime.engine import EngineContext, EngineRequest  # noqa: E402
from slurmserve.runtime.protocol import SamplingParams  # noqa: E402
from slurmserve.runtime.vllm_engine import VllmEngine  # noqa: E402

ENGINE_ARGS = dict(ENGINE_ARGS, kv_cache_memory_bytes="128MiB")   # two engines in one process
PROMPT = [(5 * i + 3) % 300 + 10 for i in range(100)]   # 3 full blocks + 4 tokens
MAX_TOKENS = 16
PREFILL_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                  "remote_block_ids": None, "remote_host": None, "remote_port": None}


def make_engine(model_dir, instance: int, role: str) -> VllmEngine:
    cfg = DeploymentConfig.model_validate({
        "model": {"path": str(model_dir), "max_model_len": 1024},
        "engine": {"kind": "vllm", "args": ENGINE_ARGS},
        "pools": {"prefill": 1, "decode": 1}})
    ctx = EngineContext(instance=instance, role=role, host="127.0.0.1",
                        kv_events_endpoint=f"tcp://127.0.0.1:{free_port('127.0.0.1')}",
                        kv_side_channel_port=free_port("127.0.0.1"))
    return VllmEngine(cfg, ctx)


@pytest.fixture(scope="module")
def pd(tiny_model_dir):
    model_dir = tiny_model_dir
    saved = dict(os.environ)
    os.environ.update(CPU_ENV)
    loop = asyncio.new_event_loop()
    prefill, decode = make_engine(model_dir, 0, "prefill"), make_engine(model_dir, 1, "decode")
    try:
        # Started together: the adapter serialises the part that hands os.environ (the NIXL
        # side-channel port) to each engine core, and the model loads overlap.
        async def start_both():
            await asyncio.gather(prefill.start(), decode.start())
        loop.run_until_complete(asyncio.wait_for(start_both(), 300))
        yield loop, prefill, decode
    finally:
        async def stop_both():
            await asyncio.gather(prefill.stop(), decode.stop())
        loop.run_until_complete(stop_both())
        loop.close()
        os.environ.clear()
        os.environ.update(saved)


async def collect(engine: VllmEngine, req: EngineRequest):
    return [d async for d in engine.generate(req)]


def tokens(deltas):
    return [t for d in deltas for t in d.token_ids]


def test_prefill_then_decode_matches_aggregated(pd):
    loop, prefill, decode = pd

    def run(coro):
        return loop.run_until_complete(asyncio.wait_for(coro, 60))

    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    # 1. Prefill only: one token at most, and the KV's whereabouts on the final delta.
    p = run(collect(prefill, EngineRequest("pd-1", PROMPT, sp, dict(PREFILL_PARAMS))))
    assert p[-1].finish_reason in ("length", "stop") and len(tokens(p)) <= 1
    params = p[-1].kv_transfer_params
    assert params and params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_host"] == "127.0.0.1" and params["remote_port"] == prefill.ctx.kv_side_channel_port
    assert params["remote_block_ids"]

    # 2. Decode with those params, untouched: the prompt's KV comes over NIXL, not from compute.
    d = run(collect(decode, EngineRequest("pd-1", PROMPT, sp, params)))
    assert d[-1].finish_reason == "length" and d[-1].kv_transfer_params is None
    assert d[0].num_prompt_tokens == len(PROMPT)
    # vLLM reports the prefill side's own prefix-cache hits here (none), not the transferred tokens.
    assert d[0].num_cached_tokens == params.get("remote_prefill_cached_tokens", 0) == 0
    external = decode.stats()["prompt_tokens"]
    assert external["external_kv_transfer"] >= 3 * BLOCK and external["local_cache_hit"] == 0
    assert external["local_compute"] < len(PROMPT) - 3 * BLOCK + 1

    # 3. The same prompt as an ordinary request on the prefill instance (no transfer involved).
    ref = run(collect(prefill, EngineRequest("agg-1", PROMPT, sp)))
    assert tokens(d) == tokens(ref) and len(tokens(ref)) == MAX_TOKENS
    assert ref[-1].kv_transfer_params is None
    assert prefill.stats()["prompt_tokens"]["external_kv_transfer"] == 0


def test_ucx_and_side_channel_env(pd):
    _, prefill, decode = pd
    from slurmserve.kvfabric.ucx_env import has_infiniband
    if not has_infiniband():
        assert os.environ.get("UCX_MODULES") == "^ib"
    assert os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] in (str(prefill.ctx.kv_side_channel_port),
                                                         str(decode.ctx.kv_side_channel_port))
