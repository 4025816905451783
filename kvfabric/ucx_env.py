"""UCX environment defaults for processes that create NIXL agents.

UCX's InfiniBand module crashes at process exit (SIGSEGV in libnl-route teardown) on machines that
have no InfiniBand devices, so every process that created a NIXL agent dies with exit code 139.
Excluding the module avoids it; on IB clusters the module stays in. A value the user already set
always wins.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

IB_SYSFS = Path("/sys/class/infiniband")


def has_infiniband(sysfs: Path = IB_SYSFS) -> bool:
    """True when the kernel exposes at least one InfiniBand (or RoCE) device."""
    try:
        return any(sysfs.iterdir())
    except OSError:  # missing directory, or not readable
        return False


def ucx_env_defaults(environ: Mapping[str, str] | None = None, sysfs: Path = IB_SYSFS) -> dict[str, str]:
    """UCX variables to add to the environment before a NIXL agent is created (nothing to override)."""
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    if "UCX_MODULES" not in env and not has_infiniband(sysfs):
        out["UCX_MODULES"] = "^ib"
    return out
