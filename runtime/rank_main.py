"""`slurmserve run CONFIG`: what every rank executes under `mpirun` or `srun`."""

from __future__ import annotations

import logging
import signal
import sys

import uvloop

from slurmserve.config import DeploymentConfig
from slurmserve.runtime.bootstrap import BootstrapError, World, bootstrap, free_port
from slurmserve.runtime.engine import EngineContext, create_engine
from slurmserve.runtime.worker import Worker

log = logging.getLogger("slurmserve.rank")


def _setup_logging(rank: int, role: str, cfg: DeploymentConfig) -> None:
    cfg.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fmt = f"%(asctime)s rank{rank} {role} %(levelname)s %(name)s: %(message)s"
    handlers = [logging.StreamHandler(sys.stderr), logging.FileHandler(cfg.log_dir / f"rank-{rank}.log")]
    logging.basicConfig(level=logging.INFO, format=fmt, handlers=handlers, force=True)


def run_rank(cfg: DeploymentConfig) -> int:
    head_sock = {}

    def endpoints_for(placement, address):
        if placement.is_head:
            from slurmserve.router.head import Head
            head_sock["zmq"] = Head.bind_control_socket(address)
            return head_sock["zmq"][2]
        if placement.instance_rank == 0:
            return {"kv_events": f"tcp://{address}:{free_port(address)}",
                    "kv_side_channel_port": free_port(address)}
        return {}

    try:
        world = bootstrap(cfg, endpoints_for)
    except BootstrapError as e:
        print(f"slurmserve: {e}", file=sys.stderr)
        return 2
    p = world.placement
    _setup_logging(p.rank, p.role, cfg)
    if p.is_head:
        from slurmserve.router.head import Head
        zctx, sock, _ = head_sock["zmq"]
        return uvloop.run(Head(cfg, zctx, sock).run(world))
    return uvloop.run(_run_engine_rank(cfg, world))


async def _run_engine_rank(cfg: DeploymentConfig, world: World) -> int:
    p = world.placement
    me = world.ranks[p.rank]
    ctx = EngineContext(instance=p.instance, role=p.role, host=me.address,
                        kv_events_endpoint=me.endpoints.get("kv_events", ""),
                        kv_side_channel_port=int(me.endpoints.get("kv_side_channel_port", 0)),
                        comm=world.instance_comm)
    if p.instance_rank != 0:
        raise NotImplementedError("multi-rank engine instances arrive with the TensorRT-LLM engine")
    # SIGUSR2 is for the head (it drains and then shuts the workers down); a worker only
    # keeps serving until told. SIGTERM/SIGINT stop it directly (handled in Worker.run).
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    engine = create_engine(cfg, ctx)
    worker = Worker(engine, world.head.endpoints["control"], world.head.endpoints["control_key"].encode(),
                    p.instance, cfg.runtime.heartbeat_interval_s,
                    head_timeout_s=max(5.0, 3 * cfg.runtime.heartbeat_timeout_s))
    await worker.run()
    return 0
