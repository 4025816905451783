"""`slurmserve run CONFIG`: what every rank executes under `mpirun` or `srun`."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import uvloop

from slurmserve.config import DeploymentConfig
from slurmserve.stale_dirs import remove_stale_dirs
from slurmserve.kvfabric.relay import KVEventRelay
from slurmserve.registry import HeadRegistration
from slurmserve.runtime.bootstrap import BootstrapError, World, bootstrap, free_port
from slurmserve.runtime.engine import EngineContext, create_engine
from slurmserve.runtime.weight_stage import StageError, stage_weights
from slurmserve.runtime.worker import Worker

log = logging.getLogger("slurmserve.rank")

HEAD_EXIT_FILE = "head_exit_code"
HEAD_ERROR_FILE = "head_error"      # one line: why the deployment failed (for `slurmserve serve`)
KV_DIR_PREFIX = "slurmserve-kv-"


def _setup_logging(rank: int, role: str, cfg: DeploymentConfig) -> None:
    cfg.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fmt = f"%(asctime)s rank{rank} {role} %(levelname)s %(name)s: %(message)s"
    handlers = [logging.StreamHandler(sys.stderr), logging.FileHandler(cfg.log_dir / f"rank-{rank}.log")]
    logging.basicConfig(level=logging.INFO, format=fmt, handlers=handlers, force=True)


def array_task_log_dir(log_dir: Path, env=os.environ) -> Path:
    """The tasks of a job array run at once from one script: each gets its own subdirectory for
    rank logs, the endpoint and the API key, or they would overwrite each other's."""
    task = env.get("SLURM_ARRAY_TASK_ID")
    return log_dir / f"array-task-{task}" if task else log_dir


def run_rank(cfg: DeploymentConfig) -> int:
    cfg.log_dir = array_task_log_dir(cfg.log_dir)
    head_sock = {}
    kv_curve = {}   # this rank's KV-event publisher keys, when it leads an instance

    def endpoints_for(placement, address, keys):
        """What this rank tells the others: addresses and ports only; the keys each derives itself."""
        if placement.is_head:
            from slurmserve.router.head import Head
            head_sock["zmq"] = Head.bind_control_socket(address, keys.keypair(keys.control()))
            return {"control": head_sock["zmq"][2]["control"]}
        if placement.instance_rank == 0:
            kv_curve["keys"] = keys.keypair(keys.kv_events(placement.instance))
            # the KV-transfer side channel (NIXL metadata, or the bytes themselves) is CURVE too
            kv_curve["side_channel"] = keys.keypair(keys.kv_side_channel(placement.instance))
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
    if p.is_head:   # `slurmserve bench ready` times start-up by these marks
        HeadRegistration.mark_phase(cfg, "bootstrapped", new=True)
    try:
        # every rank, together: this node's copy of the model (model.stage), or model.path itself
        name = cfg.model.served_name              # the served name stays the source's
        cfg.model.path = stage_weights(cfg, world.comm, needs_weights=not p.is_head)
        cfg.model.name = name
    except StageError as e:                       # raised alike on every rank
        log.error("%s", e)
        if p.is_head:
            _record_head_failure(cfg, str(e), 2)
        return 2
    if p.is_head:
        HeadRegistration.mark_phase(cfg, "staged")
        code, failed = _run_head(cfg, world, *head_sock["zmq"][:2])
    else:
        try:
            code = uvloop.run(_run_engine_rank(cfg, world, kv_curve.get("keys"), kv_curve.get("side_channel")))
        except Exception:
            log.exception("engine rank %d failed", p.rank)
            code = 1
        failed = code != 0     # its engine failed, the deployment failed, or the head is gone
    if failed:
        # A rank of a failed deployment must end now, so the job does: engine libraries may leave
        # threads and child processes behind that would keep the interpreter from exiting, and MPI's
        # finalize would wait for ranks that are gone. (A clean end, `batch`'s "lines left" code 3
        # included, finalizes MPI on every rank as usual.)
        _kill_children()
        logging.shutdown()
        sys.stderr.flush()
        os._exit(code or 1)
    return code


def _kill_children() -> None:
    """SIGKILL this rank's child processes (an engine core whose start hung, say): os._exit skips
    the interpreter's own reaping of them, and they must not outlive a failed deployment."""
    for task in Path("/proc/self/task").iterdir():
        try:
            pids = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (OSError, ValueError):
                pass


def _run_head(cfg: DeploymentConfig, world: World, zctx, sock) -> tuple[int, bool]:
    """The head's exit code, and whether the deployment failed."""
    from slurmserve.router.head import Head, HeadError

    code, error = 1, None   # on failure the head has told the workers to stop, so the job ends
    try:
        code = uvloop.run(Head(cfg, zctx, sock, _batch_job(cfg)).run(world))
    except HeadError as e:     # a user's mistake (the port is taken), or the deployment failed
        error = str(e)
        log.error("%s", e)
    except Exception as e:
        error = f"the head failed: {type(e).__name__}: {e} (log: {cfg.log_dir / 'rank-0.log'})"
        log.exception("the head failed")
    _record_head_failure(cfg, error, code)
    return code, error is not None


def _batch_job(cfg: DeploymentConfig):
    """For `slurmserve batch` (cfg.batch set): what the head runs its file with."""
    if cfg.batch is None:
        return None
    from slurmserve.launcher.batch.driver import BatchDriver
    return lambda app, api_key, registry, ready: BatchDriver(cfg, app, api_key, registry, ready)


def _record_head_failure(cfg: DeploymentConfig, error: str | None, code: int) -> None:
    """The head's exit code (mpirun in recovery mode exits 0 whatever the ranks did; `slurmserve
    serve` reads it) and, when the deployment failed, why: in the log dir and the job registry."""
    from slurmserve.registry import HeadRegistration

    (cfg.log_dir / HEAD_EXIT_FILE).write_text(f"{code}\n")
    if error is not None:
        (cfg.log_dir / HEAD_ERROR_FILE).write_text(error.splitlines()[0] + "\n")
        reg = HeadRegistration.from_env(cfg)
        if reg is not None:
            reg.failed(error.splitlines()[0])


def kv_private_dir(tmp: str | None = None) -> str:
    """A new 0700 directory for this rank's ipc:// KV-event socket, named with its pid. Directories
    that a killed rank of this user left behind (their pid has gone) are removed first."""
    tmp = tmp or tempfile.gettempdir()
    remove_stale_dirs(Path(tmp), KV_DIR_PREFIX)
    return tempfile.mkdtemp(prefix=f"{KV_DIR_PREFIX}{os.getpid()}-", dir=tmp)


async def _run_follower(cfg: DeploymentConfig, world: World) -> int:
    """A rank after its instance's first: it takes part in the instance through the engine's
    follower loop (its instance communicator), and the instance's leader stops it."""
    p = world.placement
    leader = world.ranks[p.rank - p.instance_rank]
    log.info("rank %d follows instance %d (instance rank %d, leader rank %d on %s)", p.rank, p.instance,
             p.instance_rank, leader.rank, leader.hostname)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)    # the head drains; the leader stops us
    ctx = EngineContext(instance=p.instance, role=p.role, host=world.ranks[p.rank].address,
                        kv_events_endpoint="", kv_side_channel_port=0, comm=world.instance_comm,
                        extra={"leader_host": leader.address})
    return await create_engine(cfg, ctx).follow()


async def _run_engine_rank(cfg: DeploymentConfig, world: World, kv_curve_keys, side_channel_keys=None) -> int:
    p = world.placement
    me = world.ranks[p.rank]
    if p.instance_rank != 0:
        return await _run_follower(cfg, world)
    # The engine publishes KV events where only this user can connect; the relay re-publishes them
    # on the job's network to CURVE clients (kvfabric/relay.py says why).
    private = kv_private_dir()
    relay = None
    try:
        local_events = f"ipc://{private}/events"
        relay = KVEventRelay(local_events, me.endpoints["kv_events"], kv_curve_keys)
        ctx = EngineContext(instance=p.instance, role=p.role, host=me.address,
                            kv_events_endpoint=local_events,
                            kv_side_channel_port=int(me.endpoints.get("kv_side_channel_port", 0)),
                            comm=world.instance_comm)
        if side_channel_keys is not None:
            keys = world.keys
            ctx.extra["kv_side_channel_keys"] = side_channel_keys
            ctx.extra["kv_peer_keys"] = {f"{r.address}:{r.endpoints['kv_side_channel_port']}":
                                         keys.public(keys.kv_side_channel(i)).decode()
                                         for i, r in enumerate(world.instance_leaders(cfg))}
        # SIGUSR2 is for the head (it drains and then shuts the workers down); a worker only
        # keeps serving until told. SIGTERM/SIGINT stop it directly (handled in Worker.run).
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        worker = Worker(lambda: create_engine(cfg, ctx), world.head.endpoints["control"],
                        world.keys.public(world.keys.control()), p.instance,
                        cfg.runtime.heartbeat_interval_s, head_timeout_s=cfg.runtime.head_timeout_s,
                        rank=p.rank, log_path=str(cfg.log_dir / f"rank-{p.rank}.log"),
                        start_timeout_s=cfg.runtime.engine_start_timeout_s)
        return await worker.run()
    finally:
        if relay is not None:
            relay.close()
        shutil.rmtree(private, ignore_errors=True)
