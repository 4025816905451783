"""The engine rank's loop against the head's real control socket (CURVE ROUTER), the test playing
the head: one message per engine step, and at most OUTPUT_WINDOW of them unread."""

from __future__ import annotations

import asyncio

from slurmserve.router.head import Head
from slurmserve.runtime import protocol as P
from slurmserve.runtime.engine import EngineRequest
from slurmserve.runtime.worker import Worker
from test_sim_engine import make_engine, model_dir, params  # noqa: F401  (model_dir: fixture)


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

    async def start_worker(self, engine) -> asyncio.Task:
        """Run a Worker for instance 0 and wait for its first heartbeat: the ROUTER drops what
        is sent to a peer before it has connected."""
        worker = Worker(engine, self.endpoints["control"], self.endpoints["control_key"].encode(),
                        instance=0, heartbeat_interval_s=60.0, head_timeout_s=60.0)
        run = asyncio.create_task(worker.run())
        assert await self.next(P.Heartbeat) is not None
        return run

    def send(self, identity: bytes, msg) -> None:
        self.sock.send_multipart([identity, P.encode(msg)])

    def close(self):
        self.sock.close(linger=0)
        self.zctx.term()


def with_worker(model_dir, body) -> None:
    """Run `body(head)` against a worker for instance 0 over the sim engine (speedup inf: a
    request's steps all run at once), then shut the worker down."""
    head = FakeHead()

    async def main():
        run = await head.start_worker(make_engine(model_dir))
        await body(head)
        head.send(IDENTITY, P.Shutdown("test over"))
        await asyncio.wait_for(run, 10)

    try:
        asyncio.run(main())
    finally:
        head.close()


def test_a_worker_that_is_not_read_merges_later_steps_into_one_message(model_dir):
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
        solo = make_engine(model_dir)
        await solo.start()
        try:   # nothing lost, repeated or reordered: the tokens an engine read at once gives
            for req_id, prompt in prompts.items():
                alone = [t async for d in solo.generate(EngineRequest(req_id, prompt, params(64)))
                         for t in d.token_ids]
                assert len(alone) == 64 and tokens[req_id] == alone
        finally:
            await solo.stop()

    with_worker(model_dir, body)


def test_a_ping_reopens_the_window_when_a_confirmation_is_lost(model_dir):
    """Pings come every quarter second; one stands in for a lost Consumed."""

    async def body(head):
        head.send(IDENTITY, P.Generate("a", list(range(20)), params(32)))
        for _ in range(P.OUTPUT_WINDOW):
            assert await head.next_outputs() is not None
        assert await head.next_outputs(timeout_s=0.3) is None
        head.send(IDENTITY, P.Ping())
        rest = await head.next_outputs()
        assert rest is not None and rest.deltas[-1].finish_reason == "length"

    with_worker(model_dir, body)
