"""Messages between the head and the engine ranks over ZeroMQ: msgspec structs in msgpack.

One ROUTER socket on the head, one DEALER per engine instance. Workers send one `StepOutputs` per
engine step carrying every request's new tokens, not one message per token, and keep at most
OUTPUT_WINDOW of them unread by the head: see `Consumed`. Bumping
PROTOCOL_VERSION is required whenever a struct changes; ranks compare it at bootstrap.

Every struct is `gc=False`: messages hold only plain values, never a cycle, so the garbage
collector need not track the tens of thousands of them a busy head decodes per second.
"""

from __future__ import annotations

from typing import Any

import msgspec

PROTOCOL_VERSION = 5

# Disaggregation phases of a request (Generate.phase). The head never reads a handoff: what a
# prefill-only leg returns (Delta.handoff) goes, untouched, to the decode leg. Its encoding is the
# engine's own (vLLM: kv_transfer_params; TensorRT-LLM: DisaggregatedParams fields).
AGGREGATED = ""
PREFILL_ONLY = "prefill_only"                  # compute the prompt's KV, hold it, return a handoff
DECODE_WITH_HANDOFF = "decode_with_handoff"    # take the prompt's KV from the handoff, then decode


class SamplingParams(msgspec.Struct, gc=False, omit_defaults=True, forbid_unknown_fields=True):
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = []
    logprobs: int | None = None          # logprobs of each sampled token, and of this many top ones
    prompt_logprobs: int | None = None   # the same for each prompt token after the first
    logit_bias: dict[int, float] | None = None
    # Structured output, vLLM's StructuredOutputsParams fields: json (a schema), json_object,
    # regex, choice, grammar, structural_tag, plus its whitespace/additional-properties options.
    structured_outputs: dict[str, Any] | None = None


# ---- head -> worker -----------------------------------------------------------------------------

class Generate(msgspec.Struct, gc=False, tag=True, omit_defaults=True):
    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    phase: str = AGGREGATED
    handoff: dict[str, Any] | None = None    # DECODE_WITH_HANDOFF: what the prefill leg returned
    # After the first token, send the tokens once this many have accumulated (and at the end):
    # the head's stream interval, or "never" for an answer that is only read whole.
    stream_interval: int = 1


class Abort(msgspec.Struct, gc=False, tag=True):
    req_ids: list[str]


class Shutdown(msgspec.Struct, gc=False, tag=True):
    reason: str = ""
    failed: bool = False    # the deployment failed: ranks exit non-zero, at once

class Ping(msgspec.Struct, gc=False, tag=True):
    """The head is alive; a worker that hears nothing from the head for a while exits. It also
    stands in for a `Consumed` that was lost, so a worker never waits longer than a ping period."""


class Consumed(msgspec.Struct, gc=False, tag=True):
    """The head has read `read` of the worker's `StepOutputs` so far.

    Flow control: a worker keeps at most OUTPUT_WINDOW of them unread. Steps that end while the
    window is full are merged into the worker's next message, so a head that falls behind reads
    fewer, larger messages instead of a backlog of one per step. The head confirms only when the
    window has filled, so a head that keeps up costs one extra small message per OUTPUT_WINDOW
    steps and nothing waits."""
    read: int


OUTPUT_WINDOW = 2


# ---- worker -> head -----------------------------------------------------------------------------

class Logprobs(msgspec.Struct, gc=False, array_like=True):
    """Log-probabilities at consecutive positions: of each position's token (sampled, or the
    prompt's), and of the most likely tokens there, best first (empty lists when no top ones were
    asked for). Raw floats: -inf stays -inf; the head clamps it as OpenAI's JSON needs."""
    token: list[float]
    top_ids: list[list[int]] = []
    top: list[list[float]] = []


class Delta(msgspec.Struct, gc=False, omit_defaults=True, array_like=True):
    req_id: str
    token_ids: list[int]
    finish_reason: str | None = None   # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int = 0         # set on the first delta
    num_cached_tokens: int = 0         # set on the first delta: prefix-cache hits (local or remote)
    error: str | None = None
    handoff: dict[str, Any] | None = None  # set on a prefill-only leg's final delta (opaque to the head)
    logprobs: Logprobs | None = None         # of token_ids, when the request asked for them
    prompt_logprobs: Logprobs | None = None  # on the first delta: prompt positions 1..n-1
    rejected: bool = False   # with finish_reason "error": the request is invalid as given (a 400, not a 503)

    @property
    def kv_transfer_params(self) -> dict[str, Any] | None:
        """The handoff under vLLM's name: for the sim and vLLM engines it is vLLM's kv_transfer_params."""
        return self.handoff


def merge_deltas(deltas: list[Delta]) -> Delta:
    """One delta with the tokens of consecutive deltas of one request; the last one's ending."""
    first, last = deltas[0], deltas[-1]
    tokens = [t for d in deltas for t in d.token_ids]
    logprobs = None
    if any(d.logprobs is not None for d in deltas):
        logprobs = Logprobs([], [], [])
        for d in deltas:
            if d.logprobs is not None:
                logprobs.token += d.logprobs.token
                logprobs.top_ids += d.logprobs.top_ids
                logprobs.top += d.logprobs.top
    return Delta(first.req_id, tokens, last.finish_reason, first.num_prompt_tokens,
                 first.num_cached_tokens, last.error, last.handoff, logprobs, first.prompt_logprobs,
                 last.rejected)


def coalesce(deltas: list[Delta]) -> list[Delta]:
    """Deltas of several engine steps with each request's merged into one, in arrival order."""
    by_req: dict[str, list[Delta]] = {}
    for d in deltas:
        run = by_req.get(d.req_id)
        if run is None:
            by_req[d.req_id] = [d]
        else:
            run.append(d)
    if len(by_req) == len(deltas):
        return deltas
    return [run[0] if len(run) == 1 else merge_deltas(run) for run in by_req.values()]


class StepOutputs(msgspec.Struct, gc=False, tag=True):
    deltas: list[Delta]


class Load(msgspec.Struct, gc=False, omit_defaults=True):
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0          # fraction of KV blocks in use, 0..1
    num_kv_blocks: int = 0
    block_size: int = 0
    external_kv_tokens: int = 0    # prompt tokens whose KV came from another instance, since start
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache, since start
    prefix_cache_hits: int = 0     # ... and found there (vLLM's vllm:prefix_cache_queries / _hits)


class EngineInfo(msgspec.Struct, gc=False, omit_defaults=True):
    """What the head must know about an instance, declared by its engine in the first ready
    heartbeat, so that the head reads no engine's own configuration keys."""
    kind: str = ""
    block_size: int = 0
    num_kv_blocks: int = 0
    max_num_seqs: int = 0              # batch capacity
    prefix_caching: bool = False
    # The instance's KV events carry vLLM's chained block hashes with this algorithm ("sha256",
    # "sha256_cbor") seeded by hash_seed (kvfabric/block_hash.py): the head can then hash prompts to
    # match them. None: it cannot, so it routes that instance by load alone.
    hash_algo: str | None = None
    hash_seed: str | None = None
    ranks: int = 1                     # MPI ranks the instance spans (its followers included)


class Heartbeat(msgspec.Struct, gc=False, tag=True):
    instance: int
    load: Load
    ready: bool = True
    info: EngineInfo | None = None     # in the first ready heartbeat


class Goodbye(msgspec.Struct, gc=False, tag=True):
    instance: int
    reason: str = ""


class Failed(msgspec.Struct, gc=False, tag=True):
    """The instance gave up (its engine failed to start, or its loop failed) and its rank is exiting.
    `error` is one line for the user: the exception, the rank and its log file."""
    instance: int
    error: str


ToWorker = Generate | Abort | Shutdown | Ping | Consumed
ToHead = StepOutputs | Heartbeat | Goodbye | Failed

_enc = msgspec.msgpack.Encoder()
encode = _enc.encode
decode_to_worker = msgspec.msgpack.Decoder(ToWorker).decode
decode_to_head = msgspec.msgpack.Decoder(ToHead).decode
