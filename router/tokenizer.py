"""Tokenization on the head: prompts in, chat templates, and streamed detokenization out.

`Tokenizer` wraps the model directory's Hugging Face fast tokenizer (local files only). Encoding
and decoding call the Rust `tokenizers` backend directly; transformers is used to load the files
and to render chat templates.

`TextStream` turns the token ids an engine streams back into text deltas for one request:

  * incremental detokenization (`IncrementalDetokenizer`) with the prefix/read-offset technique:
    each step decodes only a short window (the tokens of the previous delta as context plus the
    new ones) and emits what the new tokens added, so the total cost is linear in the output
    length and the concatenated deltas equal a one-shot decode, also for tokenizers where a token
    decoded alone differs from the token decoded in context (Metaspace/SentencePiece spaces) or
    holds part of a UTF-8 character (byte-level BPE: text ending in U+FFFD is held back);
  * stop strings (`StopChecker`), OpenAI semantics: the output ends before the first stop string
    to complete, which is not included. Text that could be the start of a stop string is held back
    until it is known not to be one. Only the new text plus the held-back tail is searched.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPLACEMENT_CHAR = "\ufffd"   # what decoding an incomplete UTF-8 sequence ends with

try:   # tokenizers 0.21 has DecodeStream, later releases prime it with ids=
    from tokenizers.decoders import DecodeStream as _DecodeStream
    _DecodeStream(ids=[], skip_special_tokens=True)
except (ImportError, TypeError):   # IncrementalDetokenizer then decodes every step itself
    _DecodeStream = None

# Template arguments that would change what apply_chat_template returns: not for requests.
_RESERVED_TEMPLATE_KWARGS = frozenset({"tokenize", "return_dict", "return_tensors", "padding",
                                       "truncation", "max_length", "return_assistant_tokens_mask",
                                       "tokenizer_kwargs", "conversation", "chat_template"})

# Normalizer or pre-tokenizer stages that can delete input characters (whitespace, control
# characters, a pattern replaced by nothing): with one of them, text length bounds no token count.
_DROPS_TEXT = re.compile(r'Strip|Bert|Whitespace|Nmt|Precompiled|Removed|content=""')


class TooLong(Exception):
    """A prompt text longer than any prompt of `limit` tokens could be (`Tokenizer.max_prompt_chars`)."""

    def __init__(self, chars: int, limit: int, max_chars: int):
        super().__init__(f"the prompt is {chars} characters long; this tokenizer makes at least one "
                         f"token of every {max_chars // limit} characters, so that is more than this "
                         f"model's maximum context length of {limit} tokens")


# Tokenizers that are nothing but a tokenizer.json (Llama 3, Qwen 2, the tiny model). For them the
# plain fast class loads the same thing as AutoTokenizer without importing torch (and triton, whose
# bindings print dozens of "leaked" lines at exit), which saves the head seconds and memory.
_PLAIN_FAST = {"PreTrainedTokenizerFast", "TokenizersBackend"}


def default_threads(share: int = 1) -> int:
    """Tokenizer threads for one of `share` processes on this process's CPUs: at most 4."""
    return max(1, min(4, len(os.sched_getaffinity(0)) // share))


def _load_fast_tokenizer(path: Path):
    try:
        cls = json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        cls = None
    if cls in _PLAIN_FAST and (path / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)


class Tokenizer:
    """A model directory's tokenizer: encode, chat template, decode.

    The head must never tokenize a long prompt on its event loop (engines take a stalled head for
    a dead one): `off_loop` runs the work of a large request on worker threads, where the Rust
    batch calls release the GIL, so the loop goes on while they run."""

    # Work on up to this many characters (~2000 tokens, ~0.7 ms) runs on the caller's thread. A hop
    # to a worker thread and back costs more CPU than the hop alone (~40-90 µs): under load the
    # threads contend for the GIL, and a 512-token chat request cost the head ~0.2 ms (7%) more off
    # the loop than on it (docs/benchmarks.md). Parallel tokenizing is the front-end processes' job
    # (router.http_workers); the threads only keep a long prompt from stalling the loop.
    INLINE_CHARS = 8192

    def __init__(self, model_dir: str | os.PathLike, threads: int | None = None):
        self.path = Path(model_dir)
        # No more threads than cores: on more, a burst of long prompts finishes later, each one
        # slowed by the others, and an engine starts its first prefill step later (TTFT p99 of the
        # KV-routing burst: docs/benchmarks.md). The pool runs them first come, first served.
        self.threads = threads or default_threads()
        if not self.path.is_dir():
            raise FileNotFoundError(f"tokenizer: {self.path} is not a directory")
        self.hf = _load_fast_tokenizer(self.path)
        if not getattr(self.hf, "is_fast", False) or getattr(self.hf, "backend_tokenizer", None) is None:
            raise ValueError(f"tokenizer: {self.path} has no fast tokenizer (tokenizer.json)")
        self.backend = self.hf.backend_tokenizer
        # The head calls encode/decode directly on the backend: make sure no padding or
        # truncation is configured there.
        self.backend.no_truncation()
        self.backend.no_padding()

        self.eos_token_id: int | None = self.hf.eos_token_id
        vocab = self.backend.get_vocab(with_added_tokens=True)
        # ids run from 0 to vocab_size - 1 (sizes and ids differ only for sparse vocabularies)
        self.vocab_size: int = max(len(self.hf), max(vocab.values(), default=-1) + 1)
        # Added tokens flagged special are exactly what decode(skip_special_tokens=True) drops.
        self.special_ids: frozenset[int] = frozenset(
            i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)
        self.eos_token_ids: tuple[int, ...] = self._eos_ids()
        self.chars_per_token: int | None = self._chars_per_token(vocab)
        # The batch call releases the GIL (encode does not); the _fast one skips the offsets.
        self._encode_batch = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        self._pool: ThreadPoolExecutor | None = None

    def _chars_per_token(self, vocab: dict[str, int]) -> int | None:
        """The most input characters one token can stand for, or None when there is no bound.

        A token's text is at most as long as its vocabulary entry (byte-level BPE spells each byte
        as one character; SentencePiece's "▁" is one space; byte-fallback "<0x41>" and WordPiece's
        "##" only overstate it). The pipeline before the model maps characters one to one except
        NFC/NFKC composition (a base letter and up to three marks become one character) and stages
        that delete text, which leave no bound."""
        stages = f"{self.backend.normalizer!r} {self.backend.pre_tokenizer!r}"
        if _DROPS_TEXT.search(stages):
            return None
        longest = max((len(t) for t in vocab), default=1)
        return longest * (4 if "NF" in stages else 1)

    def max_prompt_chars(self, max_tokens: int) -> int | None:
        """A text longer than this has more than `max_tokens` tokens, whatever its content."""
        return None if self.chars_per_token is None else self.chars_per_token * max_tokens

    def _eos_ids(self) -> tuple[int, ...]:
        """EOS of the tokenizer plus those of generation_config.json (Llama 3 has several)."""
        ids = [] if self.eos_token_id is None else [self.eos_token_id]
        try:
            gen = json.loads((self.path / "generation_config.json").read_text())
        except (OSError, ValueError):
            gen = {}
        extra = gen.get("eos_token_id") if isinstance(gen, dict) else None
        for i in extra if isinstance(extra, list) else [extra]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
        return tuple(ids)

    # ---- prompts --------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of a completion prompt, with the special tokens the tokenizer adds (BOS for
        most models), as vLLM does for /v1/completions."""
        return self._encode_batch([text], add_special_tokens=True)[0].ids

    def encode_prompts(self, texts: Sequence[str], limit: int | None = None,
                       add_special_tokens: bool = True) -> list[list[int] | int]:
        """Token ids of each text, as `encode` makes them. A text of `limit` tokens or more comes
        back as its token count alone: no id list is built for a prompt that will be refused."""
        encodings = self._encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids if limit is None or len(e) < limit else len(e) for e in encodings]

    async def off_loop(self, size: int, fn: Callable, *args):
        """`fn(*args)`, where it cannot hold up the event loop: on the caller's thread when `size`
        (characters of input) is small, else on this tokenizer's worker threads."""
        if size <= self.INLINE_CHARS:
            return fn(*args)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="tokenize")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def render_chat_template(self, messages: Sequence[dict[str, Any]],
                             add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
        """The prompt text the chat template makes of OpenAI-style messages."""
        from jinja2 import TemplateError

        bad = _RESERVED_TEMPLATE_KWARGS.intersection(template_kwargs)
        if bad:
            raise ValueError(f"chat template argument(s) not allowed: {', '.join(sorted(bad))}")
        msgs = normalize_messages(messages)
        try:
            text = self.hf.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt,
                                               tokenize=False, **template_kwargs)
        except TemplateError as e:
            raise ValueError(f"chat template failed: {e}") from None
        if not isinstance(text, str):   # defensive: a batched call would return a list
            raise ValueError("chat template did not render a single prompt")
        return text

    def apply_chat_template(self, messages: Sequence[dict[str, Any]],
                            add_generation_prompt: bool = True, **template_kwargs: Any) -> list[int]:
        """Token ids of a chat prompt. The template writes any BOS itself, so nothing is added
        when tokenizing its output (vLLM's convention)."""
        text = self.render_chat_template(messages, add_generation_prompt, **template_kwargs)
        return self._encode_batch([text], add_special_tokens=False)[0].ids

    def chat_prompt(self, messages: Sequence[dict[str, Any]], limit: int | None,
                    template_kwargs: dict[str, Any]) -> list[int] | int:
        """`apply_chat_template` for a model of context `limit`: the rendered text is checked
        against `max_prompt_chars` (TooLong) before it is tokenized, and a prompt of `limit` tokens
        or more comes back as its token count (see `encode_prompts`)."""
        text = self.render_chat_template(messages, True, **template_kwargs)
        max_chars = None if limit is None else self.max_prompt_chars(limit)
        if max_chars is not None and len(text) > max_chars:
            raise TooLong(len(text), limit, max_chars)
        return self.encode_prompts([text], limit, add_special_tokens=False)[0]

    # ---- output ---------------------------------------------------------------------------------

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """One-shot decode (no clean-up of tokenization spaces, like the streamed text)."""
        if len(ids) > self.INLINE_CHARS:   # the batch call releases the GIL (see off_loop)
            return self.backend.decode_batch([list(ids)], skip_special_tokens=skip_special_tokens)[0]
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, eos={self.eos_token_id})"


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI chat messages with every `content` as a string, ready for a chat template.

    Content may be a string, null (→ ""), or a list of parts; parts of type "text" are joined
    with newlines (vLLM's "string" content format). Other part types raise ValueError."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object, got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}].role must be a non-empty string")
        content = m.get("content")
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                if not isinstance(part, dict):
                    raise ValueError(f"{where} must be an object with a 'type', got {type(part).__name__}")
                kind = part.get("type")
                if kind != "text":
                    raise ValueError(f"{where}: content parts of type {kind!r} are not supported "
                                     f"(this model accepts only 'text' parts)")
                t = part.get("text")
                if not isinstance(t, str):
                    raise ValueError(f"{where}.text must be a string")
                texts.append(t)
            text = "\n".join(texts)
        else:
            raise ValueError(f"messages[{i}].content must be a string or a list of content parts, "
                             f"got {type(content).__name__}")
        msg = {**m, "content": text}
        if isinstance(m.get("tool_calls"), list):
            msg["tool_calls"] = [_tool_call_for_template(c) for c in m["tool_calls"]]
        out.append(msg)
    return out


def _tool_call_for_template(call: Any) -> Any:
    """An assistant message's tool call with its JSON `arguments` string as an object: chat
    templates write `arguments | tojson` or iterate over them (vLLM hands them over the same way)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        args = json.loads(fn["arguments"])
    except ValueError:
        return call
    return {**call, "function": {**fn, "arguments": args}}


class IncrementalDetokenizer:
    """Text deltas of one request's output tokens, fed as they arrive.

    The window `_ids` holds the tokens of the last emitted delta (context; the first `_read` of
    them) and the tokens not emitted yet. A step decodes the window and emits what it adds to the
    context's text, unless that ends in U+FFFD (a character cut in the middle). Special tokens are
    dropped on arrival when they are skipped anyway, so they never grow the window.
    """

    # Tokens held back waiting for a character to complete before looking for a shorter stable
    # prefix of the window (a UTF-8 character spans at most 4 tokens).
    MAX_PENDING = 6
    # Tokens of prompt context for the first delta (Metaspace/SentencePiece leading spaces).
    PROMPT_CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True,
                 prompt_ids: Sequence[int] | None = None):
        self._backend = tokenizer.backend
        self._skip = skip_special_tokens
        self._drop = tokenizer.special_ids if skip_special_tokens else frozenset()
        ctx = [t for t in (prompt_ids or ())[-self.PROMPT_CONTEXT:] if t not in self._drop]
        self._ids: list[int] = ctx
        self._read = len(ctx)
        self._prefix_text: str | None = self._decode(ctx) if ctx else ""   # None: not decoded yet
        self._stream = None   # opened by the first one-token step

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=self._skip)

    def _context_text(self) -> str:
        """The text of the window's context, decoded when first needed after the stream moved it."""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[:self._read])
        return self._prefix_text

    def _open_stream(self):
        """tokenizers' own incremental decoder, primed with the window's context, for the common
        step: one token, nothing pending. It follows the same rule as `step` (emit what the window
        adds unless it ends in U+FFFD; the last delta's tokens are the next context) in one call
        into Rust, where `step` decodes twice from Python. None where it cannot start from this
        window: tokens pending, a context text that ends in U+FFFD (it would take the context as
        new text), or a tokenizers release without `DecodeStream(ids=...)`."""
        if _DecodeStream is None or len(self._ids) != self._read or \
                self._context_text().endswith(REPLACEMENT_CHAR):
            return None
        return _DecodeStream(ids=list(self._ids), skip_special_tokens=self._skip)

    def step(self, new_ids: Sequence[int]) -> str:
        """Add output tokens; return the text they complete (possibly "")."""
        drop = self._drop
        if drop and not drop.isdisjoint(new_ids):
            new_ids = [t for t in new_ids if t not in drop]
        if not new_ids:
            return ""
        ids = self._ids
        if len(new_ids) == 1 and len(ids) - self._read < self.MAX_PENDING:
            stream = self._stream
            if stream is None and len(ids) == self._read:
                stream = self._stream = self._open_stream()
            if stream is not None:
                token = new_ids[0]
                try:
                    piece = stream.step(self._backend, token)
                except Exception:   # a decode that is not monotonic (invalid UTF-8): the way below
                    pass
                else:
                    if piece is None:   # nothing new yet: the token waits in the window
                        ids.append(token)
                        return ""
                    del ids[:self._read]   # emitted: the tokens since the last delta are the context
                    ids.append(token)
                    self._read = len(ids)
                    self._prefix_text = None
                    return piece
        self._stream = None   # the window moves on without it
        self._context_text()
        ids.extend(new_ids)
        pending = len(ids) - self._read
        text = self._decode(ids)
        if len(text) > len(self._prefix_text) and not text.endswith(REPLACEMENT_CHAR):
            return self._advance(len(ids), text)
        if pending <= self.MAX_PENDING:
            return ""
        return self._stable_part(text)

    def flush(self) -> str:
        """The end of the output: emit whatever is held back, incomplete characters included."""
        if len(self._ids) == self._read:
            return ""
        self._context_text()
        self._stream = None
        return self._advance(len(self._ids), self._decode(self._ids))

    def _advance(self, end: int, text: str) -> str:
        """Emit text (the decode of _ids[:end]) and make _ids[_read:end] the next context."""
        delta = text[len(self._prefix_text):]
        del self._ids[:self._read]
        self._read = end - self._read
        self._prefix_text = self._decode(self._ids[:self._read]) if self._read else ""
        return delta

    def _stable_part(self, text: str) -> str:
        """Many tokens held back: a big chunk ending in part of a character, output that decodes
        to nothing new, or invalid UTF-8. Emit the longest prefix of the window (looking back a
        few tokens) whose text is final."""
        n, prefix_len = len(self._ids), len(self._prefix_text)
        if len(text) <= prefix_len:   # the new tokens add no text: keep only their context
            return self._advance(n, text)
        fallback = None
        for end in range(n - 1, max(self._read, n - 1 - self.MAX_PENDING), -1):
            t = self._decode(self._ids[:end])
            if len(t) <= prefix_len or not text.startswith(t):
                continue
            if not t.endswith(REPLACEMENT_CHAR):
                return self._advance(end, t)
            if fallback is None and t + self._decode(self._ids[end:]) == text:
                # ends in invalid bytes that no later token can complete (the split does not
                # change the text, unlike a split inside a character still being completed)
                fallback = (end, t)
        if n - self._read > 4 * self.MAX_PENDING:   # give up waiting: bound the window
            end, t = fallback or (n, text)
            return self._advance(end, t)
        return ""


class StopChecker:
    """Stop strings over a stream of text deltas (OpenAI semantics: the stop string is not part
    of the output, unless include_stop).

    The output ends at the stop string that completes first; the result does not depend on how
    the text is split into deltas. A suffix of the text that is the beginning of a stop string is
    held back until the next delta shows whether it is one.
    """

    def __init__(self, stop: Iterable[str] | None, *, include_stop: bool = False):
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in (stop or ()) if s))
        self.include_stop = include_stop
        self._prefixes = frozenset(s[:k] for s in self.stops for k in range(1, len(s)))
        self._max_held = max((len(s) for s in self.stops), default=1) - 1
        self._held = ""
        self.stopped = False
        self.stop_str: str | None = None   # the stop string that ended the output

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add text; return (text to emit now, whether a stop string ended the output)."""
        if self.stopped:
            return "", True
        if not self.stops:
            return delta, False
        buf = self._held + delta if self._held else delta
        if not buf:
            return "", False
        best_end, best = -1, None
        for s in self.stops:
            i = buf.find(s)
            if i >= 0:
                end = i + len(s)
                if best is None or end < best_end or (end == best_end and len(s) > len(best)):
                    best_end, best = end, s
        if best is not None:
            self.stopped, self.stop_str, self._held = True, best, ""
            return buf[:best_end if self.include_stop else best_end - len(best)], True
        for k in range(min(self._max_held, len(buf)), 0, -1):
            if buf[-k:] in self._prefixes:
                self._held = buf[-k:]
                return buf[:-k], False
        self._held = ""
        return buf, False

    def flush(self) -> str:
        """The end of the output: the held-back text was not a stop string after all."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


class TextStream:
    """Detokenization plus stop strings for one request.

    feed(ids) -> (text delta, stopped); once stopped, stop feeding (the rest is discarded).
    finish() -> the held-back text, when the engine ends the output (EOS, length, ...).
    prompt_ids (optional): the prompt's token ids, as context for the first tokens' text (e.g.
    SentencePiece's leading space), as vLLM does.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Iterable[str] | None = None, *,
                 skip_special_tokens: bool = True, include_stop: bool = False,
                 prompt_ids: Sequence[int] | None = None):
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens,
                                             prompt_ids=prompt_ids)
        self._stop = StopChecker(stop, include_stop=include_stop)

    @property
    def plain(self) -> IncrementalDetokenizer | None:
        """The detokenizer, when there are no stop strings to watch (then `feed(ids)` is
        `(plain.step(ids), False)`); else None."""
        return None if self._stop.stops else self._detok

    @property
    def stopped(self) -> bool:
        return self._stop.stopped

    @property
    def stop_str(self) -> str | None:
        return self._stop.stop_str

    def feed(self, ids: Sequence[int]) -> tuple[str, bool]:
        if self._stop.stopped:
            return "", True
        return self._stop.feed(self._detok.step(ids))

    def finish(self) -> str:
        if self._stop.stopped:
            return ""
        text, stopped = self._stop.feed(self._detok.flush())
        return text if stopped else text + self._stop.flush()
