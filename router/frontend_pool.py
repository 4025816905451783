"""The front-end processes of a multi-process head: started, watched (one that dies is started
again; its requests were aborted) and stopped by the router process.

They share the head's port with SO_REUSEPORT. The router process binds the port first, without
listening, so that `port: 0` picks one and it stays the head's while front ends come and go; only
listening sockets take connections. The IPC socket to the router lives in a 0700 directory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from slurmserve.config import DeploymentConfig
from slurmserve.stale_dirs import remove_stale_dirs
from slurmserve.router.frontend import Settings
from slurmserve.router.frontend_hub import FrontendHub
from slurmserve.router.tokenizer import default_threads

log = logging.getLogger(__name__)

MAX_AUTO_WORKERS = 8
IPC_DIR_PREFIX = "slurmserve-head-"    # + the router process's pid (slurmserve/stale_dirs.py)


def frontend_count(cfg: DeploymentConfig, env=os.environ) -> int:
    """router.http_workers, or by default: in a Slurm job the CPUs the head's task may use (its
    allocation; at most 8), else 1. A batch run sends its lines in-process: always 1."""
    if cfg.batch is not None:
        return 1
    if cfg.router.http_workers is not None:
        return cfg.router.http_workers
    if "SLURM_JOB_ID" not in env:
        return 1
    return max(1, min(MAX_AUTO_WORKERS, len(os.sched_getaffinity(0))))


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (host, port) with SO_REUSEPORT and no listen: the port is ours, and connections go
    only to the front ends that listen on it."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class FrontendError(RuntimeError):
    pass


class FrontendPool:
    def __init__(self, cfg: DeploymentConfig, api_key: str, host: str, port: int, count: int):
        self.cfg = cfg
        self.api_key = api_key
        self.host, self.port = host, port
        self.count = count
        base = Path(tempfile.gettempdir())
        remove_stale_dirs(base, IPC_DIR_PREFIX)     # of heads that were killed
        self.dir = tempfile.mkdtemp(prefix=f"{IPC_DIR_PREFIX}{os.getpid()}-", dir=base)    # 0700
        self.address = f"ipc://{self.dir}/router"
        self.procs: dict[int, subprocess.Popen] = {}
        self.stopping = False
        self._watcher: asyncio.Task | None = None

    def log_file(self, index: int) -> str:
        return str(self.cfg.log_dir / f"frontend-{index}.log")

    def _spawn(self, index: int) -> None:
        settings = Settings(index, pickle.dumps(self.cfg), self.api_key, self.address, self.host,
                            self.port, os.getpid(), default_threads(share=self.count))
        proc = subprocess.Popen([sys.executable, "-m", "slurmserve.router.frontend"], stdin=subprocess.PIPE)
        proc.stdin.write(msgspec.json.encode(settings))
        proc.stdin.close()
        self.procs[index] = proc

    async def start(self, hub: FrontendHub, timeout_s: float = 300.0) -> None:
        """Start them all and wait until each has said Hello; FrontendError if one exits first."""
        for index in range(self.count):
            self._spawn(index)
        deadline = time.monotonic() + timeout_s
        while len(hub.frontends) < self.count:
            for index, proc in self.procs.items():
                if proc.poll() is not None:
                    raise FrontendError(f"the head failed: HTTP front end {index} exited with code {proc.returncode} while "
                                        f"starting: {self._last_line(index)} (log: {self.log_file(index)})")
            if time.monotonic() > deadline:
                raise FrontendError(f"the HTTP front ends did not start within {timeout_s:.0f} s")
            hub.hello.clear()
            try:
                async with asyncio.timeout(0.2):
                    await hub.hello.wait()
            except TimeoutError:
                pass
        self._watcher = asyncio.create_task(self._watch(hub))

    def _last_line(self, index: int) -> str:
        try:
            lines = Path(self.log_file(index)).read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return lines[-1] if lines else "no log"

    async def _watch(self, hub: FrontendHub, period_s: float = 0.5) -> None:
        """A front end that died (a bug, the OOM killer) takes its connections with it; its requests
        are aborted in the engines and a new one takes its place."""
        while True:
            await asyncio.sleep(period_s)
            for index, proc in list(self.procs.items()):
                if proc.poll() is None or self.stopping:
                    continue
                log.error("HTTP front end %d (pid %d) exited with code %s; starting it again (log: %s)",
                          index, proc.pid, proc.returncode, self.log_file(index))
                hub.forget(b"frontend-%d" % index)
                self._spawn(index)

    async def stop(self, timeout_s: float = 5.0) -> None:
        """After the hub's Stop: wait for them to exit, kill what is left."""
        self.stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in self.procs.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
