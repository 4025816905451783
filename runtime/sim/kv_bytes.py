"""The simulator's KV bytes: what a simulated token's KV "is", written into blocks and checked there.

A simulated instance has no model, so the KV of a token is a deterministic function of (token id,
position) only. A prefill instance writes it into its transfer buffer (`fill_kv`); a decode
instance that pulled the blocks checks every byte against its own prompt (`kv_matches`): any
instance can tell what the right bytes are, so a transfer that misplaces or corrupts a block is
caught. `buffer` is a KVTransfer's host buffer: (num_blocks, block_bytes) uint8, with
block_bytes = block_size * 8 * words.
"""

from __future__ import annotations

import numpy as np


def kv_pattern(token_ids: np.ndarray, positions: np.ndarray, words: int) -> np.ndarray:
    """(n, words) uint64: the simulated KV of each token, a function of (token id, position) only."""
    t = token_ids.astype(np.uint64)
    p = positions.astype(np.uint64)
    with np.errstate(over="ignore"):
        seed = (t * np.uint64(0x9E3779B97F4A7C15)) ^ (p * np.uint64(0xC2B2AE3D27D4EB4F)) ^ np.uint64(0x165667B19E3779F9)
        x = seed[:, None] + np.arange(1, words + 1, dtype=np.uint64)[None, :] * np.uint64(0xD6E8FEB86659FD93)
        x ^= x >> np.uint64(31)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(29)
    return x


def _token_slots(buffer: np.ndarray, block_size: int, block_ids: list[int], start: int, end: int):
    words = buffer.shape[1] // 8 // block_size
    view = buffer.view(np.uint64).reshape(buffer.shape[0], block_size, words)
    pos = np.arange(start, end)
    blocks = np.asarray(block_ids, dtype=np.int64)[pos // block_size]
    return view, blocks, pos % block_size, pos, words


def fill_kv(buffer: np.ndarray, block_size: int, block_ids: list[int], tokens: list[int], start: int,
            end: int) -> None:
    """Write the KV of tokens[start:end] (positions start..end-1) into their blocks."""
    if end <= start:
        return
    view, blocks, slots, pos, words = _token_slots(buffer, block_size, block_ids, start, end)
    view[blocks, slots] = kv_pattern(np.asarray(tokens[start:end]), pos, words)


def kv_matches(buffer: np.ndarray, block_size: int, block_ids: list[int], tokens: list[int], start: int,
               end: int) -> bool:
    """True when the blocks hold exactly the KV fill_kv writes for tokens[start:end]."""
    if end <= start:
        return True
    view, blocks, slots, pos, words = _token_slots(buffer, block_size, block_ids, start, end)
    return bool(np.array_equal(view[blocks, slots], kv_pattern(np.asarray(tokens[start:end]), pos, words)))
