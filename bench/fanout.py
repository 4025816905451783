"""The head's per-chunk cost alone: engine step messages fanned out to streamed answers.

    python -m slurmserve.bench.fanout MODEL_DIR [--requests 128] [--steps 64] [--repeats 21]

Each repeat sends `steps` one-token StepOutputs messages for `requests` streamed chat answers
through the head's own path (protocol decode, DeltaStream, StreamedAnswer, detokenizer, ChunkWriter,
Response) into a transport that drops the bytes, so the figure is the Python and the tokenizer
work per chunk, without the socket write. Beside it, two floors for what a native per-chunk path
could reach: the same chunks written flat in Python (decode, one lookup, DecodeStream, the SSE and
chunk framing, the write call), and the calls native code would still make (decode, DecodeStream).
Prints the median over repeats of µs per chunk for each (docs/benchmarks.md, "Where the head's CPU
goes").
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

import msgspec

from slurmserve.router import openai_api as oa
from slurmserve.router.engine_client import DeltaStream
from slurmserve.router.http_app import HeadApp, StreamedAnswer
from slurmserve.router.http_server import Response
from slurmserve.router.metrics import HeadMetrics
from slurmserve.router.tokenizer import Tokenizer
from slurmserve.runtime import protocol as P

PROMPT = [1, 2, 3, 4, 5]   # the detokenizer's prompt context


class _Dropped:
    """A connection whose transport drops what is written (the write itself is not measured)."""

    def __init__(self):
        self.transport = self

    def write(self, data: bytes) -> None:
        pass

    def response_done(self, response) -> None:
        pass


class _Instance:
    def prefilled(self, stream) -> None:
        pass


def _steps(tok: Tokenizer, requests: int, steps: int, seed: int) -> list[bytes]:
    """The engine's step messages: a token for every request per step, the last one finishing."""
    rng = random.Random(seed)
    ids = sorted(set(range(tok.vocab_size)) - tok.special_ids)
    return [P.encode(P.StepOutputs([P.Delta(f"r{i}", [rng.choice(ids)], "length" if k == steps - 1 else None,
                                            len(PROMPT) if k == 0 else 0) for i in range(requests)]))
            for k in range(steps)]


def head_path(tok: Tokenizer, messages: list[bytes], requests: int) -> float:
    """Seconds for the messages through the head's fan-out, as EngineClient delivers them."""
    app = HeadApp(orchestrator=None, tokenizer=tok, metrics=HeadMetrics("bench"), model_name="bench",
                  max_model_len=1 << 20, api_key="unused")
    req = oa.parse(msgspec.json.encode({"model": "bench", "messages": [{"role": "user", "content": "hi"}],
                                        "stream": True}), True)
    streams, answers = {}, []
    for i in range(requests):
        stream = DeltaStream(f"r{i}", _Instance())
        answer = StreamedAnswer(app, Response(_Dropped()), req, f"r{i}", PROMPT, [], True, 0.0)
        stream.attach(answer.feed)
        streams[f"r{i}"] = stream
        answers.append(answer)
    start = time.perf_counter()
    for payload in messages:
        dirty: list[DeltaStream] = []
        for delta in P.decode_to_head(payload).deltas:
            streams[delta.req_id].push(delta, dirty)
        for stream in dirty:
            stream.flush()
    elapsed = time.perf_counter() - start
    if not all(a.done.done() and a.done.exception() is None and a.response.finished for a in answers):
        raise RuntimeError("an answer did not end: the fan-out measured is not the head's")
    return elapsed


def flat_floor(tok: Tokenizer, messages: list[bytes], requests: int, write: bool = True) -> float:
    """Seconds for only what a chunk must do, written flat; `write=False`: decode and detokenize alone."""
    from tokenizers.decoders import DecodeStream

    backend, encode = tok.backend, msgspec.json.encode
    writer = oa.ChunkWriter(True, "chatcmpl-" + "0" * 32, "bench")   # its templates, without its call
    head, tail = writer._text_head, writer._text_tail
    sink = _Dropped().write
    lanes = {f"r{i}": DecodeStream(ids=list(PROMPT), skip_special_tokens=True) for i in range(requests)}
    start = time.perf_counter()
    for payload in messages:
        for delta in P.decode_to_head(payload).deltas:
            piece = lanes[delta.req_id].step(backend, delta.token_ids[0])
            if write and piece:
                data = head + encode(piece) + tail
                sink(b"%x\r\n%b\r\n" % (len(data), data))
    return time.perf_counter() - start


async def run(model_dir: str, requests: int, steps: int, repeats: int) -> dict[str, float]:
    """Median µs per chunk of each way (run in a loop: answers make futures)."""
    tok = Tokenizer(model_dir)
    ways = {"head path": lambda m: head_path(tok, m, requests),
            "flat Python floor": lambda m: flat_floor(tok, m, requests),
            "decode + DecodeStream only": lambda m: flat_floor(tok, m, requests, write=False)}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(repeats):
        messages = _steps(tok, requests, steps, r)
        for name, way in ways.items():     # interleaved, so that drift hits every way alike
            times[name].append(way(messages) / (requests * steps) * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slurmserve.bench.fanout", description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", help="a model directory with a fast tokenizer")
    ap.add_argument("--requests", type=int, default=128, help="streamed answers per step (default 128)")
    ap.add_argument("--steps", type=int, default=64, help="one-token steps per answer (default 64)")
    ap.add_argument("--repeats", type=int, default=21, help="repeats; medians are printed (default 21)")
    a = ap.parse_args(argv)
    for name, us in asyncio.run(run(a.model_dir, a.requests, a.steps, a.repeats)).items():
        print(f"{name:28s} {us:6.2f} µs per chunk")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
