"""Rank 0: the OpenAI endpoint, the router and the control plane's hub.

Signals: SIGUSR2 (Slurm's preemption warning, and what `slurmserve serve` sends on Ctrl-C) drains:
new requests get 503, in-flight ones finish within `runtime.shutdown_grace_s`, then every engine
instance is told to shut down. SIGTERM and SIGINT do the same with no waiting for in-flight work.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import secrets
import signal
import time
from pathlib import Path

import zmq

from slurmserve.config import DeploymentConfig
from slurmserve.private_files import write_private
from slurmserve.kvfabric.kv_index import ApproxKVIndex
from slurmserve.router.engine_client import EngineClient
from slurmserve.router.http_app import AppServer, HeadApp
from slurmserve.router.frontend_hub import FrontendHub
from slurmserve.router.frontend_pool import FrontendError, FrontendPool, frontend_count, reserve_port
from slurmserve.router.instance import Instance
from slurmserve.router.kv_state import KVState
from slurmserve.router.metrics import HeadMetrics
from slurmserve.router.orchestrator import Orchestrator
from slurmserve.router.policies import make_policies
from slurmserve.router.routing import Router
from slurmserve.router.tokenizer import Tokenizer
from slurmserve.registry import HeadRegistration
from slurmserve.runtime.bootstrap import World

log = logging.getLogger(__name__)


class HeadError(RuntimeError):
    """The head cannot serve for a reason the user can fix, or the deployment failed; the message
    is one line that says why (the setting, or the failed rank and its log)."""


def read_api_key_file(path: Path) -> str:
    """The key in a user's `api_key_file`; HeadError when it is unreadable or empty (`serve` checks
    this before it starts anything, the head again where it runs)."""
    try:
        key = path.read_text().strip()
    except OSError as e:
        raise HeadError(f"api_key_file {path}: {e.strerror}") from None
    if not key:
        raise HeadError(f"api_key_file {path} is empty: put the key clients must send in it, or "
                        f"leave api_key_file unset to have one generated")
    return key


def load_api_key(cfg: DeploymentConfig) -> str:
    if cfg.api_key_file is not None:
        return read_api_key_file(cfg.api_key_file)
    key = "sk-" + secrets.token_urlsafe(32)
    write_private(cfg.log_dir / "api_key", key + "\n")
    return key


class Head:
    def __init__(self, cfg: DeploymentConfig, zctx: zmq.Context, sock: zmq.Socket, batch_job=None):
        """`batch_job(app, api_key, registry, ready)`, for `slurmserve batch`: an object whose
        `run(stop, grace)` sends a file through `app` and returns the exit code; the head serves
        until it is done (launcher/batch/driver.py)."""
        self.cfg = cfg
        self.zctx = zctx
        self.sock = sock
        self.batch_job = batch_job

    @staticmethod
    def bind_control_socket(address: str, keypair: tuple[bytes, bytes] | None = None
                            ) -> tuple[zmq.Context, zmq.Socket, dict[str, str]]:
        """Bind the control plane's ROUTER with CURVE: only peers that know the head's public key
        can connect, and that key travels to the engine ranks only through MPI."""
        zctx = zmq.Context()
        sock = zctx.socket(zmq.ROUTER)
        public, secret = keypair or zmq.curve_keypair()
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.setsockopt(zmq.SNDHWM, 0)   # control messages are never dropped for lack of room
        sock.setsockopt(zmq.RCVHWM, 0)
        port = sock.bind_to_random_port(f"tcp://{address}")
        return zctx, sock, {"control": f"tcp://{address}:{port}", "control_key": public.decode()}

    async def run(self, world: World) -> int:
        cfg = self.cfg
        api_key = load_api_key(cfg)
        self.frontends = frontend_count(cfg)
        # before the control loops start: it blocks for a while (front-end processes load their own)
        tokenizer = Tokenizer(cfg.model.path) if self.frontends == 1 else None
        metrics = HeadMetrics(cfg.model.served_name)
        instances = [Instance(index=i, role=role, identity=f"instance-{i}".encode(), address=r.address)
                     for i, (role, r) in enumerate(zip(cfg.pools.instances(), world.instance_leaders(cfg)))]
        kv = cfg.router.kv
        kv_state = KVState(metrics, ApproxKVIndex(kv.approx_ttl_s) if kv.index == "approximate" else None,
                           zctx=self.zctx)
        client = EngineClient(self.sock, instances, metrics, cfg.runtime.heartbeat_timeout_s,
                              on_instance_down=kv_state.forget, on_instance_declared=kv_state.declare)
        client.min_instances = cfg.runtime.min_instances or len(instances)
        client.start()
        try:
            return await self._serve(world, tokenizer, metrics, instances, client, kv_state, api_key)
        except Exception as e:
            if not client.closing:   # tell the workers to stop, or they would wait for a head that is gone
                reason = str(e) if str(e).startswith("the head failed") else f"the head failed: {e}"
                await client.close(reason, grace_s=2.0, failed=True)
            raise

    async def _serve(self, world: World, tokenizer: Tokenizer, metrics: HeadMetrics,
                     instances: list[Instance], client: EngineClient, kv_state: KVState, api_key: str) -> int:
        cfg = self.cfg
        for inst, leader in zip(instances, world.instance_leaders(cfg)):
            if leader.endpoints.get("kv_events"):
                kv_state.watch(inst.index, leader.endpoints["kv_events"],
                               world.keys.public(world.keys.kv_events(inst.index)))
        policies = make_policies(cfg.router.policy, {i.role for i in instances}, kv_state.index, cfg.router.kv)
        # no fallback hasher: prompts are hashed with the scheme the engines declare when they come up
        router = Router(instances, policies, kv_state.index)
        orchestrator = Orchestrator(client, router, metrics, cfg.pools.disaggregated, cfg.router.disagg,
                                    cfg.router.kv.busy_threshold, migration_limit=cfg.router.migration_limit)
        host = cfg.router.host or world.head.address
        count = self.frontends
        try:
            front = AppServer(HeadApp.from_config(cfg, orchestrator, tokenizer, metrics, api_key), cfg) \
                if count == 1 else ProcessFront(cfg, orchestrator, metrics, api_key, count)
            host, port = await front.start(host, cfg.router.port)
        except OSError as e:
            raise HeadError(f"router: cannot listen on {host}:{cfg.router.port}: {e.strerror}") from None
        except FrontendError as e:
            raise HeadError(str(e)) from None

        stop = asyncio.Event()
        drain = {"grace": 0.0, "signal": None}

        def on_signal(sig: int) -> None:
            drain["grace"] = cfg.runtime.shutdown_grace_s if sig == signal.SIGUSR2 else 0.0
            drain["signal"] = sig
            log.info("received %s: draining", signal.Signals(sig).name)
            stop.set()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
            loop.add_signal_handler(sig, on_signal, sig)

        info = {"url": f"http://{host}:{port}/v1", "host": host, "port": port, "pid": os.getpid(),
                "model": cfg.model.served_name, "started": time.time(),
                "api_key_file": str(cfg.api_key_file or cfg.log_dir / "api_key"),
                "control": world.head.endpoints["control"],
                "instances": [{"index": i.index, "role": i.role, "address": r.address, "pid": r.pid,
                               "hostname": r.hostname, "kv_events": r.endpoints.get("kv_events")}
                              for i, r in zip(instances, world.instance_leaders(cfg))]}
        write_private(cfg.log_dir / "endpoint.json", json.dumps(info, indent=2) + "\n")
        # Inside a Slurm job the job registry gets the endpoint, the key and, below, readiness.
        reg = HeadRegistration.from_env(cfg)
        ready_task = None
        if reg is not None:
            reg.serving(info, api_key)
            reg.mark(listening=info["started"])
            ready_task = asyncio.create_task(reg.watch_ready(client.all_ready))
        log.info("serving %s at http://%s:%d/v1 (%d engine instances, %d HTTP front-end process%s)",
                 cfg.model.served_name, host, port, len(instances), count, "" if count == 1 else "es")
        # The tokenizer and its libraries leave a large heap that never becomes garbage: move it out of
        # the collector's sight, or every full collection walks it again while requests wait.
        gc.collect()
        gc.freeze()
        batch = None
        if self.batch_job is not None:   # `slurmserve batch`: run the file through `app`, then shut down
            batch = asyncio.create_task(self.batch_job(front.app, api_key, metrics.registry, client.all_ready)
                                        .run(stop, lambda: drain["grace"]))
        failure = asyncio.create_task(watch_failures(client))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([failure, stopped], return_when=asyncio.FIRST_COMPLETED)
        if failure.done():     # the deployment cannot serve: end the job, saying why
            stopped.cancel()
            if batch is not None:
                batch.cancel()
            await front.close()
            await client.close(f"the deployment failed: {failure.result()}", grace_s=2.0, failed=True)
            await kv_state.close()
            raise HeadError(failure.result())
        failure.cancel()
        if ready_task is not None:
            ready_task.cancel()
        if reg is not None:
            reg.draining(drain["signal"])
        code = await batch if batch is not None else 0   # in-flight lines finish within the grace

        cut = await front.drain(drain["grace"])   # still running at the end of the grace: cut
        if cut:
            log.warning("drain: %d request(s) still running after %.0f s were cut", cut, drain["grace"])
        await front.close()
        await client.close("head shutting down", grace_s=max(2.0, cfg.runtime.shutdown_grace_s))
        await kv_state.close()
        self.zctx.term()
        if reg is not None:   # exited, or requeued after a preemption warning when the job asks
            reg.finished(preempted=drain["signal"] == signal.SIGUSR2, cut_requests=cut)
        return code


class ProcessFront:
    """HTTP front-end processes on a shared port (router.http_workers > 1); this process routes."""

    app = None    # (no in-process app: `slurmserve batch` runs with one front end)

    def __init__(self, cfg: DeploymentConfig, orchestrator: Orchestrator, metrics: HeadMetrics, api_key: str,
                 count: int):
        self.cfg, self.orch, self.metrics, self.api_key, self.count = cfg, orchestrator, metrics, api_key, count
        self.port_sock = self.zctx = self.pool = self.hub = None
        self.closed = False

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self.port_sock = reserve_port(host, port)
        try:
            host, port = self.port_sock.getsockname()[:2]
            self.pool = FrontendPool(self.cfg, self.api_key, host, port, self.count)
            self.zctx, sock = FrontendHub.bind(self.pool.address)
            self.hub = FrontendHub(self.orch, self.metrics, sock, self.cfg.router.max_concurrent_requests)
            self.hub.start()
            await self.pool.start(self.hub)
        except BaseException:
            await self.close()
            raise
        return host, port

    async def drain(self, grace_s: float) -> int:
        return await self.hub.drain(grace_s)

    async def close(self) -> None:
        """Stop the front ends (they end their connections), then let go of the port."""
        if self.closed:
            return
        self.closed = True
        if self.hub is not None:
            self.hub.close()
        if self.pool is not None:
            await self.pool.stop()
        if self.zctx is not None:
            self.zctx.term()
        self.port_sock.close()


async def watch_failures(client: EngineClient, period_s: float = 0.1) -> str:
    """Returns, with the reason, once the deployment cannot serve: while starting, when an instance
    failed to start and fewer than `min_instances` can still come up (or a pool has none left);
    once serving, when a pool has had no live instance for a while (nothing restarts them; the
    while lets instances that only missed heartbeats, say while the head stalled, come back)."""
    roles = {i.role for i in client.instances}
    empty_since: dict[str, float] = {}
    patience = max(5.0, 2 * client.heartbeat_timeout_s)
    while True:
        await asyncio.sleep(period_s)
        insts = client.instances
        failed = [i for i in insts if i.failed]
        if failed:
            can_serve = len(insts) - len(failed)
            dead_pool = any(all(i.failed for i in insts if i.role == r) for r in roles)
            if can_serve < client.min_instances or dead_pool:
                more = f" ({len(failed)} of {len(insts)} instances failed to start)" if len(failed) > 1 else ""
                return failed[0].failed + more
        if client.closing or not all(i.ever_up or i.failed for i in insts):
            continue
        now = time.monotonic()
        for role in roles:
            if client.pool(role):
                empty_since.pop(role, None)
            elif now - empty_since.setdefault(role, now) > patience:
                last = max((i for i in insts if i.role == role), key=lambda i: i.last_seen)
                return f"no {role} instance is left ({last.down_reason or 'all failed'})"
