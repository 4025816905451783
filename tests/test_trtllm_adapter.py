"""runtime/trtllm_engine.py against the TensorRT-LLM stand-in in tests/fakes (TensorRT-LLM itself
cannot be installed here: see that package's docstring for the sources its signatures follow)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from slurmserve.config import DeploymentConfig
from slurmserve.kvfabric.block_hash import BlockHasher, event_hash
from slurmserve.kvfabric.events import BlockStored, KVEventSubscriber
from slurmserve.runtime import protocol as P
from slurmserve.runtime.engine import EngineContext, EngineRequest, create_engine
from slurmserve.runtime.trtllm_engine import KVEventTranslator

FAKES = str(Path(__file__).parent / "fakes")


@pytest.fixture(autouse=True)
def fake_trtllm(monkeypatch):
    """The stand-in importable as `tensorrt_llm` for this module's tests only (elsewhere `trtllm`
    must stay refused: tests/test_config.py)."""
    monkeypatch.syspath_prepend(FAKES)
    yield
    for name in [m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")]:
        del sys.modules[name]


def toy_token(*args):
    from tensorrt_llm.llmapi.llm import toy_token
    return toy_token(*args)


PROMPT = list(range(40, 110))        # 70 tokens: two full blocks of 32


def _cfg(model_dir, **engine):
    return DeploymentConfig.model_validate({"model": {"path": str(model_dir), "max_model_len": 256},
                                            "engine": {"kind": "trtllm", **engine}})


def _sp(n=8, **kw):
    return P.SamplingParams(max_tokens=n, **kw)


async def _collect(engine, req):
    return [d async for d in engine.generate(req)]


def _tokens(deltas):
    return [t for d in deltas for t in d.token_ids]


def test_config_accepts_trtllm_with_a_warning(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(f"model: {{path: {tmp_path}}}\nengine: {{kind: trtllm, tensor_parallel_size: 2}}\n"
                 "pools: {workers: 1}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([FAKES, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "slurmserve", "config", "validate", str(f)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "never against real TensorRT-LLM" in r.stderr and "# ok: 3 MPI ranks" in r.stderr


def test_generate_stream_stats_events_and_declaration(tiny_model_dir, tmp_path):
    async def main():
        endpoint = f"ipc://{tmp_path}/events"
        got: list = []
        sub = KVEventSubscriber(lambda inst, seq, evs: got.extend(evs))
        ctx = EngineContext(0, "worker", "127.0.0.1", endpoint, 0)
        engine = create_engine(_cfg(tiny_model_dir), ctx)
        await engine.start()
        sub.add(0, endpoint)
        try:
            await asyncio.sleep(0.2)
            deltas = await _collect(engine, EngineRequest("a", PROMPT, _sp(8, ignore_eos=True)))
            assert _tokens(deltas) == [toy_token(PROMPT, i, None) for i in range(8)]
            assert len(deltas) > 2 and deltas[0].num_prompt_tokens == len(PROMPT)
            assert deltas[-1].finish_reason == "length" and deltas[-1].handoff is None
            again = await _collect(engine, EngineRequest("b", PROMPT, _sp(2)))
            assert again[0].num_cached_tokens == 64                 # block reuse: two blocks
            for _ in range(100):
                if engine.load().num_kv_blocks and any(isinstance(e, BlockStored) for e in got):
                    break
                await asyncio.sleep(0.05)
            load = engine.load()
            assert load.num_kv_blocks == 64 and load.block_size == 32 and load.prefix_cache_hits == 64
            info = engine.info()
            assert (info.kind, info.block_size, info.prefix_caching, info.hash_algo) == ("trtllm", 32, True, "sha256")
            # re-published in vLLM's format, with the hashes the head computes for the prompt
            stored = [e for e in got if isinstance(e, BlockStored)]
            want = [event_hash(d) for d in BlockHasher(32, info.hash_seed, "sha256").chain(PROMPT)]
            assert stored and stored[0].block_hashes == want and stored[0].token_ids == PROMPT[:64]
        finally:
            await engine.stop()
            await sub.aclose()
    asyncio.run(main())


def test_abort_and_unsupported(tiny_model_dir):
    async def main():
        engine = create_engine(_cfg(tiny_model_dir), EngineContext(0, "worker", "127.0.0.1", "", 0))
        await engine.start()
        try:
            out = []
            async for d in engine.generate(EngineRequest("long", PROMPT, _sp(10_000, ignore_eos=True))):
                out.append(d)
                if len(out) == 3:
                    engine.abort("long")
            assert out[-1].finish_reason == "abort" and len(_tokens(out)) < 100
            engine.abort("early")                       # before its generate(): remembered
            assert (await _collect(engine, EngineRequest("early", PROMPT, _sp())))[-1].finish_reason == "abort"
            bad = await _collect(engine, EngineRequest("lp", PROMPT, _sp(logprobs=2)))
            assert bad[-1].finish_reason == "error" and "logprobs" in bad[-1].error
        finally:
            await engine.stop()
    asyncio.run(main())


def test_context_only_then_generation_only(tiny_model_dir):
    """DisaggregatedParams legs: the handoff crosses the head's wire untouched (bytes included) and
    the decode instance's tokens equal an aggregated run's."""
    async def main():
        pre = create_engine(_cfg(tiny_model_dir), EngineContext(0, "prefill", "127.0.0.1", "", 0))
        dec = create_engine(_cfg(tiny_model_dir), EngineContext(1, "decode", "127.0.0.1", "", 0))
        for e in (pre, dec):
            await e.start()
        try:
            p = await _collect(pre, EngineRequest("r-prefill", PROMPT, _sp(12), phase=P.PREFILL_ONLY))
            assert p[-1].finish_reason == "length" and len(_tokens(p)) == 1
            handoff = p[-1].handoff
            assert isinstance(handoff["opaque_state"], bytes) and handoff["first_gen_tokens"] == _tokens(p)
            wire = P.decode_to_worker(P.encode(P.Generate("r", PROMPT, _sp(12), P.DECODE_WITH_HANDOFF, handoff)))
            d = await _collect(dec, EngineRequest("r", PROMPT, wire.params, phase=wire.phase, handoff=wire.handoff))
            ref = await _collect(pre, EngineRequest("agg", PROMPT, _sp(12)))
            assert _tokens(d) == _tokens(ref) and len(_tokens(d)) == 12
            assert d[0].num_cached_tokens == len(PROMPT)
            # a handoff nobody holds: the generation-only leg fails, as a failed transfer does
            lost = await _collect(dec, EngineRequest("x", PROMPT, _sp(4), phase=P.DECODE_WITH_HANDOFF,
                                                     handoff={**handoff, "ctx_request_id": 10**9}))
            assert lost[-1].finish_reason == "error"
        finally:
            for e in (pre, dec):
                await e.stop()
    asyncio.run(main())


def test_translator_skips_what_cannot_be_chained():
    t = KVEventTranslator(2, "s")
    blk = lambda h, toks, extra=0: {"block_hash": h, "tokens": [{"token_id": x, "token_extra_id": extra} for x in toks]}  # noqa: E731
    assert t.translate({"data": {"type": "stored", "parent_hash": 99, "blocks": [blk(1, [1, 2])]}}) == []
    [ev] = t.translate({"data": {"type": "stored", "parent_hash": None, "blocks": [blk(1, [1, 2]), blk(2, [3, 4]),
                                                                                   blk(3, [5, 6], extra=7)]}})
    want = BlockHasher(2, "s").chain([1, 2, 3, 4])
    assert ev.block_hashes == [event_hash(d) for d in want] and ev.parent_block_hash is None
    [child] = t.translate({"data": {"type": "stored", "parent_hash": 2, "blocks": [blk(4, [7, 8])]}})
    assert child.parent_block_hash == event_hash(want[1])
    [gone] = t.translate({"data": {"type": "removed", "block_hashes": [1, 3, 77]}})
    assert gone.block_hashes == [event_hash(want[0])]


_MPI_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, sys.argv[2])
    from mpi4py import MPI
    from slurmserve.config import DeploymentConfig
    from slurmserve.runtime import protocol as P
    from slurmserve.runtime.engine import EngineContext, EngineRequest, create_engine
    cfg = DeploymentConfig.model_validate({"model": {"path": sys.argv[1], "max_model_len": 256},
                                           "engine": {"kind": "trtllm", "tensor_parallel_size": 2}})
    comm = MPI.COMM_WORLD.Split(0, MPI.COMM_WORLD.Get_rank())    # the instance's communicator
    engine = create_engine(cfg, EngineContext(0, "worker", "127.0.0.1", "", 0, comm=comm))
    async def lead():
        await engine.start()
        out = [d async for d in engine.generate(EngineRequest("a", [5] * 40, P.SamplingParams(max_tokens=4)))]
        print("LEADER", engine.llm.follower_hosts, sum(len(d.token_ids) for d in out), engine.info().ranks, flush=True)
        await engine.stop()
        return 0
    code = asyncio.run(lead() if comm.Get_rank() == 0 else engine.follow())
    print("RANK", comm.Get_rank(), "EXIT", code, flush=True)
""")


def test_follower_rank_serves_the_instance_communicator(tiny_model_dir, tmp_path):
    """Two real MPI ranks: the leader's MpiCommSession runs work on the follower (the fake LLM asks
    each rank for its host, as a model load would), and the follower exits when the leader stops."""
    script = tmp_path / "two_ranks.py"
    script.write_text(_MPI_SCRIPT)
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_btl": "self,tcp"}
    r = subprocess.run(["mpirun", "-n", "2", "--oversubscribe", sys.executable, str(script), str(tiny_model_dir),
                        FAKES], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "LEADER ['" in r.stdout and "'] 4 2" in r.stdout, r.stdout
    assert "RANK 0 EXIT 0" in r.stdout and "RANK 1 EXIT 0" in r.stdout, r.stdout
