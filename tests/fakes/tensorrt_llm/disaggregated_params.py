"""tensorrt_llm/disaggregated_params.py's DisaggregatedParams (P-D fields; no bindings)."""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional


@dataclass(slots=True, kw_only=True)
class DisaggregatedParams:
    request_type: Optional[str] = None
    first_gen_tokens: Optional[List[int]] = None
    ctx_request_id: Optional[int] = None
    opaque_state: Optional[bytes] = None
    draft_tokens: Optional[List[int]] = None
    multimodal_embedding_handles: Optional[List[Dict[str, Any]]] = None
    multimodal_hashes: Optional[List[List[int]]] = None

    def __post_init__(self):
        if self.request_type is not None:
            self.request_type = self.request_type.lower()
            if self.request_type not in ["context_only", "generation_only", "context_and_generation"]:
                raise ValueError(f"Unknown request type: {self.request_type}. Must be context_only, "
                                 "generation_only or context_and_generation")
