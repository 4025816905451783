"""The vLLM adapter on the tiny model, without MPI: one engine per module, driven on a private loop.

Checks greedy tokens against vLLM's offline `LLM.generate` (run in a subprocess, so that no two
engines share this process), KV events on the instance's endpoint (hashes recomputed with
kvfabric.block_hash), prefix-cache accounting, abort, load and a clean stop.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

pytestmark = pytest.mark.vllm

import msgspec  # noqa: E402
import psutil  # noqa: E402
import zmq  # noqa: E402

from slurmserve.config import DeploymentConfig  # noqa: E402
from slurmserve.kvfabric.block_hash import block_hashes  # noqa: E402
from slurmserve.runtime.bootstrap import free_port  # noqa: E402
from slurmserve.runtime.engine import EngineContext, EngineRequest  # noqa: E402
from slurmserve.runtime.protocol import SamplingParams  # noqa: E402
from vllm_cpu import BLOCK, ENGINE_ARGS, MAX_MODEL_LEN, MAX_TOKENS, Offline, cpu_env  # noqa: E402

from slurmserve.runtime.vllm_engine import (  # noqa: E402
    KV_EVENTS_TOPIC,
    VllmEngine,
    engine_env,
    engine_kwargs,
    kv_events_bind_endpoint,
)

# Three prompts: 40, 70 and 100 tokens (1, 2 and 3 full blocks), distinct from the first token on.
PROMPTS = [[(7 * i + 11 * k) % 300 + 10 for i in range(n)] for k, n in ((1, 40), (2, 70), (3, 100))]


class Running:
    """One VllmEngine on its own event loop, plus a SUB socket on its KV events endpoint."""

    def __init__(self, model_dir):
        self.cfg = DeploymentConfig.model_validate({
            "model": {"path": str(model_dir), "max_model_len": MAX_MODEL_LEN},
            "engine": {"kind": "vllm", "args": ENGINE_ARGS}})
        self.ctx = EngineContext(instance=0, role="worker", host="127.0.0.1",
                                 kv_events_endpoint=f"tcp://127.0.0.1:{free_port('127.0.0.1')}",
                                 kv_side_channel_port=free_port('127.0.0.1'))
        self.engine = VllmEngine(self.cfg, self.ctx)
        self.loop = asyncio.new_event_loop()
        self.zctx = zmq.Context()
        self.sub = self.zctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, KV_EVENTS_TOPIC.encode())
        self.sub.connect(self.ctx.kv_events_endpoint)
        self.events: list = []   # every event seen, in order

    def run(self, coro, timeout=60):
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    async def collect(self, req: EngineRequest, on_delta=None):
        deltas = []
        async for d in self.engine.generate(req):
            deltas.append(d)
            if on_delta is not None:
                on_delta(d)
        return deltas

    def drain_events(self, until=None, timeout=5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if until is not None and until(self.events):
                return
            if self.sub.poll(50):
                topic, seq, payload = self.sub.recv_multipart()
                assert topic == KV_EVENTS_TOPIC.encode() and len(seq) == 8
                ts, events, dp_rank = msgspec.msgpack.decode(payload)
                assert isinstance(ts, float) and dp_rank == 0
                self.events.extend(events)
            elif until is None:
                return


def _event_type(e):
    return e.get("type") if isinstance(e, dict) else e[0]   # maps with "type" (0.32); tagged arrays tolerated


def _stored_hashes(events) -> set[int]:
    out = set()
    for e in events:
        if _event_type(e) == "BlockStored":
            out.update(e["block_hashes"] if isinstance(e, dict) else e[1])
    return out


def zmq_io_threads() -> int:
    """Native ZeroMQ I/O threads in this process (one per live context)."""
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return sum(n.startswith("ZMQbg/IO") for n in names)


@pytest.fixture(scope="module")
def eng(tiny_model_dir):
    # what this process ran before (earlier test modules' helpers) is not the engine's to reap
    baseline_children = set(psutil.Process().children(recursive=True))
    baseline_zmq = zmq_io_threads()
    with cpu_env():
        offline = Offline(tiny_model_dir, PROMPTS)
        r = Running(tiny_model_dir)
        r.baseline_threads = threading.active_count()
        r.baseline_children = baseline_children
        r.baseline_zmq = baseline_zmq
        try:
            r.run(r.engine.start(), timeout=240)
            r.offline = offline.result()
            yield r
        finally:
            offline.kill()
            r.run(r.engine.stop(), timeout=60)
            r.sub.close(linger=0)
            r.zctx.term()
            r.loop.close()


def test_ucx_env_defaults(tmp_path):
    from slurmserve.kvfabric.ucx_env import ucx_env_defaults
    assert ucx_env_defaults({}, sysfs=tmp_path / "missing") == {"UCX_MODULES": "^ib"}
    assert ucx_env_defaults({}, sysfs=tmp_path) == {"UCX_MODULES": "^ib"}   # empty directory
    assert ucx_env_defaults({"UCX_MODULES": "ib"}, sysfs=tmp_path) == {}     # the user's choice wins
    (tmp_path / "mlx5_0").mkdir()
    assert ucx_env_defaults({}, sysfs=tmp_path) == {}


def test_engine_args_and_endpoint():
    assert kv_events_bind_endpoint("tcp://10.1.2.3:5557") == "tcp://*:5557"
    assert kv_events_bind_endpoint("tcp://*:5557") == "tcp://*:5557"
    assert kv_events_bind_endpoint("ipc:///tmp/x") == "ipc:///tmp/x"
    cfg = DeploymentConfig.model_validate({
        "model": {"path": "/m", "name": "tiny", "max_model_len": 512},
        "engine": {"kind": "vllm", "args": {"kv_cache_memory_bytes": "1GiB", "max_model_len": 256,
                                            "kv_events_config": {"buffer_steps": 7}}}})
    ctx = EngineContext(instance=3, role="prefill", host="10.0.0.5", kv_events_endpoint="tcp://10.0.0.5:6000",
                        kv_side_channel_port=7000)
    kw = engine_kwargs(cfg, ctx)
    assert kw["model"] == "/m" and kw["served_model_name"] == "tiny" and kw["enable_prefix_caching"] is True
    assert kw["max_model_len"] == 256 and kw["kv_cache_memory_bytes"] == 1 << 30   # args win
    assert kw["kv_events_config"] == {"enable_kv_cache_events": True, "publisher": "zmq",
                                      "endpoint": "tcp://*:6000", "topic": "kv-events", "buffer_steps": 7}
    assert kw["kv_transfer_config"]["kv_role"] == "kv_producer"
    assert kw["kv_transfer_config"]["kv_buffer_device"] == "cpu"
    # The engine core is spawned from its MPI rank, not forked, unless the user says otherwise.
    assert engine_env(cfg, ctx, environ={})["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    assert "VLLM_WORKER_MULTIPROC_METHOD" not in engine_env(cfg, ctx, environ={"VLLM_WORKER_MULTIPROC_METHOD": "fork"})


def test_greedy_matches_offline_llm(eng):
    gaps: list[float] = []

    async def ticker(stop):
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.02)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async def main():
        stop = asyncio.Event()
        t = asyncio.create_task(ticker(stop))
        res = await asyncio.gather(*(
            eng.collect(EngineRequest(f"greedy-{i}", p, SamplingParams(max_tokens=MAX_TOKENS,
                                                                       temperature=0.0)))
            for i, p in enumerate(PROMPTS)))
        stop.set()
        await t
        return res

    results = eng.run(main())
    for prompt, deltas, (want_tokens, want_reason) in zip(PROMPTS, results, eng.offline):
        tokens = [t for d in deltas for t in d.token_ids]
        assert tokens == want_tokens
        assert deltas[-1].finish_reason == want_reason == "length"
        assert all(d.finish_reason is None for d in deltas[:-1])
        assert deltas[0].num_prompt_tokens == len(prompt)
        assert len(deltas) > 1   # streamed, not one final output
    # The engine core is another process: this loop stays responsive while it computes.
    assert max(gaps) < 0.5, f"event loop stalled for {max(gaps):.2f} s"


def test_kv_events_and_prefix_cache(eng):
    prompt = PROMPTS[2]
    want = set(block_hashes(prompt, BLOCK))   # 3 full blocks; default sha256, seed "vllm-none-hash"
    eng.drain_events(until=lambda evs: want <= _stored_hashes(evs))
    assert want <= _stored_hashes(eng.events), "BlockStored events for the prompt's blocks"
    assert {_event_type(e) for e in eng.events} <= {"BlockStored", "BlockRemoved", "AllBlocksCleared"}
    # The same prompt again: every full block is a prefix-cache hit, reported on the first delta.
    req = EngineRequest("again", prompt, SamplingParams(max_tokens=4, temperature=0.0))
    deltas = eng.run(eng.collect(req))
    assert deltas[0].num_cached_tokens == 3 * BLOCK
    load = eng.engine.load()    # vLLM's own prefix-cache counters, as the heartbeat carries them
    assert load.prefix_cache_hits >= 3 * BLOCK and load.prefix_cache_queries >= load.prefix_cache_hits + len(prompt)
    assert [t for d in deltas for t in d.token_ids] == eng.offline[2][0][:4]


def test_abort(eng):
    seen = []

    def on_delta(d):
        seen.append(d)
        if len(seen) == 2:
            eng.engine.abort("long")

    req = EngineRequest("long", PROMPTS[0], SamplingParams(max_tokens=800, ignore_eos=True, temperature=0.0))
    deltas = eng.run(eng.collect(req, on_delta))
    assert deltas[-1].finish_reason == "abort"
    assert sum(len(d.token_ids) for d in deltas) < 800

    # Aborted before its generate() ran (the worker's Abort can overtake the task's first step).
    async def early():
        req = EngineRequest("early", PROMPTS[1], SamplingParams(max_tokens=800, ignore_eos=True))
        gen = eng.engine.generate(req)
        eng.engine.abort("early")
        return [d async for d in gen]

    deltas = eng.run(early())
    assert [d.finish_reason for d in deltas] == ["abort"] and deltas[0].token_ids == []


def test_load(eng):
    async def main():
        samples = []
        req = EngineRequest("loaded", PROMPTS[1],
                            SamplingParams(max_tokens=64, ignore_eos=True, temperature=0.0))
        async for d in eng.engine.generate(req):
            samples.append(eng.engine.load())
        return samples

    samples = eng.run(main())
    assert max(s.running for s in samples) == 1
    assert max(s.kv_usage for s in samples) > 0
    idle = eng.engine.load()
    assert idle.running == 0 and idle.waiting == 0
    assert 0.0 <= idle.kv_usage <= 1.0
    assert idle.block_size == BLOCK and idle.num_kv_blocks * BLOCK >= MAX_MODEL_LEN


def test_stop_leaves_no_process_or_thread(eng):
    me = psutil.Process()
    assert set(me.children(recursive=True)) - eng.baseline_children, "the engine core runs in a child process"
    t0 = time.monotonic()
    eng.run(eng.engine.stop())
    assert time.monotonic() - t0 < 8
    # a zombie counts: the engine must reap what it started
    left = [p for p in me.children(recursive=True) if p not in eng.baseline_children]
    assert left == [], [(p.pid, p.status(), p.cmdline()) for p in left]
    # Python threads back to what they were (the loop's to_thread executor aside), and no native
    # ZeroMQ threads of the engine's context left behind.
    names = [t.name for t in threading.enumerate() if not t.name.startswith("asyncio_")]
    assert len(names) <= eng.baseline_threads, names
    assert zmq_io_threads() <= eng.baseline_zmq + 1   # 1: this test's own SUB context
