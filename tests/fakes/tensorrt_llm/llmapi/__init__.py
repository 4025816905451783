from ..disaggregated_params import DisaggregatedParams
from ..executor import CompletionOutput
from ..sampling_params import SamplingParams
from .llm import LLM, RequestOutput
from .llm_args import CacheTransceiverConfig, KvCacheConfig
from .mpi_session import MpiCommSession

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "DisaggregatedParams",
           "KvCacheConfig", "CacheTransceiverConfig", "MpiCommSession"]
