"""Offline batch throughput: `slurmserve batch` against vLLM's own `run_batch`, same engine, same file.

    python -m slurmserve.bench.batch_vs_vllm CONFIG --lines 256 --max-tokens 64 --repeats 3 [--out DIR]

CONFIG is a vLLM deployment (`engine.kind: vllm`, one `workers:` pool); vLLM's run_batch gets the same
model, max_model_len and `engine.args` (as `--flag value`). Both read one generated chat file (a shared
system prompt, distinct questions, greedy sampling) and run one after the other, `--repeats` times,
alternating. Reported per system: the median end-to-end wall time (process start to exit, engine start
included, as a user sees it), completion tokens per second over that time, and for slurmserve also its
generation-phase throughput: slurmserve's from its summary (engines up to last record), vLLM's from
run_batch's progress bar (whole seconds). Outputs must be identical (message content, finish reason, token counts); the script says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slurmserve.config import load_config

QUESTIONS = ["what is the capital of {}?", "tell me a story about {}.", "how does {} work?",
             "write a poem about {}.", "explain {} to a child."]
TOPICS = ["france", "a cat", "rain", "the moon", "a river", "bread", "music", "trains", "snow", "bees"]


def make_file(path: Path, model: str, lines: int, max_tokens: int) -> None:
    with open(path, "w") as f:
        for i in range(lines):
            q = QUESTIONS[i % len(QUESTIONS)].format(TOPICS[(i // len(QUESTIONS)) % len(TOPICS)]) + f" ({i})"
            f.write(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": model, "max_tokens": max_tokens, "temperature": 0,
                                         "messages": [{"role": "system", "content": "you are a helpful "
                                                       "assistant . answer briefly and precisely ."},
                                                      {"role": "user", "content": q}]}}) + "\n")


def vllm_command(cfg, inp: Path, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(inp), "-o", str(out),
           "--model", str(cfg.model.path), "--served-model-name", cfg.model.served_name,
           "--max-model-len", str(cfg.model.max_model_len),
           "--tensor-parallel-size", str(cfg.engine.tensor_parallel_size)]
    for k, v in cfg.engine.args.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            cmd.append(flag)
        elif v is not False and v is not None:
            if k == "kv_cache_memory_bytes" and isinstance(v, str):
                v = _bytes(v)
            cmd += [flag, json.dumps(v) if isinstance(v, (dict, list)) else str(v)]
    return cmd


def _bytes(text: str) -> int:
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
    t = text.strip().lower()
    for u, m in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * m)
    return int(t)


def essentials(path: Path) -> dict:
    out = {}
    with open(path) as f:
        for ln in f:
            r = json.loads(ln)
            b = (r.get("response") or {}).get("body") or {}
            c = (b.get("choices") or [{}])[0]
            out[r["custom_id"]] = ((c.get("message") or {}).get("content"), c.get("finish_reason"),
                                   (b.get("usage") or {}).get("prompt_tokens"),
                                   (b.get("usage") or {}).get("completion_tokens"))
    return out


def vllm_generation_s(log: Path) -> float | None:
    """run_batch's own progress bar: the elapsed time of its last `Running batch` update (whole
    seconds: the file must be long enough for that to be precise)."""
    last = None
    for m in re.finditer(r"Running batch: 100%[^\[]*\[(\d+):(\d+)(?::(\d+))?<", log.read_text(errors="replace")):
        a, b, c = m.groups()
        last = int(a) * 60 + int(b) if c is None else int(a) * 3600 + int(b) * 60 + int(c)
    return float(last) if last else None


def timed(cmd: list[str], env: dict, log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({r.returncode}); see {log}")
    return wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--lines", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="keep files here (default: a temp dir)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    if cfg.engine.kind != "vllm" or cfg.pools.disaggregated or cfg.pools.workers != 1:
        raise SystemExit("batch_vs_vllm: CONFIG must be one vLLM worker (the engine run_batch runs)")
    work = args.out or Path(tempfile.mkdtemp(prefix="batch-vs-vllm-"))
    work.mkdir(parents=True, exist_ok=True)
    inp = work / "chat.jsonl"
    make_file(inp, cfg.model.served_name, args.lines, args.max_tokens)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0")}
    runs: dict[str, list[dict]] = {"slurmserve": [], "vllm": []}
    for k in range(args.repeats):
        for system in (("vllm", "slurmserve") if k % 2 else ("slurmserve", "vllm")):
            out = work / f"{system}-{k}.jsonl"
            out.unlink(missing_ok=True)
            (work / f"{system}-{k}.summary.json").unlink(missing_ok=True)
            if system == "vllm":
                wall = timed(vllm_command(cfg, inp, out), env, work / f"{system}-{k}.log")
                gen = {"wall_s": vllm_generation_s(work / f"{system}-{k}.log")}
            else:
                wall = timed([sys.executable, "-m", "slurmserve", "batch", args.config, "-i", str(inp),
                              "-o", str(out)], env, work / f"{system}-{k}.log")
                gen = json.loads((work / f"{system}-{k}.summary.json").read_text())
            ess = essentials(out)
            tokens = sum(v[3] or 0 for v in ess.values())
            runs[system].append({"wall_s": wall, "completion_tokens": tokens, "answers": ess,
                                 "generation_s": gen["wall_s"] if gen else None})
            print(f"{system} run {k}: {wall:.1f} s, {tokens} completion tokens", file=sys.stderr)
    ref = runs["vllm"][0]["answers"]
    identical = all(r["answers"] == ref for rs in runs.values() for r in rs)
    result = {"lines": args.lines, "max_tokens": args.max_tokens, "repeats": args.repeats,
              "identical_outputs": identical, "date": time.strftime("%Y-%m-%d"), "config": args.config}
    for system, rs in runs.items():
        wall = statistics.median(r["wall_s"] for r in rs)
        result[system] = {"median_wall_s": round(wall, 2),
                          "completion_tokens_per_s": round(rs[0]["completion_tokens"] / wall, 1)}
        gens = [r["generation_s"] for r in rs if r["generation_s"]]
        if gens:
            g = statistics.median(gens)
            result[system]["median_generation_s"] = round(g, 2)
            result[system]["generation_completion_tokens_per_s"] = round(rs[0]["completion_tokens"] / g, 1)
    if "generation_completion_tokens_per_s" in result["vllm"]:
        result["ratio_generation"] = round(result["slurmserve"]["generation_completion_tokens_per_s"]
                                           / result["vllm"]["generation_completion_tokens_per_s"], 3)
    result["ratio_end_to_end"] = round(result["slurmserve"]["completion_tokens_per_s"]
                                       / result["vllm"]["completion_tokens_per_s"], 3)
    print(json.dumps(result, indent=2))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
