"""A tiny random-weight Llama with a locally trained BPE tokenizer and a ChatML chat template.

Used by the tests and the demo: no model hub is needed and nothing here imports torch (the base
install has numpy, safetensors and tokenizers; transformers is not needed either). The result
loads with `transformers.AutoModelForCausalLM` / `AutoTokenizer` and with vLLM.

Properties the rest of the project relies on:
  * deterministic: the same arguments give byte-identical files;
  * greedy by default: generation_config.json says top_k=1, so an engine that applies the model's
    generation config samples greedily, and lm_head is scaled up so the argmax is far from ties
    (HF, vLLM and float32 kernels on different machines agree on the greedy continuation);
  * the default "ascii" tokenizer (Metaspace pre-tokenizer) decodes every token to printable ASCII,
    so random generations never contain partial UTF-8. "bytelevel" (GPT-2 style) is available for
    tests of incremental detokenization, where a token may hold a fraction of a character;
  * the end-of-sequence token is <|im_end|> (ChatML), pad is <|pad|>, there is no BOS; the other
    special tokens (<unk>, <|pad|>, <|im_start|>, <|endoftext|>) get all-zero lm_head rows, so
    the model never generates them.

`make_tiny_model(dir)` is cheap when `dir` already holds a complete model built with the same
arguments (a marker file records them; it is written last).
"""

from __future__ import annotations

import argparse
import json
import os
import string
from pathlib import Path
from typing import Any

import numpy as np

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
UNK = "<unk>"
EOS, PAD = "<|im_end|>", "<|pad|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TOKENIZER_KINDS = ("ascii", "bytelevel")
MARKER = "slurmserve-tiny-model.json"
FORMAT_VERSION = 1       # bump when the generated files change for the same arguments
INIT_STD = 0.02
LM_HEAD_SCALE = 50.0     # sharpen the logits: greedy argmax far from ties
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json", "special_tokens_map.json")

_WORDS = """
the quick brown fox jumps over lazy dog . hello world , you are a helpful assistant .
what is capital of france ? paris one two three four five six seven eight nine ten
0 1 2 3 4 5 6 7 8 9 ! ? : ; ( ) [ ] { } < > = + - * / ' " @ # $ % & _ ~ ^ |
prefill decode router rank engine cache block token request serve model tensor kernel batch
stream latency throughput cluster node slurm job queue partition memory compute network
transfer prefix route policy worker scheduler attention layer weight vector matrix sequence
prompt completion chat message system user answer question reason result value number
time first last next because before after between during without within around about
can could would should will must may might have has had been being make made take took
give gave find found think thought know knew tell told work working worked call called try
city country river mountain ocean forest garden house school market library museum station
red green blue yellow black white orange purple small large little great long short high
good better best bad worse worst new old young early late fast slow hot cold warm
apple banana cherry grape lemon mango orange pear plum bread cheese coffee water tea
monday tuesday wednesday thursday friday saturday sunday january february march april
Hello The What Paris France Once Please Thanks Yes No OK I We They She He It
""".split()


def _corpus() -> list[str]:
    """A few KB of deterministic text (plain arithmetic, no RNG): enough for a small BPE."""
    n = len(_WORDS)
    lines = []
    for i in range(600):
        lines.append(" ".join(_WORDS[(i * 7 + k * k * 3 + k) % n] for k in range(12)))
    # newline-joined turns, as the chat template renders them
    lines += ["<|im_start|>user\nwhat is the capital of france ?<|im_end|>\n"
              "<|im_start|>assistant\nparis is the capital .<|im_end|>\n"] * 20
    return lines


def _train_tokenizer(vocab: int, kind: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        specials = list(SPECIAL_TOKENS)
    else:   # every token decodes to printable ASCII; anything else encodes to <unk>
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="never")
        alphabet = [c for c in string.printable if c not in " \t\r\x0b\x0c"] + ["\u2581"]
        specials = SPECIAL_TOKENS + [UNK]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                  initial_alphabet=sorted(alphabet), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def _tokenizer_files(tok, kind: str, max_len: int) -> dict[str, bytes]:
    specials = {"eos_token": EOS, "pad_token": PAD}
    if kind == "ascii":
        specials["unk_token"] = UNK
    added = {}
    for t in SPECIAL_TOKENS + ([UNK] if kind == "ascii" else []):
        added[str(tok.token_to_id(t))] = {"content": t, "lstrip": False, "normalized": False,
                                           "rstrip": False, "single_word": False, "special": True}
    # Portable across transformers 4.x and 5.x: explicit class, inline chat template.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        **specials,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "chat_template": CHAT_TEMPLATE,
    }
    return {
        "tokenizer.json": tok.to_str(pretty=True).encode(),
        "tokenizer_config.json": _json(config),
        "special_tokens_map.json": _json(specials),
    }


def _weights(cfg: dict, seed: int, never_emit: list[int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def normal(out_features: int, in_features: int) -> np.ndarray:   # HF: [out, in]
        return rng.standard_normal((out_features, in_features), dtype=np.float32) * np.float32(INIT_STD)

    ones = lambda n: np.ones((n,), dtype=np.float32)   # noqa: E731
    w = {"model.embed_tokens.weight": normal(v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = normal(nq * hd, h)
        w[p + "self_attn.k_proj.weight"] = normal(nkv * hd, h)
        w[p + "self_attn.v_proj.weight"] = normal(nkv * hd, h)
        w[p + "self_attn.o_proj.weight"] = normal(h, nq * hd)
        w[p + "mlp.gate_proj.weight"] = normal(inter, h)
        w[p + "mlp.up_proj.weight"] = normal(inter, h)
        w[p + "mlp.down_proj.weight"] = normal(h, inter)
        w[p + "input_layernorm.weight"] = ones(h)
        w[p + "post_attention_layernorm.weight"] = ones(h)
    w["model.norm.weight"] = ones(h)
    lm_head = normal(v, h) * np.float32(LM_HEAD_SCALE)
    lm_head[never_emit] = 0.0   # logit exactly 0, far below the max of ~N(0, hidden) logits
    w["lm_head.weight"] = lm_head
    return w


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def _write(path: Path, data: bytes) -> None:
    # write-then-rename: a concurrent builder (same args => same bytes) or a reader never sees
    # a half-written file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _read_marker(out: Path) -> dict | None:
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not all((out / f).is_file() for f in FILES):
        return None
    return marker


def make_tiny_model(out_dir: str | os.PathLike, *, hidden: int = 128, layers: int = 2,
                    vocab: int = 512, seed: int = 0, max_position_embeddings: int = 4096,
                    tokenizer: str = "ascii", force: bool = False) -> dict:
    """Write a tiny Llama (weights, config, generation config, tokenizer) into `out_dir`.

    `vocab` is the BPE training target; the real vocabulary (specials included) may be smaller
    and is what config.json and the returned summary say. Returns
    {"dir", "vocab", "eos", "params", "built"}; "built" is False when `out_dir` already held a
    complete model made with the same arguments (nothing is rewritten then, unless `force`).
    """
    if hidden < 8 or hidden % 8:
        raise ValueError(f"hidden must be a positive multiple of 8 (4 heads of even size), got {hidden}")
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    if tokenizer not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer must be one of {TOKENIZER_KINDS}, got {tokenizer!r}")
    min_vocab = 256 + len(SPECIAL_TOKENS) if tokenizer == "bytelevel" else 128
    if vocab < min_vocab:
        raise ValueError(f"vocab must be >= {min_vocab} for the {tokenizer} tokenizer, got {vocab}")
    if max_position_embeddings < 16:
        raise ValueError(f"max_position_embeddings must be >= 16, got {max_position_embeddings}")

    out = Path(out_dir)
    args = {"format": FORMAT_VERSION, "hidden": hidden, "layers": layers, "vocab": vocab,
            "seed": seed, "max_position_embeddings": max_position_embeddings,
            "tokenizer": tokenizer}
    marker = _read_marker(out)
    if not force and marker is not None and marker.get("args") == args:
        return dict(marker["summary"], dir=str(out), built=False)

    tok = _train_tokenizer(vocab, tokenizer)
    real_vocab = tok.get_vocab_size(with_added_tokens=True)
    eos, pad = tok.token_to_id(EOS), tok.token_to_id(PAD)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden // 4,
        "hidden_act": "silu",
        "vocab_size": real_vocab,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": INIT_STD,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    gen = {"do_sample": True, "top_k": 1, "temperature": 1.0,   # => greedy by default in vLLM
           "bos_token_id": None, "eos_token_id": eos, "pad_token_id": pad}
    # special tokens other than EOS (<unk>, <|pad|>, ...) are never generated: their text is
    # skipped on output, which would make generations look shorter than their token count
    never_emit = sorted(i for t in SPECIAL_TOKENS + [UNK]
                        if (i := tok.token_to_id(t)) is not None and i != eos)
    weights = _weights(cfg, seed, never_emit)
    params = int(sum(a.size for a in weights.values()))

    from safetensors.numpy import save

    files = {"config.json": _json(cfg), "generation_config.json": _json(gen),
             "model.safetensors": save(weights, metadata={"format": "pt"})}
    files.update(_tokenizer_files(tok, tokenizer, max_position_embeddings))
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)   # incomplete until the marker is back
    for name in FILES:
        _write(out / name, files[name])
    summary = {"vocab": real_vocab, "eos": eos, "params": params}
    _write(out / MARKER, _json({"args": args, "summary": summary}))   # dir-independent bytes
    return dict(summary, dir=str(out), built=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="output directory (created if missing)")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size, a multiple of 8 (default 128)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    parser.add_argument("--vocab", type=int, default=512, help="BPE vocabulary target (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    parser.add_argument("--max-position-embeddings", type=int, default=4096,
                        help="context length the model advertises (default 4096)")
    parser.add_argument("--tokenizer", choices=TOKENIZER_KINDS, default="ascii",
                        help="ascii: Metaspace BPE over printable ASCII (default); "
                             "bytelevel: GPT-2 style byte-level BPE")
    parser.add_argument("--force", action="store_true", help="rebuild even if DIR is up to date")


def run(args: argparse.Namespace) -> int:
    try:
        summary = make_tiny_model(args.dir, hidden=args.hidden, layers=args.layers, vocab=args.vocab,
                                  seed=args.seed, max_position_embeddings=args.max_position_embeddings,
                                  tokenizer=args.tokenizer, force=args.force)
    except OSError as e:
        raise SystemExit(f"slurmserve model make-tiny: cannot write {args.dir}: {e.strerror or e}") from None
    except ValueError as e:      # an argument out of range: make_tiny_model says which
        raise SystemExit(f"slurmserve model make-tiny: {e}") from None
    print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slurmserve model make-tiny",
                                     description="generate a tiny random-weight Llama with its tokenizer")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
