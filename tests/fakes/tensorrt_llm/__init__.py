"""A stand-in for TensorRT-LLM's LLM API, for testing runtime/trtllm_engine.py where TensorRT-LLM
cannot be installed (PyPI's `tensorrt-llm` needs NVIDIA's index and a GPU).

Built from NVIDIA/TensorRT-LLM's source: the names, signatures and output shapes of
tensorrt_llm/llmapi/llm.py (LLM.generate_async, get_stats_async, get_kv_cache_events_async,
shutdown; commit 4c05a74891e4df8066f08ed4ce14b0972abe4e25), executor/result.py (CompletionOutput,
GenerationResult.abort/finished/aborted/async iteration, IterationResult; a678b91aafbeff265cd0b764abb59d7def624ac2),
disaggregated_params.py (b828daced8dcf69000b172b183b5ff45e5a158d1), sampling_params.py
(a98a9061d72f6fd39f5d055ebdd2c6878a100e2c), llmapi/mpi_session.py (MpiCommSession over
MPICommExecutor) and _utils.py (KVCacheEventSerializer's event dicts). Behind them runs a toy engine:
one token per request per step, deterministic tokens, paged blocks with reuse and LRU eviction
hashed with a scheme of its own, and an in-process "cache transceiver" for context-only /
generation-only legs. It models only what the adapter uses; nothing here is TensorRT-LLM's code.
"""

from .disaggregated_params import DisaggregatedParams
from .llmapi import LLM
from .sampling_params import SamplingParams

__version__ = "0.0.0+fake"
__all__ = ["LLM", "SamplingParams", "DisaggregatedParams"]
