"""The head's tokenizer (slurmserve.router.tokenizer): prompts, chat template, streamed text."""

from __future__ import annotations

import json
import random

import pytest

from slurmserve.router.tokenizer import (IncrementalDetokenizer, StopChecker, TextStream, Tokenizer,
                                         normalize_messages)
from slurmserve.tools.tiny_model import make_tiny_model

MULTILINGUAL = "héllo 世界 🎉 naïve café — ok 😀😀 done"


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return Tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory):
    """A byte-level BPE (GPT-2 style): tokens can hold part of a UTF-8 character."""
    d = tmp_path_factory.mktemp("tiny-bytelevel")
    make_tiny_model(d, tokenizer="bytelevel", hidden=32, layers=1)
    return Tokenizer(d)


def stream(tokenizer, ids, chunks, stop=None, **kw):
    """Feed ids in chunks of the given sizes (cycled); return (deltas, stopped)."""
    ts = TextStream(tokenizer, stop, **kw)
    out, i, k = [], 0, 0
    while i < len(ids):
        n = chunks[k % len(chunks)]
        piece, stopped = ts.feed(ids[i:i + n])
        out.append(piece)
        i, k = i + n, k + 1
        if stopped:
            return out, True
    out.append(ts.finish())
    return out, False


# ---- prompts ------------------------------------------------------------------------------------

def test_properties(tok):
    assert tok.eos_token_id == tok.backend.token_to_id("<|im_end|>") == 2
    assert tok.eos_token_ids == (2,)
    assert tok.vocab_size == len(tok) == 512
    assert tok.special_ids == {0, 1, 2, 3, 4}


def test_encode_matches_transformers_and_round_trips(tok, byte_tok):
    for t in (tok, byte_tok):
        for s in ("hello world , the quick brown fox", "  two  spaces\nand a newline", "", "?!"):
            ids = t.encode(s)
            assert ids == t.hf(s).input_ids
            assert t.decode(ids) == s
    assert byte_tok.decode(byte_tok.encode(MULTILINGUAL)) == MULTILINGUAL
    assert tok.decode(tok.encode("é")) == ""            # ascii tokenizer: <unk>, a special token
    assert tok.decode(tok.encode("é"), skip_special_tokens=False) == "<unk>"


def test_chat_template(tok):
    msgs = [{"role": "system", "content": "you are a helpful assistant ."},
            {"role": "user", "content": "what is the capital of france ?"}]
    ids = tok.apply_chat_template(msgs)
    text = tok.decode(ids, skip_special_tokens=False)
    assert text == ("<|im_start|>system\nyou are a helpful assistant .<|im_end|>\n"
                    "<|im_start|>user\nwhat is the capital of france ?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert ids == tok.encode(text)                       # no BOS or anything else added
    assert ids.count(tok.eos_token_id) == 2
    no_prompt = tok.apply_chat_template(msgs, add_generation_prompt=False)
    assert ids[:len(no_prompt)] == no_prompt and not tok.decode(
        no_prompt, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert tok.apply_chat_template(msgs, unused_template_variable=1) == ids


def test_chat_content_parts(tok):
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello"},
                                          {"type": "text", "text": "world"}]},
             {"role": "assistant", "content": None}]
    assert normalize_messages(parts)[0]["content"] == "hello\nworld"
    assert tok.render_chat_template(parts, add_generation_prompt=False) == \
        "<|im_start|>user\nhello\nworld<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     r"messages\[0\]\.content\[0\].*'image_url'.*not supported"),
    ([{"role": "user", "content": [{"type": "text"}]}], r"\.text must be a string"),
    ([{"role": "user", "content": ["hello"]}], r"content\[0\] must be an object"),
    ([{"role": "user", "content": 3}], r"content must be a string or a list"),
    ([{"content": "hi"}], r"role must be a non-empty string"),
    (["hi"], r"messages\[0\] must be an object"),
    ([], "non-empty list"),
])
def test_chat_rejects_bad_messages(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


def test_chat_rejects_reserved_kwargs(tok):
    with pytest.raises(ValueError, match="tokenize"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)


# ---- incremental detokenization -----------------------------------------------------------------

def test_incremental_equals_one_shot(tok):
    rng = random.Random(0)
    ids = [rng.randrange(tok.vocab_size) for _ in range(5000)]   # specials included
    full = tok.decode(ids)
    for chunks in ([1], [1, 2, 7, 3], [64], [5000]):
        out, stopped = stream(tok, ids, chunks)
        assert not stopped and "".join(out) == full
    out, _ = stream(tok, ids, [3], skip_special_tokens=False)
    assert "".join(out) == tok.decode(ids, skip_special_tokens=False)


def test_incremental_window_stays_small(tok):
    rng = random.Random(1)
    d = IncrementalDetokenizer(tok)
    for _ in range(3000):
        d.step([rng.randrange(tok.vocab_size)])
        assert len(d._ids) <= 2                               # context + pending: O(1) per step


def test_multibyte_characters_are_held_until_complete(byte_tok):
    ids = byte_tok.encode(MULTILINGUAL)
    assert len(ids) > len(MULTILINGUAL.split())
    d = IncrementalDetokenizer(byte_tok)
    parts = [d.step([i]) for i in ids] + [d.flush()]
    assert "".join(parts) == MULTILINGUAL
    assert not any("\ufffd" in p for p in parts)
    assert "🎉" in parts and "世" in parts                        # emitted whole, once complete


def test_big_chunk_ending_inside_a_character(byte_tok):
    ids = byte_tok.encode("hello world , the quick brown fox 🎉")
    assert byte_tok.decode(ids[:-1]).endswith("\ufffd")          # the emoji spans tokens
    d = IncrementalDetokenizer(byte_tok)
    assert d.step(ids[:-1]) == "hello world , the quick brown fox "
    assert d.step(ids[-1:]) == "🎉" and d.flush() == ""


def test_invalid_utf8_output_matches_one_shot(byte_tok):
    """A random model emits arbitrary byte tokens: the deltas still add up to the one-shot text."""
    vocab = byte_tok.backend.get_vocab()
    byte_ids = [i for t, i in vocab.items() if len(t) == 1 and ord(t) > 160]   # non-ASCII bytes
    rng = random.Random(2)
    for trial in range(300):
        pool = byte_ids if trial % 2 else range(byte_tok.vocab_size)
        ids = [rng.choice(pool) for _ in range(rng.randrange(1, 150))]
        out, _ = stream(byte_tok, ids, [rng.choice([1, 2, 3, 40])])
        assert "".join(out) == byte_tok.decode(ids), ids


def test_decode_stream_gives_the_same_deltas_as_decoding_the_window(tok, byte_tok, monkeypatch):
    """The one-token step through tokenizers' DecodeStream emits exactly what decoding the window
    twice from Python does, delta for delta, including characters split over tokens, invalid
    UTF-8, skipped special tokens and chunks of several tokens between single ones."""
    from slurmserve.router import tokenizer as module

    assert module._DecodeStream is not None   # the tokenizers this project installs has it
    rng = random.Random(3)
    for t in (tok, byte_tok):
        vocab = t.backend.get_vocab()
        pools = [range(t.vocab_size), [i for s, i in vocab.items() if len(s) == 1 and ord(s) > 160] or [0]]
        for trial in range(200):
            pool = pools[trial % 2]
            ids = [rng.choice(pool) for _ in range(rng.randrange(1, 80))]
            prompt = [rng.randrange(t.vocab_size) for _ in range(rng.randrange(0, 8))]
            sizes = [rng.choice([1, 1, 1, 2, 5]) for _ in ids]
            skip = trial % 3 != 0
            runs = []
            for stream_class in (module._DecodeStream, None):
                monkeypatch.setattr(module, "_DecodeStream", stream_class)
                d = IncrementalDetokenizer(t, skip_special_tokens=skip, prompt_ids=prompt)
                out, i = [], 0
                for n in sizes:
                    if i >= len(ids):
                        break
                    out.append(d.step(ids[i:i + n]))
                    i += n
                runs.append(out + [d.flush()])
            assert runs[0] == runs[1], (ids, prompt, sizes, skip)


def test_prompt_context_and_finish(tok):
    prompt = tok.encode("the quick brown")
    out = tok.encode(" fox jumps")
    ts = TextStream(tok, prompt_ids=prompt)
    text = ts.feed(out)[0] + ts.finish()
    assert text == tok.decode(prompt + out)[len(tok.decode(prompt)):] == " fox jumps"
    ts = TextStream(tok)
    assert ts.feed([tok.eos_token_id]) == ("", False) and ts.finish() == ""


# ---- stop strings -------------------------------------------------------------------------------

def test_stop_spanning_deltas():
    s = StopChecker(["STOP"])
    assert s.feed("abc ST") == ("abc ", False)                   # "ST" held back
    assert s.feed("O") == ("", False)
    assert s.feed("P and more") == ("", True)
    assert s.stopped and s.stop_str == "STOP"
    assert s.feed("x") == ("", True) and s.flush() == ""


def test_stop_held_text_released():
    s = StopChecker(["\n\n", "END"])
    assert s.feed("line\n") == ("line", False)
    assert s.feed("E") == ("\n", False)
    assert s.feed("x") == ("Ex", False)
    assert s.feed("EN") == ("", False)
    assert s.flush() == "EN" and not s.stopped


def test_stop_first_to_complete_wins_and_include_stop():
    assert StopChecker(["abcd", "c"]).feed("xabcd") == ("xab", True)
    assert StopChecker(["bc", "abc"]).feed("xabc") == ("x", True)         # same end: longer one
    s = StopChecker(["c", "ab"], include_stop=True)
    assert s.feed("xabc") == ("xab", True) and s.stop_str == "ab"
    assert StopChecker([""]).feed("abc") == ("abc", False)              # empty stops ignored
    assert StopChecker(None).feed("abc") == ("abc", False)


def test_stop_result_independent_of_chunking():
    rng = random.Random(3)
    for _ in range(500):
        text = "".join(rng.choice("abc") for _ in range(rng.randrange(0, 40)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randrange(1, 5)))
                 for _ in range(rng.randrange(1, 4))]
        ends = [(text.find(s) + len(s), -len(s)) for s in stops if s in text]
        expect = text[:min(ends)[0] + min(ends)[1]] if ends else text
        s, out, i = StopChecker(stops), [], 0
        while i < len(text) and not s.stopped:
            n = rng.randrange(1, 6)
            out.append(s.feed(text[i:i + n])[0])
            i += n
        out.append(s.flush())
        assert "".join(out) == expect, (text, stops)
        assert s.stopped == bool(ends)


def test_text_stream_stop_across_token_boundary(tok):
    ids = tok.encode("the quick brown fox jumps over the lazy dog")
    out, stopped = stream(tok, ids, [1], stop=["brown f", "zzz"])
    assert stopped and "".join(out) == "the quick "
    out, stopped = stream(tok, ids, [1], stop=["dogs"])         # "dog" held, then flushed
    assert not stopped and "".join(out) == "the quick brown fox jumps over the lazy dog"
    assert out[-1] == "dog"
    ts = TextStream(tok, ["fox"])
    assert ts.feed(ids) == ("the quick brown ", True) and ts.stopped and ts.stop_str == "fox"
    assert ts.feed(ids) == ("", True) and ts.finish() == ""


# ---- long prompts: a length bound before tokenizing, and tokenizing off the event loop ----------------

def test_prompt_length_bound_is_sound(tok, byte_tok):
    """No text has fewer tokens than its length over chars_per_token: not even one made of the
    longest vocabulary entries, or random pieces of the vocabulary."""
    rng = random.Random(0)
    for t in (tok, byte_tok):
        pieces = [t.decode([i], skip_special_tokens=False) for i in range(t.vocab_size)]
        longest = max(pieces, key=len)
        texts = [longest * 200, "".join(rng.choice(pieces) for _ in range(3000)), MULTILINGUAL * 50,
                 " " * 5000, "a" * 5000]
        for text in texts:
            assert len(t.encode(text)) * t.chars_per_token >= len(text), (t, text[:40])
        assert t.max_prompt_chars(100) == 100 * t.chars_per_token


def test_no_length_bound_when_the_tokenizer_drops_characters(tiny_model_dir, tmp_path):
    import json
    import shutil

    def variant(name, **changes):
        d = tmp_path / name
        shutil.copytree(tiny_model_dir, d)
        spec = json.loads((d / "tokenizer.json").read_text())
        spec.update(changes)
        (d / "tokenizer.json").write_text(json.dumps(spec))
        return Tokenizer(d)
    base = Tokenizer(tiny_model_dir).chars_per_token
    assert variant("nfkc", normalizer={"type": "NFKC"}).chars_per_token == 4 * base
    assert variant("ws", pre_tokenizer={"type": "Whitespace"}).chars_per_token is None
    assert variant("strip", normalizer={"type": "Strip", "strip_left": True, "strip_right": True}) \
        .max_prompt_chars(100) is None


def test_encode_prompts_gives_a_count_past_the_limit(tok):
    texts = ["hello world", "the quick brown fox " * 50]
    assert tok.encode_prompts(texts) == [tok.encode(t) for t in texts]
    short, long_ = tok.encode_prompts(texts, limit=20)
    assert short == tok.encode(texts[0]) and long_ == len(tok.encode(texts[1]))
    # a chat prompt over the length bound is refused before it is tokenized
    from slurmserve.router.tokenizer import TooLong
    with pytest.raises(TooLong, match="maximum context length of 10 tokens"):
        tok.chat_prompt([{"role": "user", "content": "x" * (10 * tok.chars_per_token)}], 10, {})
    ids = tok.chat_prompt([{"role": "user", "content": "hi"}], 512, {})
    assert ids == tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_off_loop_runs_large_work_on_a_worker_thread(tok):
    import asyncio
    import threading

    async def main():
        here = threading.get_ident()
        small = await tok.off_loop(10, threading.get_ident)
        large = await tok.off_loop(tok.INLINE_CHARS + 1, threading.get_ident)
        ids = await tok.off_loop(10**6, tok.encode_prompts, ["hello world " * 1000])
        return here, small, large, ids
    here, small, large, ids = asyncio.run(main())
    assert small == here and large != here
    assert ids == [tok.encode("hello world " * 1000)]
    long_ids = ids[0] * 3
    assert len(long_ids) > tok.INLINE_CHARS    # (decoded by the GIL-free batch call)
    assert tok.decode(long_ids) == tok.backend.decode(long_ids)


def test_a_plain_fast_tokenizer_loads_without_torch(tiny_model_dir):
    """The head of a sim deployment used to import torch and triton through AutoTokenizer (seconds
    of start-up, and dozens of nanobind 'leaked' lines at exit); the tokenizer must be the same."""
    import subprocess
    import sys
    code = (
        "import sys, json\n"
        "from slurmserve.router.tokenizer import Tokenizer\n"
        f"t = Tokenizer({str(tiny_model_dir)!r})\n"
        "msgs = [{'role': 'user', 'content': 'hi there'}]\n"
        "print(json.dumps(['torch' in sys.modules, t.encode('hello world'), t.apply_chat_template(msgs)]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    torch_loaded, ids, chat = json.loads(out)
    assert not torch_loaded
    from transformers import AutoTokenizer
    auto = AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)
    assert ids == auto.encode("hello world", add_special_tokens=False)
    expected = auto.apply_chat_template([{"role": "user", "content": "hi there"}], tokenize=True,
                                        add_generation_prompt=True, return_dict=True)["input_ids"]
    assert chat == expected


def test_tokenizer_threads_never_outnumber_the_cores(tok):
    """More tokenizer threads than cores slowed every prompt of a burst (the KV-routing TTFT p99):
    a burst of long prompts runs on at most as many threads as the process has CPUs."""
    import asyncio
    import threading
    import time

    import os

    from slurmserve.router.tokenizer import default_threads
    cpus = len(os.sched_getaffinity(0))
    assert 1 <= tok.threads <= min(4, cpus)
    assert default_threads(share=cpus) == 1 and default_threads(share=10 * cpus) == 1

    def work():
        time.sleep(0.02)
        return threading.get_ident()

    async def burst():
        return await asyncio.gather(*(tok.off_loop(tok.INLINE_CHARS + 1, work) for _ in range(16)))
    assert len(set(asyncio.run(burst()))) <= min(4, cpus)
