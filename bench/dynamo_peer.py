"""NVIDIA Dynamo's frontend as a peer to measure the head against (`slurmserve bench peer`).

Starts Dynamo 1.6.1 from PyPI the way one runs it without etcd or NATS: `python -m dynamo.frontend
--router-mode kv` and one `python -m dynamo.mocker --num-workers N` process, found through file
discovery (DYN_DISCOVERY_BACKEND=file in a private directory), requests over TCP, KV events over
ZeroMQ. Install: `pip install 'slurmserve[dynamo]'` and `pip install --no-deps ai-dynamo==1.6.1`
(its full dependency set pulls in Kubernetes and Redis clients the frontend does not use).

Equal work with a slurmserve sim deployment:
- Step model: the mocker's default timing is AISimulate's polynomial, prefill_ms = 4.209989e-7*T^2 +
  1.518344e-2*T + 16.50142 over the uncached tokens T of the pass, decode_ms = max(1, -25.74*u^2 +
  54.01*u + 5.74) with u the scheduled sequences' KV tokens over the capacity. `sim_config` sets
  the same coefficients explicitly on the sim, and the same blocks, block size and batch limits
  on both (the sim's u counts used blocks: equal up to the partial last block of each sequence).
- Output: the mocker samples random u32 token ids, which a real vocabulary decodes to nothing, so
  the frontend would send no text chunks at all. Every request therefore names a replay row
  (`nvext.annotations: output_replay_id:...`) of `output_ids`: ids drawn like the sim's, from the
  vocabulary less its special tokens, one chunk per token as on the head.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# AISimulate's polynomial (crates/core/src/engine/common/perf_model.rs), as (a, b, c) of a*x^2 + b*x + c.
PREFILL_COEFFS = (4.209989e-07, 1.518344e-02, 16.50142)
DECODE_COEFFS = (-25.74, 54.01, 5.74)


def available() -> bool:
    """Whether Dynamo's frontend and mocker are importable here."""
    try:
        return all(importlib.util.find_spec(m) is not None for m in ("dynamo.frontend", "dynamo.mocker"))
    except ModuleNotFoundError:
        return False


def sim_config(model_dir: str, model_name: str, *, workers: int, speedup: float, num_kv_blocks: int,
               block_size: int, max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
               max_model_len: int = 4096, policy: str = "kv") -> dict:
    """The slurmserve deployment that does the mocker's work: same step model, KV and limits."""
    return {
        "model": {"path": str(model_dir), "name": model_name, "max_model_len": max_model_len},
        "engine": {"kind": "sim", "sim": {
            "speedup": speedup, "num_kv_blocks": num_kv_blocks, "block_size": block_size,
            "max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens,
            "prefill_coeffs": list(PREFILL_COEFFS), "decode_coeffs": list(DECODE_COEFFS)}},
        "pools": {"workers": workers},
        "router": {"host": "127.0.0.1", "port": 0, "policy": policy},
    }


def output_ids(tokenizer, n: int, seed: int = 0) -> list[int]:
    """n token ids as the sim draws them: uniform over the vocabulary less its special tokens."""
    rng = random.Random(seed)
    special = set(tokenizer.special_ids)
    ids = [i for i in range(tokenizer.vocab_size) if i not in special]
    return [rng.choice(ids) for _ in range(n)]


def replay_extra(output_len: int) -> dict:
    """The request field that makes the mocker answer with the replay row of this length."""
    return {"nvext": {"annotations": [f"output_replay_id:out{output_len}"]}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DynamoPeer:
    """Dynamo's frontend + N mocker workers in a private discovery directory; a context manager."""

    def __init__(self, workdir: Path, model_dir: str, model_name: str, *, workers: int, speedup: float,
                 num_kv_blocks: int, block_size: int, output_ids_by_len: dict[int, list[int]],
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 8192, max_model_len: int = 4096,
                 name: str = "dynamo"):
        self.dir = Path(workdir).resolve() / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.model_dir, self.model = str(model_dir), model_name
        self.workers = workers
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        trace = self.dir / "replay.jsonl"
        trace.write_text("".join(json.dumps({"request_id": f"out{n}", "timestamp": 0, "input_length": 1,
                                             "output_length": n, "hash_ids": [0], "output_token_ids": ids}) + "\n"
                                 for n, ids in sorted(output_ids_by_len.items())))
        self.env = dict(os.environ, DYN_DISCOVERY_BACKEND="file", DYN_REQUEST_PLANE="tcp",
                        DYN_EVENT_PLANE="zmq", DYN_FILE_KV=str(self.dir / "discovery"),
                        DYN_NAMESPACE=f"peer{os.getpid()}",
                        # INFO logs a line per request; the head logs none, so neither side pays for it
                        DYN_LOG=os.environ.get("DYN_LOG", "warn"))
        self.env.pop("DYN_SYSTEM_PORT", None)
        py = [sys.executable, "-m"]
        self.frontend_cmd = py + ["dynamo.frontend", "--router-mode", "kv", "--http-host", "127.0.0.1",
                                  "--http-port", str(self.port), "--namespace", self.env["DYN_NAMESPACE"]]
        # the sim's speedup .inf: --speedup-ratio 0 should mean no sleeping, but 1.6.1's live mocker
        # then paces steps in real time (measured: 6.6 ms between tokens at c=1); 1e6 makes them ~µs
        self.mocker_cmd = py + ["dynamo.mocker", "--model-path", self.model_dir, "--model-name", model_name,
                                "--num-workers", str(workers), "--num-gpu-blocks-override", str(num_kv_blocks),
                                "--block-size", str(block_size), "--max-num-seqs", str(max_num_seqs),
                                "--max-num-batched-tokens", str(max_num_batched_tokens),
                                "--max-model-len", str(max_model_len),
                                "--speedup-ratio", "1e6" if math.isinf(speedup) else str(speedup),
                                "--kv-bytes-per-token", "512",   # else it reads the model's config for it
                                "--response-replay-trace-path", str(trace)]
        self.frontend: subprocess.Popen | None = None
        self.mocker: subprocess.Popen | None = None
        self._logs: list = []

    def _spawn(self, cmd: list[str], log: str) -> subprocess.Popen:
        f = open(self.dir / log, "wb")
        self._logs.append(f)
        # own session: a stop signal reaches each process without touching ours
        return subprocess.Popen(cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

    def start(self, timeout: float = 120) -> DynamoPeer:
        self.frontend = self._spawn(self.frontend_cmd, "frontend.log")
        self.mocker = self._spawn(self.mocker_cmd, "mocker.log")
        deadline = time.time() + timeout
        while time.time() < deadline:
            for p, log in ((self.frontend, "frontend.log"), (self.mocker, "mocker.log")):
                if p.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"{p.args[2]} exited with {p.returncode}:\n{self.output(log)}")
            if self.ready():
                return self
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"Dynamo not ready after {timeout} s:\n{self.output('frontend.log')}"
                           f"\n{self.output('mocker.log')}")

    def ready(self) -> bool:
        """Every mocker worker is known to the frontend, and the model is listed."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                health = json.loads(r.read())
            with urllib.request.urlopen(self.url + "/models", timeout=2) as r:
                models = json.loads(r.read())
        except (OSError, ValueError):
            return False
        workers = sum(1 for i in health.get("instances", []) if i.get("endpoint") == "generate")
        return workers >= self.workers and any(m.get("id") == self.model for m in models.get("data", []))

    def output(self, log: str) -> str:
        return (self.dir / log).read_text(errors="replace")[-4000:]

    @property
    def pids(self) -> dict[str, int]:
        return {"frontend": self.frontend.pid, "engines": self.mocker.pid}

    def stop(self, timeout: float = 15) -> None:
        for p in (self.mocker, self.frontend):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (self.mocker, self.frontend):
            if p is None:
                continue
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in self._logs:
            f.close()
        self._logs = []

    def __enter__(self) -> DynamoPeer:
        return self.start() if self.frontend is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
