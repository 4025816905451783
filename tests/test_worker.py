"""Flow control of the engine ranks' output, one side at a time over the real CURVE control socket:
a Worker with the test playing the head (at most OUTPUT_WINDOW step messages unread, the rest
merged), and the head's EngineClient with the test playing a worker (it confirms full windows)."""

from __future__ import annotations

import asyncio
import struct
import threading
import time

import zmq

from slurmserve.router.engine_client import EngineClient
from slurmserve.router.head import Head
from slurmserve.router.instance import Instance
from slurmserve.router.metrics import HeadMetrics
from slurmserve.runtime import protocol as P
from slurmserve.runtime.engine import EngineRequest
from slurmserve.runtime.worker import Worker
from test_sim_engine import make_engine, params


IDENTITY = b"instance-0"


class FakeHead:
    """The head's control socket, read by hand."""

    def __init__(self):
        self.zctx, self.sock, self.endpoints = Head.bind_control_socket("127.0.0.1")

    def recv(self, timeout_s: float = 5.0):
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        identity, payload = self.sock.recv_multipart()
        return identity, P.decode_to_head(payload)

    async def next(self, kind: type, timeout_s: float = 5.0):
        """The next message of this kind, skipping others (heartbeats)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (left := deadline - loop.time()) > 0:
            got = await loop.run_in_executor(None, self.recv, left)
            if got is not None and type(got[1]) is kind:
                return got[1]
        return None

    async def next_outputs(self, timeout_s: float = 5.0) -> P.StepOutputs | None:
        return await self.next(P.StepOutputs, timeout_s)

    async def start_worker(self, engine, heartbeat_interval_s: float = 60.0) -> asyncio.Task:
        """Run a Worker for instance 0 and wait for its first heartbeat (kept in `first_heartbeat`):
        the ROUTER drops what is sent to a peer before it has connected."""
        self.worker = worker = Worker(lambda: engine, self.endpoints["control"], self.endpoints["control_key"].encode(),
                        instance=0, heartbeat_interval_s=heartbeat_interval_s, head_timeout_s=60.0)
        run = asyncio.create_task(worker.run())
        self.first_heartbeat = await self.next(P.Heartbeat)
        assert self.first_heartbeat is not None
        return run

    def send(self, identity: bytes, msg) -> None:
        self.sock.send_multipart([identity, P.encode(msg)])

    def close(self):
        self.sock.close(linger=0)
        self.zctx.term()


def with_worker(model_dir, body, engine=None, heartbeat_interval_s: float = 60.0) -> None:
    """Run `body(head)` against a worker for instance 0 over the sim engine (speedup inf: a
    request's steps all run at once), then shut the worker down."""
    head = FakeHead()

    async def main():
        run = await head.start_worker(engine or make_engine(model_dir), heartbeat_interval_s)
        await body(head)
        head.send(IDENTITY, P.Shutdown("test over"))
        await asyncio.wait_for(run, 10)

    try:
        asyncio.run(main())
    finally:
        head.close()


def test_a_worker_that_is_not_read_merges_later_steps_into_one_message(tiny_model_dir):
    """While the head reads nothing, the worker sends OUTPUT_WINDOW step messages and holds the
    rest; once told they were read, everything held leaves as one delta per request, in order."""
    prompts = {"a": list(range(5, 25)), "b": list(range(9, 29))}

    async def body(head):
        for req_id, prompt in prompts.items():
            head.send(IDENTITY, P.Generate(req_id, prompt, params(64)))
        window = [await head.next_outputs() for _ in range(P.OUTPUT_WINDOW)]
        assert all(window), "the worker sends its first steps at once"
        assert await head.next_outputs(timeout_s=0.5) is None, "and no more while they are unread"
        await asyncio.sleep(0.2)   # both requests finish meanwhile

        head.send(IDENTITY, P.Consumed(read=P.OUTPUT_WINDOW))
        held = await head.next_outputs()
        assert held is not None
        assert sorted(d.req_id for d in held.deltas) == ["a", "b"], "one delta per request"
        assert all(d.finish_reason == "length" for d in held.deltas)

        tokens: dict[str, list[int]] = {"a": [], "b": []}
        for msg in (*window, held):
            for d in msg.deltas:
                tokens[d.req_id] += d.token_ids
        solo = make_engine(tiny_model_dir)
        await solo.start()
        try:   # nothing lost, repeated or reordered: the tokens an engine read at once gives
            for req_id, prompt in prompts.items():
                alone = [t async for d in solo.generate(EngineRequest(req_id, prompt, params(64)))
                         for t in d.token_ids]
                assert len(alone) == 64 and tokens[req_id] == alone
        finally:
            await solo.stop()

    with_worker(tiny_model_dir, body)


def test_a_ping_reopens_the_window_when_a_confirmation_is_lost(tiny_model_dir):
    """Pings come every quarter second; one stands in for a lost Consumed."""

    async def body(head):
        head.send(IDENTITY, P.Generate("a", list(range(20)), params(32)))
        for _ in range(P.OUTPUT_WINDOW):
            assert await head.next_outputs() is not None
        assert await head.next_outputs(timeout_s=0.3) is None
        head.send(IDENTITY, P.Ping())
        rest = await head.next_outputs()
        assert rest is not None and rest.deltas[-1].finish_reason == "length"

    with_worker(tiny_model_dir, body)


def head_and_dealer():
    """The head's control socket and a DEALER connected to it as instance 0 (the test plays the worker)."""
    zctx, sock, endpoints = Head.bind_control_socket("127.0.0.1")
    dealer = zctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, IDENTITY)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.curve_serverkey = endpoints["control_key"].encode()
    dealer.curve_publickey, dealer.curve_secretkey = zmq.curve_keypair()
    dealer.connect(endpoints["control"])
    return zctx, sock, dealer


def run_client(main, zctx, sock, dealer) -> None:
    """asyncio.run(main()), then close the sockets whatever happened."""
    try:
        asyncio.run(main())
    finally:
        dealer.close(linger=0)
        sock.close(linger=0)
        zctx.term()


def test_the_head_confirms_each_full_window_once_it_has_read_it():
    """Without confirmations a worker would wait for the next ping (a quarter second) every
    OUTPUT_WINDOW steps: everything would still work, only slowly, so this is checked directly."""
    zctx, sock, dealer = head_and_dealer()

    def confirmations(wait_s: float) -> list[int]:
        """The `read` counts of the Consumed messages that arrive within wait_s (pings skipped)."""
        got, deadline = [], time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0:
            if dealer.poll(int(left * 1000) + 1):
                msg = P.decode_to_worker(dealer.recv())
                if type(msg) is P.Consumed:
                    got.append(msg.read)
        return got

    async def main():
        inst = Instance(index=0, role="worker", identity=IDENTITY, address="127.0.0.1")
        client = EngineClient(sock, [inst], HeadMetrics("m"), heartbeat_timeout_s=60.0)
        client.start()
        loop = asyncio.get_running_loop()
        step = P.encode(P.StepOutputs([P.Delta("r", [7])]))
        for _ in range(P.OUTPUT_WINDOW - 1):
            dealer.send(step)
        assert await loop.run_in_executor(None, confirmations, 0.3) == [], "a window not yet full"
        dealer.send(step)
        assert await loop.run_in_executor(None, confirmations, 0.3) == [P.OUTPUT_WINDOW]
        for _ in range(2 * P.OUTPUT_WINDOW):
            dealer.send(step)
        # one confirmation per drain that filled a window, carrying everything read so far; the
        # drains may split the messages so that the last few fill no window, and that is fine
        # as long as what stays unconfirmed leaves the worker room to send
        got = await loop.run_in_executor(None, confirmations, 0.3)
        assert got and got == sorted(got) and 3 * P.OUTPUT_WINDOW - got[-1] < P.OUTPUT_WINDOW
        await client.close("test over", grace_s=0)

    run_client(main, zctx, sock, dealer)


def test_first_ready_heartbeat_declares_the_engine(tiny_model_dir):
    """Heartbeats say ready=False while the engine starts; the first ready one carries the engine's
    declaration (protocol.EngineInfo), later ones do not."""
    engine = make_engine(tiny_model_dir)

    async def body(head):
        beats = [head.first_heartbeat]
        while len([b for b in beats if b.ready]) < 3:
            beats.append(await head.next(P.Heartbeat))
        ready = [b for b in beats if b.ready]
        assert all(b.info is None for b in beats if not b.ready)
        assert ready[0].info == engine.info() and ready[0].info.kind == "sim"
        assert all(b.info is None for b in ready[1:])

    with_worker(tiny_model_dir, body, engine, heartbeat_interval_s=0.05)


def test_a_worker_told_to_stop_reads_why_before_it_sees_the_head_go(tiny_model_dir):
    """The head sends Shutdown(failed) and exits. The disconnect comes on the monitor socket, which
    the loop may read first: the worker must still act on the Shutdown queued before it, and not
    report the head as vanished (regression: one of two workers did, in CI)."""

    async def body(head):
        head.send(IDENTITY, P.Shutdown("the head failed: test", failed=True))
        time.sleep(0.3)   # blocks the loop: the Shutdown sits unread in the worker's socket
        disconnected = struct.pack("=hi", zmq.EVENT_DISCONNECTED, 0)
        head.worker._on_monitor_event(disconnected, head.endpoints["control"].encode())
        assert head.worker.gave_up is None
        assert head.worker.deployment_failed is True

    with_worker(tiny_model_dir, body)


def test_closing_waits_for_the_goodbye_of_an_instance_still_starting():
    """A failed head tells every instance to stop, the ones still loading their engine included,
    and closes its socket only after they said goodbye (or the grace ran out): its LINGER is 0,
    so a socket closed at once drops the Shutdown it just queued (regression: close waited only
    for instances that were up, so a starting worker never heard why the head went)."""
    zctx, sock, dealer = head_and_dealer()
    heard: list = []

    def starting_worker():
        """Heartbeats ready=False until a Shutdown comes; then a goodbye, after a delay."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            dealer.send(P.encode(P.Heartbeat(0, P.Load(), ready=False)))
            if dealer.poll(50) and type(msg := P.decode_to_worker(dealer.recv())) is P.Shutdown:
                heard.append(msg)
                time.sleep(0.3)
                heard.append(time.monotonic())
                dealer.send(P.encode(P.Goodbye(0, "shutdown")))
                return

    async def main():
        inst = Instance(index=0, role="worker", identity=IDENTITY, address="127.0.0.1")
        client = EngineClient(sock, [inst], HeadMetrics("m"), heartbeat_timeout_s=60.0)
        client.start()
        thread = threading.Thread(target=starting_worker)
        thread.start()
        while not inst.last_seen:
            await asyncio.sleep(0.01)
        await client.close("the head failed: test", grace_s=5.0, failed=True)
        closed = time.monotonic()
        thread.join()
        assert heard and heard[0].failed and heard[0].reason == "the head failed: test"
        assert closed >= heard[1], "the socket stayed open until the goodbye"

    run_client(main, zctx, sock, dealer)
