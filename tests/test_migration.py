"""Request migration: a request whose engine instance dies mid-request goes on on another instance,
and its client sees one complete answer. Also what goes with an instance's death: its gauges clear,
and the head's own stalls never make live instances look dead.

Deployments are real (`slurmserve serve` over mpirun, simulated or vLLM engines, the openai client);
the in-process tests drive the head's EngineClient and Orchestrator over a real ZeroMQ socket pair,
with scripted engine ranks on the other end.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time

import psutil
import pytest
import zmq

from slurmserve.config import DeploymentConfig
from slurmserve.tools.local_deployment import LocalDeployment
from slurmserve.tools.local_deployment import metric_value as metric
from slurmserve.router.engine_client import EngineClient
from slurmserve.router.head import Head
from slurmserve.router.instance import Instance
from slurmserve.router.metrics import HeadMetrics
from slurmserve.router.orchestrator import Orchestrator
from slurmserve.router.policies import make_policies
from slurmserve.router.routing import Router
from slurmserve.router.tokenizer import Tokenizer
from slurmserve.runtime import protocol as P

MODEL = "tiny-llama"
RUNNING = "slurmserve:instance_num_requests_running"
MIGRATIONS = "slurmserve:request_migrations_total"


def sim_config(model_dir, workers: int, speedup: float) -> dict:
    return {
        "model": {"path": str(model_dir), "name": MODEL, "max_model_len": 512},
        "engine": {"kind": "sim", "sim": {"speedup": speedup, "num_kv_blocks": 256, "block_size": 16}},
        "pools": {"workers": workers},
        "router": {"host": "127.0.0.1", "port": 0, "policy": "round_robin"},
        "runtime": {"heartbeat_interval_s": 0.25, "heartbeat_timeout_s": 1.5},
    }


def random_tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 500) for _ in range(n)]   # the tiny model's vocabulary is 512


def serving_instance(dep: LocalDeployment, timeout: float = 5.0) -> dict:
    """The one instance whose heartbeat says it runs a request."""
    deadline = time.monotonic() + timeout
    while True:
        m = dep.metrics()
        busy = [i for i in dep.info["instances"] if metric(m, RUNNING, instance=i["index"]) > 0]
        if len(busy) == 1:
            return busy[0]
        assert time.monotonic() < deadline, f"no single busy instance: {busy}"
        time.sleep(0.05)


class Streamed:
    """A streamed completion, chunk by chunk: its text parts, usage and finish reason."""

    def __init__(self):
        self.parts, self.usage, self.finish = [], None, None

    def add(self, chunk) -> None:
        if chunk.usage is not None:
            self.usage = chunk.usage
        if chunk.choices:
            self.parts.append(chunk.choices[0].text)
            self.finish = chunk.choices[0].finish_reason or self.finish


def stream_and_kill(dep: LocalDeployment, prompt: list[int], max_tokens: int, kill_after: int,
                    victim=None) -> tuple[str, object, str, dict]:
    """Stream a greedy completion and SIGKILL the instance serving it (`victim`, else the one whose
    heartbeat says it is busy) once `kill_after` chunks have arrived: (text, usage, finish, victim)."""
    answer = Streamed()
    for chunk in dep.client(timeout=120).completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
        answer.add(chunk)
        if chunk.choices and len(answer.parts) == kill_after:
            victim = victim or serving_instance(dep)
            os.kill(victim["pid"], signal.SIGKILL)
    assert victim is not None, "the answer ended before the kill"
    return "".join(answer.parts), answer.usage, answer.finish, victim


# ---- the simulator: exact continuation, gauges --------------------------------------------------

def sim_tokens(model_dir, prompt: list[int], max_tokens: int) -> list[int]:
    """What the deployment's simulated engines generate for this prompt (they draw tokens seeded by
    the prompt, identically on every instance), from an engine in this process."""
    from slurmserve.runtime.engine import EngineContext, EngineRequest
    from slurmserve.runtime.sim_engine import SimEngine

    sim = dict(sim_config(model_dir, 1, 1.0)["engine"]["sim"], speedup=float("inf"))
    cfg = DeploymentConfig.model_validate({"model": {"path": str(model_dir), "max_model_len": 512},
                                           "engine": {"kind": "sim", "sim": sim}})
    engine = SimEngine(cfg, EngineContext(instance=0, role="worker", host="127.0.0.1",
                                          kv_events_endpoint="", kv_side_channel_port=0))

    async def run():
        await engine.start()
        try:
            return [t async for d in engine.generate(EngineRequest(
                "r", list(prompt), P.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)))
                for t in d.token_ids]
        finally:
            await engine.stop()
    return asyncio.run(run())


def test_killed_instance_request_continues_exactly(tiny_model_dir, tmp_path):
    """SIGKILL the instance under a greedy stream after some tokens: the stream goes on with no
    error, no token lost or doubled, and the usage of one request. The simulator draws tokens
    seeded by the prompt, so its "greedy" continuation of prompt + the first k tokens is what a
    request with that prompt gets: the answer must be exactly the first k tokens of the unmigrated
    answer, then that. The dead instance's gauges go to 0."""
    dep = LocalDeployment(tmp_path, sim_config(tiny_model_dir, workers=2, speedup=0.1)).start()  # 60 ms a token
    tok = Tokenizer(tiny_model_dir)
    prompt, n = random_tokens(40, seed=5), 48
    try:
        c = dep.client(timeout=120)
        plain = c.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
        text, usage, finish, victim = stream_and_kill(dep, prompt, n, kill_after=8)
        m = dep.metrics()
        assert metric(m, MIGRATIONS) == 1
        assert metric(m, "slurmserve:requests_total", finish_reason="error") == 0
        assert (usage.prompt_tokens, usage.completion_tokens, finish) == (len(prompt), n, "length")
        # item 9a: a dead instance's gauges do not keep their last heartbeat's values
        assert metric(m, "slurmserve:instance_up", instance=victim["index"]) == 0
        assert metric(m, RUNNING, instance=victim["index"]) == 0
    finally:
        assert dep.stop() == 0, dep.output()
        dep.kill()
    whole = sim_tokens(tiny_model_dir, prompt, n)
    assert plain == tok.decode(whole), "the in-process engine must reproduce the deployment's"
    # k: the tokens the head had when the instance died (at least the chunks read before the kill)
    matches = [k for k in range(1, n)
               if text == tok.decode(whole[:k] + sim_tokens(tiny_model_dir, prompt + whole[:k], n - k))]
    assert matches and matches[0] >= 8, (text, plain)
    assert text != plain, "the continuation comes from the continued prompt, not the old instance"


def test_disaggregated_request_migrates_to_another_decode_instance(tiny_model_dir, tmp_path):
    """Prefilled remotely, then its decode instance dies: it goes on on the other decode instance
    (which prefills prompt + tokens itself); the usage counts the first leg's cached tokens only."""
    cfg = sim_config(tiny_model_dir, workers=1, speedup=0.1)
    cfg["pools"] = {"prefill": 1, "decode": 2}
    cfg["router"]["disagg"] = {"min_uncached_tokens": 0, "min_uncached_fraction": 0.0}   # always remote
    dep = LocalDeployment(tmp_path, cfg).start()
    try:
        prompt = random_tokens(40, seed=6)
        text, usage, finish, victim = stream_and_kill(dep, prompt, 32, kill_after=6)
        assert victim["role"] == "decode" and text
        assert (usage.prompt_tokens, usage.completion_tokens, finish) == (len(prompt), 32, "length")
        assert len(prompt) - 16 <= usage.prompt_tokens_details.cached_tokens <= len(prompt)
        m = dep.metrics()
        assert metric(m, MIGRATIONS) == 1
        assert metric(m, "slurmserve:disagg_requests_total", path="remote_prefill") == 1
    finally:
        assert dep.stop() == 0, dep.output()
        dep.kill()


def test_migration_under_load(tiny_model_dir, tmp_path):
    """300 streamed requests, 16 at a time, through the openai client; one of 3 engine ranks is
    SIGKILLed a third of the way: every answer is complete and no client sees an error."""
    import openai

    dep = LocalDeployment(tmp_path, sim_config(tiny_model_dir, workers=3, speedup=1.0)).start()
    tok = Tokenizer(tiny_model_dir)
    n_tokens, total, done = 40, 300, []
    try:
        client = openai.AsyncOpenAI(base_url=dep.info["url"], api_key=dep.api_key, max_retries=0, timeout=60)
        victim = dep.info["instances"][0]["pid"]

        async def one(i: int):
            prompt = f"request {i} : " + " ".join(str(random.Random(i).randrange(1000)) for _ in range(8))
            answer = Streamed()
            async for chunk in await client.completions.create(
                    model=MODEL, prompt=prompt, max_tokens=n_tokens, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
                answer.add(chunk)
            done.append(i)
            if len(done) == total // 3:
                os.kill(victim, signal.SIGKILL)
            return prompt, "".join(answer.parts), answer.usage, answer.finish

        async def main():
            sem = asyncio.Semaphore(16)

            async def limited(i):
                async with sem:
                    return await one(i)
            try:
                return await asyncio.gather(*(limited(i) for i in range(total)), return_exceptions=True)
            finally:
                await client.close()

        results = asyncio.run(main())
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, f"{len(errors)} client errors, e.g. {errors[0]!r}"
        for prompt, text, usage, finish in results:
            assert finish == "length" and text
            assert (usage.prompt_tokens, usage.completion_tokens) == (len(tok.encode(prompt)), n_tokens)
        m = dep.metrics()
        assert metric(m, MIGRATIONS) >= 1, "the kill must have caught requests in flight"
        assert metric(m, "slurmserve:requests_total", finish_reason="length") == total
        assert metric(m, "slurmserve:instance_up", instance=0) == 0
    finally:
        assert dep.stop() == 0, dep.output()
        dep.kill()


# ---- the head in process, over a real ZeroMQ socket pair -----------------------------------------

IDENTITY = b"instance-0"


class Engine(threading.Thread):
    """A DEALER that heartbeats like engine rank `index` every 50 ms until `stop` (or `silent`: a
    rank that hangs), and answers each Generate with `tokens` in one step, unfinished."""

    def __init__(self, zctx, endpoints, index: int = 0, tokens: list[int] | None = None):
        super().__init__(daemon=True)
        self.zctx, self.endpoints, self.index, self.tokens = zctx, endpoints, index, tokens
        self.stop, self.silent = threading.Event(), threading.Event()
        self.generates: list[P.Generate] = []

    def run(self):
        dealer = self.zctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, f"instance-{self.index}".encode())
        dealer.curve_serverkey = self.endpoints["control_key"].encode()
        dealer.curve_publickey, dealer.curve_secretkey = zmq.curve_keypair()
        dealer.connect(self.endpoints["control"])
        beat = P.encode(P.Heartbeat(self.index, P.Load(running=3, waiting=1, kv_usage=0.5)))
        next_beat = 0.0
        while not self.stop.is_set():
            if self.silent.is_set():
                time.sleep(0.01)
                continue
            if time.monotonic() >= next_beat:
                dealer.send(beat)
                next_beat = time.monotonic() + 0.05
            if dealer.poll(10):
                msg = P.decode_to_worker(dealer.recv())
                if type(msg) is P.Generate:
                    self.generates.append(msg)
                    if self.tokens:
                        dealer.send(P.encode(P.StepOutputs([P.Delta(msg.req_id, self.tokens)])))
        dealer.close(linger=0)


async def until(cond, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("limit", [3, 0])
def test_migrated_leg_continues_the_prompt_within_the_budget(limit):
    """Instance 0 streams 3 tokens and hangs: the request goes on on instance 1 with the prompt +
    those tokens, max_tokens and min_tokens less 3, and its seed; the answer gets no error. With
    `migration_limit` 0, the answer ends with the error as before."""
    zctx, sock, endpoints = Head.bind_control_socket("127.0.0.1")
    engines = [Engine(zctx, endpoints, 0, tokens=[7, 8, 9]), Engine(zctx, endpoints, 1)]
    for e in engines:
        e.start()
    metrics = HeadMetrics("m")
    insts = [Instance(index=i, role="worker", identity=f"instance-{i}".encode(), address="127.0.0.1")
             for i in (0, 1)]

    async def main():
        client = EngineClient(sock, insts, metrics, heartbeat_timeout_s=0.5)
        router = Router(insts, make_policies("round_robin", {"worker"}))
        orch = Orchestrator(client, router, metrics, disaggregated=False, migration_limit=limit)
        client.start()
        await until(lambda: all(i.up for i in insts), "both instances up")
        params = P.SamplingParams(max_tokens=10, min_tokens=5, seed=42, temperature=0.0)
        stream = await orch.start("r", [1, 2, 3], params)    # round robin: instance 0
        got = []
        stream.attach(got.append)
        await until(lambda: got, "the first tokens")
        engines[0].silent.set()
        await until(lambda: engines[1].generates or got[-1].finish_reason, "a migration or the error")
        if limit:
            (leg,) = engines[1].generates
            assert leg.prompt_token_ids == [1, 2, 3, 7, 8, 9]
            assert leg.params == P.SamplingParams(max_tokens=7, min_tokens=2, seed=42, temperature=0.0)
            assert [(d.token_ids, d.finish_reason) for d in got] == [([7, 8, 9], None)]
            assert stream.leg.instance is insts[1]
        else:
            assert engines[1].generates == []
            assert [d.finish_reason for d in got] == [None, "error"]
        orch.release(stream)
        await client.close("test over", grace_s=0)

    try:
        asyncio.run(main())
    finally:
        for e in engines:
            e.stop.set()
            e.join()
        sock.close(linger=0)
        zctx.term()
    assert metric(metrics.render().decode(), MIGRATIONS) == (1 if limit else 0)


def test_head_loop_stall_drops_no_instance():
    """A head whose event loop is blocked longer than the heartbeat timeout (a huge prompt
    tokenized on the loop, say) must not take its live instances for dead; an instance that
    really falls silent is still dropped, and its load gauges go to 0."""
    zctx, sock, endpoints = Head.bind_control_socket("127.0.0.1")
    engine = Engine(zctx, endpoints)
    engine.start()
    metrics = HeadMetrics("m")
    inst = Instance(index=0, role="worker", identity=IDENTITY, address="127.0.0.1")

    async def main():
        client = EngineClient(sock, [inst], metrics, heartbeat_timeout_s=0.5)   # ticks every 0.125 s
        client.start()
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + 10
        while not inst.up:
            assert time.monotonic() < deadline, "the instance never came up"
            await asyncio.sleep(0.01)
        failed = []   # a request in flight there: dropping the instance would fail it
        client.submit(inst, "r", [1, 2, 3], P.SamplingParams()).attach(failed.append)
        for _ in range(3):
            # The worst case: the watchdog's wake-up is queued before the stall, and so runs
            # before the heartbeats that came meanwhile are read. `a` lets the watchdog's timer
            # come due; `c`, run in the loop iteration that fires it, queues the stall `b` just
            # ahead of the watchdog's tick.
            stalled = loop.create_future()

            def a():
                time.sleep(0.2)
                loop.call_soon(c)

            def c():
                loop.call_soon(b)

            def b():
                time.sleep(1.2)
                stalled.set_result(None)

            loop.call_soon(a)
            await stalled
            await asyncio.sleep(0.3)
            assert inst.up and not failed, "a stall of the head's loop dropped a live instance"
        assert metric(metrics.render().decode(), RUNNING, instance="0") == 3
        engine.stop.set()
        silent = time.monotonic()
        while inst.up:
            assert time.monotonic() - silent < 2.0, "a silent instance was not dropped"
            await asyncio.sleep(0.02)
        assert [d.finish_reason for d in failed] == ["error"]
        await client.close("test over", grace_s=0)

    try:
        asyncio.run(main())
    finally:
        engine.stop.set()
        engine.join()
        sock.close(linger=0)
        zctx.term()
    text = metrics.render().decode()
    assert metric(text, RUNNING, instance="0") == 0
    assert metric(text, "slurmserve:instance_num_requests_waiting", instance="0") == 0
    assert metric(text, "slurmserve:instance_kv_cache_usage_perc", instance="0") == 0


# ---- vLLM ---------------------------------------------------------------------------------------

@pytest.mark.vllm
def test_vllm_migrated_greedy_answer_equals_unmigrated(tiny_model_dir, tmp_path):
    """With real vLLM engines, greedy decoding continues a prompt + its first tokens exactly as it
    would have gone on: the migrated answer is the unmigrated one, token for token."""
    import vllm_cpu

    cfg = {
        "model": {"path": str(tiny_model_dir), "name": MODEL, "max_model_len": vllm_cpu.MAX_MODEL_LEN},
        "engine": {"kind": "vllm", "args": vllm_cpu.ENGINE_ARGS},
        "pools": {"workers": 2},
        "router": {"host": "127.0.0.1", "port": 0, "policy": "round_robin"},
        "runtime": {"heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 2.0},
    }
    prompt, n = [(7 * i + 13) % 300 + 10 for i in range(40)], 160
    with vllm_cpu.cpu_env():
        dep = LocalDeployment(tmp_path, cfg)
        procs = []
        try:
            dep.start(timeout=300)
            procs = [p for i in dep.info["instances"] for p in [psutil.Process(i["pid"])]
                     + psutil.Process(i["pid"]).children(recursive=True)]
            c = dep.client(timeout=120)
            plain = c.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text
            # round robin: the first request went to instance 0, this one goes to instance 1
            text, usage, finish, _ = stream_and_kill(dep, prompt, n, kill_after=4,
                                                     victim=dep.info["instances"][1])
            assert metric(dep.metrics(), MIGRATIONS) == 1
            assert (usage.prompt_tokens, usage.completion_tokens, finish) == (len(prompt), n, "length")
            assert text == plain
        finally:
            dep.stop()
            dep.kill()
            for p in procs:   # the killed rank's engine process, orphaned
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
