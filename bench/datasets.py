"""Workloads for the load generator. Prompts are token ids (or chat messages) with exact lengths.

Token-id prompts go to /v1/completions, so the server sees exactly `input_len` tokens whatever its
tokenizer would make of text; chat workloads (ShareGPT, multi-turn) are measured after templating.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RequestSpec:
    prompt: list[int] | None = None           # /v1/completions with token ids
    messages: list[dict] | None = None        # /v1/chat/completions
    max_tokens: int = 128
    at: float | None = None                   # trace replay: seconds after the start
    session: str | None = None                # multi-turn: later turns wait for earlier ones
    extra: dict = field(default_factory=dict)


def _ids(rng: random.Random, n: int, vocab: int, low: int = 10) -> list[int]:
    return [rng.randrange(low, vocab) for _ in range(n)]


def _length(rng: random.Random, mean: int, ratio: float) -> int:
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return rng.randint(lo, hi)


def random_dataset(n: int, input_len: int, output_len: int, vocab: int, range_ratio: float = 0.0,
                   seed: int = 0) -> list[RequestSpec]:
    rng = random.Random(seed)
    return [RequestSpec(_ids(rng, _length(rng, input_len, range_ratio), vocab),
                        max_tokens=_length(rng, output_len, range_ratio)) for _ in range(n)]


def prefix_repetition(n: int, num_prefixes: int, prefix_len: int, suffix_len: int, output_len: int,
                      vocab: int, seed: int = 0) -> list[RequestSpec]:
    """`num_prefixes` shared prefixes, each request one of them plus a unique suffix (shuffled)."""
    rng = random.Random(seed)
    prefixes = [_ids(rng, prefix_len, vocab) for _ in range(num_prefixes)]
    specs = [RequestSpec(prefixes[i % num_prefixes] + _ids(rng, suffix_len, vocab), max_tokens=output_len)
             for i in range(n)]
    rng.shuffle(specs)
    return specs


def multi_turn(n_conversations: int, turns: int, user_len: int, output_len: int, seed: int = 0,
               words: list[str] | None = None) -> list[RequestSpec]:
    """Conversations that grow turn by turn; each turn resends the history (the server's prefix cache
    should hit it). Assistant turns are placeholders of the requested length in words."""
    rng = random.Random(seed)
    words = words or "the quick brown fox jumps over the lazy dog hello world".split()
    specs = []
    for c in range(n_conversations):
        history: list[dict] = []
        for t in range(turns):
            history = history + [{"role": "user", "content": " ".join(rng.choices(words, k=user_len))}]
            specs.append(RequestSpec(messages=list(history), max_tokens=output_len, session=f"c{c}"))
            history = history + [{"role": "assistant", "content": " ".join(rng.choices(words, k=output_len))}]
    return specs


def sharegpt(path: Path, n: int, seed: int = 0, max_output: int = 1024) -> list[RequestSpec]:
    """ShareGPT-format JSON: [{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}].
    The human turn is the prompt; the gpt turn's length (in words, as a proxy) caps max_tokens."""
    data = json.loads(Path(path).read_text())
    rng = random.Random(seed)
    rng.shuffle(data)
    specs = []
    for item in data:
        conv = item.get("conversations") or []
        if len(conv) < 2:
            continue
        specs.append(RequestSpec(messages=[{"role": "user", "content": conv[0]["value"]}],
                                 max_tokens=max(1, min(max_output, len(conv[1]["value"].split())))))
        if len(specs) == n:
            break
    return specs


def mooncake_trace(path: Path, vocab: int, block_tokens: int = 512, n: int | None = None,
                   seed: int = 0) -> list[RequestSpec]:
    """Mooncake-style JSONL: {timestamp (ms), input_length, output_length, hash_ids}. Equal hash ids
    become equal token blocks, so the trace's prefix sharing is reproduced exactly."""
    rng = random.Random(seed)
    blocks: dict[int, list[int]] = {}
    specs = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            ids: list[int] = []
            for h in rec.get("hash_ids", []):
                if h not in blocks:
                    blocks[h] = _ids(rng, block_tokens, vocab)
                ids += blocks[h]
            length = int(rec["input_length"])
            ids = (ids + _ids(rng, max(0, length - len(ids)), vocab))[:length]
            specs.append(RequestSpec(ids, max_tokens=int(rec["output_length"]),
                                     at=float(rec.get("timestamp", 0)) / 1000.0))
            if n is not None and len(specs) == n:
                break
    return specs


def build(dataset: str, n: int, *, input_len: int = 256, output_len: int = 64, range_ratio: float = 0.0,
          num_prefixes: int = 8, prefix_len: int = 1024, suffix_len: int = 128, turns: int = 4,
          vocab: int = 400, seed: int = 0, dataset_path: Path | None = None) -> list[RequestSpec]:
    """One entry point for every workload, used by `bench serve` and scenario files alike."""
    if dataset == "random":
        return random_dataset(n, input_len, output_len, vocab, range_ratio, seed)
    if dataset == "prefix-repetition":
        return prefix_repetition(n, num_prefixes, prefix_len, suffix_len, output_len, vocab, seed)
    if dataset == "multi-turn":
        return multi_turn(max(1, n // turns), turns, input_len, output_len, seed)
    if dataset_path is None:
        raise ValueError(f"dataset {dataset!r} needs dataset_path")
    if dataset == "sharegpt":
        return sharegpt(Path(dataset_path), n, seed)
    if dataset == "mooncake":
        return mooncake_trace(Path(dataset_path), vocab, n=n, seed=seed)
    raise ValueError(f"unknown dataset {dataset!r}")
