"""MPI bootstrap: one COMM_WORLD becomes a head plus engine instances.

Rank 0 is the head. Ranks 1.. are cut, in order, into instances of `ranks_per_instance` ranks each;
the instance list comes from the pools (prefill instances first, then decode). Every rank then
allgathers its address and endpoints, so all of them know the whole deployment without etcd, NATS
or rendezvous files. No key crosses MPI: every rank derives the job's CURVE keys from the job
secret (slurmserve/job_secret.py). After this, MPI is used only inside an instance (TensorRT-LLM's TP group).
"""

from __future__ import annotations

import fcntl
import os
import random
import socket
import struct
from dataclasses import dataclass, field

from slurmserve.config import DeploymentConfig
from slurmserve.job_secret import JobKeys, load_job_keys
from slurmserve.runtime.protocol import PROTOCOL_VERSION


class BootstrapError(RuntimeError):
    """The MPI world does not fit the config; raised identically on every rank."""


@dataclass(frozen=True)
class Placement:
    """Where a rank sits in the deployment; derived from the config and the rank alone."""

    rank: int
    role: str                 # "head" | "worker" | "prefill" | "decode"
    instance: int | None      # engine-instance index, None for the head
    instance_rank: int        # rank inside the instance (0 leads and talks to the head)

    @property
    def is_head(self) -> bool:
        return self.role == "head"


def place(cfg: DeploymentConfig, rank: int, size: int) -> Placement:
    if size != cfg.world_size:
        shape = (f"{cfg.pools.prefill} prefill + {cfg.pools.decode} decode"
                 if cfg.pools.disaggregated else f"{cfg.pools.workers} workers")
        raise BootstrapError(
            f"the config needs {cfg.world_size} MPI ranks (1 head + {shape} instances x "
            f"{cfg.engine.ranks_per_instance} rank(s) each), but the job has {size}")
    if rank == 0:
        return Placement(0, "head", None, 0)
    rpi = cfg.engine.ranks_per_instance
    instance, instance_rank = divmod(rank - 1, rpi)
    return Placement(rank, cfg.pools.instances()[instance], instance, instance_rank)


@dataclass
class RankInfo:
    """What each rank tells every other rank at bootstrap."""

    rank: int
    hostname: str
    address: str
    pid: int
    protocol: int = PROTOCOL_VERSION
    endpoints: dict[str, str | int] = field(default_factory=dict)


@dataclass
class World:
    placement: Placement
    ranks: list[RankInfo]
    comm: object                 # MPI.COMM_WORLD
    instance_comm: object        # this rank's instance (the head gets a communicator of its own)
    keys: JobKeys | None = None  # the job's CURVE keys

    @property
    def head(self) -> RankInfo:
        return self.ranks[0]

    def instance_leaders(self, cfg: DeploymentConfig) -> list[RankInfo]:
        rpi = cfg.engine.ranks_per_instance
        return [self.ranks[1 + i * rpi] for i in range(len(cfg.pools.instances()))]


def interface_address(ifname: str) -> str:
    """IPv4 address of a network interface (Linux SIOCGIFADDR), e.g. the cluster's ib0."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", ifname[:15].encode()))
        except OSError as e:
            raise BootstrapError(f"runtime.interface={ifname!r}: no IPv4 address ({e.strerror})") from None
    return socket.inet_ntoa(packed[20:24])


def local_address(cfg: DeploymentConfig, single_host: bool) -> str:
    if cfg.runtime.interface:
        return interface_address(cfg.runtime.interface)
    if single_host:
        return "127.0.0.1"
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError as e:
        raise BootstrapError(
            f"cannot resolve this node's hostname ({e}); set runtime.interface") from None


PRIVATE_PORTS_FROM = 20000     # below: well-known services' ports (Slurm's 6817-6819, ...)


def _ephemeral_low() -> int:
    try:
        return int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768             # Linux's default


def free_port(address: str) -> int:
    """A port that is free now on `address`, which an engine binds a moment later (vLLM binds its
    NIXL side channel and KV-event ports itself, so they cannot be held open meanwhile). Picked
    below the kernel's ephemeral range: ports there go to every outgoing connection on the node,
    so any process of any job could take one in that moment, and vLLM then waits for ever."""
    low = _ephemeral_low()
    if low - PRIVATE_PORTS_FROM >= 1000:
        for port in random.sample(range(PRIVATE_PORTS_FROM, low), 64):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((address, port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:   # a crowded node: any free one
        s.bind((address, 0))
        return s.getsockname()[1]



def bootstrap(cfg: DeploymentConfig, endpoints_for=None) -> World:
    """Place this rank and exchange addresses with every other rank.

    `endpoints_for(placement, address, keys)` returns the endpoints this rank publishes (the head
    binds its ZeroMQ socket first and publishes the bound endpoint, so no port can be stolen); `keys`
    are the job's CURVE keys.
    """
    # MPI only bootstraps (a few allgathers). Under srun, TCP: Open MPI's shared-memory transport buys
    # nothing and a killed rank would leave its 4 MiB segments in /dev/shm. `slurmserve serve` sets
    # shared memory in a private directory instead (launcher/local.py), so no rank listens on TCP.
    os.environ.setdefault("OMPI_MCA_btl", "self,tcp")
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    placement = place(cfg, comm.Get_rank(), comm.Get_size())
    instance_comm = comm.Split(color=0 if placement.is_head else placement.instance + 1,
                               key=placement.rank)
    hostname = socket.gethostname()
    single_host = len(set(comm.allgather(hostname))) == 1
    address = local_address(cfg, single_host)
    try:
        keys = load_job_keys(comm)
    except (OSError, ValueError) as e:
        raise BootstrapError(str(e)) from None
    endpoints = endpoints_for(placement, address, keys) if endpoints_for else {}
    mine = RankInfo(placement.rank, hostname, address, os.getpid(), PROTOCOL_VERSION, endpoints)
    ranks = [RankInfo(**d) for d in comm.allgather(mine.__dict__)]
    versions = {r.protocol for r in ranks}
    if len(versions) != 1:
        raise BootstrapError(f"ranks run different slurmserve protocol versions: {sorted(versions)}")
    return World(placement, ranks, comm, instance_comm, keys)
