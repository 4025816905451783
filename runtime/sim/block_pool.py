"""Paged KV blocks with a prefix cache, and the KV events they produce (nano-vllm's BlockManager).

  * Blocks are ref-counted; a request holds its blocks, a prefill instance's handoff may hold them
    longer (`hold`).
  * Prefix caching: full blocks are keyed by the vLLM-compatible chained block hash
    (slurmserve.kvfabric.block_hash). A freed hashed block keeps its hash and sits in an LRU free
    list; a later request whose prefix hashes to it reuses it, and allocation evicts the least
    recently freed block first (freed unhashed blocks are handed out before any cached one).
  * KV events (vLLM wire format): BlockStored when a block becomes full and computed, BlockRemoved
    when a cached block is evicted. They collect until `take_events`: the removals first (they
    happen while scheduling), then the stores. A block whose hash another block already holds
    stays unhashed and announces nothing.
"""

from __future__ import annotations

from collections import OrderedDict

from slurmserve.kvfabric.block_hash import BlockHasher
from slurmserve.kvfabric.events import BlockRemoved, BlockStored
from slurmserve.runtime.sim.request import SimRequest

_MASK64 = (1 << 64) - 1     # event hashes are the digests' low 64 bits, as vLLM publishes them


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, hasher: BlockHasher):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.hasher = hasher
        self._ref = [0] * num_blocks
        self._bhash: list[bytes | None] = [None] * num_blocks
        self._cache: dict[bytes, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._removed: list[int] = []
        self._stored: list[BlockStored] = []

    # ---- counts ---------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Blocks in use / all blocks (a cached block that nobody holds counts as free)."""
        return (self.num_blocks - len(self._free)) / self.num_blocks

    @property
    def num_cached(self) -> int:
        """Blocks in the prefix cache."""
        return len(self._cache)

    # ---- allocation -----------------------------------------------------------------------------

    def alloc(self, n: int) -> list[int]:
        """n blocks from the free list (the caller checked there are enough), evicting cached ones."""
        free, bhash, cache, ref = self._free, self._bhash, self._cache, self._ref
        out = []
        for _ in range(n):
            bid = free.popitem(last=False)[0]
            h = bhash[bid]
            if h is not None:
                bhash[bid] = None
                if cache.get(h) == bid:
                    del cache[h]
                self._removed.append(int.from_bytes(h, "big") & _MASK64)
            ref[bid] = 1
            out.append(bid)
        return out

    def allocate(self, req: SimRequest, hits: list[int], need: int) -> bool:
        """Give a request its cached prefix blocks `hits` and `need` new ones; False (nothing
        changes) when the free list cannot cover both."""
        ref, free = self._ref, self._free
        hit_free = sum(1 for bid in hits if ref[bid] == 0)   # a hit nobody holds sits in the free list
        if need > len(free) - hit_free:
            return False
        for bid in hits:
            if ref[bid] == 0:
                del free[bid]
            ref[bid] += 1
        req.block_ids = hits + self.alloc(need) if need > 0 else hits
        req.num_stored = len(hits)
        return True

    def hold(self, block_ids: list[int]) -> None:
        """One more reference to each block (released by `release`)."""
        for bid in block_ids:
            self._ref[bid] += 1

    def release(self, block_ids: list[int]) -> None:
        """Drop one reference to each block, tail first, as vLLM does: the tail is evicted first."""
        free, bhash, ref = self._free, self._bhash, self._ref
        for bid in reversed(block_ids):
            r = ref[bid] - 1
            ref[bid] = r
            if r == 0:
                free[bid] = None
                if bhash[bid] is None:      # nothing cached in it: hand it out before cached blocks
                    free.move_to_end(bid, last=False)

    def free(self, req: SimRequest) -> None:
        """Release a request's blocks."""
        self.release(req.block_ids)
        req.block_ids = []
        req.num_stored = 0

    # ---- prefix cache ---------------------------------------------------------------------------

    def _ensure_hashes(self, req: SimRequest, nblocks: int) -> None:
        hashes = req.hashes
        if len(hashes) < nblocks:
            hashes.extend(self.hasher.chain(req.tokens, hashes[-1] if hashes else None,
                                            len(hashes) * self.block_size))

    def prefix_hit(self, req: SimRequest, max_blocks: int) -> list[int]:
        """Cached blocks matching the request's leading full blocks, at most max_blocks."""
        if max_blocks <= 0 or not self._cache:
            return []
        self._ensure_hashes(req, max_blocks)
        cache, hits = self._cache, []
        for h in req.hashes[:max_blocks]:
            bid = cache.get(h)
            if bid is None:
                break
            hits.append(bid)
        return hits

    def store(self, req: SimRequest, full: int) -> None:
        """Register the request's blocks [num_stored, full) in the prefix cache; queue BlockStored."""
        self._ensure_hashes(req, full)
        hashes, bids, bhash, cache = req.hashes, req.block_ids, self._bhash, self._cache
        run: list[int] = []
        first = 0
        for i in range(req.num_stored, full):
            h, bid = hashes[i], bids[i]
            if bhash[bid] is None and h not in cache:
                cache[h] = bid
                bhash[bid] = h
                if not run:
                    first = i
                run.append(int.from_bytes(h, "big") & _MASK64)
                continue
            if run:
                self._stored_event(req, first, run)
                run = []
        if run:
            self._stored_event(req, first, run)
        req.num_stored = full

    def _stored_event(self, req: SimRequest, first: int, run: list[int]) -> None:
        bs = self.block_size
        parent = int.from_bytes(req.hashes[first - 1], "big") & _MASK64 if first else None
        self._stored.append(BlockStored(run, parent, req.tokens[first * bs:(first + len(run)) * bs], bs,
                                        None, "GPU", None))

    # ---- events ---------------------------------------------------------------------------------

    def take_events(self) -> list:
        """The KV events since the last call, in publishing order: one BlockRemoved, then the stores."""
        events: list = []
        if self._removed:
            events.append(BlockRemoved(self._removed, "GPU"))
            self._removed = []
        if self._stored:
            events.extend(self._stored)
            self._stored = []
        return events
