"""The deployment config: one pydantic model, loaded from YAML, with --set overrides.

Every rank of a deployment reads the same file, so everything a rank needs to find its role
is derivable from the config plus its MPI rank.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slurmserve.slurm_config import SlurmOptions


class ConfigError(Exception):
    """A config that cannot be used; the message lists every problem with its key path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    path: Path = Field(description="Local model directory (weights, config.json, tokenizer).")
    name: str | None = Field(None, description="Served model name; defaults to the directory name.")
    max_model_len: int = Field(4096, gt=0, description="Longest prompt + completion accepted, in tokens.")
    stage: Literal["auto", "none", "node-local", "broadcast"] = Field(
        "auto", description="Copy the model to each node's local disk before engines load it "
                            "(runtime/weight_stage.py): broadcast (one reader per file, MPI fan-out), "
                            "node-local (every node reads `path` itself), none (load from `path`). "
                            "auto: broadcast when the job spans more than one node, else none.")
    stage_dir: str | None = Field(
        None, description="Node-local directory for staged copies; $VARS are expanded on each node. "
                          "Default: $SLURMSERVE_STAGE_DIR (a site file's `setup:` can export it), "
                          "else $TMPDIR, else /tmp.")

    @field_validator("stage_dir")
    @classmethod
    def _absolute_stage_dir(cls, v: str | None) -> str | None:
        # "$VAR/..." is checked on the node, once expanded; a plain relative path is a mistake now
        if v is not None and not v.startswith(("/", "$", "~")):
            raise ValueError(f"{v!r} must be an absolute path (or start with $VAR or ~)")
        return v

    @property
    def served_name(self) -> str:
        return self.name or self.path.name


class SimConfig(_Strict):
    """Simulated engine: continuous batching over paged KV blocks with a polynomial step-time model."""

    speedup: float = Field(1.0, gt=0, description="Divides every step time; .inf means no sleeping.")
    load_time_s: float = Field(0.0, ge=0, description="Seconds the engine takes to start, as a "
                               "model load would (start-up failures and time to ready are tested so).")
    max_num_seqs: int = Field(256, gt=0)
    max_num_batched_tokens: int = Field(8192, gt=0)
    num_kv_blocks: int = Field(2048, gt=0)
    block_size: int = Field(16, gt=0)
    # prefill_ms = a*T^2 + b*T + c with T uncached tokens in the step (default: a published simulator's fit).
    prefill_coeffs: tuple[float, float, float] = (4.209989e-07, 1.518344e-02, 16.50142)
    # decode_ms = a*u^2 + b*u + c with u the KV utilization, floored at 1 ms.
    decode_coeffs: tuple[float, float, float] = (-25.74, 54.01, 5.74)
    seed: int = 0
    # Disaggregated pools move real KV bytes: prefill instances fill kv_bytes_per_token per token in
    # a registered host buffer, decode instances pull them (kvfabric/kv_transfer.py) and verify them.
    kv_bytes_per_token: int = Field(512, gt=0, multiple_of=8, description="Simulated KV bytes per token.")
    kv_transfer: Literal["auto", "nixl", "zmq", "none"] = Field(
        "auto", description="How disaggregated instances move KV: nixl (UCX), zmq, auto (nixl when "
                            "importable), or none (no bytes; a modelled cost per block).")


# Engine kinds this build can run (runtime/engine.py create_engine).
AVAILABLE_ENGINES = ("sim", "vllm", "trtllm")
TRTLLM_UNVERIFIED = ("engine.kind trtllm: the TensorRT-LLM adapter (runtime/trtllm_engine.py) has been "
                     "tested only against a stand-in of TensorRT-LLM's LLM API, never against real TensorRT-LLM")


class EngineConfig(_Strict):
    kind: Literal["sim", "vllm", "trtllm"] = "sim"
    tensor_parallel_size: int = Field(1, ge=1)
    nodes_per_instance: int = Field(1, ge=1, description="sim and vllm: ranks (one per node) one instance "
                                    "spans; vLLM then runs multi-node tensor/pipeline parallel, its "
                                    "followers headless. trtllm runs one rank per GPU instead.")
    args: dict[str, Any] = Field(default_factory=dict, description="Passed through to the engine.")
    sim: SimConfig = Field(default_factory=SimConfig)

    @field_validator("kind")
    @classmethod
    def _available(cls, kind: str) -> str:
        if kind not in AVAILABLE_ENGINES:
            raise ValueError(f"{kind!r} is not available in this build "
                             f"(available: {', '.join(AVAILABLE_ENGINES)})")
        if kind == "trtllm":
            # refused here, before anything is submitted, rather than by a rank that cannot start
            if importlib.util.find_spec("tensorrt_llm") is None:
                raise ValueError("'trtllm' needs the tensorrt_llm package (TensorRT-LLM), which does not "
                                 "import here")
            logging.getLogger(__name__).warning("%s", TRTLLM_UNVERIFIED)
        return kind

    @property
    def ranks_per_instance(self) -> int:
        # TensorRT-LLM runs one MPI rank per GPU; vLLM and the simulator one per node of the instance.
        if self.kind == "trtllm":
            return self.tensor_parallel_size * int(self.args.get("pipeline_parallel_size", 1))
        return self.nodes_per_instance


class PoolsConfig(_Strict):
    """Either one aggregated pool (`workers`) or a prefill pool and a decode pool."""

    workers: int | None = Field(None, ge=1)
    prefill: int | None = Field(None, ge=1)
    decode: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_shape(self) -> PoolsConfig:
        if self.workers is not None and (self.prefill is not None or self.decode is not None):
            raise ValueError("set either `workers` (aggregated) or `prefill` + `decode`, not both")
        if self.workers is None and (self.prefill is None or self.decode is None):
            raise ValueError("set `workers` for an aggregated pool, or both `prefill` and `decode`")
        return self

    @property
    def disaggregated(self) -> bool:
        return self.workers is None

    def instances(self) -> list[str]:
        """Role of each engine instance, in rank order."""
        if self.disaggregated:
            return ["prefill"] * self.prefill + ["decode"] * self.decode
        return ["worker"] * self.workers


class KVRoutingConfig(_Strict):
    """The `kv` policy (router/policies.py KVAware explains the cost)."""

    index: Literal["events", "approximate"] = Field(
        "events", description="Fleet KV index fed by the engines' KV events, or (approximate) by the "
                              "router's own decisions, for engines that publish none.")
    approx_ttl_s: float = Field(120.0, gt=0, description="Approximate mode: how long a routed prefix "
                                                         "is assumed cached.")
    prefill_load_scale: float = Field(4.0, ge=0, description="Weight of prefill work (queued, and this "
                                      "prompt's uncached part) against held KV in the cost; 4 measured "
                                      "best on the shared-prefix benchmark (docs/benchmarks.md).")
    busy_threshold: float = Field(0.95, gt=0, le=1, description="KV usage at which an instance is "
                                                                "passed over while another is free.")
    temperature: float = Field(0.0, ge=0, description="0: lowest cost wins; >0: softmax sampling.")


class DisaggConfig(_Strict):
    """When a disaggregated deployment sends a prompt to the prefill pool rather than letting the
    decode instance prefill it: only when enough of it is not cached there already."""

    min_uncached_tokens: int = Field(2048, ge=0)
    min_uncached_fraction: float = Field(0.3, ge=0, le=1)
    prefill_timeout_s: float = Field(30.0, gt=0, description="A prefill leg that takes longer is "
                                     "abandoned and the decode instance prefills the prompt itself.")


class RouterConfig(_Strict):
    host: str | None = Field(
        None, description="HTTP bind address. Unset: the address the runtime chose for the job, i.e. "
                          "loopback when every rank is on one host, else the job's interface.")
    port: int = Field(8000, ge=0, le=65535, description="0 picks a free port.")
    policy: Literal["round_robin", "least_loaded", "kv"] = "round_robin"
    kv: KVRoutingConfig = Field(default_factory=KVRoutingConfig)
    session_header: str | None = Field(
        None, description="Session affinity: requests carrying this header (e.g. x-session-id) with "
                          "the same value go to the same instance while it lives, whatever the policy.")
    disagg: DisaggConfig = Field(default_factory=DisaggConfig)
    max_concurrent_requests: int = Field(4096, gt=0)
    http_read_timeout_s: float = Field(
        60.0, gt=0, description="A request's head must arrive within this long of its first byte, and "
                                "its body may pause no longer; else 408 and the connection closes "
                                "(slow clients, slowloris). vLLM and nginx use about 60 s.")
    max_connections_per_client: int = Field(
        8192, gt=0, description="Open connections one client address may hold; more are refused with "
                                "429. Above max_concurrent_requests, so that a gateway or a load "
                                "generator (one address for all) meets the in-flight limit first; "
                                "lowered to half the process's open-file limit.")
    stream_interval: int = Field(
        1, ge=1, description="vLLM's --stream-interval: a streamed response gets its first token at "
                             "once, then a chunk per this many tokens (and the last). Larger values "
                             "cost the head less per request at the price of burstier streams.")
    tool_call_parser: str | None = Field(
        None, description="vLLM's tool-call parser for this model (vllm serve --tool-call-parser: "
                          "hermes, llama3_json, mistral, pythonic, ...). Set, a chat request's tools "
                          "default to tool_choice \"auto\" and calls are read from the model's text; "
                          "the head then imports vLLM. Unset, \"required\" and named functions "
                          "still work (constrained JSON).")
    http_workers: int | None = Field(
        None, ge=1, le=64,
        description="HTTP front-end processes (tokenizing, detokenizing, the OpenAI API), sharing the "
                    "port with SO_REUSEPORT; with more than 1, a router process of its own owns the "
                    "routing state, the KV index and the engine connections. Unset: inside a Slurm "
                    "job, the CPUs the head's task may run on, at most 8; outside one, 1. "
                    "`slurmserve batch` always uses 1 (it sends its lines in-process).")
    migration_limit: int = Field(
        3, ge=0, description="A request whose engine instance dies or hangs mid-request continues on "
                             "another instance of its pool (prompt + the tokens already generated), "
                             "at most this many times; then, or with 0, it ends with an error.")


class RuntimeConfig(_Strict):
    interface: str | None = Field(
        None, description="Network interface for ZeroMQ between ranks; default: loopback when all "
                          "ranks share one host, else the address the hostname resolves to.")
    heartbeat_interval_s: float = Field(0.5, gt=0, le=1.0)
    heartbeat_timeout_s: float = Field(2.0, gt=0)
    head_timeout_s: float = Field(
        60.0, gt=0, description="An engine rank whose head is alive but silent this long leaves it. "
                                "A head whose process ended is noticed within seconds by its closed "
                                "connection; this limit is for a hung node, so a head that stalls "
                                "for a while (a huge request) is never left.")
    engine_start_timeout_s: float = Field(
        1200.0, gt=0, description="An engine instance that has not started this long after its "
                                  "rank began (weights loaded, KV cache allocated) has failed, and "
                                  "with it the deployment unless runtime.min_instances allows. Raise "
                                  "it for models that take longer to load from your filesystem.")
    shutdown_grace_s: float = Field(5.0, ge=0)
    min_instances: int | None = Field(
        None, ge=1, description="Engine instances that must start for the deployment to serve. "
                                "Unset: all of them; an instance that fails to start fails the job. "
                                "Set lower to serve with a partly started pool (each pool still "
                                "needs one live instance).")


class BatchConfig(_Strict):
    """Offline batch generation (`slurmserve batch`): the head sends every line of `input` through
    its own OpenAI handlers, appends the answers to `output`, and the deployment exits when done."""

    input: Path = Field(description="OpenAI batch input, JSONL: {custom_id, method, url, body}.")
    output: Path = Field(description="Answers (and errors, unless `errors` is set); resumed if present.")
    errors: Path | None = Field(None, description="Error records go here instead of `output`.")
    shard: str | None = Field(None, pattern=r"^\d+/\d+$", description="i/n: this run does input lines "
                              "L with (L-1) mod n == i; default from SLURM_ARRAY_TASK_ID/_COUNT.")
    ordered: bool = Field(False, description="Write records in input order.")
    max_inflight: int | None = Field(None, gt=0, description="Requests in flight; default: 2x the "
                                     "engines' batch capacity (sum of max_num_seqs).")
    checkpoint_records: int = Field(256, gt=0, description="Append + fsync after this many records...")
    checkpoint_interval_s: float = Field(1.0, gt=0, description="... or this long, whichever first.")
    progress_interval_s: float = Field(10.0, gt=0, description="Progress log line period (no TTY).")
    retries: int = Field(3, ge=0, description="Retries of a request the deployment could not take "
                                              "(429/5xx) before it is left for the next run.")


class DeploymentConfig(_Strict):
    model: ModelConfig
    engine: EngineConfig = Field(default_factory=EngineConfig)
    pools: PoolsConfig = Field(default_factory=lambda: PoolsConfig(workers=1))
    router: RouterConfig = Field(default_factory=RouterConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    api_key_file: Path | None = Field(
        None, description="File holding the API key clients must send; generated 0600 when absent.")
    log_dir: Path = Field(Path("runs/latest"), description="Per-rank logs and the generated API key.")
    slurm: SlurmOptions | None = Field(None, description="Slurm layout for `slurmserve sbatch|submit`.")
    batch: BatchConfig | None = Field(None, description="Run a batch file, then exit (`slurmserve batch`).")

    @property
    def world_size(self) -> int:
        """MPI ranks the deployment needs: the head plus every engine rank."""
        return 1 + len(self.pools.instances()) * self.engine.ranks_per_instance

    @model_validator(mode="after")
    def _engine_fits(self) -> DeploymentConfig:
        sim = self.engine.sim
        if self.engine.kind == "sim" and sim.num_kv_blocks * sim.block_size < self.model.max_model_len:
            raise ValueError(
                f"engine.sim holds {sim.num_kv_blocks * sim.block_size} KV tokens, fewer than "
                f"model.max_model_len={self.model.max_model_len}")
        nodes = self.engine.nodes_per_instance
        if self.engine.kind == "vllm" and nodes > 1:
            # vLLM's multi-node executor splits the instance's workers evenly over its nodes
            world = self.engine.tensor_parallel_size * int(self.engine.args.get("pipeline_parallel_size", 1))
            if world % nodes:
                raise ValueError(f"engine.nodes_per_instance={nodes} must divide the instance's "
                                 f"tensor_parallel_size x pipeline_parallel_size = {world}")
        n = len(self.pools.instances())
        if self.runtime.min_instances is not None and self.runtime.min_instances > n:
            raise ValueError(f"runtime.min_instances={self.runtime.min_instances} is more than the "
                             f"{n} engine instances the pools have")
        return self


def _parse_scalar(text: str) -> Any:
    """`--set` values are YAML scalars, so `4`, `true`, `.inf`, `[1,2]` and `null` mean what they say."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:i + 1])} is not a mapping")
            node = child
        node[parts[-1]] = _parse_scalar(value)
    return data


def format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {err.error_count()} error(s)"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def read_yaml_mapping(path: str | os.PathLike, label: str) -> dict:
    """A YAML file whose top level is a mapping (empty file: {}), or a ConfigError saying why not."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ConfigError(f"{label}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{label}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> DeploymentConfig:
    """Load a YAML file (or the embedded default when path is None) and apply `--set` overrides.

    Relative paths inside the file are taken relative to the file, so a config works from any cwd.
    """
    if path is None:
        data, base, source = default_config_dict(), Path.cwd(), "<embedded default>"
    else:
        data = read_yaml_mapping(path, str(path))
        base, source = Path(path).resolve().parent, str(path)
    data = apply_overrides(data, list(overrides))
    try:
        cfg = DeploymentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, source)) from None
    return _resolve_paths(cfg, base)


def _resolve_paths(cfg: DeploymentConfig, base: Path) -> DeploymentConfig:
    def fix(p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    cfg.model.path = fix(cfg.model.path)
    cfg.log_dir = fix(cfg.log_dir)
    if cfg.api_key_file is not None:
        cfg.api_key_file = fix(cfg.api_key_file)
    if cfg.batch is not None:
        cfg.batch.input, cfg.batch.output = fix(cfg.batch.input), fix(cfg.batch.output)
        if cfg.batch.errors is not None:
            cfg.batch.errors = fix(cfg.batch.errors)
    return cfg


def default_model_dir() -> Path:
    """Where `slurmserve model make-tiny` puts the demo model when no directory is given."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "slurmserve" / "tiny-llama"


def default_config_dict() -> dict:
    """The embedded default: the tiny model on four simulated workers behind a loopback head."""
    return {
        "model": {"path": str(default_model_dir()), "name": "tiny-llama", "max_model_len": 2048},
        "engine": {"kind": "sim"},
        "pools": {"workers": 4},
        "router": {"port": 8000},
        "log_dir": str(Path.cwd() / "runs" / "default"),
    }


def dump_config(cfg: DeploymentConfig) -> str:
    return yaml.safe_dump(_plain(cfg.model_dump()), sort_keys=False)


def _plain(x: Any) -> Any:
    """Paths to strings and tuples to lists, so YAML stays plain (and `.inf` stays a float)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return str(x) if isinstance(x, Path) else x
