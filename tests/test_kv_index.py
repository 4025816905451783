"""The fleet KV index (kvfabric.kv_index) and the `kv` routing policy (router.policies.KVAware)."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

from slurmserve.kvfabric.block_hash import DEFAULT_HASH_SEED, block_digests, block_hashes
from slurmserve.kvfabric.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventSubscriber
from slurmserve.kvfabric.kv_index import ApproxKVIndex, KVIndex
from slurmserve.router.engine_client import EngineClient
from slurmserve.router.head import Head
from slurmserve.router.instance import Instance
from slurmserve.router.metrics import HeadMetrics
from slurmserve.router.policies import KVAware, PrefixHasher, Route
from slurmserve.runtime import protocol as P

from test_sim_engine import collect, make_engine, model_dir, params  # noqa: F401

BS = 4


def stored(hashes, parent=None):
    return BlockStored(list(hashes), parent, [1] * (BS * len(hashes)), BS, None, "GPU", None)


def test_overlap_counts_leading_blocks_per_instance():
    idx = KVIndex()
    a = block_hashes(list(range(40)), BS)            # 10 blocks
    b = block_hashes(list(range(20)) + [99] * 20, BS)  # shares 5 leading blocks with a
    idx.apply(0, [stored(a)])
    idx.apply(1, [stored(a[:3])])
    idx.apply(2, [stored(b)])
    assert idx.overlap(a, [0, 1, 2, 3]) == {0: 10, 1: 3, 2: 5, 3: 0}
    assert idx.overlap(b, [0, 2]) == {0: 5, 2: 10}
    assert idx.overlap(a[:4], [0]) == {0: 4}

    # a block evicted from the middle ends the usable prefix there, as in the engine
    idx.apply(0, [BlockRemoved([a[6]], "GPU")])
    assert idx.overlap(a, [0]) == {0: 6}
    idx.apply(0, [AllBlocksCleared()])
    assert idx.overlap(a, [0, 1]) == {0: 0, 1: 3}
    idx.forget(1)
    assert idx.overlap(a, [0, 1, 2]) == {0: 0, 1: 0, 2: 5}
    assert idx.blocks(2) == 10 and len(idx) == 10


def test_raw_digest_events_match_int_hashes():
    """vLLM sends raw 32-byte digests when VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0."""
    tokens = list(range(16))
    idx = KVIndex()
    idx.apply(5, [stored(block_digests(tokens, BS))])
    assert idx.overlap(block_hashes(tokens, BS), [5]) == {5: 4}
    idx.apply(5, [BlockRemoved([block_digests(tokens, BS)[0]], "GPU")])
    assert idx.overlap(block_hashes(tokens, BS), [5]) == {5: 0}


def test_head_hashes_equal_engine_hashes():
    tokens = list(range(1000, 1050))
    r = Route(tokens, PrefixHasher(DEFAULT_HASH_SEED))
    assert r.hashes(16) == block_hashes(tokens, 16, DEFAULT_HASH_SEED)
    assert r.prompt_blocks(16) == 4 and len(r.hashes(16)) == 3


def test_index_predicts_the_sim_engines_prefix_hits(model_dir):  # noqa: F811
    """Fed by a real engine's KV events under eviction pressure, the index's overlap for a prompt
    equals the prefix-cache hit the engine then reports for it."""
    async def main():
        e = make_engine(model_dir, events=True, num_kv_blocks=48, block_size=BS, max_model_len=128)
        await e.start()
        batches, removed = [], []
        sub = KVEventSubscriber(lambda i, seq, evs: batches.append((seq, evs)), lambda *gap: None)
        sub.add(0, e.publisher.endpoint)
        await asyncio.sleep(0.3)          # PUB/SUB slow joiner
        idx = KVIndex()
        last_seq = -1
        rng = random.Random(1)
        prefixes = [[rng.randrange(10, 500) for _ in range(rng.randrange(8, 40))] for _ in range(6)]
        try:
            checked = 0
            for i in range(40):
                prompt = rng.choice(prefixes) + [rng.randrange(10, 500) for _ in range(rng.randrange(0, 9))]
                predicted = idx.overlap(block_hashes(prompt, BS, DEFAULT_HASH_SEED), [0])[0]
                deltas, _ = await collect(e, f"r{i}", prompt, params(2))
                hit = deltas[0].num_cached_tokens // BS
                assert hit == min(predicted, (len(prompt) - 1) // BS), (i, predicted, hit)
                checked += predicted > 0
                # let this request's events (stores and evictions) reach the index
                await asyncio.sleep(0.01)
                while e.publisher.seq != last_seq + 1:
                    await asyncio.sleep(0.005)
                    if batches:
                        last_seq = batches[-1][0]
                for _, evs in batches:
                    idx.apply(0, evs)
                    removed += [ev for ev in evs if type(ev) is BlockRemoved]
                batches.clear()
            assert checked >= 10   # the comparison was not trivially 0 == 0
            assert removed, "the cache was too big to evict anything"
        finally:
            await e.stop()
            sub.close()
    asyncio.run(main())


def test_approximate_index_learns_and_expires():
    now = [0.0]
    idx = ApproxKVIndex(ttl_s=10, clock=lambda: now[0])
    h = block_hashes(list(range(32)), BS)
    idx.record(3, h[:5])
    assert idx.overlap(h, [3, 4]) == {3: 5, 4: 0}
    now[0] = 5
    idx.record(4, h)
    now[0] = 12           # 3's entries are past their TTL, 4's are not
    assert idx.overlap(h, [3, 4]) == {3: 0, 4: 8}
    idx.record(4, h[:1])  # the next record drops them for good
    assert all(3 not in e for e in idx._expiry.values())
    idx.forget(4)
    assert idx.overlap(h, [4]) == {4: 0}


def test_the_approximate_index_drops_what_expired_at_the_next_record():
    """Expired entries go at the next record, oldest first, and only they: the index used to sweep
    itself whole once per TTL, which held the head's loop for as long as the index was large (14 ms
    at 36,000 entries, 276 ms at 500,000) and kept what expired between sweeps until the next one."""
    now = [0.0]
    idx = ApproxKVIndex(ttl_s=10, clock=lambda: now[0])
    h = block_hashes(list(range(16 * 16)), BS)
    a, b, c, d = h[:4], h[4:8], h[8:12], h[12:16]
    idx.record(1, a)                  # until 10
    now[0] = 0.5
    idx.record(2, b)                  # until 10.5
    now[0] = 5
    idx.record(1, a[:2])              # a's first two again: until 15
    now[0] = 10
    idx.record(3, c)                  # a[2:] expired
    assert set(idx._expiry) == set(a[:2] + b + c)
    now[0] = 11
    idx.record(3, d)                  # b expired
    assert set(idx._expiry) == set(a[:2] + c + d)
    assert idx.overlap(a, [1]) == {1: 2}
    now[0] = 30
    idx.record(4, [])
    assert len(idx) == 0


@dataclass
class Inst:
    index: int
    prefill_blocks: int = 0
    decode_blocks: int = 0
    kv_usage: float = 0.0
    num_kv_blocks: int = 1000
    block_size: int = BS
    inflight: int = 0
    running: int = 0
    waiting: int = 0
    held_hashes: dict = field(default_factory=dict)


def test_kv_policy_trades_overlap_against_load():
    idx = KVIndex()
    prompt = list(range(64))                      # 16 blocks
    idx.apply(1, [stored(block_hashes(prompt, BS)[:12])])
    a, b = Inst(0), Inst(1)

    def choose():   # a fresh policy each time: no memory of the previous decision
        return KVAware(idx, prefill_load_scale=1.0).choice([a, b], Route(prompt, PrefixHasher()))

    choice = choose()
    assert choice.instance is b and choice.overlap_blocks == 12
    # b is busy prefilling: 12 cached blocks no longer outweigh its queue
    b.prefill_blocks = 30
    assert choose().instance is a
    # b's KV is nearly full: it is passed over whatever it caches
    b.prefill_blocks, b.kv_usage = 0, 0.97
    assert choose().instance is a
    # ...unless everyone is
    a.kv_usage = 0.99
    assert choose().instance is b


def test_kv_policy_counts_a_prefix_already_held_there_once():
    """Two instances cache the prompt's prefix alike. One runs a request with the same prefix, the
    other an unrelated one holding fewer blocks. Requests sharing a prefix read the same KV, so the
    first adds less KV by taking this request too, and wins."""
    idx = KVIndex()
    prompt = list(range(64))                      # 16 blocks
    hashes = block_hashes(prompt, BS)
    idx.apply(0, [stored(hashes[:12])])
    idx.apply(1, [stored(hashes[:12])])
    a, b = Inst(0, decode_blocks=16), Inst(1, decode_blocks=10)
    a.held_hashes = {h: 1 for h in hashes[:12] + block_hashes(list(range(48)) + [7] * 16, BS)[12:]}
    assert KVAware(idx, prefill_load_scale=1.0).choose([a, b], Route(prompt, PrefixHasher())) is a
    a.held_hashes = {}      # the same load, but nothing this prompt shares: b holds less
    assert KVAware(idx, prefill_load_scale=1.0).choose([a, b], Route(prompt, PrefixHasher())) is b


def with_client(body) -> None:
    """Run `body(client, inst)` on an EngineClient over the real control socket, with one instance
    (up) whose requests the test submits and releases itself."""
    zctx, sock, _ = Head.bind_control_socket("127.0.0.1")

    async def main():
        inst = Instance(index=0, role="worker", identity=b"w0", address="127.0.0.1", up=True)
        client = EngineClient(sock, [inst], HeadMetrics("m"), heartbeat_timeout_s=60.0)
        client.start()
        try:
            body(client, inst)
        finally:
            await client.close("test over", grace_s=0)

    try:
        asyncio.run(main())
    finally:
        sock.close(linger=0)
        zctx.term()


def submit_shared_prefix(client, inst, n: int, **account) -> list:
    """n requests of a 12-block prefix, each with 2 full blocks of its own and a partial one."""
    routes = [Route(list(range(48)) + [100 + i] * 8 + [1], PrefixHasher()) for i in range(n)]
    return [client.submit(inst, f"r{i}", r.prompt_token_ids, P.SamplingParams(), held_blocks=r.prompt_blocks(BS),
                          held_hashes=r.hashes(BS), **account) for i, r in enumerate(routes)]


def test_head_load_account_counts_shared_prefix_blocks_once():
    def body(client, inst):
        streams = submit_shared_prefix(client, inst, 3)
        assert inst.decode_blocks == 12 + 3 * 3
        client.release(streams[1])
        assert inst.decode_blocks == 12 + 2 * 3
        client.release(streams[1])                # a second release changes nothing
        assert inst.decode_blocks == 12 + 2 * 3
        for stream in streams:
            client.release(stream)
        assert inst.decode_blocks == 0 and inst.held_hashes == {}

    with_client(body)


def test_head_load_account_of_a_failed_instance_empties_as_its_requests_are_released():
    """Including a request that had finished but was not yet released when the instance failed."""
    def body(client, inst):
        streams = submit_shared_prefix(client, inst, 3, prefill_blocks=15)
        client._on_message(b"w0", P.encode(P.StepOutputs([P.Delta("r0", [1], finish_reason="length")])))
        client._drop(inst, "test")
        for stream in streams:
            client.release(stream)
        assert (inst.prefill_blocks, inst.decode_blocks, inst.held_hashes) == (0, 0, {})

    with_client(body)


def test_kv_policy_remembers_prefixes_it_routed_until_events_arrive():
    """Requests for a prefix that an instance has just prefilled follow it there, although its KV
    events have not reached the head yet."""
    pol = KVAware(KVIndex())
    insts = [Inst(i) for i in range(4)]
    prompt = list(range(64))
    first = pol.choose(insts, Route(prompt, PrefixHasher()))
    first.decode_blocks += 16      # the head's account of the first request, past its first token
    assert {pol.choose(insts, Route(prompt + [9], PrefixHasher())).index for _ in range(3)} == {first.index}


def test_kv_policy_temperature_spreads_ties_and_approximate_mode_records():
    idx = ApproxKVIndex()
    insts = [Inst(i) for i in range(4)]
    hot = KVAware(idx, temperature=1.0, record_decisions=True, seed=0)
    picks = {hot.choose(insts, Route(list(range(i * 100, i * 100 + 8)), PrefixHasher())).index
             for i in range(40)}
    assert picks == {0, 1, 2, 3}
    # approximate mode: the same prompt again goes where the first one went (cold: lowest cost wins)
    cold = KVAware(idx, record_decisions=True)
    prompt = list(range(5000, 5064))
    first = cold.choose(insts, Route(prompt, PrefixHasher())).index
    insts[first].decode_blocks = 10        # even with some load there
    assert cold.choose(insts, Route(prompt, PrefixHasher())).index == first


def test_router_owns_the_decision_sessions_and_the_decode_overlap():
    """The Router: a pool's policy picks among its live instances and says what the pick caches; a
    session sticks to its instance while that lives; a decode instance's overlap comes from the
    fleet KV index (its policy looks at load alone); an empty pool is NoInstanceError."""
    import pytest

    from slurmserve.config import KVRoutingConfig
    from slurmserve.router.instance import NoInstanceError
    from slurmserve.router.policies import make_policies
    from slurmserve.router.routing import Router

    def inst(i: int, role: str) -> Instance:
        x = Instance(index=i, role=role, identity=b"i%d" % i, address="127.0.0.1", up=True)
        x.num_kv_blocks, x.block_size = 1000, BS
        return x

    idx = KVIndex()
    prompt = list(range(64))                      # 16 blocks
    prefill, cached, decode = inst(0, "prefill"), inst(1, "prefill"), inst(2, "decode")
    idx.apply(1, [stored(block_hashes(prompt, BS)[:12])])
    idx.apply(2, [stored(block_hashes(prompt, BS)[:5])])
    router = Router([prefill, cached, decode], make_policies("kv", {"prefill", "decode"}, idx, KVRoutingConfig()),
                    kv_index=idx, hasher=PrefixHasher())
    route = router.route(prompt)
    choice = router.choose("prefill", route)
    assert choice.instance is cached and choice.overlap_blocks == 12
    d = router.choose("decode", route)
    assert d.instance is decode and d.overlap_blocks == 5            # from the index, not the policy
    # a session sticks to its first instance, whatever the policy would pick now
    cached.prefill_blocks = 10_000
    assert router.choose("prefill", route, session=b"s").instance is prefill
    cached.prefill_blocks = 0
    assert router.choose("prefill", route, session=b"s").instance is prefill
    prefill.up = False                            # ... while it lives
    assert router.choose("prefill", route, session=b"s").instance is cached
    decode.up = False
    with pytest.raises(NoInstanceError, match="no decode instance"):
        router.choose("decode", route)
