"""Workloads for the load generator. Prompts are token ids (or chat messages) with exact lengths.

Token-id prompts go to /v1/completions, so the server sees exactly `input_len` tokens whatever its
tokenizer would make of text. Given the served model's tokenizer (`tokenizer=`, a
`slurmserve.router.tokenizer.Tokenizer`), ids are drawn from its vocabulary without special tokens,
chat workloads are built and counted with it: multi-turn user turns are exactly `input_len`
tokens, ShareGPT replies are measured in tokens, and every chat spec's `prompt_len` is the token
count of its prompt after the chat template -- what the server should report as `prompt_tokens`.
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
    prompt_len: int | None = None             # prompt tokens the server should count (None: unknown)

    def __post_init__(self):
        if self.prompt_len is None and self.prompt is not None:
            self.prompt_len = len(self.prompt)


class _Vocab:
    """What the datasets need of a tokenizer: ids to draw, single-token words, exact counts."""

    def __init__(self, tokenizer=None, vocab: int = 400):
        self.tok = tokenizer
        if tokenizer is None:
            self.ids = list(range(10, vocab))
            self.words = "the quick brown fox jumps over the lazy dog hello world".split()
            return
        special = set(tokenizer.special_ids)
        self.ids = [i for i in range(tokenizer.vocab_size) if i not in special]
        # words that are one token after a space, so " w1 w2 ... wn" is n tokens
        words = []
        for i in self.ids:
            w = tokenizer.decode([i])
            if len(w) > 2 and w[0] == " " and w[1:].isalpha() and w[1:].isascii() and self.count(w) == 1:
                words.append(w[1:])
                if len(words) == 2000:
                    break
        if not words:
            raise ValueError("tokenizer has no single-token words")
        self.words = words

    def count(self, text: str) -> int:
        return len(self.tok.backend.encode(text, add_special_tokens=False).ids)

    def text(self, rng: random.Random, n: int) -> str:
        """Text of exactly n tokens (with a tokenizer; n words without one)."""
        words = rng.choices(self.words, k=n)
        if self.tok is None:
            return " ".join(words)
        text = " " + " ".join(words)
        while self.count(text) > n:   # a tokenizer merging across spaces: drop words until it fits
            words.pop()
            text = " " + " ".join(words)
        while self.count(text) < n:
            text += " " + rng.choice(self.words)
        if self.count(text) != n:
            raise ValueError(f"cannot build a text of exactly {n} tokens with this tokenizer")
        return text

    def chat_len(self, messages: list[dict]) -> int | None:
        return None if self.tok is None else len(self.tok.apply_chat_template(messages))


def _ids(rng: random.Random, n: int, vocab: _Vocab) -> list[int]:
    return rng.choices(vocab.ids, k=n)


def _length(rng: random.Random, mean: int, ratio: float) -> int:
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return rng.randint(lo, hi)


def random_dataset(n: int, input_len: int, output_len: int, vocab: _Vocab, range_ratio: float = 0.0,
                   seed: int = 0) -> list[RequestSpec]:
    rng = random.Random(seed)
    return [RequestSpec(_ids(rng, _length(rng, input_len, range_ratio), vocab),
                        max_tokens=_length(rng, output_len, range_ratio)) for _ in range(n)]


def prefix_repetition(n: int, num_prefixes: int, prefix_len: int, suffix_len: int, output_len: int,
                      vocab: _Vocab, seed: int = 0) -> list[RequestSpec]:
    """`num_prefixes` shared prefixes, each request one of them plus a unique suffix (shuffled)."""
    rng = random.Random(seed)
    prefixes = [_ids(rng, prefix_len, vocab) for _ in range(num_prefixes)]
    specs = [RequestSpec(prefixes[i % num_prefixes] + _ids(rng, suffix_len, vocab), max_tokens=output_len)
             for i in range(n)]
    rng.shuffle(specs)
    return specs


def multi_turn(n_conversations: int, turns: int, user_len: int, output_len: int, vocab: _Vocab,
               seed: int = 0) -> list[RequestSpec]:
    """Conversations that grow turn by turn; each turn resends the history (the server's prefix cache
    should hit it). User turns and the placeholder assistant turns are `user_len` and `output_len`
    tokens (words without a tokenizer)."""
    rng = random.Random(seed)
    specs = []
    for c in range(n_conversations):
        history: list[dict] = []
        for t in range(turns):
            history = history + [{"role": "user", "content": vocab.text(rng, user_len)}]
            specs.append(RequestSpec(messages=list(history), max_tokens=output_len, session=f"c{c}",
                                     prompt_len=vocab.chat_len(history)))
            history = history + [{"role": "assistant", "content": vocab.text(rng, output_len)}]
    return specs


def sharegpt(path: Path, n: int, vocab: _Vocab, seed: int = 0, max_output: int = 1024) -> list[RequestSpec]:
    """ShareGPT-format JSON: [{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}].
    The human turn is the prompt; the gpt turn's length in tokens (words without a tokenizer) is
    max_tokens, at most `max_output`."""
    data = json.loads(Path(path).read_text())
    rng = random.Random(seed)
    rng.shuffle(data)
    specs = []
    for item in data:
        conv = item.get("conversations") or []
        if len(conv) < 2:
            continue
        reply = conv[1]["value"]
        out_len = len(reply.split()) if vocab.tok is None else vocab.count(reply)
        messages = [{"role": "user", "content": conv[0]["value"]}]
        specs.append(RequestSpec(messages=messages, max_tokens=max(1, min(max_output, out_len)),
                                 prompt_len=vocab.chat_len(messages)))
        if len(specs) == n:
            break
    return specs


def mooncake_trace(path: Path, vocab: _Vocab, block_tokens: int = 512, n: int | None = None,
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
          vocab: int = 400, seed: int = 0, dataset_path: Path | None = None, block_tokens: int = 512,
          tokenizer=None) -> list[RequestSpec]:
    """One entry point for every workload, used by `bench serve` and scenario files alike.
    Without `tokenizer`, token ids are drawn from [10, vocab)."""
    vocab = _Vocab(tokenizer, vocab)
    if dataset == "random":
        return random_dataset(n, input_len, output_len, vocab, range_ratio, seed)
    if dataset == "prefix-repetition":
        return prefix_repetition(n, num_prefixes, prefix_len, suffix_len, output_len, vocab, seed)
    if dataset == "multi-turn":
        return multi_turn(max(1, n // turns), turns, input_len, output_len, vocab, seed)
    if dataset_path is None:
        raise ValueError(f"dataset {dataset!r} needs dataset_path")
    if dataset == "sharegpt":
        return sharegpt(Path(dataset_path), n, vocab, seed)
    if dataset == "mooncake":
        return mooncake_trace(Path(dataset_path), vocab, block_tokens, n=n, seed=seed)
    raise ValueError(f"unknown dataset {dataset!r}")
