"""tensorrt_llm/llmapi/llm.py's LLM: the methods the adapter calls, over a toy engine.

Toy engine: every step gives each running request one token, (prompt, position, seed)-determined,
so a request's tokens are the same on any instance and in any phase split. Prompt blocks are
cached (block reuse) under the engine's own hash, announced and evicted with TensorRT-LLM's KV
event dicts. A context-only request leaves its prompt in a process-wide "transceiver" under its
ctx_request_id; a generation-only request takes it from there (an unknown id ends it "timeout").
"""

import asyncio
import json
import os
import socket
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any, List, Optional

from ..disaggregated_params import DisaggregatedParams
from ..executor.result import GenerationResult, IterationResult
from ..sampling_params import SamplingParams
from .llm_args import LLM_ARGS, KvCacheConfig

_TRANSCEIVER: dict = {}     # ctx_request_id -> prompt token ids (the "KV" a context leg leaves behind)
_MASK = (1 << 63) - 1


def toy_token(prompt: List[int], position: int, seed: Optional[int]) -> int:
    h = (sum((i + 1) * t for i, t in enumerate(prompt)) * 1_000_003 + position * 7919 + (seed or 0)) & _MASK
    return 100 + h % 900


class RequestOutput(GenerationResult):
    pass


class _Req:
    def __init__(self, result: GenerationResult, prompt, sp: SamplingParams, dp: Optional[DisaggregatedParams]):
        self.result, self.prompt, self.sp, self.dp = result, prompt, sp, dp
        self.out: List[int] = []
        self.started = False
        self.blocks: List[int] = []
        self.cancel = False


class LLM:
    _next_id = 1

    def __init__(self, model, tokenizer=None, tensor_parallel_size: int = 1, dtype: str = "auto", **kwargs: Any):
        for key in kwargs:
            if key not in LLM_ARGS:
                raise ValueError(f"{self.__class__.__name__} got invalid argument: {key}")
        if not os.path.isdir(str(model)):
            raise ValueError(f"model {model} is not a directory")
        kv = kwargs.get("kv_cache_config") or KvCacheConfig()
        self.args = SimpleNamespace(model=model, tensor_parallel_size=tensor_parallel_size,
                                    max_batch_size=kwargs.get("max_batch_size", 2048), kv_cache_config=kv,
                                    backend=kwargs.get("backend"), enable_iter_perf_stats=kwargs.get("enable_iter_perf_stats", False))
        self.mpi_session = kwargs.get("_mpi_session")
        self.follower_hosts: List[str] = []
        if self.mpi_session is not None:      # the model's shards load on every rank of the session
            self.follower_hosts = self.mpi_session.submit_sync(socket.gethostname)[1:]
        self.bs = kv.tokens_per_block
        self.capacity = (kv.max_tokens or 64 * self.bs) // self.bs
        self.blocks: "OrderedDict[int, int]" = OrderedDict()   # free-able cached blocks, LRU first: hash -> refs
        self.refs: dict = {}
        self._reqs: dict = {}
        self._task: Optional[asyncio.Task] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stats: Optional[IterationResult] = None
        self._events: Optional[IterationResult] = None
        self._shutdown = False
        self.iter = 0
        self.reused = self.missed = 0
        self._pending_events: List[dict] = [{"event_id": 0, "data": {"type": "created",
                                             "num_blocks_per_cache_level": [self.capacity]}, "window_size": self.bs}]
        self._event_id = 1

    # ---- the LLM API ------------------------------------------------------------------------------

    def generate_async(self, inputs, sampling_params: Optional[SamplingParams] = None, lora_request=None,
                       prompt_adapter_request=None, streaming: bool = False, kv_cache_retention_config=None,
                       disaggregated_params: Optional[DisaggregatedParams] = None, _postproc_params=None,
                       scheduling_params=None, cache_salt: Optional[str] = None) -> RequestOutput:
        if self._shutdown:
            raise RuntimeError("LLM is shutting down")
        sp = sampling_params or SamplingParams()
        if disaggregated_params is not None and disaggregated_params.request_type == "context_only":
            sp.max_tokens = 1
        prompt = list(inputs["prompt_token_ids"] if isinstance(inputs, dict) else inputs)
        rid, LLM._next_id = LLM._next_id, LLM._next_id + 1
        result = RequestOutput(rid, prompt, self, streaming, disaggregated_params)
        self._reqs[rid] = _Req(result, prompt, sp, disaggregated_params)
        for it in (self._stats, self._events):
            if it is not None:
                it.mark_undone()
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._run())
        return result

    def get_stats_async(self, timeout: Optional[float] = 2) -> IterationResult:
        if self._stats is None:
            self._stats = IterationResult()
        self._stats.set_timeout(timeout)
        return self._stats

    def get_kv_cache_events_async(self, timeout: Optional[float] = 2) -> IterationResult:
        if self._events is None:
            self._events = IterationResult()
            for ev in self._pending_events:
                self._events.aqueue.put_nowait(json.dumps(ev))
            self._pending_events = []
        self._events.set_timeout(timeout)
        return self._events

    def shutdown(self) -> None:
        """Thread-safe, like the real one (the adapter calls it from a worker thread)."""
        self._shutdown = True
        if self._task is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._task.cancel)
        if self.mpi_session is not None:
            self.mpi_session.shutdown()
            self.mpi_session = None

    # executor side
    def abort_request(self, request_id: int) -> None:
        req = self._reqs.get(request_id)
        if req is not None:
            req.cancel = True

    # ---- the toy engine -----------------------------------------------------------------------------

    def _event(self, data: dict) -> None:
        ev = {"event_id": self._event_id, "data": data, "window_size": self.bs}
        self._event_id += 1
        if self._events is not None:
            self._events.aqueue.put_nowait(json.dumps(ev))
        else:
            self._pending_events.append(ev)

    def _prefill(self, req: _Req) -> int:
        """Cache the prompt's full blocks; the number of prompt tokens found cached."""
        parent, stored, hit = None, [], 0
        for i in range(len(req.prompt) // self.bs):
            toks = req.prompt[i * self.bs:(i + 1) * self.bs]
            h = hash((parent, tuple(toks))) & _MASK      # the engine's own scheme, not vLLM's
            if h in self.refs:
                self.reused += 1
                hit += self.bs if not stored else 0
                self.blocks.pop(h, None)
            else:
                self.missed += 1
                self._evict()
                stored.append({"type": "stored_block", "block_hash": h, "cache_level": 0, "priority": 35,
                               "tokens": [{"type": "unique_token", "token_id": t, "token_extra_id": 0} for t in toks]})
                if len(stored) == 1:
                    first_parent = parent
            self.refs[h] = self.refs.get(h, 0) + 1
            req.blocks.append(h)
            parent = h
        if stored:
            self._event({"type": "stored", "parent_hash": first_parent, "blocks": stored})
        return min(hit, len(req.prompt) - 1)

    def _evict(self) -> None:
        while len(self.refs) >= self.capacity and self.blocks:
            h, _ = self.blocks.popitem(last=False)
            del self.refs[h]
            self._event({"type": "removed", "block_hashes": [h]})

    def _release(self, req: _Req) -> None:
        for h in req.blocks:
            self.refs[h] -= 1
            if self.refs[h] == 0:
                self.blocks[h] = 0      # cached, free-able
        req.blocks = []

    async def _run(self) -> None:
        while True:
            if not self._reqs:
                await asyncio.sleep(0.002)
                continue
            self.iter += 1
            for rid, req in list(self._reqs.items()):
                resp: dict = {"tokens": []}
                if req.cancel:
                    resp["finish_reason"] = "cancelled"
                elif not req.started:
                    req.started = True
                    if req.dp is not None and req.dp.request_type == "generation_only":
                        prompt = _TRANSCEIVER.pop(req.dp.ctx_request_id, None)
                        if prompt != req.prompt:
                            resp["finish_reason"] = "timeout"     # no such context: the transfer fails
                        else:
                            resp["cached_tokens"] = len(req.prompt)
                            req.out = list(req.dp.first_gen_tokens)
                            resp["tokens"] = list(req.out)
                    else:
                        resp["cached_tokens"] = self._prefill(req)
                        req.out = [toy_token(req.prompt, 0, req.sp.seed)]
                        resp["tokens"] = list(req.out)
                else:
                    tok = toy_token(req.prompt, len(req.out), req.sp.seed)
                    req.out.append(tok)
                    resp["tokens"] = [tok]
                if "finish_reason" not in resp:
                    if resp["tokens"] and resp["tokens"][-1] in (req.sp.stop_token_ids or []):
                        resp["finish_reason"] = "stop"
                    elif len(req.out) >= req.sp.max_tokens:
                        resp["finish_reason"] = "length"
                if "finish_reason" in resp:
                    del self._reqs[rid]
                    self._release(req)
                    if req.dp is not None and req.dp.request_type == "context_only" and resp["finish_reason"] == "length":
                        _TRANSCEIVER[rid] = req.prompt
                        resp["disaggregated_params"] = DisaggregatedParams(
                            request_type="context_only", first_gen_tokens=list(req.out), ctx_request_id=rid,
                            opaque_state=b"toy-transceiver\x00" + rid.to_bytes(8, "big"), draft_tokens=None)
                req.result.aqueue.put_nowait(resp)
            if self._stats is not None:
                used = sum(1 for n in self.refs.values() if n)
                self._stats.aqueue.put_nowait(json.dumps({
                    "iter": self.iter, "numActiveRequests": len(self._reqs), "numQueuedRequests": 0,
                    "maxNumActiveRequests": self.args.max_batch_size,
                    "kvCacheStats": {"maxNumBlocks": self.capacity, "freeNumBlocks": self.capacity - used,
                                     "usedNumBlocks": used, "tokensPerBlock": self.bs,
                                     "reusedBlocks": self.reused, "missedBlocks": self.missed},
                    "inflightBatchingStats": {"numPausedRequests": 0}}))
            await asyncio.sleep(0.001)
