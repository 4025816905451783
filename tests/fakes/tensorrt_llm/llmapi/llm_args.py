"""tensorrt_llm/llmapi/llm_args.py: the config models the adapter builds (unknown fields refused)."""

from typing import Optional

from pydantic import BaseModel, ConfigDict


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KvCacheConfig(_Strict):
    enable_block_reuse: bool = True
    max_tokens: Optional[int] = None
    free_gpu_memory_fraction: Optional[float] = None
    event_buffer_max_size: int = 0
    tokens_per_block: int = 32


class CacheTransceiverConfig(_Strict):
    backend: Optional[str] = None       # DEFAULT | UCX | NIXL | MPI
    max_tokens_in_buffer: Optional[int] = None


# LLM(...) keyword arguments the fake accepts (TorchLlmArgs' fields that the tests use)
LLM_ARGS = {"model", "tokenizer", "backend", "tensor_parallel_size", "pipeline_parallel_size", "max_seq_len",
            "max_batch_size", "max_num_tokens", "enable_iter_perf_stats", "kv_cache_config",
            "cache_transceiver_config", "dtype", "_mpi_session"}
