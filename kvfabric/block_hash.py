"""vLLM-compatible prefix block hashes.

A prompt is cut into full blocks of `block_size` tokens (a trailing partial block is never hashed).
Block i's hash chains over every block before it, exactly as vLLM's prefix cache computes it:

    NONE_HASH = H(seed)                       seed: $PYTHONHASHSEED if set, else "vllm-none-hash"
    h_i       = H((h_{i-1} or NONE_HASH, tuple(block_i_tokens), extra_keys_i))

with H = sha256 over `pickle.dumps(x, protocol=5)` (vLLM's default `sha256`), or sha256 over
canonical CBOR (vLLM's `--prefix-caching-hash-algo sha256_cbor`). KV events carry the low 64 bits
of the big-endian digest (`event_hash`).

The seed is an explicit argument everywhere (`hash_seed`), read from the environment only when it is
None, so the head and the engines can be made to agree. Like vLLM, an *empty* PYTHONHASHSEED still
counts as set (vLLM tests `os.getenv("PYTHONHASHSEED") is not None`).

Token ids must be plain Python ints: pickle encodes numpy integers differently.

`sha256_cbor` needs the `cbor2` package, which is not a dependency of slurmserve (vLLM installs
it); it is imported only when that algorithm is asked for.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from functools import lru_cache
from hashlib import sha256 as _sha256
from typing import Any

DEFAULT_HASH_SEED = "vllm-none-hash"
ALGOS = ("sha256", "sha256_cbor")
_MASK64 = (1 << 64) - 1
_dumps = pickle.dumps


def resolve_hash_seed(hash_seed: str | None = None) -> str:
    """The seed NONE_HASH derives from: `hash_seed`, else $PYTHONHASHSEED, else vLLM's default."""
    if hash_seed is not None:
        return hash_seed
    env = os.environ.get("PYTHONHASHSEED")
    return env if env is not None else DEFAULT_HASH_SEED


def _hash_pickle(obj: Any) -> bytes:
    return _sha256(_dumps(obj, 5)).digest()


def _hash_cbor(obj: Any) -> bytes:
    try:
        import cbor2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("prefix hash algo 'sha256_cbor' needs the cbor2 package (pip install cbor2)") from e
    return _sha256(cbor2.dumps(obj, canonical=True)).digest()


def hash_function(algo: str = "sha256"):
    if algo == "sha256":
        return _hash_pickle
    if algo == "sha256_cbor":
        return _hash_cbor
    raise ValueError(f"unknown prefix hash algo {algo!r}; expected one of {ALGOS}")


@lru_cache(maxsize=16)
def _none_hash(seed: str, algo: str) -> bytes:
    return hash_function(algo)(seed)


def none_hash(hash_seed: str | None = None, algo: str = "sha256") -> bytes:
    """The digest that stands in for the parent of a prompt's first block."""
    return _none_hash(resolve_hash_seed(hash_seed), algo)


def event_hash(digest: bytes) -> int:
    """The 64-bit integer vLLM puts in KV events for a block digest."""
    return int.from_bytes(digest, "big") & _MASK64


class BlockHasher:
    """Computes chained block digests for one (block_size, seed, algo); reuse one per process.

    `next(parent, tokens)` extends a chain by one block; `chain(token_ids)` hashes every full
    block of a sequence, optionally continuing after `parent` from token offset `start`.
    """

    __slots__ = ("block_size", "hash_seed", "algo", "none", "_fn", "_pickle")

    def __init__(self, block_size: int, hash_seed: str | None = None, algo: str = "sha256"):
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.block_size = block_size
        self.hash_seed = resolve_hash_seed(hash_seed)
        self.algo = algo
        self._fn = hash_function(algo)
        self._pickle = algo == "sha256"
        self.none = _none_hash(self.hash_seed, algo)

    def next(self, parent: bytes | None, block_tokens: Sequence[int], extra_keys: Any = None) -> bytes:
        """Digest of one full block whose predecessor's digest is `parent` (None: first block)."""
        key = (parent or self.none, tuple(block_tokens), extra_keys)
        if self._pickle:
            return _sha256(_dumps(key, 5)).digest()
        return self._fn(key)

    def chain(self, token_ids: Sequence[int], parent: bytes | None = None, start: int = 0,
              extra_keys: Sequence[Any] | None = None) -> list[bytes]:
        """Digests of the full blocks of token_ids[start:], chained after `parent`.

        `extra_keys`, if given, has one entry (a tuple or None) per block hashed here.
        """
        bs = self.block_size
        end = start + (len(token_ids) - start) // bs * bs
        out: list[bytes] = []
        append = out.append
        prev = parent or self.none
        if self._pickle and extra_keys is None:
            dumps, sha = _dumps, _sha256
            for i in range(start, end, bs):
                prev = sha(dumps((prev, tuple(token_ids[i:i + bs]), None), 5)).digest()
                append(prev)
            return out
        fn = self._fn
        for n, i in enumerate(range(start, end, bs)):
            prev = fn((prev, tuple(token_ids[i:i + bs]), extra_keys[n] if extra_keys is not None else None))
            append(prev)
        return out


def block_digests(token_ids: Sequence[int], block_size: int, hash_seed: str | None = None,
                  extra_keys: Sequence[Any] | None = None, algo: str = "sha256") -> list[bytes]:
    """Raw 32-byte digests of every full block of `token_ids`."""
    return BlockHasher(block_size, hash_seed, algo).chain(token_ids, extra_keys=extra_keys)


def block_hashes(token_ids: Sequence[int], block_size: int, hash_seed: str | None = None,
                 extra_keys: Sequence[Any] | None = None, algo: str = "sha256") -> list[int]:
    """64-bit block hashes of every full block of `token_ids`, as vLLM's KV events carry them."""
    return [int.from_bytes(d, "big") & _MASK64
            for d in block_digests(token_ids, block_size, hash_seed, extra_keys, algo)]
