"""KV-cache events in vLLM's ZeroMQ wire format: structs, a publisher and a subscriber.

Wire format (vLLM's ZmqEventPublisher): PUB multipart `[topic, seq, payload]` with `seq` an 8-byte
big-endian counter starting at 0 per publisher, and `payload` msgpack `[ts, [event, ...], dp_rank]`.
vLLM encodes each event as a map tagged with `"type"` (`{"type": "BlockStored", "block_hashes": ...}`);
this module also decodes the array form (`["BlockStored", block_hashes, parent, ...]`, fields in
vLLM's order) and a map-shaped batch. Missing keys mean null. Block hashes sent as raw digests
(`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`) are folded to the same 64-bit ints as the int form.

The simulated engine publishes through `KVEventPublisher`, so the head's subscriber path is the
same for the simulator and for vLLM.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any, Union

import msgspec
import zmq

from slurmserve.zmq_loop import LoopSocket

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


# ---- event structs ------------------------------------------------------------------------------
# Field order follows vLLM's structs, so the array form decodes positionally. Encoded as maps with
# every field present (vLLM's own decoder requires lora_id, medium and lora_name).

class BlockStored(msgspec.Struct, tag=True, gc=False):
    block_hashes: list[int] = []
    parent_block_hash: int | None = None
    token_ids: list[int] = []
    block_size: int = 0
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None


class BlockRemoved(msgspec.Struct, tag=True, gc=False):
    block_hashes: list[int] = []
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, gc=False):
    pass


KVEvent = Union[BlockStored, BlockRemoved, AllBlocksCleared]
_EVENT_TYPES: dict[str, type] = {"BlockStored": BlockStored, "BlockRemoved": BlockRemoved,
                                 "AllBlocksCleared": AllBlocksCleared}


class KVEventBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None


class KVEventDecodeError(ValueError):
    pass


# ---- encode / decode ----------------------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()
_fast_decoder = msgspec.msgpack.Decoder(KVEventBatch)
_any_decoder = msgspec.msgpack.Decoder()


def encode_batch(events: list, ts: float | None = None, data_parallel_rank: int | None = 0) -> bytes:
    """The msgpack payload frame for a batch of events."""
    return _encoder.encode(KVEventBatch(time.time() if ts is None else ts, events, data_parallel_rank))


def _fold(h: Any) -> Any:
    if type(h) is bytes or type(h) is bytearray:
        return int.from_bytes(h, "big") & _MASK64
    return h


def _event_from_plain(ev: Any) -> KVEvent | None:
    """One event from its generic msgpack form; None for an event type this module does not know."""
    if isinstance(ev, dict):
        cls = _EVENT_TYPES.get(ev.get("type"))
        if cls is None:
            return None
        kind = cls.__name__
        fields = {k: v for k, v in ev.items() if k != "type" and v is not None}
    elif isinstance(ev, (list, tuple)) and ev and isinstance(ev[0], str):
        cls = _EVENT_TYPES.get(ev[0])
        if cls is None:
            return None
        kind = cls.__name__
        fields = {name: v for name, v in zip(cls.__struct_fields__, ev[1:]) if v is not None}
    else:
        raise KVEventDecodeError(f"cannot decode KV event {ev!r:.80}")
    if "block_hashes" in fields:
        fields["block_hashes"] = [_fold(h) for h in fields["block_hashes"]]
    if "parent_block_hash" in fields:
        fields["parent_block_hash"] = _fold(fields["parent_block_hash"])
    try:
        return msgspec.convert(fields, cls)
    except msgspec.ValidationError as e:
        raise KVEventDecodeError(f"bad {kind} event: {e}") from None


def _decode_slow(payload: bytes) -> KVEventBatch:
    try:
        raw = _any_decoder.decode(payload)
    except msgspec.DecodeError as e:
        raise KVEventDecodeError(f"KV event payload is not msgpack: {e}") from None
    if isinstance(raw, dict):
        ts, events, rank = raw.get("ts"), raw.get("events"), raw.get("data_parallel_rank")
    elif isinstance(raw, (list, tuple)) and len(raw) >= 2:
        ts, events = raw[0], raw[1]
        rank = raw[2] if len(raw) > 2 else None
    else:
        raise KVEventDecodeError(f"KV event payload is not a batch: {raw!r:.80}")
    if not isinstance(events, (list, tuple)):
        raise KVEventDecodeError("KV event batch has no event list")
    decoded = [_event_from_plain(ev) for ev in events]
    return KVEventBatch(float(ts or 0.0), [ev for ev in decoded if ev is not None],
                        rank if isinstance(rank, int) else None)


def decode_batch(payload: bytes) -> KVEventBatch:
    """Decode a payload frame; accepts vLLM's map-tagged events and the array-tagged form.

    Events of a type this module does not know are dropped; a malformed payload raises
    KVEventDecodeError.
    """
    try:
        batch = _fast_decoder.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return _decode_slow(payload)
    return batch


# ---- publisher ----------------------------------------------------------------------------------

class KVEventPublisher:
    """A PUB socket bound to `endpoint`, sending batches exactly as vLLM does.

    Sends never block: a PUB socket drops messages for a subscriber past its high-water mark, which
    the subscriber sees as a sequence gap.
    """

    def __init__(self, endpoint: str, topic: str = "kv-events", data_parallel_rank: int = 0,
                 hwm: int = 100_000):
        self._ctx = zmq.Context(io_threads=1)
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError:
            self._sock.close(linger=0)
            self._ctx.term()
            raise
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT) or endpoint
        self._topic = topic.encode()
        self._rank = data_parallel_rank
        self.seq = 0              # the sequence number the next batch gets
        self.closed = False

    def publish(self, events: list, ts: float | None = None) -> int:
        """Send one batch; returns its sequence number."""
        if self.closed:
            raise RuntimeError("KVEventPublisher is closed")
        seq = self.seq
        self.seq = seq + 1
        payload = _encoder.encode(KVEventBatch(time.time() if ts is None else ts, events, self._rank))
        try:
            self._sock.send_multipart((self._topic, seq.to_bytes(8, "big"), payload), flags=zmq.NOBLOCK)
        except zmq.Again:  # cannot happen on PUB, kept for safety: the gap shows at the subscriber
            pass
        return seq

    def close(self, linger_ms: int = 100) -> None:
        if self.closed:
            return
        self.closed = True
        self._sock.close(linger=linger_ms)
        self._ctx.term()


# ---- subscriber ---------------------------------------------------------------------------------

BatchCallback = Callable[[int, int, list], Any]
GapCallback = Callable[[int, int, int], Any]


class KVEventSubscriber:
    """SUB sockets to many engine instances, one socket per instance, read by the event loop's
    reader callbacks (no task or future per message).

    `on_batch(instance, seq, events)` gets every decoded batch (a coroutine function's result is run
    as a task); `on_gap(instance, expected, got)` is called before the batch whenever `seq` is not
    the one expected: a lost batch (got > expected), a publisher restart (got < expected), or a first
    batch whose seq is not 0 (events were sent before this subscriber connected).
    """

    def __init__(self, on_batch: BatchCallback, on_gap: GapCallback | None = None,
                 topic: str = "kv-events", ctx: zmq.Context | None = None, rcvhwm: int = 100_000):
        self.on_batch = on_batch
        self.on_gap = on_gap
        self.topic = topic.encode()
        self._own_ctx = ctx is None
        self._ctx = ctx or zmq.Context()
        self._rcvhwm = rcvhwm
        self._socks: dict[int, LoopSocket] = {}
        self._pending: set[asyncio.Task] = set()
        self.endpoints: dict[int, str] = {}
        self.next_seq: dict[int, int] = {}     # per instance: the seq expected next
        self.gaps = 0
        self.batches = 0
        self.decode_errors = 0

    def add(self, instance: int, endpoint: str, server_key: bytes | None = None) -> None:
        """Connect to one instance's publisher (replacing any earlier connection for it), as a CURVE
        client when `server_key` (the publisher's public key) is given."""
        if instance in self._socks:
            self.remove(instance)
        sock = self._ctx.socket(zmq.SUB)
        if server_key is not None:
            sock.curve_serverkey = server_key
            sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
        sock.setsockopt(zmq.RCVHWM, self._rcvhwm)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, self.topic)
        sock.connect(endpoint)
        self._socks[instance] = LoopSocket(
            sock, lambda topic, seq, payload: self._on_message(instance, seq, payload), frames=3)
        self.endpoints[instance] = endpoint
        self.next_seq.pop(instance, None)

    def remove(self, instance: int) -> None:
        sock = self._socks.pop(instance, None)
        if sock is not None:
            sock.close()
        self.endpoints.pop(instance, None)
        self.next_seq.pop(instance, None)

    @property
    def instances(self) -> list[int]:
        return list(self._socks)

    def _on_message(self, instance: int, seq_bytes: bytes, payload: bytes) -> None:
        if len(seq_bytes) != 8:
            self.decode_errors += 1
            log.warning("instance %d: malformed KV event message (seq of %d bytes)", instance, len(seq_bytes))
            return
        seq = int.from_bytes(seq_bytes, "big")
        expected = self.next_seq.get(instance, 0)
        self.next_seq[instance] = seq + 1
        if seq != expected:
            self.gaps += 1
            if self.on_gap is not None:
                self._run(self.on_gap(instance, expected, seq))
        try:
            batch = decode_batch(payload)
        except KVEventDecodeError as e:
            self.decode_errors += 1
            log.warning("instance %d: undecodable KV event batch %d: %s", instance, seq, e)
            return
        self.batches += 1
        try:
            self._run(self.on_batch(instance, seq, batch.events))
        except Exception:
            log.exception("instance %d: KV event callback failed on batch %d", instance, seq)

    def _run(self, result: Any) -> None:
        if result is not None and inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def aclose(self) -> None:
        self.close()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    def close(self) -> None:
        """Closes every socket; callbacks already running as tasks are left to finish."""
        for instance in list(self._socks):
            self.remove(instance)
        if self._own_ctx:
            self._ctx.term()
            self._own_ctx = False
