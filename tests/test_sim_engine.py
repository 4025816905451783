"""The simulated engine: continuous batching, paged KV with prefix caching, KV events, disaggregation."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest

from slurmserve.config import DeploymentConfig
from slurmserve.kvfabric.block_hash import DEFAULT_HASH_SEED, block_hashes
from slurmserve.kvfabric.events import BlockRemoved, BlockStored, KVEventSubscriber
from slurmserve.runtime.engine import EngineContext, EngineRequest, InvalidRequest
from slurmserve.runtime.protocol import SamplingParams
from slurmserve.runtime.sim_engine import SimEngine

INF = float("inf")
VOCAB = 512
EOS = 2


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"vocab_size": VOCAB, "eos_token_id": EOS, "pad_token_id": 3}))
    return d


def make_engine(model_dir, instance=0, role="worker", events=False, max_model_len=1024, **sim) -> SimEngine:
    sim = {"speedup": INF, "num_kv_blocks": 256, "block_size": 16, **sim}
    cfg = DeploymentConfig.model_validate({"model": {"path": str(model_dir), "max_model_len": max_model_len},
                                           "engine": {"kind": "sim", "sim": sim}})
    ctx = EngineContext(instance=instance, role=role, host="127.0.0.1",
                        kv_events_endpoint=free_endpoint() if events else "", kv_side_channel_port=5600 + instance,
                        extra={"hash_seed": DEFAULT_HASH_SEED})
    return SimEngine(cfg, ctx)


def params(max_tokens=16, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, **{"ignore_eos": True, **kw})


async def collect(engine, req_id, prompt, p, kv=None):
    deltas = [d async for d in engine.generate(EngineRequest(req_id, list(prompt), p, kv))]
    return deltas, [t for d in deltas for t in d.token_ids]


class Events:
    """Subscribes to an engine's KV events."""

    def __init__(self):
        self.batches = []
        self.gaps = []
        self.sub = KVEventSubscriber(lambda i, s, evs: self.batches.append(evs),
                                     lambda i, e, s: self.gaps.append((e, s)))

    def events(self, kind):
        return [ev for evs in self.batches for ev in evs if isinstance(ev, kind)]

    async def wait(self, cond, timeout=5.0):
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, "KV events did not arrive"
            await asyncio.sleep(0.01)


async def connect_events(engine) -> Events:
    ev = Events()
    ev.sub.add(engine.ctx.instance, engine.publisher.endpoint)
    await asyncio.sleep(0.3)          # PUB/SUB slow joiner: let the subscription reach the engine
    return ev


# ---- batching -----------------------------------------------------------------------------------

def test_many_concurrent_requests(model_dir):
    async def main():
        e = make_engine(model_dir, max_num_seqs=8, max_num_batched_tokens=256)
        await e.start()
        try:
            lens = [1 + (i * 7) % 40 for i in range(60)]
            results = await asyncio.gather(*[
                collect(e, f"r{i}", range(i, i + 5 + i % 50), params(n)) for i, n in enumerate(lens)])
            for (deltas, toks), n, i in zip(results, lens, range(60)):
                assert len(toks) == n
                assert deltas[-1].finish_reason == "length"
                assert all(d.finish_reason is None for d in deltas[:-1])
                assert deltas[0].num_prompt_tokens == 5 + i % 50
                assert all(4 <= t < VOCAB for t in toks)      # never a special id (0..3 here)
            # the batch was continuous: far fewer steps than tokens
            assert e.scheduler.steps < sum(lens) / 2
            assert e.load().running == 0 and e.load().waiting == 0 and e.load().kv_usage == 0.0
        finally:
            await e.stop()
    asyncio.run(main())


def test_load_while_busy(model_dir):
    async def main():
        e = make_engine(model_dir, speedup=2.0, max_num_seqs=4)
        await e.start()
        try:
            tasks = [asyncio.create_task(collect(e, f"r{i}", range(100 + i), params(10))) for i in range(6)]
            await asyncio.sleep(0.03)
            load = e.load()
            assert load.running == 4 and load.waiting == 2
            assert 0 < load.kv_usage < 1 and load.num_kv_blocks == 256 and load.block_size == 16
            await asyncio.gather(*tasks)
        finally:
            await e.stop()
    asyncio.run(main())


def test_chunked_prefill(model_dir):
    async def main():
        e = make_engine(model_dir, max_num_batched_tokens=32)
        await e.start()
        try:
            deltas, toks = await collect(e, "long", range(200), params(3))
            assert len(toks) == 3 and deltas[0].num_prompt_tokens == 200
            assert e.scheduler.steps >= 200 // 32 + 2      # 7 prefill chunks, then 2 decode steps
        finally:
            await e.stop()
    asyncio.run(main())


def test_deterministic_outputs(model_dir):
    async def main():
        outs = []
        for _ in range(2):
            e = make_engine(model_dir)
            await e.start()
            try:
                a = (await collect(e, "a", range(30), params(20)))[1]
                a2 = (await collect(e, "a2", range(30), params(20)))[1]
                b = (await collect(e, "b", range(1, 31), params(20)))[1]
                s1 = (await collect(e, "s1", range(30), params(20, seed=1)))[1]
                s1b = (await collect(e, "s1b", range(30), params(20, seed=1)))[1]
                s2 = (await collect(e, "s2", range(30), params(20, seed=2)))[1]
            finally:
                await e.stop()
            assert a == a2 and s1 == s1b
            assert a != b and s1 != s2 and s1 != a
            outs.append((a, b, s1, s2))
        assert outs[0] == outs[1]               # the same on a fresh engine (another instance)
        # a shorter max_tokens gives a prefix of the same stream
        e = make_engine(model_dir)
        await e.start()
        try:
            assert (await collect(e, "short", range(30), params(5)))[1] == outs[0][0][:5]
        finally:
            await e.stop()
    asyncio.run(main())


def test_sim_seed_changes_outputs(model_dir):
    async def main():
        toks = []
        for seed in (0, 1):
            e = make_engine(model_dir, seed=seed)
            await e.start()
            try:
                toks.append((await collect(e, "a", range(30), params(20)))[1])
            finally:
                await e.stop()
        assert toks[0] != toks[1]
    asyncio.run(main())


# ---- sampling params ----------------------------------------------------------------------------

def test_eos_min_tokens_and_stop_ids(model_dir):
    async def main():
        e = make_engine(model_dir)
        e.sampler.eos_threshold = 65536 // 4          # EOS with probability 1/4 per token
        await e.start()
        try:
            stopped = 0
            for i in range(20):
                deltas, toks = await collect(e, f"e{i}", range(i, i + 10), params(50, ignore_eos=False, min_tokens=3))
                assert len(toks) >= 3
                if deltas[-1].finish_reason == "stop":
                    stopped += 1
                    assert toks[-1] == EOS and EOS not in toks[:-1]
                else:
                    assert len(toks) == 50
            assert stopped >= 15
            # ignore_eos: always the full length, never an EOS
            for i in range(5):
                deltas, toks = await collect(e, f"i{i}", range(i, i + 10), params(50))
                assert len(toks) == 50 and EOS not in toks and deltas[-1].finish_reason == "length"
            # stop_token_ids: stop at the first one drawn after min_tokens, never before
            ref = (await collect(e, "ref", range(40), params(60)))[1]
            stop_tok = ref[10]
            deltas, toks = await collect(e, "stop", range(40), params(60, stop_token_ids=[stop_tok]))
            assert deltas[-1].finish_reason == "stop" and toks[-1] == stop_tok
            assert toks == ref[:ref.index(stop_tok) + 1]
            deltas, toks = await collect(e, "stopmin", range(40),
                                         params(60, stop_token_ids=[stop_tok], min_tokens=12))
            assert stop_tok not in toks[:11]
        finally:
            await e.stop()
    asyncio.run(main())


def test_missing_model_dir(tmp_path):
    e = make_engine(tmp_path / "nope")
    assert e.sampler.vocab_size == 32000 and e.sampler.eos_token_id is None


# ---- prefix cache and KV events -----------------------------------------------------------------

def test_prefix_cache_hit_and_block_stored(model_dir):
    async def main():
        e = make_engine(model_dir, events=True)
        await e.start()
        ev = await connect_events(e)
        try:
            prompt = list(range(10, 110))      # 100 tokens: 6 full blocks of 16
            first, toks1 = await collect(e, "one", prompt, params(4))
            assert first[0].num_cached_tokens == 0 and first[0].num_prompt_tokens == 100
            again, toks2 = await collect(e, "two", prompt, params(4))
            assert again[0].num_cached_tokens == 96
            assert toks1 == toks2
            # a whole-block prompt is never entirely cached: the last token is computed
            blk, _ = await collect(e, "b1", prompt[:64], params(2))
            blk2, _ = await collect(e, "b2", prompt[:64], params(2))
            assert blk2[0].num_cached_tokens == 48

            expect = block_hashes(prompt, 16, DEFAULT_HASH_SEED)
            await ev.wait(lambda: len(ev.events(BlockStored)) >= 1)
            stored = ev.events(BlockStored)
            first_ev = stored[0]
            assert first_ev.block_hashes == expect and first_ev.parent_block_hash is None
            assert first_ev.token_ids == prompt[:96] and first_ev.block_size == 16
            # as decode fills the 7th block (100 prompt + 4 outputs = 104 tokens: not full), nothing more;
            # the repeat hits the cache and announces nothing new
            all_hashes = [h for s in stored for h in s.block_hashes]
            assert len(all_hashes) == len(set(all_hashes))
            assert ev.gaps == []
        finally:
            await ev.sub.aclose()
            await e.stop()
    asyncio.run(main())


def test_a_prefix_scheduled_in_a_step_is_a_hit_for_requests_admitted_after_it(model_dir):
    """vLLM v1 caches the blocks a step fills while scheduling it (allocate_slots), so a request
    admitted later in the same step reuses a prefix that an earlier one is prefilling. The sim
    cached them only after the step: two requests sharing a prompt prefix that arrived together
    both prefilled it, and the step was modelled longer than vLLM's (the cold burst of the
    KV-routing workload)."""
    from slurmserve.runtime.sim.request import SimRequest
    from slurmserve.runtime.sim.scheduler import prefill_step_ms

    e = make_engine(model_dir)
    sched = e.scheduler
    shared = list(range(10, 10 + 64))                       # 4 full blocks of 16
    a = SimRequest(EngineRequest("a", shared + [300, 301], params(2)), 0, 2)
    b = SimRequest(EngineRequest("b", shared + [400, 401, 402], params(2)), 1, 2)
    sched.add(a)
    sched.add(b)
    ms, produced = sched.step()
    assert {r.req_id for r in produced} == {"a", "b"}
    assert (a.num_cached, b.num_cached) == (0, 64)
    assert ms == pytest.approx(prefill_step_ms(sched.prefill_coeffs, 66 + 3))
    # the shared blocks are held by both, and announced once
    assert a.block_ids[:4] == b.block_ids[:4]
    stored = [ev for ev in sched.blocks.take_events() if isinstance(ev, BlockStored)]
    assert [h for ev in stored for h in ev.block_hashes] == block_hashes(shared, 16, DEFAULT_HASH_SEED)


def test_decode_fills_block_event(model_dir):
    async def main():
        e = make_engine(model_dir, events=True)
        await e.start()
        ev = await connect_events(e)
        try:
            prompt = list(range(20))                # 1 full block + 4 tokens
            _, toks = await collect(e, "d", prompt, params(30))
            seq = prompt + toks                     # 50 tokens: blocks 0..2 full and computed? 49 computed
            expect = block_hashes(seq[:49], 16, DEFAULT_HASH_SEED)
            await ev.wait(lambda: sum(len(s.block_hashes) for s in ev.events(BlockStored)) >= 3)
            stored = ev.events(BlockStored)
            assert [h for s in stored for h in s.block_hashes] == expect
            assert stored[1].parent_block_hash == expect[0]
            assert stored[1].token_ids == seq[16:32]
        finally:
            await ev.sub.aclose()
            await e.stop()
    asyncio.run(main())


def test_eviction_emits_block_removed(model_dir):
    async def main():
        e = make_engine(model_dir, events=True, num_kv_blocks=16, block_size=4, max_model_len=64)
        await e.start()
        ev = await connect_events(e)
        try:
            for i in range(8):
                await collect(e, f"r{i}", range(1000 * i, 1000 * i + 20), params(4))
            await ev.wait(lambda: ev.events(BlockRemoved))
            stored = {h for s in ev.events(BlockStored) for h in s.block_hashes}
            removed = [h for r in ev.events(BlockRemoved) for h in r.block_hashes]
            assert removed and set(removed) <= stored
            assert len(removed) == len(set(removed))
            # the oldest prompt's blocks are gone from the cache, the newest are still there
            last, _ = await collect(e, "again7", range(7000, 7020), params(1))
            assert last[0].num_cached_tokens == 16
            old, _ = await collect(e, "again0", range(0, 20), params(1))
            assert old[0].num_cached_tokens == 0
        finally:
            await ev.sub.aclose()
            await e.stop()
    asyncio.run(main())


def test_preemption_under_kv_pressure(model_dir):
    async def main():
        e = make_engine(model_dir, num_kv_blocks=24, block_size=4, max_model_len=64)
        await e.start()
        try:
            results = await asyncio.gather(*[collect(e, f"r{i}", range(100 * i, 100 * i + 8), params(40))
                                             for i in range(6)])
            assert e.scheduler.num_preemptions > 0
            for i, (deltas, toks) in enumerate(results):
                assert len(toks) == 40 and deltas[-1].finish_reason == "length"
                alone = make_engine(model_dir)
                await alone.start()
                assert (await collect(alone, "x", range(100 * i, 100 * i + 8), params(40)))[1] == toks
                await alone.stop()
            assert e.load().kv_usage == 0.0
        finally:
            await e.stop()
    asyncio.run(main())


# ---- abort, errors, shutdown --------------------------------------------------------------------

def test_abort(model_dir):
    async def main():
        e = make_engine(model_dir, speedup=100.0)
        await e.start()
        try:
            got = []

            async def run():
                async for d in e.generate(EngineRequest("long", list(range(50)), params(10_000 // 20))):
                    got.append(d)

            t = asyncio.create_task(run())
            while sum(len(d.token_ids) for d in got) < 5:
                await asyncio.sleep(0.005)
            e.abort("long")
            await asyncio.wait_for(t, 2)
            assert got[-1].finish_reason == "abort"
            assert sum(len(d.token_ids) for d in got) < 500
            assert e.load().running == 0 and e.load().kv_usage == 0.0
            e.abort("long")                      # unknown / finished: ignored
            # abort while waiting
            e2 = asyncio.create_task(collect(e, "w", range(10), params(5)))
            await asyncio.sleep(0)
            e.abort("w")
            deltas, toks = await e2
            assert deltas[-1].finish_reason == "abort" and toks == []
            # a consumer that walks away frees the request's blocks
            gen = e.generate(EngineRequest("walk", list(range(40)), params(100)))
            await gen.__anext__()
            await gen.aclose()
            assert e.load().running == 0 and e.load().kv_usage == 0.0
        finally:
            await e.stop()
    asyncio.run(main())


def test_bad_requests(model_dir):
    async def main():
        e = make_engine(model_dir, num_kv_blocks=8, block_size=4, max_model_len=32)
        await e.start()
        try:
            # the request's own faults raise InvalidRequest (the head answers a 400), before any delta
            with pytest.raises(InvalidRequest, match="empty prompt"):
                await collect(e, "empty", [], params(4))
            with pytest.raises(InvalidRequest, match="max_model_len"):
                await collect(e, "huge", range(40), params(4))
            # generation stops at max_model_len
            deltas, toks = await collect(e, "cap", range(20), params(100))
            assert deltas[-1].finish_reason == "length" and 20 + len(toks) == 32
        finally:
            await e.stop()
    asyncio.run(main())


def test_stop_ends_streams_and_leaves_nothing(model_dir):
    async def main():
        e = make_engine(model_dir, events=True, speedup=10.0)
        await e.start()
        tasks = [asyncio.create_task(collect(e, f"r{i}", range(i, i + 30), params(1000))) for i in range(4)]
        await asyncio.sleep(0.1)
        loop_task = e._task
        await e.stop()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 2)
        assert all(deltas[-1].finish_reason == "abort" for deltas, _ in results)
        assert loop_task.done() and e.publisher is None
        deltas, _ = await collect(e, "late", range(5), params(2))
        assert deltas[-1].finish_reason == "error"
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert others == []
    asyncio.run(main())


# ---- disaggregation -----------------------------------------------------------------------------

def test_prefill_only_then_remote_decode(model_dir):
    async def main():
        pre = make_engine(model_dir, instance=1, role="prefill", events=True)
        dec = make_engine(model_dir, instance=2, role="decode")
        agg = make_engine(model_dir, instance=3)
        for e in (pre, dec, agg):
            await e.start()
        ev = await connect_events(pre)
        try:
            prompt = list(range(300, 380))        # 80 tokens: 5 full blocks
            kv_req = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                      "remote_block_ids": None, "remote_host": None, "remote_port": None}
            deltas, toks = await collect(pre, "p", prompt, params(16, min_tokens=0), kv_req)
            assert len(toks) == 1 and deltas[-1].finish_reason == "length"
            kv = deltas[-1].kv_transfer_params
            assert kv["do_remote_prefill"] is True and kv["do_remote_decode"] is False
            assert kv["remote_engine_id"] == "sim-1" and kv["remote_host"] == "127.0.0.1"
            assert kv["remote_port"] == 5601 and kv["num_tokens"] == 80
            assert len(kv["remote_block_ids"]) == 5
            await ev.wait(lambda: ev.events(BlockStored))
            assert ev.events(BlockStored)[0].block_hashes == block_hashes(prompt, 16, DEFAULT_HASH_SEED)

            d_deltas, d_toks = await collect(dec, "d", prompt, params(16), kv)
            assert d_deltas[0].num_cached_tokens == 80 and d_deltas[0].num_prompt_tokens == 80
            assert len(d_toks) == 16 and d_deltas[-1].finish_reason == "length"
            assert d_deltas[-1].kv_transfer_params is None
            _, a_toks = await collect(agg, "a", prompt, params(16))
            assert d_toks == a_toks and toks == a_toks[:1]
            assert dec.scheduler.steps == 16                # no prefill step on the decode instance
            # the decode instance reports the prompt tokens it got from the prefill instance (the
            # head's instance_prompt_tokens_external_total); a repeat finds them in its own cache
            assert (dec.load().external_kv_tokens, pre.load().external_kv_tokens) == (80, 0)
            assert agg.load().external_kv_tokens == 0
            longer = prompt + list(range(400, 424))                     # 104 tokens, 80 cached
            kv2 = (await collect(pre, "p2", longer, params(16, min_tokens=0), kv_req))[0][-1].kv_transfer_params
            await collect(dec, "d2", longer, params(4), kv2)
            assert dec.load().external_kv_tokens == 80 + 24
        finally:
            await ev.sub.aclose()
            for e in (pre, dec, agg):
                await e.stop()
    asyncio.run(main())


# ---- timing -------------------------------------------------------------------------------------

def test_speedup_inf_is_fast(model_dir):
    async def main():
        e = make_engine(model_dir, num_kv_blocks=4096)
        await e.start()
        try:
            t = time.perf_counter()
            results = await asyncio.gather(*[collect(e, f"r{i}", range(i, i + 100), params(64))
                                             for i in range(200)])
            elapsed = time.perf_counter() - t
            assert all(len(toks) == 64 for _, toks in results)
            assert elapsed < 3.0, elapsed
        finally:
            await e.stop()
    asyncio.run(main())


def test_step_time_model(model_dir):
    async def main():
        # one 100-token prefill step, then 19 decode steps, twice as fast as modelled
        e = make_engine(model_dir, speedup=2.0)
        a, b, c = e.scheduler.prefill_coeffs
        total_ms = a * 100 ** 2 + b * 100 + c
        da, db, dc = e.scheduler.decode_coeffs
        for k in range(1, 20):                # decode step k computes token 100 + k - 1
            u = -(-(100 + k) // 16) / 256
            total_ms += max(1.0, da * u * u + db * u + dc)
        expected = total_ms / 2 / 1000
        await e.start()
        try:
            t = time.perf_counter()
            deltas, toks = await collect(e, "t", range(100), params(20))
            elapsed = time.perf_counter() - t
            assert len(toks) == 20 and e.scheduler.steps == 20
            # a token leaves when its own step's time is up: one per delta, the last one only
            # after all 20 steps (the loop samples the next step before it sleeps; that token
            # must not ride along with the previous one)
            assert [len(d.token_ids) for d in deltas] == [1] * 20
            assert expected - 0.002 <= elapsed <= expected * 1.5 + 0.1, (elapsed, expected)
        finally:
            await e.stop()
    asyncio.run(main())
