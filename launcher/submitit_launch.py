"""Deployments from Python with submitit: `launch(config, executor) -> Deployment`.

    executor = submitit.AutoExecutor(folder="runs/submitit")
    executor.update_parameters(slurm_partition="gpu", timeout_min=120)
    dep = launch("examples/sim-agg.yaml", executor, nodes=2)
    dep.wait_ready(300)
    print(dep.client().completions.create(model="tiny-llama", prompt="hi", max_tokens=8))
    dep.stop()

One submitit job with one task per MPI rank: submitit runs the pickled callable in every task
(`srun python -m submitit.core._submit`), and `srun --mpi=<plugin>` makes the tasks one MPI world, so
each task just runs `run_rank` and MPI decides who is the head. Tasks per node come from the same
layout as the sbatch script (`plan_layout`); where nodes hold different numbers of ranks, a setup line
writes a host file and srun places the ranks by it.

Preemption: the callable is `Checkpointable`. submitit installs its SIGUSR2 handler (checkpoint, then
`scontrol requeue`) before calling it; the head replaces it with its drain. After the head has
drained (in-flight requests finished, workers shut down) and recorded in the registry that it wants a
requeue (`SLURMSERVE_REQUEUE=submitit`, no `slurmserve stop` pending), rank 0 calls submitit's saved
handler: `checkpoint()` returns a DelayedSubmission of the same callable, submitit requeues the job,
and the requeued job serves again with the same job id and a fresh API key.
"""

from __future__ import annotations

import os
import secrets
import signal
from pathlib import Path
from typing import Any

from slurmserve.config import ConfigError, DeploymentConfig, load_config
from slurmserve.job_secret import SECRET_ENV, write_job_secret
from slurmserve import registry
from slurmserve.slurm_config import (SiteConfig, SlurmError, SlurmOptions, format_time, load_site,
                                              parse_time)

try:
    from submitit.helpers import Checkpointable, DelayedSubmission
except ImportError:             # submitit is an extra (`pip install slurmserve[slurm]`)
    Checkpointable = object     # type: ignore[assignment,misc]
    DelayedSubmission = None    # type: ignore[assignment]


class ServeRanks(Checkpointable):
    """The callable every task runs: one rank of the deployment."""

    def __init__(self, config: dict, state_dir: str, rank_gpus: list[str] | None, requeue: bool,
                 secret_file: str | None = None):
        self.config = config               # DeploymentConfig.model_dump(): paths already absolute
        self.state_dir = state_dir
        self.secret_file = secret_file     # the job secret (0600), written before submission
        self.rank_gpus = rank_gpus         # GPU slots per rank on its node; None without GPUs
        self.requeue = requeue

    def __call__(self) -> int:
        from slurmserve.launcher.rank_main import run_rank

        rank = int(os.environ.get("SLURM_PROCID", "0"))
        os.environ["SLURMSERVE_STATE_DIR"] = self.state_dir
        os.environ["SLURMSERVE_REQUEUE"] = "submitit" if self.requeue else ""
        if self.secret_file:
            os.environ[SECRET_ENV] = self.secret_file
        if self.rank_gpus is not None:
            _narrow_gpus(self.rank_gpus[rank])
        # submitit's checkpoint-and-requeue handler; the head's drain takes SIGUSR2 over meanwhile.
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        rc = run_rank(DeploymentConfig.model_validate(self.config))
        if rank == 0 and self.requeue and self._head_wants_requeue() and callable(submitit_handler):
            submitit_handler(signal.SIGUSR2, None)     # checkpoint(), scontrol requeue, exit
        return rc

    def _head_wants_requeue(self) -> bool:
        job_id = os.environ.get("SLURM_JOB_ID")
        entry = registry.read_entry(job_id) if job_id else None
        return bool(entry and entry.get("status") == "starting" and entry.get("drain_signal") == "SIGUSR2"
                    and not entry.get("stop_requested"))

    def checkpoint(self, *args: Any, **kwargs: Any):
        """A server keeps no state worth saving: resubmit the same callable, which starts the
        deployment afresh (the registry entry keeps the job id; the head writes a new endpoint)."""
        return DelayedSubmission(self, *args, **kwargs)


def _narrow_gpus(slots: str) -> None:
    """This rank's block of its node's GPUs (the same rule as the sbatch script's rank wrapper)."""
    node_gpus = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]
    want = [int(i) for i in slots.split(",") if i]
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(node_gpus[i] if i < len(node_gpus) else str(i)
                                                  for i in want)


class Deployment:
    """A deployment running as a submitit job."""

    def __init__(self, job, cfg: DeploymentConfig):
        self.job = job
        self.job_id = str(job.job_id)
        self.cfg = cfg

    def __repr__(self) -> str:
        return f"Deployment(job_id={self.job_id}, model={self.cfg.model.served_name})"

    def wait_ready(self, timeout: float | None = None) -> Deployment:
        from slurmserve.launcher.slurm_cli import wait_ready
        wait_ready(self.job_id, timeout)
        return self

    @property
    def endpoint(self) -> str:
        """The OpenAI base URL (http://host:port/v1)."""
        from slurmserve.launcher.slurm_cli import connection
        return connection(self.job_id)[0]

    @property
    def api_key(self) -> str:
        from slurmserve.launcher.slurm_cli import connection
        return connection(self.job_id)[1]

    def client(self, **kwargs):
        """An openai.OpenAI client for the endpoint, with the job's secret."""
        from openai import OpenAI
        from slurmserve.launcher.slurm_cli import connection
        url, key = connection(self.job_id)
        return OpenAI(base_url=url, api_key=key, **kwargs)

    def status(self) -> dict:
        """Registry entry plus Slurm's view (`slurm_state`, `time_left`, `ready`); no secret."""
        from slurmserve.launcher.slurm_cli import job_status
        return job_status(self.job_id)

    def stop(self, grace_s: float | None = None) -> str:
        """Drain (SIGUSR2 to the tasks), then cancel what is left."""
        from slurmserve.launcher.slurm_cli import stop_job
        return stop_job(self.job_id, grace_s)


def _config(config: Any, overrides: list[str]) -> tuple[DeploymentConfig, str | None]:
    if isinstance(config, DeploymentConfig):
        return config, None
    if isinstance(config, dict):
        from pydantic import ValidationError

        from slurmserve.config import apply_overrides, format_errors
        try:
            cfg = DeploymentConfig.model_validate(apply_overrides(dict(config), list(overrides)))
        except ValidationError as e:
            raise ConfigError(format_errors(e, "<dict config>")) from None
        cfg.model.path = cfg.model.path.expanduser().resolve()
        cfg.log_dir = cfg.log_dir.expanduser().resolve()
        if cfg.api_key_file is not None:
            cfg.api_key_file = cfg.api_key_file.expanduser().resolve()
        return cfg, None
    return load_config(config, overrides), str(Path(config).expanduser().resolve())


def _set_params(executor, **params: Any) -> None:
    """SlurmExecutor takes sbatch names; AutoExecutor takes its generic names or slurm_-prefixed ones."""
    import submitit
    if isinstance(executor, submitit.AutoExecutor):
        if executor.cluster != "slurm":
            raise SlurmError(f"launch needs a Slurm executor; this AutoExecutor runs on {executor.cluster!r}")
        generic = {"ntasks_per_node": "tasks_per_node", "nodes": "nodes", "gpus_per_node": "gpus_per_node",
                   "cpus_per_task": "cpus_per_task", "job_name": "name"}
        params = {generic.get(k, f"slurm_{k}"): v for k, v in params.items()}
    elif not isinstance(executor, submitit.SlurmExecutor):
        raise SlurmError(f"launch needs a submitit SlurmExecutor or AutoExecutor, not {type(executor).__name__}")
    executor.update_parameters(**params)


def launch(config: Any, executor, *, overrides: list[str] = (), slurm: SlurmOptions | dict | None = None,
           site: SiteConfig | None = None, requeue: bool = True, **slurm_kwargs: Any) -> Deployment:
    """Submit a deployment with a submitit executor and return its handle (not waiting for it).

    `config`: a YAML path, a dict or a DeploymentConfig. Layout options (nodes, head, gpus_per_node,
    mpi, grace_s, ...) come from `slurm`/keyword arguments, the config's `slurm:` section and the site
    file, as for `slurmserve submit`; everything else (partition, time, account) is the executor's.
    `requeue`: on a preemption warning, drain and requeue (submitit's Checkpointable protocol)."""
    from slurmserve.launcher.sbatch import register_submission, resolved_for, validate, cluster_info
    from slurmserve.slurm_config import merge_options, options_from

    cfg, config_path = _config(config, list(overrides))
    site = site or load_site()
    opts = merge_options(options_from(slurm) if slurm else None, slurm_kwargs or None)
    opts = opts.model_copy(update={"requeue": requeue})
    res = resolved_for(cfg, opts, site)
    inner = getattr(executor, "_executor", executor)          # AutoExecutor wraps a SlurmExecutor
    existing = dict(getattr(inner, "parameters", {}))
    # The executor's own partition and time limit count as given (submitit's default time is 5 min).
    res.partition = res.partition or existing.get("partition")
    if res.time is None and existing.get("time"):
        res.time = _time_of(executor)
    layout = validate(cfg, res, cluster_info(res.partition))
    for w in layout.warnings:
        import warnings
        warnings.warn(f"slurmserve: {w}", stacklevel=2)

    cfg.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    srun_args = [*(existing.get("srun_args") or []), f"--mpi={res.mpi}", "--kill-on-bad-exit=0"]
    setup = list(existing.get("setup", None) or [])
    if site.modules:
        setup.append("module load " + " ".join(site.modules))
    setup += site.setup
    if not layout.uniform:
        # Different rank counts per node: place every rank explicitly (same rule as the sbatch script).
        hostfile = f"{cfg.log_dir}/hostfile-$SLURM_JOB_ID"
        setup += ['mapfile -t SLURMSERVE_NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
                  f'export SLURM_HOSTFILE="{hostfile}"',
                  "printf '%s\\n' " + " ".join(f'"${{SLURMSERVE_NODES[{n}]}}"' for n in layout.rank_node)
                  + ' > "$SLURM_HOSTFILE"',
                  "unset SLURM_NTASKS_PER_NODE"]
        srun_args += [f"--ntasks={cfg.world_size}", "--distribution=arbitrary"]
    params: dict[str, Any] = dict(nodes=layout.nodes, ntasks_per_node=layout.tasks_per_node,
                                  cpus_per_task=res.opts.cpus_per_task, srun_args=srun_args, setup=setup,
                                  signal_delay_s=res.grace_s)
    if layout.gpus_per_node:
        params["gpus_per_node"] = layout.gpus_per_node
    for key in ("partition", "account", "qos"):
        if getattr(res, key) and not existing.get(key):
            params[key] = getattr(res, key)
    if res.time:
        params["time"] = max(1, -(-parse_time(res.time) // 60))
    additional = dict(existing.get("additional_parameters", None) or {})
    if requeue:
        additional["requeue"] = True
    if additional:
        params["additional_parameters"] = additional
    if not existing.get("job_name") or existing.get("job_name") == "submitit":
        params["job_name"] = res.job_name
    _set_params(executor, **params)

    # The ranks derive the job's CURVE keys from a secret that never crosses MPI (job_secret.py): a
    # file only this user can read, on the filesystem the nodes share, named by a random token.
    secret = write_job_secret(cfg.log_dir / f".job-secret-{secrets.token_hex(8)}")
    call = ServeRanks(cfg.model_dump(), str(registry.state_dir()),
                      layout.rank_gpus if layout.gpus_per_node else None, requeue, str(secret))
    job = executor.submit(call)
    register_submission(str(job.job_id), cfg, launcher="submitit", config_path=config_path,
                        batch_log=str(job.paths.stdout).replace("%t", "0"),
                        time_limit=res.time or format_time(300), grace_s=res.grace_s,
                        requeue="submitit" if requeue else None)
    return Deployment(job, cfg)


def _time_of(executor) -> str | None:
    minutes = getattr(getattr(executor, "_executor", executor), "parameters", {}).get("time")
    return format_time(int(minutes) * 60) if isinstance(minutes, (int, float)) else minutes


__all__ = ["Deployment", "ServeRanks", "launch", "launch_batch"]


def launch_batch(config: Any, executor, input: str | os.PathLike, output: str | os.PathLike, *,
                 errors: str | os.PathLike | None = None, shard: str | None = None, ordered: bool = False,
                 overrides: list[str] = (), **kwargs: Any) -> Deployment:
    """`launch` for an offline batch run (`slurmserve batch` as a submitit job): the deployment sends
    `input` through its API into `output` and exits; after a preemption the requeued job resumes.
    `deployment.job.wait()` waits for the end; the summary is next to the output (`*.summary.json`)."""
    from slurmserve.launcher.batch.cli import batch_overrides
    sets = batch_overrides(input, output, errors, shard, ordered)
    return launch(config, executor, overrides=[*overrides, *sets], **kwargs)
