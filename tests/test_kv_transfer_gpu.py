"""KV pulls between two processes with blocks in GPU memory (NIXL VRAM), and between host and GPU.

These need a CUDA GPU; on a machine without one (the CI box) they are skipped. scripts/gpu-check.sh
runs them, with `bench kv-transfer` on the GPU. Not yet run on a GPU: the session that wrote them
(2026-12-04) was refused a device machine.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import threading

import numpy as np
import pytest
import torch
import zmq

from slurmserve.kvfabric import kv_buffer
from slurmserve.kvfabric.kv_transfer import create_kv_transfer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SPAWN = mp.get_context("spawn")    # CUDA and UCX state must not be forked
NBLOCKS = 48
BLOCK = 64 * 1024


def pattern(block_ids) -> np.ndarray:
    """The bytes the exporter writes into each block: a function of the block id alone."""
    return np.stack([np.random.default_rng(1000 + b).integers(0, 256, BLOCK, dtype=np.uint8) for b in block_ids])


def digest(buffer, ids) -> str:
    return hashlib.sha256(kv_buffer.gather(buffer, ids).tobytes()).hexdigest()


def _exporter_main(conn, backend: str, device: str, keys) -> None:
    kv_buffer.bind_thread(kv_buffer.placement(device))
    t = create_kv_transfer(backend, name="prefill-gpu", host="127.0.0.1", port=0, num_blocks=NBLOCKS,
                           block_bytes=BLOCK, curve_keys=keys, peer_keys={}, device=device)
    kv_buffer.scatter(t.buffer, np.arange(NBLOCKS), pattern(range(NBLOCKS)))
    done = threading.Event()
    conn.send(t.port)
    while True:
        cmd, *args = conn.recv()
        if cmd == "export":
            conn.send(t.export("req-gpu", args[0], 0, lambda ok: ok and done.set()))
        elif cmd == "wait_read":
            conn.send((done.wait(30), dict(t.stats), t.buffer.device.type if device != "cpu" else "cpu"))
        elif cmd == "stop":
            t.close()
            conn.send("bye")
            return


@pytest.mark.parametrize("backend,export_device,import_device", [
    ("nixl", "cuda:0", "cuda:0"),     # GPU to GPU: UCX's CUDA transports, no host staging
    ("nixl", "cpu", "cuda:0"),        # a host-memory prefill instance, a GPU decode instance
    ("nixl", "cuda:0", "cpu"),
    ("zmq", "cuda:0", "cuda:0"),      # the fallback without NIXL, staged through the host
])
def test_blocks_move_between_processes_to_and_from_gpu_memory(backend, export_device, import_device):
    keys = zmq.curve_keypair()
    conn, child = SPAWN.Pipe()
    proc = SPAWN.Process(target=_exporter_main, args=(child, backend, export_device, keys), daemon=True)
    proc.start()
    t = None
    try:
        assert conn.poll(120), "the exporter did not start"
        port = conn.recv()
        t = create_kv_transfer(backend, name="decode-gpu", host="127.0.0.1", port=0, num_blocks=NBLOCKS,
                               block_bytes=BLOCK, curve_keys=zmq.curve_keypair(),
                               peer_keys={f"127.0.0.1:{port}": keys[0]}, device=import_device)
        if import_device != "cpu":
            assert t.buffer.is_cuda and t.buffer.device.index == 0
        src = [5, 17, 3, 40, 41, 42, 0, 33]
        dst = [12, 1, 30, 31, 7, 47, 20, 2]
        conn.send(("export", src))
        params = conn.recv()
        assert t.import_(params, dst) == len(src) * BLOCK
        assert digest(t.buffer, dst) == hashlib.sha256(pattern(src).tobytes()).hexdigest()
        untouched = [b for b in range(NBLOCKS) if b not in dst]
        assert not kv_buffer.gather(t.buffer, untouched).any()          # nothing else was written
        conn.send(("wait_read",))
        read, stats, where = conn.recv()
        assert read and stats["exports_done"] == 1, stats
        assert where == ("cuda" if export_device != "cpu" else "cpu")
        assert t.stats["imports"] == 1 and t.stats["handshakes"] == 1
    finally:
        if t is not None:
            t.close()
        if proc.is_alive():
            conn.send(("stop",))
            conn.poll(30) and conn.recv()
        proc.join(30)
    assert proc.exitcode == 0
