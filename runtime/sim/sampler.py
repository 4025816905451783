"""The simulated model's output: which token a request draws next, and its logprobs.

Output tokens are pseudo-random ids in [first non-special id, vocab_size), from a 64-bit LCG seeded
by (sim.seed, the request's seed if any, its prompt): the same request gives the same tokens on
any instance, which is what makes a disaggregated request's output equal an aggregated one's. When
the model has an EOS id and the request does not ignore it, EOS is drawn with probability
`eos_probability` per token once `min_tokens` are out (finish "stop"); stop_token_ids finish
"stop" when drawn after `min_tokens` and are never drawn before.

Logprobs (when asked for) are deterministic stand-ins (`logprobs_at`): the sampled token is the
most likely one; prompt logprobs depend only on (sim.seed, the prompt). logit_bias acts only at its
extremes: +100 forces that token, -100 bans it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from slurmserve.runtime.engine import EngineRequest
from slurmserve.runtime.protocol import Logprobs
from slurmserve.runtime.sim.request import SimRequest

_M64 = (1 << 64) - 1
_LCG_A = 6364136223846793005            # Knuth's MMIX linear congruential generator
_LCG_C = 1442695040888963407


def mix64(x: int) -> int:
    """splitmix64 finalizer: spreads a seed over all 64 bits."""
    x &= _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def read_model_info(model_dir: Path | str | None) -> tuple[int, list[int], set[int]]:
    """(vocab_size, eos ids, special ids) from a HF model dir; (32000, [], {}) when it is missing."""
    vocab, eos, specials = 32000, [], set()
    if model_dir is None:
        return vocab, eos, specials
    d = Path(model_dir)
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return vocab, eos, specials
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    vocab = int(cfg.get("vocab_size") or text_cfg.get("vocab_size") or vocab)

    def ids(v: Any) -> list[int]:
        if isinstance(v, int) and not isinstance(v, bool):
            return [v]
        if isinstance(v, list):
            return [x for x in v if isinstance(x, int) and not isinstance(x, bool)]
        return []

    eos += ids(cfg.get("eos_token_id", text_cfg.get("eos_token_id")))
    for key in ("bos_token_id", "pad_token_id", "eos_token_id"):
        specials.update(ids(cfg.get(key, text_cfg.get(key))))
    try:
        gen = json.loads((d / "generation_config.json").read_text())
        for x in ids(gen.get("eos_token_id")):
            if x not in eos:
                eos.append(x)
        specials.update(eos)
    except (OSError, ValueError):
        pass
    try:
        tok_cfg = json.loads((d / "tokenizer_config.json").read_text())
        for k, v in (tok_cfg.get("added_tokens_decoder") or {}).items():
            if isinstance(v, dict) and v.get("special"):
                specials.add(int(k))
    except (OSError, ValueError):
        pass
    return vocab, [e for e in eos if 0 <= e < vocab], {s for s in specials if 0 <= s < vocab}


class Sampler:
    eos_probability = 0.002            # per token, when the model has an EOS id and it is not ignored

    def __init__(self, model_dir: Path | str | None, seed: int, cap_tokens: int):
        vocab, eos, specials = read_model_info(model_dir)
        self.seed = seed
        self.cap_tokens = cap_tokens   # a request ends ("length") when prompt + output reach this
        self.vocab_size = vocab
        self.eos_ids = eos
        self.eos_token_id = eos[0] if eos else None
        # draw above the low special ids (BOS, EOS, PAD, ...); specials above that are skipped
        low = [s for s in specials if s < 1024]
        self.tok_lo = min(max(low) + 1 if low else 0, vocab - 1)
        self.tok_span = max(1, vocab - self.tok_lo)
        self.banned = frozenset(s for s in specials if s >= self.tok_lo)
        self.eos_threshold = int(self.eos_probability * 65536) if self.eos_token_id is not None else 0

    def seed_for(self, request: EngineRequest) -> int:
        """The request's initial LCG state: from (sim.seed, its seed if any, its prompt)."""
        prompt = tuple(request.prompt_token_ids)
        seed = request.params.seed
        key = hash(prompt) if seed is None else hash((seed, prompt))
        return mix64(mix64(self.seed + 0x9E3779B97F4A7C15) ^ (key & _M64))

    def sample(self, req: SimRequest) -> None:
        """Draw the request's next token into `tokens` and `out`; set `finish` when it ends."""
        state = (req.rng * _LCG_A + _LCG_C) & _M64
        req.rng = state
        tok = self.tok_lo + (state >> 32) % self.tok_span
        n_out = req.num_out + 1
        finish = None
        banned = self.banned
        stop_ids = req.stop_ids
        may_stop = n_out >= req.min_tokens
        if req.avoid:
            banned = banned | req.avoid
        if banned or (stop_ids and not may_stop):
            span, lo = self.tok_span, self.tok_lo
            for _ in range(span):
                if tok in banned or (stop_ids and not may_stop and tok in stop_ids):
                    tok = lo + (tok - lo + 1) % span
                else:
                    break
        if req.forced is not None:
            tok = req.forced
            if may_stop and stop_ids and tok in stop_ids:
                finish = "stop"
        elif may_stop:
            if self.eos_threshold and not req.ignore_eos and ((state >> 16) & 0xFFFF) < self.eos_threshold:
                tok = self.eos_token_id
                finish = "stop"
            elif stop_ids and tok in stop_ids:
                finish = "stop"
        req.tokens.append(tok)
        req.out.append(tok)
        req.num_out = n_out
        if req.num_logprobs is not None:
            req.out_lp.append(self.logprobs_at(tok, state, True, req.num_logprobs))
        if finish is None and (n_out >= req.max_tokens or len(req.tokens) >= self.cap_tokens):
            finish = "length"
        if finish is not None:
            req.finish = finish

    # ---- logprobs: deterministic, well-formed stand-ins ----------------------------------------------

    def logprobs_at(self, tok: int, h: int, top1: bool, k: int) -> tuple[float, list[int], list[float]]:
        """(logprob of `tok`, the k most likely ids, their logprobs) at a position, from 64 bits `h`.
        `tok` is the most likely token when `top1` (it was sampled: the sim is greedy-like), with
        probability p in (0.37, 0.995]; otherwise some other token is, and `tok` has p < 0.3. The rest
        of the mass halves from rank to rank, so the top list is strictly decreasing."""
        lo, span = self.tok_lo, self.tok_span
        if top1:
            p = 0.995 - ((h >> 8) & 0xFF) / 256 * 0.62
            ids, probs = [tok], [p]
        else:
            p = 0.01 + ((h >> 8) & 0xFF) / 256 * 0.29
            other = lo + (tok - lo + 1 + (h >> 16) % (span - 1)) % span
            ids, probs = [other], [1.0 - p - 0.01]
        rest = 1.0 - sum(probs) - (0.0 if top1 else p)
        j = 1
        while len(ids) < k:
            t = lo + (tok - lo + 7 * j) % span
            j += 1
            if t in ids or t == tok:
                continue
            rest /= 2
            ids.append(t)
            probs.append(rest)
        if not top1 and k and p > probs[-1] and tok not in ids:   # it belongs in the list by rank
            at = next(i for i, q in enumerate(probs) if p > q)
            ids.insert(at, tok)
            probs.insert(at, p)
            ids, probs = ids[:k], probs[:k]
        log = math.log
        return log(p), ids[:k], [log(q) for q in probs[:k]]

    def prompt_logprobs(self, prompt: list[int], k: int) -> Logprobs:
        """Prompt positions 1..n-1, each from (sim.seed, the previous token, the token, position):
        the same prompt gives the same values on any instance."""
        out = Logprobs([], [], [])
        base = mix64(self.seed ^ 0x5851F42D4C957F2D)
        for i in range(1, len(prompt)):
            h = mix64(base ^ (prompt[i - 1] << 40) ^ (prompt[i] << 16) ^ i)
            lp, ids, lps = self.logprobs_at(prompt[i], h, h & 3 == 0, k)
            out.token.append(lp)
            out.top_ids.append(ids)
            out.top.append(lps)
        return out
