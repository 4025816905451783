"""tensorrt_llm/executor/result.py: CompletionOutput, GenerationResult, IterationResult (asyncio only)."""

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, List, Optional


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: Optional[List[int]] = field(default_factory=list)
    finish_reason: Optional[str] = None          # 'stop' | 'length' | 'timeout' | 'cancelled'
    stop_reason: Optional[Any] = None
    disaggregated_params: Optional[Any] = None
    _last_token_ids_len: int = field(default=0, init=False, repr=False)

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def token_ids_diff(self) -> List[int]:
        return self.token_ids[self._last_token_ids_len:]


class GenerationResult:
    """Streamed: each `async for` step applies one engine response (new tokens, maybe the end)."""

    def __init__(self, request_id: int, prompt_token_ids: List[int], executor, streaming: bool,
                 disaggregated_params=None):
        self.id = request_id
        self._prompt_token_ids = prompt_token_ids
        self._executor = executor
        self._streaming = streaming
        self.disaggregated_params = disaggregated_params
        self.cached_tokens = 0
        self._outputs = [CompletionOutput(0)]
        self._done = False
        self._aborted = False
        self.aqueue: asyncio.Queue = asyncio.Queue()

    @property
    def request_id(self) -> int:
        return self.id

    @property
    def prompt_token_ids(self) -> List[int]:
        return self._prompt_token_ids

    @property
    def outputs(self) -> List[CompletionOutput]:
        return self._outputs

    @property
    def finished(self) -> bool:
        return self._done

    def abort(self) -> None:
        self._executor.abort_request(self.request_id)
        self._aborted = True

    def aborted(self) -> bool:
        return self._aborted

    def _handle_response(self, response: dict) -> None:
        out = self._outputs[0]
        out.disaggregated_params = self.disaggregated_params
        out._last_token_ids_len = len(out.token_ids)
        out.token_ids.extend(response["tokens"])
        if response.get("disaggregated_params") is not None:
            self.disaggregated_params = out.disaggregated_params = response["disaggregated_params"]
        if response.get("cached_tokens") is not None:
            self.cached_tokens = response["cached_tokens"]
        if response.get("finish_reason"):
            out.finish_reason = response["finish_reason"]
            self._done = True

    async def aresult(self) -> "GenerationResult":
        while not self._done:
            self._handle_response(await self.aqueue.get())
        return self

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._done:
            raise StopAsyncIteration
        self._handle_response(await self.aqueue.get())
        return self


class IterationResult:
    """Runtime results (JSON strings) as an async iterable that ends after `timeout` without data;
    once ended it stays ended until `mark_undone` (the executor calls it per new request)."""

    def __init__(self):
        self._done = False
        self._timeout = 2
        self.aqueue: asyncio.Queue = asyncio.Queue()

    def set_timeout(self, timeout: float):
        self._timeout = timeout

    def mark_undone(self):
        self._done = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._done:
            raise StopAsyncIteration
        try:
            data = await asyncio.wait_for(self.aqueue.get(), self._timeout)
            return json.loads(data)
        except asyncio.TimeoutError:
            self._done = True
            raise StopAsyncIteration
