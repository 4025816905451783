"""The job's CURVE keys, derived from one secret file that only the job's user can read.

Every ZeroMQ server of a deployment (the head's control socket, each instance's KV-event publisher
and KV side channel) uses CURVE, and a client can connect only if it knows the server's public key.
Those keys were once exchanged over MPI, whose TCP wire Open MPI neither authenticates nor encrypts.
Now every rank derives them from a per-job secret: `slurmserve serve` and the job script write it,
mode 0600 in the 0700 log directory (on the filesystem every node shares), before the ranks start,
and name it in $SLURMSERVE_JOB_SECRET_FILE. Only addresses and ports cross MPI.

A world started some other way (`srun slurmserve run` by hand) has no such file: rank 0 then makes a
secret and broadcasts it over MPI, which is no safer than before, and says so in its log.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

import zmq
import zmq.utils.z85

from slurmserve.private_files import write_private

log = logging.getLogger(__name__)

SECRET_ENV = "SLURMSERVE_JOB_SECRET_FILE"
SECRET_BYTES = 32


def write_job_secret(path: Path) -> Path:
    """A fresh secret for one run of a deployment (a requeued job gets a new one)."""
    write_private(path, secrets.token_bytes(SECRET_BYTES))
    return path


class JobKeys:
    """CURVE key pairs named by label ("control", "kv-events-3", ...), the same on every rank."""

    def __init__(self, secret: bytes, source: str):
        if len(secret) < 16:
            raise ValueError("the job secret is too short")
        self._secret = secret
        self.source = source      # "file" or "mpi": where the secret came from

    def keypair(self, label: str) -> tuple[bytes, bytes]:
        """(public, secret), Z85-encoded as pyzmq takes them."""
        raw = hmac.new(self._secret, label.encode(), hashlib.sha256).digest()   # any 32 bytes are a key
        secret = zmq.utils.z85.encode(raw)
        return zmq.curve_public(secret), secret

    def public(self, label: str) -> bytes:
        return self.keypair(label)[0]

    # the labels, in one place
    @staticmethod
    def control() -> str:
        return "control"

    @staticmethod
    def kv_events(instance: int) -> str:
        return f"kv-events-{instance}"

    @staticmethod
    def kv_side_channel(instance: int) -> str:
        return f"kv-side-channel-{instance}"


def load_job_keys(comm, env=os.environ) -> JobKeys:
    """Collective over `comm`: every rank reads the secret file, or rank 0 broadcasts one."""
    path = env.get(SECRET_ENV)
    if path:
        try:
            secret = Path(path).read_bytes()
        except OSError as e:
            raise OSError(f"{SECRET_ENV}={path}: {e.strerror}") from None
        return JobKeys(secret, "file")
    secret = comm.bcast(secrets.token_bytes(SECRET_BYTES) if comm.Get_rank() == 0 else None, root=0)
    if comm.Get_rank() == 0:
        log.warning("no %s: the job's CURVE keys derive from a secret sent over MPI, which is not "
                    "encrypted (`slurmserve serve` and `slurmserve sbatch` scripts set it)", SECRET_ENV)
    return JobKeys(secret, "mpi")
