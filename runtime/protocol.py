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

PROTOCOL_VERSION = 3


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


# ---- head -> worker -----------------------------------------------------------------------------

class Generate(msgspec.Struct, gc=False, tag=True, omit_defaults=True):
    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # Disaggregation: a prefill-only leg sets {"do_remote_decode": True, ...}; the decode leg
    # carries the params the prefill leg returned, untouched.
    kv_transfer_params: dict[str, Any] | None = None
    # After the first token, send the tokens once this many have accumulated (and at the end):
    # the head's stream interval, or "never" for an answer that is only read whole.
    stream_interval: int = 1


class Abort(msgspec.Struct, gc=False, tag=True):
    req_ids: list[str]


class Shutdown(msgspec.Struct, gc=False, tag=True):
    reason: str = ""


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

class Delta(msgspec.Struct, gc=False, omit_defaults=True, array_like=True):
    req_id: str
    token_ids: list[int]
    finish_reason: str | None = None   # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int = 0         # set on the first delta
    num_cached_tokens: int = 0         # set on the first delta: prefix-cache hits (local or remote)
    error: str | None = None
    kv_transfer_params: dict[str, Any] | None = None  # set on a prefill-only leg's final delta


def merge_deltas(deltas: list[Delta]) -> Delta:
    """One delta with the tokens of consecutive deltas of one request; the last one's ending."""
    first, last = deltas[0], deltas[-1]
    tokens = [t for d in deltas for t in d.token_ids]
    return Delta(first.req_id, tokens, last.finish_reason, first.num_prompt_tokens,
                 first.num_cached_tokens, last.error, last.kv_transfer_params)


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


class Heartbeat(msgspec.Struct, gc=False, tag=True):
    instance: int
    load: Load
    ready: bool = True


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
