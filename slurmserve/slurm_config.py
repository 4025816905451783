"""What a Slurm submission needs beyond the deployment config: job options and the site file.

`SlurmOptions` says how one deployment is laid out on a Slurm allocation (nodes, partition, time,
GPUs, where the head goes, MPI plugin, requeue, the preemption warning). It comes from, in order of
precedence: command-line flags, a `slurm:` section of the deployment config (when the config has
one), the site file, and the defaults below.

`SiteConfig` is `~/.config/slurmserve/site.yaml` (or `$SLURMSERVE_SITE`): what is the same for every
job a user submits on one cluster (partition, account, modules, environment, container wrapper).

This module imports nothing from `slurmserve.config` at import time, so that the deployment config
can embed `SlurmOptions` as a field.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      field_validator)


class SlurmError(Exception):
    """A Slurm submission or job command that cannot go on; the message is one clear sentence."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---- time limits ------------------------------------------------------------------------------------

_TIME_RE = re.compile(r"^(?:(?P<d>\d+)-)?(?P<rest>\d+(?::\d+){0,2})$")


def parse_time(value: str | int) -> int:
    """A Slurm time limit in seconds. Accepts what sbatch accepts: `M`, `M:S`, `H:M:S`, `D-H`,
    `D-H:M`, `D-H:M:S` (and an int of minutes)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError("time limit must be positive")
        return value * 60
    text = str(value).strip()
    m = _TIME_RE.match(text)
    if not m:
        raise ValueError(f"{value!r} is not a Slurm time limit (minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]])")
    parts = [int(p) for p in m.group("rest").split(":")]
    if m.group("d") is not None:
        days = int(m.group("d"))
        parts += [0] * (3 - len(parts))       # D-H, D-H:M, D-H:M:S
        seconds = days * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    elif len(parts) == 1:
        seconds = parts[0] * 60               # M
    elif len(parts) == 2:
        seconds = parts[0] * 60 + parts[1]    # M:S
    else:
        seconds = parts[0] * 3600 + parts[1] * 60 + parts[2]
    if seconds <= 0:
        raise ValueError("time limit must be positive")
    return seconds


def _time_in(v):
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


def _time_checked(v):
    if v is not None:
        parse_time(v)
    return v


# A time limit as sbatch takes it ("30", "2:00:00", "1-12"); bare integers are minutes.
SlurmTime = Annotated[str | None, BeforeValidator(_time_in), AfterValidator(_time_checked)]


def format_time(seconds: int) -> str:
    """Seconds as Slurm's `[D-]HH:MM:SS`."""
    days, rest = divmod(int(seconds), 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return f"{days}-{h:02d}:{m:02d}:{s:02d}" if days else f"{h:02d}:{m:02d}:{s:02d}"


# ---- per-deployment options ---------------------------------------------------------------------

class SlurmOptions(_Strict):
    """How a deployment is laid out on a Slurm allocation. Unset fields fall back to the site file,
    then to what the deployment needs (see `slurmserve.launcher.sbatch.plan_layout`)."""

    job_name: str | None = Field(None, description="Default: slurmserve-<served model name>.")
    nodes: int | None = Field(None, ge=1, description="Default: the fewest nodes the pools fit on.")
    instances_per_node: int | None = Field(
        None, ge=1, description="Most engine instances on one node (default: gpus_per_node // "
                                "tensor_parallel_size with GPUs, else spread evenly over the nodes).")
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: SlurmTime = Field(None, description="Time limit, in any format sbatch accepts.")
    gpus_per_node: int | None = Field(None, ge=0, description="0: no GPUs (sim, or vLLM's CPU build).")
    cpus_per_task: int = Field(1, ge=1, description="CPUs for each MPI rank.")
    mem: str | None = Field(None, description="sbatch --mem, e.g. 64G (per node).")
    head: Literal["shared", "own-node"] = Field(
        "shared", description="shared: the head shares the first node with engine ranks; "
                              "own-node: the first node runs only the head.")
    mpi: str | None = Field(None, description="srun --mpi plugin; default: the site's, else pmix.")
    requeue: bool = Field(False, description="On the preemption warning (SIGUSR2): drain, then requeue "
                                             "the job so it serves again; without it, drain and exit.")
    grace_s: int | None = Field(
        None, ge=1, description="--signal=USR2@grace_s: seconds of warning before the time limit "
                                "(default: runtime.shutdown_grace_s + 30, at least 60).")
    sbatch_args: list[str] = Field(default_factory=list, description="Extra sbatch options, e.g. --exclusive.")

    @field_validator("sbatch_args")
    @classmethod
    def _check_args(cls, v):
        for a in v:
            if not a.startswith("-"):
                raise ValueError(f"{a!r}: each sbatch argument starts with - (e.g. --exclusive)")
        return v

    @field_validator("job_name")
    @classmethod
    def _check_name(cls, v):
        if v is not None and (not v or any(c.isspace() for c in v)):
            raise ValueError("job name must be non-empty and have no whitespace")
        return v


# ---- the site file ------------------------------------------------------------------------------

class SiteConfig(_Strict):
    """`~/.config/slurmserve/site.yaml`: per-cluster defaults for every submission."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: SlurmTime = Field(None, description="Default time limit.")
    gpus_per_node: int | None = Field(None, ge=0)
    modules: list[str] = Field(default_factory=list, description="`module load` each, in order.")
    setup: list[str] = Field(default_factory=list, description="Shell lines run before srun "
                                                               "(source a venv, export variables).")
    container: str | None = Field(
        None, description="Wrapper placed before the rank command, e.g. "
                          "`apptainer exec --nv /images/vllm.sif`.")
    mpi: str | None = Field(None, description="srun --mpi plugin (pmix for Open MPI).")
    interface: str | None = Field(None, description="Network interface for traffic between ranks "
                                                    "(sets runtime.interface when the config does not).")
    python: str | None = Field(None, description="Interpreter on the compute nodes "
                                                 "(default: the one running slurmserve).")
    sbatch_args: list[str] = Field(default_factory=list)



def site_path() -> Path:
    env = os.environ.get("SLURMSERVE_SITE")
    if env:
        return Path(env).expanduser()
    root = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return root / "slurmserve" / "site.yaml"


def load_site(path: str | os.PathLike | None = None) -> SiteConfig:
    """The site file, or empty defaults when there is none. `$SLURMSERVE_SITE` names another file
    (which must then exist)."""
    from slurmserve.config import ConfigError, format_errors, read_yaml_mapping

    explicit = path is not None or bool(os.environ.get("SLURMSERVE_SITE"))
    p = Path(path).expanduser() if path is not None else site_path()
    if not p.exists():
        if explicit:
            raise ConfigError(f"site file {p}: does not exist")
        return SiteConfig()
    data = read_yaml_mapping(p, f"site file {p}")
    try:
        return SiteConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, f"site file {p}")) from None


def options_from(data: dict | SlurmOptions | None, source: str = "slurm") -> SlurmOptions:
    """Validate a `slurm:` mapping (from a config or a test), errors naming `slurm.<key>`."""
    from slurmserve.config import ConfigError, format_errors

    if data is None:
        return SlurmOptions()
    if isinstance(data, SlurmOptions):
        return data
    try:
        return SlurmOptions.model_validate(data)
    except ValidationError as e:
        msg = format_errors(e, source)
        raise ConfigError(msg.replace("\n  ", "\n  slurm.")) from None


def merge_options(*layers: SlurmOptions | dict | None) -> SlurmOptions:
    """Later layers win, field by field, where they set a field explicitly."""
    out: dict = {}
    for layer in layers:
        if layer is None:
            continue
        if isinstance(layer, dict):
            out.update({k: v for k, v in layer.items() if v is not None})
        else:
            out.update(layer.model_dump(exclude_unset=True))
    return options_from(out)
