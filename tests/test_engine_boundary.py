"""The engine boundary: engines declare what the head must know, disaggregation speaks in phases with
an opaque handoff, and an instance may span several ranks (followers)."""

from __future__ import annotations

import asyncio
import re

import pytest
import zmq

from slurmserve.config import DeploymentConfig
from slurmserve.kvfabric.block_hash import BlockHasher, event_hash
from slurmserve.kvfabric.events import BlockStored
from slurmserve.tools.local_deployment import LocalDeployment
from slurmserve.router.engine_client import EngineClient
from slurmserve.router.instance import Instance
from slurmserve.router.kv_state import KVState
from slurmserve.router.metrics import HeadMetrics
from slurmserve.router.policies import PrefixHasher, Route
from slurmserve.router.routing import Router
from slurmserve.runtime import protocol as P
from slurmserve.runtime.engine import EngineContext, EngineRequest
from slurmserve.runtime.sim_engine import SimEngine
from slurmserve.runtime.vllm_engine import REMOTE_DECODE, kv_transfer_params

MODEL = "tiny-llama"


# ---- phases and handoffs ------------------------------------------------------------------------

def test_vllm_kv_transfer_params_are_one_encoding_of_the_phases():
    """Engine-level callers may still write vLLM's kv_transfer_params; they are read as a phase, and
    the vLLM adapter writes the phase back as kv_transfer_params, the handoff untouched."""
    sp = P.SamplingParams()
    pre = EngineRequest("a", [1, 2], sp, {"do_remote_decode": True})
    assert pre.phase == P.PREFILL_ONLY and pre.prefill_only and pre.handoff is None
    assert kv_transfer_params(pre) == REMOTE_DECODE
    handoff = {"do_remote_prefill": True, "remote_block_ids": [3, 1], "remote_host": "h", "x": b"\x00"}
    dec = EngineRequest("a", [1, 2], sp, handoff)
    assert dec.phase == P.DECODE_WITH_HANDOFF and dec.remote_prefill and dec.handoff is handoff
    assert kv_transfer_params(dec) == handoff
    assert kv_transfer_params(EngineRequest("a", [1], sp)) is None
    # what the head sends: a phase and a handoff, no vLLM key
    new = EngineRequest("a", [1], sp, phase=P.DECODE_WITH_HANDOFF, handoff={"opaque": [1]})
    assert new.remote_prefill and kv_transfer_params(new) == {"opaque": [1]}
    # on the wire the handoff is opaque (bytes too), and the delta's alias keeps vLLM's name
    gen = P.decode_to_worker(P.encode(P.Generate("a", [1], sp, P.DECODE_WITH_HANDOFF, handoff)))
    assert gen.phase == P.DECODE_WITH_HANDOFF and gen.handoff == handoff
    d = P.Delta("a", [5], "length", handoff=handoff)
    assert d.kv_transfer_params is d.handoff
    assert P.merge_deltas([P.Delta("a", [4]), d]).handoff == handoff


def _sim_cfg(model_dir, **sim):
    return DeploymentConfig.model_validate({
        "model": {"path": str(model_dir), "max_model_len": 256},
        "engine": {"kind": "sim", "sim": {"speedup": float("inf"), "num_kv_blocks": 64, "block_size": 16,
                                          "kv_transfer": "none", **sim}}})


def test_sim_declares_itself(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("PYTHONHASHSEED", "7")
    engine = SimEngine(_sim_cfg(tiny_model_dir, max_num_seqs=12), EngineContext(0, "worker", "127.0.0.1", "", 0))
    info = engine.info()
    assert (info.kind, info.block_size, info.num_kv_blocks, info.max_num_seqs) == ("sim", 16, 64, 12)
    assert info.prefix_caching and info.hash_algo == "sha256" and info.hash_seed == "7" and info.ranks == 1


def test_sim_prefill_handoff_decode_by_phase(tiny_model_dir):
    """The sim engine's disaggregated legs driven by phase + handoff, as the worker passes them."""
    async def main():
        ctx = EngineContext(0, "prefill", "127.0.0.1", "", 0)
        pre, dec = SimEngine(_sim_cfg(tiny_model_dir), ctx), SimEngine(_sim_cfg(tiny_model_dir), ctx)
        for e in (pre, dec):
            await e.start()
        try:
            prompt = list(range(40, 90))
            sp = P.SamplingParams(max_tokens=8, ignore_eos=True)
            legs = [d async for d in pre.generate(EngineRequest("p", prompt, sp, phase=P.PREFILL_ONLY))]
            handoff = legs[-1].handoff
            assert handoff and len(legs[-1].token_ids) + sum(len(d.token_ids) for d in legs[:-1]) == 1
            out = [d async for d in dec.generate(EngineRequest("d", prompt, sp, phase=P.DECODE_WITH_HANDOFF,
                                                               handoff=handoff))]
            ref = [d async for d in pre.generate(EngineRequest("r", prompt, sp))]
            assert [t for d in out for t in d.token_ids] == [t for d in ref for t in d.token_ids]
            assert out[0].num_cached_tokens == len(prompt) and dec.scheduler.external_kv_tokens > 0
        finally:
            for e in (pre, dec):
                await e.stop()
    asyncio.run(main())


# ---- the head reads declarations ------------------------------------------------------------------

def _client(n=2):
    zctx = zmq.Context()    # its own, terminated with its socket: later tests count ZeroMQ threads
    sock = zctx.socket(zmq.ROUTER)
    insts = [Instance(index=i, role="worker", identity=f"instance-{i}".encode(), address="127.0.0.1")
             for i in range(n)]
    client = EngineClient(sock, insts, HeadMetrics(MODEL), 2.0)
    return client, insts, sock


def test_head_hashes_prompts_with_the_declared_scheme():
    client, insts, sock = _client()
    declared = []
    client.on_instance_declared = lambda i, info: declared.append((i, info.kind))
    try:
        assert Router(insts, {}).prefix_hasher() is None
        fallback = PrefixHasher()
        router = Router(insts, {}, hasher=fallback)
        assert router.prefix_hasher() is fallback          # until an instance has declared
        info = P.EngineInfo(kind="x", block_size=4, num_kv_blocks=10, max_num_seqs=3, prefix_caching=True,
                            hash_algo="sha256", hash_seed="42")
        client._heartbeat(insts[0], P.Heartbeat(0, P.Load(block_size=4), ready=True, info=info))
        client._heartbeat(insts[1], P.Heartbeat(1, P.Load(block_size=4), ready=True, info=info))
        assert declared == [(0, "x"), (1, "x")] and insts[0].info == info
        hasher = router.prefix_hasher()
        assert hasher is not fallback and router.prefix_hasher() is hasher   # one per scheme
        prompt = list(range(9))
        want = [event_hash(d) for d in BlockHasher(4, "42", "sha256").chain(prompt)]
        assert Route(prompt, hasher).hashes(4) == want
        assert want != [event_hash(d) for d in BlockHasher(4, "other", "sha256").chain(prompt)]
        assert client.batch_capacity() == 6
        # an engine whose block hashes the head cannot reproduce: routed by load alone
        for inst in insts:
            inst.info = None
        client._heartbeat(insts[0], P.Heartbeat(0, P.Load(), info=P.EngineInfo(kind="y", block_size=4)))
        assert router.prefix_hasher() is None
        assert router.route(prompt).hashes(4) == []
    finally:
        sock.close(0)
        sock.context.term()


def test_kv_state_indexes_only_reproducible_hashes():
    kv = KVState(HeadMetrics(MODEL))
    stored = [BlockStored([11, 12], None, list(range(8)), 4)]
    kv.on_batch(0, 0, stored)
    kv.on_batch(1, 0, stored)
    assert kv.index.overlap([11, 12], [0, 1]) == {0: 2, 1: 2}
    kv.declare(1, P.EngineInfo(kind="trtllm", block_size=4))          # no scheme: counted only
    kv.declare(0, P.EngineInfo(kind="sim", block_size=4, prefix_caching=True, hash_algo="sha256"))
    kv.on_batch(1, 1, stored)
    assert kv.index.overlap([11, 12], [0, 1]) == {0: 2, 1: 0}
    assert kv.metrics.kv_events.tally[BlockStored, 1] == 2


# ---- a sim instance spanning two ranks, over real mpirun -------------------------------------------

@pytest.fixture(scope="module")
def two_rank_instance(tiny_model_dir, tmp_path_factory):
    cfg = {"model": {"path": str(tiny_model_dir), "name": MODEL, "max_model_len": 512},
           "engine": {"kind": "sim", "nodes_per_instance": 2,
                      "sim": {"speedup": 1.0, "num_kv_blocks": 256, "block_size": 16}},
           "pools": {"workers": 1},
           "router": {"host": "127.0.0.1", "port": 0, "policy": "kv"},
           "runtime": {"heartbeat_interval_s": 0.25, "heartbeat_timeout_s": 1.5}}
    dep = LocalDeployment(tmp_path_factory.mktemp("follower"), cfg).start()
    yield dep, cfg
    dep.stop()
    dep.kill()


def test_follower_rank_mirrors_the_leader(two_rank_instance, tiny_model_dir, tmp_path):
    """Head + one instance on two ranks: the leader serves, the follower mirrors every engine step
    and is stopped by the leader; the answers equal a one-rank instance's (the sim is deterministic)."""
    dep, cfg = two_rank_instance
    logs = dep.dir / "logs"
    c = dep.client()
    args = dict(model=MODEL, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    texts = [c.completions.create(prompt=f"tell me about rank {i}", **args).choices[0].text for i in range(3)]
    one = LocalDeployment(tmp_path, {**cfg, "engine": {**cfg["engine"], "nodes_per_instance": 1}})
    one.start()
    try:
        assert [one.client().completions.create(prompt=f"tell me about rank {i}", **args).choices[0].text
                for i in range(3)] == texts
    finally:
        one.stop()
        one.kill()
    head_log = (logs / "rank-0.log").read_text()
    assert re.search(r"instance 0 declares: sim engine, 2 ranks", head_log), head_log[-2000:]
    dep.stop()
    leader, follower = (logs / "rank-1.log").read_text(), (logs / "rank-2.log").read_text()
    assert "follows instance 0 (instance rank 1, leader rank 1" in follower
    n = int(re.search(r"the leader stopped the instance: mirrored (\d+) steps", follower).group(1))
    assert n >= 3 * 16 and f"instance followers mirrored [{n}] steps (leader: {n})" in leader
