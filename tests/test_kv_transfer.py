"""kvfabric's KV transfer between real processes: NIXL (UCX) and the ZeroMQ fallback, peer death and
recovery, the side channel's authentication, and the simulator's disaggregated mode moving real KV."""

from __future__ import annotations

import asyncio
import hashlib
import json
import multiprocessing as mp
import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from slurmserve.kvfabric.kv_transfer import KVTransferError, create_kv_transfer
from slurmserve.runtime.engine import EngineRequest
from slurmserve.runtime.protocol import SamplingParams
from slurmserve.runtime.sim.kv_bytes import fill_kv, kv_matches

SPAWN = mp.get_context("spawn")    # NIXL/UCX state must not be forked
BS = 16                            # tokens per block
BPT = 256                          # KV bytes per token
BLOCK = BS * BPT
NBLOCKS = 64


def _reply_within(conn, seconds: float = 60.0):
    if not conn.poll(seconds):
        raise TimeoutError("the peer process did not answer")
    return conn.recv()


def _transfer_main(conn, backend: str, name: str, port: int, keys) -> None:
    """A prefill-side process: one KVTransfer, driven over a pipe."""
    t = create_kv_transfer(backend, name=name, host="127.0.0.1", port=port, num_blocks=NBLOCKS,
                           block_bytes=BLOCK, curve_keys=keys, peer_keys={})
    read: dict[str, bool] = {}
    changed = threading.Condition()

    def on_done(tag, ok):
        with changed:
            read[tag] = ok
            changed.notify_all()

    conn.send(t.port)
    while True:
        cmd, *args = conn.recv()
        if cmd == "export":
            tag, ids, tokens = args
            fill_kv(t.buffer, BS, ids, tokens, 0, len(tokens))
            conn.send(t.export(tag, ids, len(tokens), lambda ok, tag=tag: on_done(tag, ok)))
        elif cmd == "sha":
            conn.send(hashlib.sha256(t.buffer[np.asarray(args[0])].tobytes()).hexdigest())
        elif cmd == "wait_read":
            with changed:
                changed.wait_for(lambda: args[0] in read, timeout=30)
            conn.send((read.get(args[0]), dict(t.stats, pending=t.pending_exports())))
        elif cmd == "stats":
            conn.send(dict(t.stats, pending=t.pending_exports()))
        elif cmd == "stop":
            t.close()
            conn.send("bye")
            return


class Peer:
    """A child process running `target(conn, *args)`; the first message it sends is its port."""

    def __init__(self, target, *args):
        self.conn, child = SPAWN.Pipe()
        self.proc = SPAWN.Process(target=target, args=(child, *args), daemon=True)
        self.proc.start()
        self.port = _reply_within(self.conn)

    def call(self, *msg):
        self.conn.send(msg)
        return _reply_within(self.conn)

    def stop(self) -> None:
        if self.proc.is_alive():
            assert self.call("stop") == "bye"
        self.proc.join(10)
        assert self.proc.exitcode == 0, f"peer exited with {self.proc.exitcode}"

    def pause(self) -> None:
        """SIGSTOP, and wait until the kernel shows the process stopped."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        while open(f"/proc/{self.proc.pid}/stat").read().rpartition(")")[2].split()[0] not in "Tt":
            time.sleep(0.001)

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)      # also ends a stopped process, without running it
        self.proc.join(10)


def keypair():
    return zmq.curve_keypair()


def decode_side(backend: str, peers: dict[int, bytes], keys=None, **kw):
    return create_kv_transfer(backend, name="decode", host="127.0.0.1", port=0, num_blocks=NBLOCKS,
                              block_bytes=BLOCK, curve_keys=keys or keypair(),
                              peer_keys={f"127.0.0.1:{p}": k for p, k in peers.items()}, **kw)


def sha(t, ids) -> str:
    return hashlib.sha256(t.buffer[np.asarray(ids)].tobytes()).hexdigest()


@pytest.mark.parametrize("backend", ["nixl", "zmq"])
def test_bytes_arrive_intact_and_reads_notify_the_exporter(backend):
    """Two exports pulled into scattered local blocks: the bytes equal the exporter's, they are the
    KV of the exported tokens, and the exporter learns of each read by notification."""
    pk = keypair()
    peer = Peer(_transfer_main, backend, "prefill-0", 0, pk)
    t = decode_side(backend, {peer.port: pk[0]})
    try:
        tokens_a = list(range(1000, 1100))                 # 100 tokens: 7 blocks, the last one partial
        tokens_b = [7] * 40 + list(range(50))
        src_a, src_b = [3, 9, 4, 20, 21, 22, 63], [0, 1, 2, 5, 6, 7]
        pa = peer.call("export", "req-a", src_a, tokens_a)
        pb = peer.call("export", "req-b", src_b, tokens_b)
        assert pa["kv_backend"] == backend and pa["remote_block_ids"] == src_a
        dst_a, dst_b = [40, 11, 12, 13, 50, 2, 1], [30, 31, 8, 33, 60, 61]
        assert t.import_(pa, dst_a) == 7 * BLOCK
        assert t.import_(pb, dst_b) == 6 * BLOCK
        assert sha(t, dst_a) == peer.call("sha", src_a) and sha(t, dst_b) == peer.call("sha", src_b)
        assert kv_matches(t.buffer, BS, dst_a, tokens_a, 0, 100)
        assert kv_matches(t.buffer, BS, dst_b, tokens_b, 0, 90)
        assert not kv_matches(t.buffer, BS, dst_a, tokens_b + tokens_a, 0, 100)   # checking is real
        for tag in ("req-a", "req-b"):
            ok, stats = peer.call("wait_read", tag)
            assert ok is True, stats
        assert stats["exports_done"] == 2 and stats["pending"] == 0 and stats["exports_expired"] == 0
        assert t.stats["handshakes"] == 1 and t.stats["imports"] == 2 and t.stats["bytes_in"] == 13 * BLOCK
        # a subset of an export (the decode side had the first blocks cached), and an empty one
        pc = peer.call("export", "req-c", src_a, tokens_a)
        assert t.import_(pc, [14, 15], remote_block_ids=src_a[5:]) == 2 * BLOCK
        assert sha(t, [14, 15]) == peer.call("sha", src_a[5:])
        pd = peer.call("export", "req-d", src_b, tokens_b)
        assert t.import_(pd, [], remote_block_ids=[]) == 0
        assert peer.call("wait_read", "req-c")[0] is True and peer.call("wait_read", "req-d")[0] is True
    finally:
        t.close()
        peer.stop()


def test_peer_killed_mid_transfer_then_agent_re_added():
    """A READ in flight when the exporter dies raises KVTransferError and drops its agent; the
    restarted exporter (same agent name, same side channel) is added again on the next pull."""
    pk = keypair()
    peer = Peer(_transfer_main, "nixl", "prefill-0", 0, pk)
    port = peer.port
    t = decode_side("nixl", {port: pk[0]})
    try:
        tokens = list(range(200, 200 + 16 * 32))
        ids = list(range(32))
        t.import_(peer.call("export", "warm", ids, tokens), ids)
        params = peer.call("export", "victim", ids, tokens)
        peer.pause()                       # the exporter stops progressing: the READ stays in flight
        fut = t.import_async(params, list(range(32, 64)))
        while t.in_flight == 0 and not fut.done():
            time.sleep(0.001)
        assert not fut.done()
        peer.kill()
        with pytest.raises(KVTransferError, match="prefill-0"):
            fut.result(timeout=30)
        assert t.stats["peers_dropped"] == 1 and t.stats["import_failures"] == 1

        peer = Peer(_transfer_main, "nixl", "prefill-0", port, pk)   # restarted, same name and port
        params = peer.call("export", "after", ids, tokens)
        assert t.import_(params, list(range(32, 64))) == 32 * BLOCK
        assert kv_matches(t.buffer, BS, list(range(32, 64)), tokens, 0, len(tokens))
        assert t.stats["handshakes"] == 2 and t.stats["imports"] == 2
        peer.stop()
    finally:
        t.close()
        peer.kill()


def _ask_for_metadata(endpoint: str, curve_server_key: bytes | None) -> bool:
    """Ask for the NIXL metadata like a stranger would; True if the side channel answered. Waits for
    the handshake's outcome (a ZeroMQ monitor event), then, if it succeeded, for the answer."""
    from zmq.utils.monitor import recv_monitor_message
    failed = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
              zmq.EVENT_HANDSHAKE_FAILED_AUTH}
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if curve_server_key is not None:
        s.curve_serverkey = curve_server_key
        s.curve_publickey, s.curve_secretkey = zmq.curve_keypair()
    mon = s.get_monitor_socket()
    s.connect(endpoint)
    s.send(b"MD")
    outcome = None
    while outcome is None and mon.poll(30_000):
        event = recv_monitor_message(mon)["event"]
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED or event in failed:
            outcome = event
    answered = outcome == zmq.EVENT_HANDSHAKE_SUCCEEDED and bool(s.poll(30_000))
    s.disable_monitor()
    mon.close(linger=0)
    s.close(linger=0)
    ctx.term()
    assert outcome is not None, "no handshake outcome"
    return answered


@pytest.mark.parametrize("backend", ["nixl", "zmq"])
def test_side_channel_refuses_peers_without_the_key(backend):
    pk = keypair()
    peer = Peer(_transfer_main, backend, "prefill-0", 0, pk)
    endpoint = f"tcp://127.0.0.1:{peer.port}"
    try:
        params = peer.call("export", "r", [1, 2], list(range(32)))
        assert not _ask_for_metadata(endpoint, None)            # plain ZeroMQ: handshake fails
        assert not _ask_for_metadata(endpoint, keypair()[0])    # CURVE with a guessed key: fails
        assert _ask_for_metadata(endpoint, pk[0])               # the job's key (sanity)
        with decode_side(backend, {peer.port: keypair()[0]}, handshake_timeout_s=1.0) as wrong:
            with pytest.raises(KVTransferError, match="no answer"):
                wrong.import_(params, [1, 2])
        with decode_side(backend, {}) as stranger:            # an address outside the job's list
            with pytest.raises(KVTransferError, match="not a KV side channel of this job"):
                stranger.import_(params, [1, 2])
        stats = peer.call("stats")                            # nothing was read
        assert stats["exports_done"] == 0 and stats["pending"] == 1
    finally:
        peer.stop()


# ---- the simulator ------------------------------------------------------------------------------

# 64 KiB blocks: UCX reads them with a protocol that needs the exporter to progress, so a stopped
# exporter keeps the pull in flight (smaller reads can complete from the reader's side alone)
SIM_BPT = 4096


def _sim_cfg(model_dir, backend):
    from slurmserve.config import DeploymentConfig
    return DeploymentConfig.model_validate({
        "model": {"path": str(model_dir), "max_model_len": 1024},
        "engine": {"kind": "sim", "sim": {"speedup": float("inf"), "num_kv_blocks": 128, "block_size": BS,
                                          "kv_bytes_per_token": SIM_BPT, "kv_transfer": backend}}})


def _sim_engine(model_dir, backend, instance, role, port, keys, peer_keys):
    from slurmserve.kvfabric.block_hash import DEFAULT_HASH_SEED
    from slurmserve.runtime.engine import EngineContext
    from slurmserve.runtime.sim_engine import SimEngine
    ctx = EngineContext(instance=instance, role=role, host="127.0.0.1", kv_events_endpoint="",
                        kv_side_channel_port=port, extra={"hash_seed": DEFAULT_HASH_SEED,
                                                          "kv_side_channel_keys": keys,
                                                          "kv_peer_keys": peer_keys})
    return SimEngine(_sim_cfg(model_dir, backend), ctx)


async def _run(engine, req_id, prompt, max_tokens, kv=None):
    p = SamplingParams(max_tokens=max_tokens, ignore_eos=True, min_tokens=0)
    deltas = [d async for d in engine.generate(EngineRequest(req_id, list(prompt), p, kv))]
    return deltas, [t for d in deltas for t in d.token_ids]


def _sim_prefill_main(conn, model_dir, backend, port, keys) -> None:
    """A prefill SimEngine in its own process; prefills on request and returns kv_transfer_params."""
    async def main():
        engine = _sim_engine(model_dir, backend, 0, "prefill", port, keys, {})
        await engine.start()
        conn.send(engine.connector.transfer.port)
        while True:
            cmd, *args = await asyncio.to_thread(conn.recv)
            if cmd == "prefill":
                deltas, _ = await _run(engine, args[0], args[1], 1, {"do_remote_decode": True})
                conn.send(deltas[-1].kv_transfer_params)
            elif cmd == "held":      # blocks still held for readers, once the reads are notified
                while engine.connector.transfer.pending_exports() and args[0]:
                    await asyncio.sleep(0.005)
                conn.send(engine.load().kv_usage)
            elif cmd == "stop":
                await engine.stop()
                conn.send("bye")
                return
    asyncio.run(main())


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"vocab_size": 512, "eos_token_id": 2}))
    return d


def test_sim_decode_pulls_verifies_and_falls_back_to_local_prefill(model_dir):
    """A decode SimEngine pulls a prefill SimEngine's KV from another process and verifies it;
    when the prefill process dies mid-pull the request is prefilled locally with the same output,
    and after the prefill instance restarts pulls work again."""
    pk, dk = keypair(), keypair()
    peer = Peer(_sim_prefill_main, model_dir, "nixl", 0, pk)
    port = peer.port

    async def main():
        dec = _sim_engine(model_dir, "nixl", 1, "decode", 0, dk, {f"127.0.0.1:{port}": pk[0]})
        agg = _sim_engine(model_dir, "none", 2, "worker", 0, None, {})
        await dec.start()
        await agg.start()
        try:
            prompt = list(range(100, 100 + 150))                 # 150 tokens: 10 blocks, last partial
            _, expect = await _run(agg, "a", prompt, 12)
            kv = peer.call("prefill", "p1", prompt)
            assert kv["kv_backend"] == "nixl" and len(kv["remote_block_ids"]) == 10
            assert peer.call("held", False) > 0                   # held until the decode side reads
            deltas, toks = await _run(dec, "d1", prompt, 12, kv)
            assert toks == expect and deltas[0].num_cached_tokens == 150
            assert (dec.connector.verified, dec.connector.failed) == (1, 0)
            assert dec.load().external_kv_tokens == 150          # the pulled prompt tokens
            assert peer.call("held", True) == 0                   # the READ's notification released them

            # the prefill process dies while the pull is in flight: local prefill, same tokens
            prompt2 = list(range(300, 300 + 100))
            _, expect2 = await _run(agg, "a2", prompt2, 12)
            kv2 = peer.call("prefill", "p2", prompt2)
            peer.pause()
            task = asyncio.create_task(_run(dec, "d2", prompt2, 12, kv2))
            while dec.connector.transfer.in_flight == 0 and not task.done():
                await asyncio.sleep(0.001)
            assert not task.done()
            peer.kill()
            deltas, toks = await task
            assert toks == expect2 and deltas[0].num_cached_tokens == 0
            assert (dec.connector.verified, dec.connector.failed) == (1, 1)
            assert dec.load().external_kv_tokens == 150          # a failed pull delivered nothing

            restarted = Peer(_sim_prefill_main, model_dir, "nixl", port, pk)
            try:
                kv3 = restarted.call("prefill", "p3", prompt2)
                _, toks = await _run(dec, "d3", prompt2, 12, kv3)
                assert toks == expect2 and (dec.connector.verified, dec.connector.failed) == (2, 1)
                # bytes that do not match the prompt are caught, and the request still answers right
                kv4 = restarted.call("prefill", "p4", prompt)
                _, toks = await _run(dec, "d4", prompt2, 12, kv4)
                assert toks == expect2 and (dec.connector.verified, dec.connector.failed) == (2, 2)
                assert dec.load().external_kv_tokens == 150 + 4   # d2's local prefill cached 96 of 100
            finally:
                restarted.stop()
        finally:
            await dec.stop()
            await agg.stop()

    try:
        asyncio.run(main())
    finally:
        peer.kill()


PROMPTS = [f"kv transfer {i} " + "the quick brown fox . " * (4 + 3 * i) for i in range(4)]


def _deployment_config(model_dir, backend="auto", **pools):
    return {"model": {"path": str(model_dir), "name": "tiny-llama", "max_model_len": 512},
            "engine": {"kind": "sim", "sim": {"speedup": 10.0, "num_kv_blocks": 256, "block_size": 16,
                                              "kv_transfer": backend}},
            "pools": pools,
            # always prefill remotely, however short the prompt (conditional disaggregation off)
            "router": {"host": "127.0.0.1", "port": 0, "policy": "round_robin",
                       "disagg": {"min_uncached_tokens": 0, "min_uncached_fraction": 0.0}},
            "runtime": {"heartbeat_interval_s": 0.25, "heartbeat_timeout_s": 1.5}}


def _answers(dep):
    c = dep.client()
    return [c.completions.create(model="tiny-llama", prompt=p, max_tokens=8, extra_body={"ignore_eos": True})
            for p in PROMPTS]


@pytest.fixture(scope="module")
def aggregated_texts(tiny_model_dir, tmp_path_factory):
    from slurmserve.tools.local_deployment import LocalDeployment
    agg = LocalDeployment(tmp_path_factory.mktemp("agg"), _deployment_config(tiny_model_dir, workers=1)).start()
    try:
        return [r.choices[0].text for r in _answers(agg)]
    finally:
        assert agg.stop() == 0, agg.output()
        agg.kill()


@pytest.mark.parametrize("backend", ["nixl", "zmq"])
def test_disaggregated_deployment_moves_and_verifies_real_kv(backend, aggregated_texts, tiny_model_dir, tmp_path):
    """1 prefill + 1 decode over mpirun: answers equal an aggregated deployment's, the decode rank
    pulled every prompt's KV and verified every byte, the prefill rank was told of every read."""
    from slurmserve.tools.local_deployment import LocalDeployment
    from slurmserve.tools.local_deployment import metric_value as metric

    dep = LocalDeployment(tmp_path, _deployment_config(tiny_model_dir, backend, prefill=1, decode=1)).start()
    try:
        got = _answers(dep)
        assert all(r.usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens for r in got)
        assert metric(dep.metrics(), "slurmserve:disagg_requests_total", path="remote_prefill") == 4
        # the decode instance's heartbeats count every prompt token it received (no two prompts
        # share a block, so none was in its own cache); the prefill instance received none
        roles = {i["role"]: str(i["index"]) for i in dep.info["instances"]}

        def external(role):
            return metric(dep.metrics(), "slurmserve:instance_prompt_tokens_external_total",
                          instance=roles[role], role=role)
        sent = sum(r.usage.prompt_tokens for r in got)
        deadline = time.time() + 5
        while external("decode") < sent and time.time() < deadline:
            time.sleep(0.1)
        assert (external("decode"), external("prefill")) == (sent, 0)
        loaded = {i["index"] + 1: heavy_libraries(i["pid"]) for i in dep.info["instances"]}
    finally:
        assert dep.stop() == 0, dep.output()
        dep.kill()
    assert [r.choices[0].text for r in got] == aggregated_texts
    logs = {p.name: p.read_text() for p in (dep.dir / "logs").glob("rank-*.log")}
    assert f"KV transfer: {backend} backend" in logs["rank-2.log"]
    # NIXL only where it moves the KV, and never torch (and with it triton's nanobind "leaked"
    # lines at exit): the engine ranks load what they need and no more
    want = {"nixl"} if backend == "nixl" else set()
    assert loaded == {i: want for i in (1, 2)}, loaded
    m = re.search(r"KV transfers: (\d+) verified, (\d+) failed", logs["rank-2.log"])
    assert m and m.groups() == ("4", "0"), logs["rank-2.log"][-3000:]
    assert "'exports_done': 4" in logs["rank-1.log"], logs["rank-1.log"][-3000:]


def heavy_libraries(pid: int) -> set[str]:
    """Which of nixl, torch and triton a running process has loaded."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {name for name in ("nixl", "torch", "triton") if f"/lib{name}" in maps}


def _import_probe(conn, what: str) -> None:
    """Start what a rank starts, then report the heavy modules it imported."""
    import sys

    async def aggregated():
        from slurmserve.config import DeploymentConfig
        from slurmserve.runtime.engine import EngineContext, create_engine
        cfg = DeploymentConfig.model_validate({"model": {"path": "/nonexistent"}, "engine": {"kind": "sim"}})
        engine = create_engine(cfg, EngineContext(0, "worker", "127.0.0.1", "", 0,
                                                  extra={"kv_side_channel_keys": keypair()}))
        await engine.start()
        await engine.stop()

    if what == "aggregated":
        asyncio.run(aggregated())
    else:
        with create_kv_transfer(what, name="x", host="127.0.0.1", port=0, num_blocks=2, block_bytes=64,
                                curve_keys=keypair(), peer_keys={}) as t:
            assert t.backend == "nixl"
    conn.send(sorted(m for m in ("nixl", "torch", "triton") if m in sys.modules))


@pytest.mark.parametrize("what,imported", [("aggregated", []), ("nixl", ["nixl"]), ("auto", ["nixl"])])
def test_nixl_and_torch_only_where_needed(what, imported):
    """An aggregated sim rank imports neither NIXL nor torch; a host-memory NIXL transfer imports
    NIXL but not torch (nixl's own import would pull a CPU torch in only to learn it has no CUDA)."""
    peer = Peer(_import_probe, what)
    assert peer.port == imported      # the first message is the probe's answer
    peer.proc.join(30)
    assert peer.proc.exitcode == 0


def _auto_backend_without_nixl(conn) -> None:
    import sys
    sys.modules["nixl"] = sys.modules["nixl._api"] = None     # `import nixl` now raises ImportError
    with create_kv_transfer("auto", name="x", host="127.0.0.1", port=0, num_blocks=2, block_bytes=64,
                            curve_keys=keypair(), peer_keys={}) as t:
        conn.send(t.backend)


def test_auto_backend_is_zeromq_without_nixl():
    peer = Peer(_auto_backend_without_nixl)
    assert peer.port == "zmq"          # the first message is the backend `auto` picked
    peer.proc.join(30)
    assert peer.proc.exitcode == 0


def test_kv_buffer_device_names_and_host_gather_scatter():
    """Where a KVTransfer's blocks may live; a bad name is a ValueError that names the choices.
    (Pulls into and out of GPU memory are in test_kv_transfer_gpu.py.)"""
    from slurmserve.kvfabric import kv_buffer
    assert kv_buffer.placement("cpu") == kv_buffer.Placement("cpu", "DRAM", 0)
    assert kv_buffer.placement("cuda") == kv_buffer.Placement("cuda:0", "VRAM", 0)
    assert kv_buffer.placement("cuda:3").dev_id == 3
    for bad in ("gpu", "cuda:", "cuda:x", "CPU"):
        with pytest.raises(ValueError, match="'cpu', 'cuda' or 'cuda:N'"):
            kv_buffer.placement(bad)
    buf = kv_buffer.allocate(8, 16, kv_buffer.placement("cpu"))
    data = np.arange(32, dtype=np.uint8).reshape(2, 16)
    kv_buffer.scatter(buf, [5, 2], data)
    assert (kv_buffer.gather(buf, [2, 5]) == data[::-1]).all() and not buf[[0, 1, 3, 4, 6, 7]].any()


def test_bench_kv_transfer_cli_writes_its_table_and_json(tmp_path):
    """`slurmserve bench kv-transfer` on a small grid: every cell moved (and checked) the bytes on
    all three paths; a device that is not there is refused with one line."""
    import subprocess
    import sys
    out = tmp_path / "kv.json"
    run = subprocess.run([sys.executable, "-m", "slurmserve", "bench", "kv-transfer", "--block-sizes", "16k,1m",
                          "--batches", "1,8", "--min-iters", "3", "--max-iters", "3", "--result-json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert [(r["block_bytes"], r["batch"]) for r in result["rows"]] == [(16384, 1), (16384, 8), (1 << 20, 1), (1 << 20, 8)]
    assert all(r[p]["gbps"] > 0 for r in result["rows"] for p in ("memcpy", "nixl", "kvfabric"))
    assert result["config"]["device"] == "cpu" and set(result["kvfabric_vs_nixl_1mib"]) == {"1", "8"}
    assert "kvfabric ÷ raw NIXL at 1 MiB blocks" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "slurmserve", "bench", "kv-transfer", "--device", "cuda:7"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "no such CUDA device here" in bad.stderr and "Traceback" not in bad.stderr
