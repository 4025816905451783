"""Slurm job scripts for a deployment: layout, validation, rendering and submission.

`render_sbatch` turns a deployment config plus `SlurmOptions` and the site file into a readable job
script (`sbatch/serve.sbatch.j2`); `submit` validates, renders, runs `sbatch --parsable` and records
the job in the registry. Everything is checked before anything is queued: an impossible request is
an error naming the problem, not a job that fails an hour later.

Layout rules (`plan_layout`):
- rank 0 is the head; ranks 1.. are the engine instances in pool order, each instance's ranks on one
  node (vLLM and the simulator: one rank per instance; TensorRT-LLM: tensor_parallel_size ranks);
- `head: shared` puts the head on the first node next to engine ranks; `head: own-node` gives the
  first node to the head alone;
- instances are spread over the engine nodes so that ranks per node (the head's included) are as
  even as node capacity allows, earlier nodes first;
- with GPUs, an instance owns tensor_parallel_size GPUs of one node, so a node holds at most
  gpus_per_node // tensor_parallel_size instances; the head gets no GPU.
"""

from __future__ import annotations

import importlib.resources

import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from slurmserve.config import DeploymentConfig
from slurmserve import registry
from slurmserve.slurm_config import (SiteConfig, SlurmError, SlurmOptions, format_time,
                                              merge_options, options_from, parse_time)

TEMPLATE_NAME = "serve.sbatch.j2"


def template_path() -> Path:
    """The job-script template, from the `sbatch/` folder (installed as `slurmserve.sbatch`)."""
    p = Path(str(importlib.resources.files("slurmserve.sbatch") / TEMPLATE_NAME))
    if not p.is_file():
        raise SlurmError(f"job-script template {TEMPLATE_NAME} not found at {p}")
    return p


# ---- the cluster, as sinfo reports it -----------------------------------------------------------

@dataclass(frozen=True)
class ClusterInfo:
    """One partition's nodes (the smallest node, when they differ)."""

    partition: str
    nodes: int
    cpus_per_node: int
    gpus_per_node: int


def _gpus_in_gres(gres: str) -> int:
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def cluster_info(partition: str | None) -> ClusterInfo | None:
    """What `sinfo` says about `partition` (the default partition when None); None when sinfo is not
    available, so rendering works away from the cluster. Raises SlurmError for an unknown partition."""
    if shutil.which("sinfo") is None:
        return None
    cmd = ["sinfo", "-h", "-o", "%P|%c|%G|%D"]
    if partition:
        cmd[2:2] = ["-p", partition]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    rows = [line.split("|") for line in r.stdout.splitlines() if line.count("|") == 3]
    if not partition:
        rows = [row for row in rows if row[0].endswith("*")]
    if not rows:
        if partition:
            raise SlurmError(f"partition {partition!r} does not exist (see `sinfo`)")
        return None
    name = rows[0][0].rstrip("*")
    return ClusterInfo(partition=name, nodes=sum(int(r[3]) for r in rows),
                       cpus_per_node=min(int(r[1].rstrip("+")) for r in rows),
                       gpus_per_node=min(_gpus_in_gres(r[2]) for r in rows))


# ---- resolved options and layout ----------------------------------------------------------------

@dataclass
class Resolved:
    """SlurmOptions with the site file and the defaults applied."""

    opts: SlurmOptions
    job_name: str
    partition: str | None
    account: str | None
    qos: str | None
    time: str | None
    gpus_per_node: int
    mpi: str
    grace_s: int
    sbatch_args: list[str]


def resolve(cfg: DeploymentConfig, opts: SlurmOptions | None, site: SiteConfig) -> Resolved:
    opts = opts or SlurmOptions()
    gpu_engine = cfg.engine.kind in ("vllm", "trtllm")
    gpus = opts.gpus_per_node
    if gpus is None:
        gpus = (site.gpus_per_node or 0) if gpu_engine else 0
    grace = opts.grace_s or max(60, math.ceil(cfg.runtime.shutdown_grace_s) + 30)
    return Resolved(
        opts=opts, job_name=opts.job_name or f"slurmserve-{cfg.model.served_name}",
        partition=opts.partition or site.partition, account=opts.account or site.account,
        qos=opts.qos or site.qos, time=_norm_time(opts.time or site.time), gpus_per_node=gpus,
        mpi=opts.mpi or site.mpi or "pmix", grace_s=grace,
        sbatch_args=[*site.sbatch_args, *opts.sbatch_args])


def _norm_time(t: str | None) -> str | None:
    return None if t is None else format_time(parse_time(t))


@dataclass
class Layout:
    nodes: int
    rank_node: list[int]               # node index (allocation order) of each rank
    rank_gpus: list[str]               # GPU slots of each rank on its node, e.g. "2,3"; "" for none
    rank_roles: list[str]              # head | worker | prefill | decode
    rank_instance: list[int | None]
    gpus_per_node: int
    warnings: list[str] = field(default_factory=list)

    @property
    def counts(self) -> list[int]:
        return [self.rank_node.count(n) for n in range(self.nodes)]

    @property
    def tasks_per_node(self) -> int:
        return max(self.counts)

    @property
    def uniform(self) -> bool:
        """srun's default block distribution places every rank where the plan wants it."""
        return len(set(self.counts)) == 1

    def describe(self) -> list[str]:
        lines = []
        for n in range(self.nodes):
            parts = []
            for r, node in enumerate(self.rank_node):
                if node != n:
                    continue
                if self.rank_roles[r] == "head":
                    parts.append(f"rank {r} head")
                else:
                    gpus = f" [GPU {self.rank_gpus[r]}]" if self.rank_gpus[r] else ""
                    parts.append(f"rank {r} {self.rank_roles[r]} {self.rank_instance[r]}{gpus}")
            lines.append(f"node {n}: " + ", ".join(parts))
        return lines


def plan_layout(cfg: DeploymentConfig, res: Resolved, cluster: ClusterInfo | None = None) -> Layout:
    """Where every rank runs and which GPUs it gets; SlurmError listing every problem otherwise."""
    if cfg.engine.kind != "trtllm" and cfg.engine.nodes_per_instance > 1:
        return _plan_spanning(cfg, res, cluster)
    opts = res.opts
    problems: list[str] = []
    warnings: list[str] = []
    roles = cfg.pools.instances()
    n_inst = len(roles)
    rpi = cfg.engine.ranks_per_instance
    tp = cfg.engine.tensor_parallel_size
    own = opts.head == "own-node"
    gpn = res.gpus_per_node
    gpr = 0 if gpn == 0 else (1 if rpi > 1 else tp)        # GPUs per engine rank
    gpi = gpr * rpi                                         # GPUs per instance (= tp with GPUs)
    cpt = opts.cpus_per_task

    # How many instances one node can hold, and why.
    cap, why = n_inst, ""
    if gpn:
        if gpn < gpi:
            problems.append(f"gpus_per_node={gpn} is less than engine.tensor_parallel_size={tp}: an "
                            f"instance's {gpi} GPUs must be on one node")
        else:
            cap, why = gpn // gpi, f"{gpn} GPUs per node / {gpi} per instance"
            if gpn % gpi:
                warnings.append(f"gpus_per_node={gpn} is not a multiple of tensor_parallel_size={tp}: "
                                f"{gpn % gpi} GPU(s) per node stay idle")
    if opts.instances_per_node is not None and opts.instances_per_node < cap:
        cap, why = opts.instances_per_node, f"instances_per_node={opts.instances_per_node}"
    if cluster is not None:
        by_cpu = cluster.cpus_per_node // (cpt * rpi)
        if by_cpu == 0:
            problems.append(f"an instance needs {rpi} rank(s) x {cpt} CPU(s), more than the "
                            f"{cluster.cpus_per_node} CPUs of a node in partition {cluster.partition}")
        elif by_cpu <= cap:
            cap, why = by_cpu, f"{cluster.cpus_per_node} CPUs per node / {cpt * rpi} per instance"
        problems += _missing_gpus(gpn, cluster)
    if problems:
        raise SlurmError(_problems(problems))
    cap = max(cap, 1)

    # The head's node holds fewer instances when the head takes CPUs there.
    cap0, why0 = cap, ""
    if cluster is not None and not own:
        room = (cluster.cpus_per_node - cpt) // (cpt * rpi)
        if room < cap:
            cap0, why0 = max(room, 0), f", the head's node {max(room, 0)} (the head takes {cpt} CPU(s))"

    def spread(engine_nodes: int) -> list[int] | None:
        """Instances per engine node, ranks (the head's included) as even as the capacities allow,
        earlier nodes first on ties; None when they do not fit."""
        caps = [cap0 if (i == 0 and not own) else cap for i in range(engine_nodes)]
        if sum(caps) < n_inst:
            return None
        counts = [0] * engine_nodes
        head = [1 if (i == 0 and not own) else 0 for i in range(engine_nodes)]
        for _ in range(n_inst):
            i = min((head[i] + c * rpi, i) for i, c in enumerate(counts) if c < caps[i])[1]
            counts[i] += 1
        return counts

    limit = f"a node holds at most {cap} instance(s) ({why}{why0})" if why else "too many ranks"
    if opts.nodes is not None:
        nodes = opts.nodes
        engine_nodes = nodes - 1 if own else nodes
        if engine_nodes < 1:
            raise SlurmError("head=own-node needs at least 2 nodes (one for the head, one or more for "
                             "the engines)")
        if engine_nodes > n_inst:
            need = n_inst + (1 if own else 0)
            raise SlurmError(f"nodes={nodes} is more than the deployment can use: {n_inst} engine "
                             f"instance(s){' plus the head node' if own else ''} fill at most {need} "
                             f"node(s)")
        per_node = spread(engine_nodes)
        if per_node is None:
            least = next((e for e in range(engine_nodes, n_inst + 1) if spread(e)), None)
            hint = f"; use --nodes={least + (1 if own else 0)}" if least else ""
            raise SlurmError(f"{n_inst} engine instance(s) do not fit on {nodes} node(s): {limit}{hint}")
    else:
        engine_nodes = next((e for e in range(1, n_inst + 1) if spread(e)), None)
        if engine_nodes is None:
            raise SlurmError(f"{n_inst} engine instance(s) do not fit even one per node: {limit}")
        per_node = spread(engine_nodes)
        nodes = engine_nodes + (1 if own else 0)
    if cluster is not None and nodes > cluster.nodes:
        raise SlurmError(f"the deployment needs {nodes} nodes, but partition {cluster.partition} has "
                         f"{cluster.nodes}")

    rank_node, rank_gpus, rank_roles, rank_instance = [0], [""], ["head"], [None]
    inst = 0
    for e, count in enumerate(per_node):
        node = e + (1 if own else 0)
        slot = 0
        for _ in range(count):
            for _ in range(rpi):
                rank_node.append(node)
                rank_gpus.append(",".join(str(slot + g) for g in range(gpr)))
                rank_roles.append(roles[inst])
                rank_instance.append(inst)
                slot += gpr
            inst += 1
    assert len(rank_node) == cfg.world_size
    return Layout(nodes=nodes, rank_node=rank_node, rank_gpus=rank_gpus, rank_roles=rank_roles,
                  rank_instance=rank_instance, gpus_per_node=gpn, warnings=warnings)


def _plan_spanning(cfg: DeploymentConfig, res: Resolved, cluster: ClusterInfo | None) -> Layout:
    """Instances that span nodes (engine.nodes_per_instance N, vLLM and the sim): the engine nodes
    form groups of N, and rank k of each instance of a group runs on the group's k-th node, with
    (tensor x pipeline parallel) / N GPUs there. A group holds as many instances as one of its nodes
    can; the head runs on the first node, or on a node of its own."""
    opts, eng = res.opts, cfg.engine
    roles = cfg.pools.instances()
    n_inst, npi, gpn, cpt = len(roles), eng.nodes_per_instance, res.gpus_per_node, opts.cpus_per_task
    own = opts.head == "own-node"
    world = eng.tensor_parallel_size * int(eng.args.get("pipeline_parallel_size", 1))
    gpr = 0 if gpn == 0 else world // npi                  # GPUs per rank
    cap = n_inst if opts.instances_per_node is None else opts.instances_per_node
    problems = []
    if gpn:
        if gpn < gpr:
            problems.append(f"gpus_per_node={gpn} is less than the {gpr} GPUs each node of an instance needs "
                            f"(tensor x pipeline parallel {world} over nodes_per_instance={npi})")
        else:
            cap = min(cap, gpn // gpr)
    if cluster is not None:
        cap = min(cap, cluster.cpus_per_node // cpt)
        problems += _missing_gpus(gpn, cluster)
    if problems:
        raise SlurmError(_problems(problems))
    cap = max(cap, 1)
    groups = -(-n_inst // cap)
    if opts.nodes is not None:
        engine_nodes = opts.nodes - (1 if own else 0)
        if engine_nodes < npi or engine_nodes % npi or engine_nodes // npi > n_inst:
            raise SlurmError(f"nodes={opts.nodes}: instances of engine.nodes_per_instance={npi} need the engine "
                             f"nodes{' (all but the head' + chr(39) + 's)' if own else ''} in groups of {npi}, "
                             f"at most {n_inst} group(s)")
        if engine_nodes // npi < groups:
            raise SlurmError(f"{n_inst} instance(s) do not fit on {engine_nodes // npi} group(s) of {npi} "
                             f"node(s): a node holds at most {cap}")
        groups = engine_nodes // npi
    nodes = groups * npi + (1 if own else 0)
    if cluster is not None and nodes > cluster.nodes:
        raise SlurmError(f"the deployment needs {nodes} nodes, but partition {cluster.partition} has "
                         f"{cluster.nodes}")
    rank_node, rank_gpus, rank_roles, rank_instance = [0], [""], ["head"], [None]
    for inst in range(n_inst):
        group, slot = inst % groups, inst // groups        # instances spread over the groups evenly
        for k in range(npi):
            rank_node.append((1 if own else 0) + group * npi + k)
            rank_gpus.append(",".join(str(slot * gpr + g) for g in range(gpr)))
            rank_roles.append(roles[inst])
            rank_instance.append(inst)
    assert len(rank_node) == cfg.world_size
    return Layout(nodes=nodes, rank_node=rank_node, rank_gpus=rank_gpus, rank_roles=rank_roles,
                  rank_instance=rank_instance, gpus_per_node=gpn)


def _missing_gpus(gpn: int, cluster: ClusterInfo) -> list[str]:
    if gpn and cluster.gpus_per_node < gpn:
        return [f"gpus_per_node={gpn}, but nodes in partition {cluster.partition} have "
                f"{cluster.gpus_per_node} GPU(s)"]
    return []


def _problems(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)


def validate(cfg: DeploymentConfig, res: Resolved, cluster: ClusterInfo | None) -> Layout:
    """Every check that can be made before queueing; SlurmError listing the problems, else the layout
    (with warnings for what works but is probably not meant)."""
    problems: list[str] = []
    warnings: list[str] = []
    if res.time is not None:
        limit = parse_time(res.time)
        if limit <= res.grace_s:
            problems.append(f"time limit {res.time} is not longer than the preemption warning "
                            f"(--signal=USR2@{res.grace_s}): the job would drain as soon as it starts")
    if res.grace_s < cfg.runtime.shutdown_grace_s:
        warnings.append(f"grace_s={res.grace_s} is shorter than runtime.shutdown_grace_s="
                        f"{cfg.runtime.shutdown_grace_s}: in-flight requests may be cut at the time limit")
    if not cfg.model.path.exists():
        problems.append(f"model.path {cfg.model.path} does not exist (the compute nodes read it from "
                        f"the same path)")
    if cfg.engine.kind in ("vllm", "trtllm") and res.gpus_per_node == 0:
        warnings.append(f"engine.kind={cfg.engine.kind} with no GPUs requested (gpus_per_node=0): the "
                        f"engines run on CPU")
    try:
        layout = plan_layout(cfg, res, cluster)
    except SlurmError as e:
        problems.append(str(e))
        layout = None
    if problems:
        raise SlurmError(_problems(problems))
    if cfg.router.port != 0:
        warnings.append(f"router.port={cfg.router.port} is fixed: two deployments on one node collide "
                        f"(router.port: 0 picks a free port; the registry records it)")
    if cfg.router.host in ("127.0.0.1", "localhost", "::1"):
        warnings.append(f"router.host={cfg.router.host}: the endpoint is reachable only on the head's "
                        f"node (leave router.host unset to bind the job's network interface)")
    layout.warnings = warnings + layout.warnings
    return layout


# ---- rendering ----------------------------------------------------------------------------------

def _python(site: SiteConfig) -> str:
    return site.python or sys.executable


def _rank_command(cfg: DeploymentConfig, config_path: str | os.PathLike | None, overrides: list[str],
                  site: SiteConfig) -> list[str]:
    cmd = [_python(site), "-m", "slurmserve", "run"]
    if config_path is not None:
        cmd.append(str(Path(config_path).expanduser().resolve()))
    extra = list(overrides)
    if site.interface and cfg.runtime.interface is None:
        extra.append(f"runtime.interface={site.interface}")
    for o in extra:
        cmd += ["--set", o]
    return cmd


def _mpi_env(cfg: DeploymentConfig, site: SiteConfig) -> list[tuple[str, str]]:
    """Open MPI's TCP between ranks on the job's interface (runtime.interface, else the site's), when
    one is named. This picks the addresses ranks use and advertise; Open MPI 4.1 still binds its
    listeners to every address (README, "What MPI's wire protects")."""
    iface = cfg.runtime.interface or site.interface
    if not iface:
        return []
    return [("OMPI_MCA_btl_tcp_if_include", iface), ("OMPI_MCA_oob_tcp_if_include", iface)]


def _sbatch_lines(cfg: DeploymentConfig, res: Resolved, layout: Layout) -> list[str]:
    log_dir = cfg.log_dir
    lines = [f"--job-name={res.job_name}"]
    for key in ("partition", "account", "qos"):
        if getattr(res, key):
            lines.append(f"--{key}={getattr(res, key)}")
    if res.time:
        lines.append(f"--time={res.time}")
    lines += [f"--nodes={layout.nodes}",
              f"--ntasks={cfg.world_size}",
              f"--ntasks-per-node={layout.tasks_per_node}",
              f"--cpus-per-task={res.opts.cpus_per_task}"]
    if layout.gpus_per_node:
        lines.append(f"--gpus-per-node={layout.gpus_per_node}")
    if res.opts.mem:
        lines.append(f"--mem={res.opts.mem}")
    lines += [f"--output={log_dir}/slurm-%j.out",
              f"--error={log_dir}/slurm-%j.out",
              "--open-mode=append",
              f"--signal=USR2@{res.grace_s}"]
    if res.opts.requeue:
        lines.append("--requeue")
    lines += res.sbatch_args
    return lines


def _srun_args(cfg: DeploymentConfig, res: Resolved, layout: Layout) -> list[str]:
    args = [f"--mpi={res.mpi}", f"--ntasks={cfg.world_size}", f"--nodes={layout.nodes}",
            "--distribution=block" if layout.uniform else "--distribution=arbitrary",
            "--kill-on-bad-exit=0", "--label"]
    return args


def render_sbatch(cfg: DeploymentConfig, config_path: str | os.PathLike | None,
                  slurm_opts: SlurmOptions | dict | None = None, site: SiteConfig | None = None,
                  overrides: list[str] = (), *, cluster: ClusterInfo | None | str = "auto",
                  warn=None) -> str:
    """The job script for a deployment. `cluster="auto"` asks sinfo (skipped where there is none);
    None skips the cluster checks. Warnings go to `warn(message)` (default: stderr)."""
    import jinja2
    from slurmserve import __version__

    site = site or SiteConfig()
    opts = merge_options(getattr(cfg, "slurm", None), options_from(slurm_opts) if slurm_opts else None)
    res = resolve(cfg, opts, site)
    if cluster == "auto":
        cluster = cluster_info(res.partition)
    layout = validate(cfg, res, cluster)
    for w in layout.warnings:
        (warn or (lambda m: print(f"slurmserve: warning: {m}", file=sys.stderr)))(w)

    pools = cfg.pools
    pools_text = (f"{pools.prefill} prefill + {pools.decode} decode instances" if pools.disaggregated
                  else f"{pools.workers} worker instance(s)")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(template_path().parent)),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["q"] = lambda s: shlex.quote(str(s))
    counts = layout.counts
    ctx = dict(
        version=__version__, model=cfg.model.served_name, pools_text=pools_text,
        world_size=cfg.world_size,
        config_text=str(Path(config_path).expanduser().resolve()) if config_path else "the embedded default config",
        log_dir=str(cfg.log_dir), state_dir=str(registry.state_dir()),
        nodes=layout.nodes, head=opts.head, layout_lines=layout.describe(), tp=cfg.engine.tensor_parallel_size,
        gpus_per_node=layout.gpus_per_node, sbatch_lines=_sbatch_lines(cfg, res, layout),
        modules=site.modules, setup=site.setup, requeue=opts.requeue, grace=res.grace_s,
        layout_arbitrary=not layout.uniform, rank_node=layout.rank_node, rank_gpus=layout.rank_gpus,
        counts_text=", ".join(f"node {n}: {c}" for n, c in enumerate(counts)),
        srun_args=_srun_args(cfg, res, layout), container=site.container, mpi_env=_mpi_env(cfg, site),
        rank_command=shlex.join(_rank_command(cfg, config_path, list(overrides), site)))
    return env.get_template(TEMPLATE_NAME).render(**ctx)


# ---- submission ---------------------------------------------------------------------------------

def _run(cmd: list[str], *, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SlurmError(f"{cmd[0]}: command not found (is this a Slurm login node?)") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{cmd[0]} did not answer within {timeout:.0f} s") from None


def submit(cfg: DeploymentConfig, config_path: str | os.PathLike | None,
           slurm_opts: SlurmOptions | dict | None = None, site: SiteConfig | None = None,
           overrides: list[str] = (), *, cluster: ClusterInfo | None | str = "auto", warn=None) -> str:
    """Validate, render, `sbatch --parsable`, register; returns the job id."""
    site = site or SiteConfig()
    script = render_sbatch(cfg, config_path, slurm_opts, site, overrides, cluster=cluster, warn=warn)
    opts = merge_options(getattr(cfg, "slurm", None), options_from(slurm_opts) if slurm_opts else None)
    res = resolve(cfg, opts, site)
    cfg.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    r = _run(["sbatch", "--parsable"], input=script)
    if r.returncode != 0:
        msg = " ".join(r.stderr.split()) or f"exit status {r.returncode}"
        raise SlurmError(f"sbatch refused the job: {msg}")
    job_id = r.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch --parsable printed {r.stdout.strip()!r}, not a job id")
    (cfg.log_dir / f"slurm-{job_id}.sbatch").write_text(script)
    register_submission(job_id, cfg, launcher="sbatch", config_path=config_path,
                        batch_log=str(cfg.log_dir / f"slurm-{job_id}.out"), time_limit=res.time,
                        grace_s=res.grace_s, requeue="scontrol" if opts.requeue else None)
    return job_id


def register_submission(job_id: str, cfg: DeploymentConfig, *, launcher: str, config_path=None,
                        batch_log: str | None, time_limit: str | None, grace_s: int,
                        requeue: str | None) -> dict:
    """The registry entry a submission starts with (the head fills in the endpoint)."""
    fields = dict(launcher=launcher, model=cfg.model.served_name,
                  pools=cfg.pools.model_dump(exclude_none=True), world_size=cfg.world_size,
                  log_dir=str(cfg.log_dir), batch_log=batch_log,
                  config=str(Path(config_path).expanduser().resolve()) if config_path else None,
                  time_limit=time_limit, grace_s=grace_s, submitted=time.time(), requeue=requeue)
    if registry.read_entry(job_id) is None:      # the head may have been quicker
        fields["status"] = "starting"
    return registry.write_entry(job_id, **fields)


# ---- job state ----------------------------------------------------------------------------------

ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
                 "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED",
                 "RESV_DEL_HOLD"}


@dataclass
class JobState:
    job_id: str
    state: str                 # Slurm's, e.g. RUNNING; UNKNOWN when neither squeue nor sacct knows it
    time_left: str | None      # squeue %L while the job is queued or running
    nodes: str | None
    reason: str | None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def ended(self) -> bool:
        return not self.active and self.state != "UNKNOWN"


def job_state(job_id: str) -> JobState:
    r = _run(["squeue", "-h", "--states=all", "-j", str(job_id), "-o", "%T|%L|%N|%r"])
    if r.returncode == 0 and r.stdout.strip():
        state, left, nodes, reason = (r.stdout.strip().splitlines()[0].split("|") + [""] * 4)[:4]
        active = state in ACTIVE_STATES
        return JobState(str(job_id), state, left if active and left not in ("", "INVALID") else None,
                        nodes or None, None if reason in ("", "None") else reason)
    if shutil.which("sacct"):
        r = _run(["sacct", "-X", "-n", "-P", "-j", str(job_id), "-o", "State,NodeList"])
        if r.returncode == 0 and r.stdout.strip():
            state, nodes = (r.stdout.strip().splitlines()[-1].split("|") + [""])[:2]
            return JobState(str(job_id), state.split()[0] if state else "UNKNOWN", None, nodes or None, None)
    return JobState(str(job_id), "UNKNOWN", None, None, None)


def signal_job(job_id: str, sig: str = "USR2", full: bool = True) -> None:
    cmd = ["scancel", f"--signal={sig}"] + (["--full"] if full else []) + [str(job_id)]
    r = _run(cmd)
    if r.returncode != 0:
        raise SlurmError(f"scancel --signal={sig} {job_id}: {' '.join(r.stderr.split())}")


def cancel_job(job_id: str) -> None:
    r = _run(["scancel", str(job_id)])
    if r.returncode != 0 and "already completing or completed" not in r.stderr \
            and "Invalid job id" not in r.stderr:
        raise SlurmError(f"scancel {job_id}: {' '.join(r.stderr.split())}")


def resolved_for(cfg: DeploymentConfig, slurm_opts=None, site: SiteConfig | None = None) -> Resolved:
    opts = merge_options(getattr(cfg, "slurm", None), options_from(slurm_opts) if slurm_opts else None)
    return resolve(cfg, opts, site or SiteConfig())


__all__ = ["ClusterInfo", "JobState", "Layout", "Resolved", "cluster_info", "job_state", "plan_layout",
           "render_sbatch", "resolve", "submit", "validate", "format_time"]
