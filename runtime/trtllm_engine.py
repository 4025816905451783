"""TensorRT-LLM adapter: one `tensorrt_llm.LLM` (its LLM API, PyTorch backend) per engine instance.

NOT YET RUN AGAINST REAL TensorRT-LLM. It was written from TensorRT-LLM's source (NVIDIA/TensorRT-LLM:
tensorrt_llm/llmapi/llm.py @4c05a748, executor/result.py @a678b91a, disaggregated_params.py
@b828dace, sampling_params.py @a98a9061, llmapi/mpi_session.py MpiCommSession,
llmapi/mgmn_worker_node.py, _utils.py KVCacheEventSerializer) and is tested against a stand-in
built from those signatures (tests/fakes/tensorrt_llm). `config validate` warns until it has run.

* Requests: `LLM.generate_async(token_ids, SamplingParams(detokenize=False), streaming=True)`; each
  streamed `RequestOutput` gives `outputs[0].token_ids_diff`; `GenerationResult.abort()` aborts.
* Disaggregation: a PREFILL_ONLY leg is `DisaggregatedParams(request_type="context_only")`; the
  `disaggregated_params` of its last output (first_gen_tokens, ctx_request_id, opaque_state,
  draft_tokens) are the handoff, which the decode instance passes back as a "generation_only"
  request. TensorRT-LLM's cache transceiver (`cache_transceiver_config`) moves the KV itself.
* Load: `get_stats_async()` iteration stats (numActiveRequests, numQueuedRequests, kvCacheStats).
* KV events: `get_kv_cache_events_async()` yields TensorRT-LLM's own block hashes, which the head
  cannot compute. Stored blocks carry their tokens, so they are re-hashed here with vLLM's chained
  hash (kvfabric/block_hash.py) and re-published in vLLM's format; the instance declares that
  scheme. Blocks with extra token ids (multimodal, LoRA) are not re-published.
* Several ranks (tensor_parallel_size * pipeline_parallel_size, one per GPU): the leader passes an
  `MpiCommSession` on the instance's communicator as `_mpi_session`; followers serve that
  communicator with mpi4py's MPICommExecutor, as TensorRT-LLM's own mgmn_worker_node.py does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from slurmserve.kvfabric.block_hash import BlockHasher, event_hash
from slurmserve.kvfabric.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventPublisher
from slurmserve.runtime import protocol as P
from slurmserve.runtime.engine import Engine, EngineContext, EngineRequest
from slurmserve.runtime.protocol import Delta, EngineInfo, Load

log = logging.getLogger(__name__)

KV_EVENTS_TOPIC = "kv-events"
DEFAULT_TOKENS_PER_BLOCK = 32        # TensorRT-LLM's KvCacheConfig default
STATS_TIMEOUT_S = 2.0                # get_stats_async / get_kv_cache_events_async polling period
IDLE_POLL_S = 0.25
HANDOFF_FIELDS = ("first_gen_tokens", "ctx_request_id", "opaque_state", "draft_tokens")
_FINISH = {"stop": "stop", "length": "length", "cancelled": "abort", "timeout": "error"}
_MAX_EARLY_ABORTS = 4096


def engine_kwargs(cfg, ctx: EngineContext) -> dict[str, Any]:
    """`LLM(...)` keyword arguments: our defaults, then cfg.engine.args on top (dicts extend ours)."""
    kw: dict[str, Any] = {
        "model": str(cfg.model.path),
        "backend": "pytorch",
        "tensor_parallel_size": cfg.engine.tensor_parallel_size,
        "max_seq_len": cfg.model.max_model_len,
        "enable_iter_perf_stats": True,                 # get_stats_async yields nothing without it
        # block reuse is TensorRT-LLM's prefix cache; events need a buffer
        "kv_cache_config": {"enable_block_reuse": True, "event_buffer_max_size": 16384},
    }
    if ctx.role in ("prefill", "decode"):
        kw["cache_transceiver_config"] = {"backend": "DEFAULT"}
    for key, value in cfg.engine.args.items():
        kw[key] = {**kw[key], **value} if isinstance(kw.get(key), dict) and isinstance(value, dict) else value
    return kw


def sampling_params(p: P.SamplingParams, max_tokens: int):
    from tensorrt_llm.llmapi import SamplingParams
    return SamplingParams(
        max_tokens=max_tokens, temperature=p.temperature, top_p=p.top_p,
        top_k=p.top_k if p.top_k > 0 else None,          # ours: -1 = off; TensorRT-LLM: None
        seed=p.seed, presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty, min_p=p.min_p or None, min_tokens=p.min_tokens or None,
        ignore_eos=p.ignore_eos, stop_token_ids=list(p.stop_token_ids) or None,
        detokenize=False)                                # the head detokenizes


def unsupported(p: P.SamplingParams) -> str | None:
    """Request features this adapter does not pass on yet: refused, not silently ignored."""
    for name in ("logprobs", "prompt_logprobs", "logit_bias", "structured_outputs"):
        if getattr(p, name, None) is not None:
            return f"{name} is not supported by the TensorRT-LLM engine adapter yet"
    return None


def disaggregated_params(request: EngineRequest):
    """TensorRT-LLM's encoding of a request's phase (None: an ordinary request)."""
    if request.phase == P.AGGREGATED:
        return None
    from tensorrt_llm.llmapi import DisaggregatedParams
    if request.prefill_only:
        return DisaggregatedParams(request_type="context_only")
    h = request.handoff or {}
    return DisaggregatedParams(request_type="generation_only", **{k: h.get(k) for k in HANDOFF_FIELDS})


def handoff_of(params: Any) -> dict[str, Any] | None:
    """The handoff a context-only leg returns: its DisaggregatedParams' fields (msgpack-able)."""
    if params is None:
        return None
    out = {k: getattr(params, k, None) for k in HANDOFF_FIELDS}
    return out if out["ctx_request_id"] is not None else None


class KVEventTranslator:
    """TensorRT-LLM KV-cache event dicts -> vLLM-format events with vLLM's block hashes."""

    def __init__(self, block_size: int, hash_seed: str | None = None, algo: str = "sha256"):
        self.hasher = BlockHasher(block_size, hash_seed, algo)
        self.digests: dict[int, bytes] = {}          # TensorRT-LLM block hash -> our digest

    def translate(self, event: dict) -> list:
        data = event.get("data") or {}
        kind = data.get("type")
        if kind == "created":
            self.digests.clear()
            return [AllBlocksCleared()]
        if kind == "removed":
            gone = [self.digests.pop(h) for h in data.get("block_hashes", []) if h in self.digests]
            return [BlockRemoved([event_hash(d) for d in gone], "GPU")] if gone else []
        if kind != "stored":
            return []                                # "updated": priority / cache level only
        parent_trt = data.get("parent_hash")
        parent = self.digests.get(parent_trt) if parent_trt is not None else None
        if parent_trt is not None and parent is None:
            return []                                # its parent was never announced: cannot chain
        first_parent, hashes, tokens = parent, [], []
        bs = self.hasher.block_size
        for block in data.get("blocks", []):
            toks = block.get("tokens", [])
            ids = [t["token_id"] for t in toks]
            if len(ids) != bs or any(t.get("token_extra_id") for t in toks):
                break                                # not a plain full block: the chain stops here
            digest = self.hasher.next(parent, ids)
            self.digests[block["block_hash"]] = digest
            hashes.append(event_hash(digest))
            tokens += ids
            parent = digest
        if not hashes:
            return []
        return [BlockStored(hashes, event_hash(first_parent) if first_parent else None, tokens, bs, medium="GPU")]


class TrtllmEngine(Engine):
    def __init__(self, cfg, ctx: EngineContext):
        super().__init__(ctx)
        self.cfg = cfg
        self.llm = None
        self.session = None
        self.publisher: KVEventPublisher | None = None
        self.translator: KVEventTranslator | None = None
        self._results: dict[str, Any] = {}
        self._early_aborts: dict[str, None] = {}
        self._tasks: list[asyncio.Task] = []
        self._stat: dict[str, Any] = {}
        self.block_size = 0
        self.max_num_seqs = 0
        self.block_reuse = True

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        from tensorrt_llm.llmapi import LLM
        from tensorrt_llm.llmapi.llm_args import CacheTransceiverConfig, KvCacheConfig
        kw = engine_kwargs(self.cfg, self.ctx)
        kv_cfg = kw["kv_cache_config"]
        self.block_size = int(kv_cfg.get("tokens_per_block") or DEFAULT_TOKENS_PER_BLOCK)
        self.block_reuse = bool(kv_cfg.get("enable_block_reuse"))
        kw["kv_cache_config"] = KvCacheConfig(**kv_cfg)
        if isinstance(kw.get("cache_transceiver_config"), dict):
            kw["cache_transceiver_config"] = CacheTransceiverConfig(**kw["cache_transceiver_config"])
        comm = self.ctx.comm
        if comm is not None and comm.Get_size() > 1:
            from tensorrt_llm.llmapi.mpi_session import MpiCommSession
            self.session = kw["_mpi_session"] = MpiCommSession(comm=comm, n_workers=comm.Get_size())
        log.info("starting TensorRT-LLM instance %d (%s): %s", self.ctx.instance, self.ctx.role, kw)
        self.llm = await asyncio.to_thread(LLM, **kw)    # builds/loads the model: minutes
        self.max_num_seqs = int(getattr(self.llm.args, "max_batch_size", 0) or 0)
        if self.ctx.kv_events_endpoint and self.block_reuse:
            self.publisher = KVEventPublisher(self.ctx.kv_events_endpoint, KV_EVENTS_TOPIC)
            self.translator = KVEventTranslator(self.block_size)
            self._tasks.append(asyncio.create_task(self._poll(self.llm.get_kv_cache_events_async, self._on_kv_event)))
        self._tasks.append(asyncio.create_task(self._poll(self.llm.get_stats_async, self._on_stat)))

    async def stop(self) -> None:
        for req_id in list(self._results):
            self.abort(req_id)
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=STATS_TIMEOUT_S + 1)
        self._tasks = []
        llm, self.llm = self.llm, None
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)       # also ends the followers' MPICommExecutor
        if self.publisher is not None:
            self.publisher.close()
            self.publisher = None

    async def follow(self) -> int:
        """Serve the leader's MPI session on the instance communicator until it shuts down."""
        from mpi4py.futures import MPICommExecutor

        def serve() -> None:
            with MPICommExecutor(self.ctx.comm, root=0) as executor:
                if executor is not None:
                    raise RuntimeError("a follower rank became the root of its instance's MPI session")
        log.info("TensorRT-LLM follower: serving instance %d's MPI session", self.ctx.instance)
        await asyncio.to_thread(serve)
        return 0

    # ---- stats and KV events --------------------------------------------------------------------

    async def _poll(self, source, handle) -> None:
        """Drain an IterationResult (it ends after STATS_TIMEOUT_S without data), then ask again."""
        while True:
            try:
                async for item in source(timeout=STATS_TIMEOUT_S):
                    handle(item)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("TensorRT-LLM %s failed; retrying", getattr(source, "__name__", source))
                await asyncio.sleep(STATS_TIMEOUT_S)
            # an idle engine's IterationResult stays done until the next request: do not spin
            await asyncio.sleep(IDLE_POLL_S)

    def _on_stat(self, stat: dict) -> None:
        self._stat = stat

    def _on_kv_event(self, event: dict) -> None:
        events = self.translator.translate(event)
        if events and self.publisher is not None:
            self.publisher.publish(events)

    def load(self) -> Load:
        s = self._stat
        kv = s.get("kvCacheStats") or {}
        ifb = s.get("inflightBatchingStats") or {}
        total = int(kv.get("maxNumBlocks", 0))
        used = int(kv.get("usedNumBlocks", total - int(kv.get("freeNumBlocks", total))))
        bs = int(kv.get("tokensPerBlock", 0) or self.block_size)
        # reusedBlocks / missedBlocks: the KV cache manager's running totals of block lookups
        reused, missed = int(kv.get("reusedBlocks", 0)), int(kv.get("missedBlocks", 0))
        return Load(running=int(s.get("numActiveRequests", 0)),
                    waiting=int(s.get("numQueuedRequests", 0)) + int(ifb.get("numPausedRequests", 0)),
                    kv_usage=used / total if total else 0.0, num_kv_blocks=total, block_size=bs,
                    prefix_cache_queries=(reused + missed) * bs, prefix_cache_hits=reused * bs)

    def info(self) -> EngineInfo:
        load = self.load()
        reproducible = self.translator is not None
        comm = self.ctx.comm
        return EngineInfo(kind="trtllm", block_size=self.block_size, num_kv_blocks=load.num_kv_blocks,
                          max_num_seqs=self.max_num_seqs, prefix_caching=self.block_reuse,
                          hash_algo=self.translator.hasher.algo if reproducible else None,
                          hash_seed=self.translator.hasher.hash_seed if reproducible else None,
                          ranks=comm.Get_size() if comm is not None else 1)

    # ---- requests -------------------------------------------------------------------------------

    def abort(self, req_id: str) -> None:
        result = self._results.get(req_id)
        if result is None:
            self._early_aborts[req_id] = None
            while len(self._early_aborts) > _MAX_EARLY_ABORTS:
                self._early_aborts.pop(next(iter(self._early_aborts)))
        elif not result.finished:
            result.abort()          # its stream ends with finish_reason "cancelled"

    async def generate(self, request: EngineRequest) -> AsyncIterator[Delta]:
        req_id, prompt = request.req_id, list(request.prompt_token_ids)
        err = "TensorRT-LLM engine is not running" if self.llm is None else unsupported(request.params)
        if err is None and req_id in self._results:
            err = f"request {req_id} is already running"
        if err is not None:
            yield Delta(req_id, [], "error", len(prompt), error=err)
            return
        if self._early_aborts.pop(req_id, False) is None:
            yield Delta(req_id, [], "abort", len(prompt))
            return
        max_tokens = 1 if request.prefill_only else request.params.max_tokens
        result = self.llm.generate_async(prompt, sampling_params=sampling_params(request.params, max_tokens),
                                         streaming=True, disaggregated_params=disaggregated_params(request))
        self._results[req_id] = result
        first = True
        try:
            async for out in result:
                comp = out.outputs[0]
                delta = Delta(req_id, list(comp.token_ids_diff))
                if first:
                    first = False
                    delta.num_prompt_tokens = len(prompt)
                    delta.num_cached_tokens = int(getattr(out, "cached_tokens", 0) or 0)
                if out.finished:
                    delta.finish_reason = _FINISH.get(comp.finish_reason or "stop", "stop")
                    if delta.finish_reason == "error":
                        delta.error = f"TensorRT-LLM ended the request: {comp.finish_reason}"
                    if request.prefill_only:
                        delta.handoff = handoff_of(comp.disaggregated_params)
                yield delta
                if out.finished:
                    return
            yield Delta(req_id, [], "error", error="TensorRT-LLM stream ended without a finish reason")
        finally:
            self._results.pop(req_id, None)
            if not result.finished and not result.aborted():
                result.abort()      # the consumer went away (the worker cancelled the request)
