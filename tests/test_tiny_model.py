"""The tiny test/demo model (slurmserve.tools.tiny_model): files, determinism, HF loading."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import load_file

from slurmserve.tools.tiny_model import FILES, MARKER, add_arguments, main, make_tiny_model, run


def _contents(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_files_config_and_weights(tiny_model_dir):
    for f in FILES + (MARKER,):
        assert (tiny_model_dir / f).is_file(), f
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (128, 256, 2)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 32)
    assert cfg["vocab_size"] == 512 and cfg["max_position_embeddings"] == 4096
    assert cfg["tie_word_embeddings"] is False and cfg["torch_dtype"] == "float32"
    assert cfg["bos_token_id"] is None

    tok = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    assert cfg["eos_token_id"] == ids["<|im_end|>"] and cfg["pad_token_id"] == ids["<|pad|>"]
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert gen["top_k"] == 1 and gen["eos_token_id"] == cfg["eos_token_id"]
    tc = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast" and tc["eos_token"] == "<|im_end|>"
    assert "<|im_start|>" in tc["chat_template"]

    w = load_file(tiny_model_dir / "model.safetensors")
    h, v, hd = 128, 512, 32
    assert w["model.embed_tokens.weight"].shape == (v, h)
    assert w["model.layers.1.self_attn.q_proj.weight"].shape == (4 * hd, h)
    assert w["model.layers.1.self_attn.k_proj.weight"].shape == (2 * hd, h)
    assert w["model.layers.0.self_attn.o_proj.weight"].shape == (h, 4 * hd)
    assert w["model.layers.0.mlp.down_proj.weight"].shape == (h, 2 * h)
    assert all(a.dtype == np.float32 for a in w.values())
    assert (w["model.norm.weight"] == 1).all() and (w["model.layers.0.input_layernorm.weight"] == 1).all()
    assert 0.015 < w["model.layers.0.mlp.up_proj.weight"].std() < 0.025
    lm = w["lm_head.weight"]
    assert 0.9 < lm[5:].std() < 1.1                                 # normal(0, 0.02) * 50
    assert (lm[[0, 1, 3, 4]] == 0).all() and lm[cfg["eos_token_id"]].any()   # specials never win
    assert len(w) == 2 + 9 * 2 + 1


def test_deterministic_and_cached(tmp_path, tiny_model_dir):
    s1 = make_tiny_model(tmp_path / "a")
    assert s1["built"] and s1["vocab"] == 512 and s1["eos"] == 2 and s1["params"] > 0
    assert _contents(tmp_path / "a") == _contents(tiny_model_dir)   # same args: same bytes

    mtime = (tmp_path / "a" / "model.safetensors").stat().st_mtime_ns
    s2 = make_tiny_model(tmp_path / "a")
    assert not s2["built"] and {**s2, "built": True} == s1
    assert (tmp_path / "a" / "model.safetensors").stat().st_mtime_ns == mtime

    s3 = make_tiny_model(tmp_path / "a", seed=1)                     # other args: rebuilt
    assert s3["built"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != \
        (tiny_model_dir / "model.safetensors").read_bytes()
    tokenizer_json = (tmp_path / "a" / "tokenizer.json").read_bytes()
    assert tokenizer_json == (tiny_model_dir / "tokenizer.json").read_bytes()   # seed: weights only

    (tmp_path / "a" / "model.safetensors").unlink()                  # incomplete: rebuilt
    assert make_tiny_model(tmp_path / "a", seed=1)["built"]


def test_bad_arguments(tmp_path):
    for kw in ({"hidden": 100}, {"layers": 0}, {"vocab": 64}, {"tokenizer": "sentencepiece"},
               {"tokenizer": "bytelevel", "vocab": 200}):
        with pytest.raises(ValueError):
            make_tiny_model(tmp_path / "x", **kw)
    assert not (tmp_path / "x").exists()


def test_cli(tmp_path, capsys):
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([str(tmp_path / "m"), "--hidden", "64", "--layers", "1", "--vocab", "300"])
    assert run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["vocab"] == 300 and out["dir"] == str(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["head_dim"]) == (64, 1, 16)
    assert main([str(tmp_path / "m"), "--hidden", "64", "--layers", "1", "--vocab", "300"]) == 0
    assert json.loads(capsys.readouterr().out)["built"] is False


def test_builds_and_tokenizes_without_torch(tmp_path):
    """The base install has no torch: generation and the head's tokenizer must not need it."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None          # import torch -> ImportError; find_spec -> None
        from slurmserve.tools.tiny_model import make_tiny_model
        from slurmserve.router.tokenizer import Tokenizer, TextStream
        make_tiny_model({str(tmp_path / 'm')!r})
        tok = Tokenizer({str(tmp_path / 'm')!r})
        ids = tok.apply_chat_template([{{"role": "user", "content": "hello world"}}])
        s = TextStream(tok)
        assert s.feed(tok.encode("hello world"))[0] + s.finish() == "hello world"
        assert sys.modules["torch"] is None
        print("ok", len(ids))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")


def test_transformers_loads_and_generates_greedily(tiny_model_dir):
    import torch   # not a dependency of the base install, but installed wherever tests run
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True,
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2 and len(tok) == 512
    ids = torch.tensor([tok("the quick brown fox", add_special_tokens=False).input_ids])
    mask = torch.ones_like(ids)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                            eos_token_id=None)
    assert greedy.shape == (1, ids.shape[1] + 12)
    # generation_config.json (sampling with top_k=1) is greedy too
    default = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)
    assert torch.equal(default, greedy)
    new = greedy[0, ids.shape[1]:].tolist()
    assert not set(new) & {0, 1, 3, 4}                               # no <unk>/<|pad|>/... output


def test_cli_mistakes_are_one_line(tmp_path):
    """An argument out of range, or a directory that cannot be made, is one line, not a traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    for args, msg in ((["--hidden", "12"], "hidden must be a positive multiple of 8"),
                      ([], "cannot write")):
        target = str(tmp_path / "m") if args else str(blocker / "m")     # a directory inside a file
        p = subprocess.run([sys.executable, "-m", "slurmserve", "model", "make-tiny", target, *args],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 1 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr
