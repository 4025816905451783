"""LoopSocket (slurmserve/zmq_loop.py): ZeroMQ sockets read from the asyncio loop's reader callback,
over real ZeroMQ sockets. Its FD is edge-triggered, so every message must be read however they
arrive: in a burst larger than one drain, one at a time, and after our own sends took the edge."""

from __future__ import annotations

import asyncio

import zmq

from slurmserve import zmq_loop
from slurmserve.zmq_loop import LoopSocket


def _pair(ctx: zmq.Context, name: str) -> tuple[zmq.Socket, zmq.Socket]:
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind(f"inproc://{name}")
    b.connect(f"inproc://{name}")
    return a, b


async def _until(cond, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_every_message_of_a_burst_larger_than_a_drain_is_read():
    n = 2 * zmq_loop._DRAIN_BATCH + 7

    async def main():
        ctx = zmq.Context()
        a, b = _pair(ctx, "burst")
        got, drains = [], []
        for i in range(n):            # queued before the reader exists
            a.send(b"%d" % i)
        ls = LoopSocket(b, got.append, on_drained=lambda: drains.append(len(got)))
        await _until(lambda: len(got) == n)
        ls.close()
        a.close()
        ctx.term()
        return got, drains
    got, drains = asyncio.run(main())
    assert got == [b"%d" % i for i in range(n)]
    assert len(drains) >= 3 and drains[-1] == n     # one drain handles at most _DRAIN_BATCH


def test_messages_trickling_in_and_after_our_own_sends_are_read():
    async def main():
        ctx = zmq.Context()
        a, b = _pair(ctx, "trickle")
        got = []
        ls = LoopSocket(b, got.append)
        for i in range(50):
            a.send(b"%d" % i)
            if i % 3 == 0:
                ls.send(b"ping")          # a send may consume the FD's edge
            await asyncio.sleep(0.001 if i % 2 else 0)
        await _until(lambda: len(got) == 50)
        pings = 0
        while a.poll(100):
            assert a.recv() == b"ping"
            pings += 1
        ls.close()
        a.close()
        ctx.term()
        return got, pings
    got, pings = asyncio.run(main())
    assert got == [b"%d" % i for i in range(50)] and pings == 17


def test_a_handler_that_closes_the_socket_ends_the_drain():
    async def main():
        ctx = zmq.Context()
        a, b = _pair(ctx, "close")
        got = []

        def handle(frame: bytes) -> None:
            got.append(frame)
            if len(got) == 3:
                ls.close()
        for i in range(10):
            a.send(b"%d" % i)
        ls = LoopSocket(b, handle)
        await _until(lambda: len(got) >= 3)
        await asyncio.sleep(0.05)
        a.close()
        ctx.term()
        return got
    assert asyncio.run(main()) == [b"0", b"1", b"2"]


def test_two_frame_messages_keep_their_frames_together():
    async def main():
        ctx = zmq.Context()
        router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        router.bind("inproc://frames")
        dealer.setsockopt(zmq.IDENTITY, b"fe-1")
        dealer.connect("inproc://frames")
        got = []
        ls = LoopSocket(router, lambda ident, payload: got.append((ident, payload)), frames=2)
        for i in range(600):
            dealer.send(b"%d" % i)
        await _until(lambda: len(got) == 600)
        ls.send_to(b"fe-1", b"reply")
        assert dealer.poll(2000) and dealer.recv() == b"reply"
        ls.close()
        dealer.close()
        ctx.term()
        return got
    got = asyncio.run(main())
    assert got == [(b"fe-1", b"%d" % i) for i in range(600)]
