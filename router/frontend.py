"""One HTTP front-end process of a multi-process head (`router.http_workers` > 1): the OpenAI API,
tokenizing, chat templates, detokenizing and stop strings, on a port it shares with the others
(SO_REUSEPORT); routing and the engines are the router process's (router/frontend_hub.py).

Started by FrontendPool (router/frontend_pool.py) as `python -m slurmserve.router.frontend`, with
its Settings on stdin (the API key never appears on a command line). It dies with the router
process (PR_SET_PDEATHSIG) and leaves signals to it: Slurm's SIGUSR2 and SIGTERM reach every
process of the step, and the router decides how the head drains and tells each front end.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import pickle
import signal
import sys

import msgspec
import uvloop
import zmq

from slurmserve.config import DeploymentConfig
from slurmserve.router import frontend_protocol as F
from slurmserve.router.bearer_app import PROMETHEUS_TEXT
from slurmserve.router.http_app import AppServer, HeadApp
from slurmserve.router.http_server import Request, Response
from slurmserve.router.metrics import HeadMetrics
from slurmserve.router.remote_orchestrator import RemoteOrchestrator
from slurmserve.router.tokenizer import Tokenizer

log = logging.getLogger("slurmserve.frontend")

_PR_SET_PDEATHSIG = 1


class Settings(msgspec.Struct):
    index: int
    config: bytes        # the DeploymentConfig, pickled (JSON has no inf, which sim speedups use)
    api_key: str
    router: str          # the router process's IPC address
    host: str
    port: int
    parent_pid: int
    tokenizer_threads: int   # the head's CPUs shared among the front ends


async def serve(s: Settings) -> int:
    cfg: DeploymentConfig = pickle.loads(s.config)
    tokenizer = Tokenizer(cfg.model.path, s.tokenizer_threads)
    metrics = HeadMetrics(cfg.model.served_name)
    zctx = zmq.Context()
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"frontend-%d" % s.index)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(s.router)

    stopped = asyncio.Event()
    drain_task: list[asyncio.Task] = []

    def on_control(msg) -> None:
        if type(msg) is F.Drain:
            drain_task.append(asyncio.create_task(drain(msg.grace_s)))
        elif type(msg) is F.Stop:
            stopped.set()

    remote = RemoteOrchestrator(sock, metrics, on_control)
    app = HeadApp.from_config(cfg, remote, tokenizer, metrics, s.api_key)

    async def prometheus(request: Request, response: Response) -> None:
        response.send(200, await remote.scrape(), PROMETHEUS_TEXT)
    app.routes[("GET", "/metrics")] = prometheus

    async def drain(grace_s: float) -> None:
        remote.send(F.Drained(await front.drain(grace_s)))

    front = AppServer(app, cfg)
    await front.start(s.host, s.port, reuse_port=True)
    remote.connect(F.Hello(s.index, os.getpid()))
    gc.collect()
    gc.freeze()     # the tokenizer's heap: see Head._serve
    await stopped.wait()
    await front.close()
    remote.close()
    zctx.term()
    return 0


def _die_with_parent(parent_pid: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:     # it died before prctl took effect
        os._exit(1)


def main() -> int:
    s = msgspec.json.decode(sys.stdin.buffer.read(), type=Settings)
    _die_with_parent(s.parent_pid)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    cfg_log_dir = pickle.loads(s.config).log_dir
    fmt = f"%(asctime)s rank0 frontend-{s.index} %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, force=True, handlers=[
        logging.StreamHandler(sys.stderr), logging.FileHandler(cfg_log_dir / f"frontend-{s.index}.log")])
    try:
        return uvloop.run(serve(s))
    except Exception:
        log.exception("the HTTP front end failed")    # its last line is what FrontendPool reports
        return 1


if __name__ == "__main__":
    sys.exit(main())
