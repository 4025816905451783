"""The load generator (`slurmserve bench serve`) and scenarios, against a real simulated deployment.

One deployment for the module (head + one sim engine that does not sleep). Token counts are checked
against what the server reports (`usage` per request, Prometheus counters overall); nothing here
asserts how fast anything is.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from slurmserve.bench import datasets
from slurmserve.bench.loadgen import Result, arrival_times, meets_slos, run_load, summarize
from slurmserve.tools.local_deployment import LocalDeployment
from slurmserve.tools.local_deployment import metric_value as metric
from slurmserve.router.tokenizer import Tokenizer

MODEL = "tiny-llama"
BLOCK = 16
DOCS = Path(__file__).resolve().parent.parent / "docs" / "bench-result-schema.md"


def config(model_dir) -> dict:
    return {
        "model": {"path": str(model_dir), "name": MODEL, "max_model_len": 512},
        "engine": {"kind": "sim", "sim": {"speedup": float("inf"), "num_kv_blocks": 512, "block_size": BLOCK}},
        "pools": {"workers": 1},
        "router": {"host": "127.0.0.1", "port": 0, "policy": "round_robin"},
    }


@pytest.fixture(scope="module")
def dep(tiny_model_dir, tmp_path_factory):
    with LocalDeployment(tmp_path_factory.mktemp("bench"), config(tiny_model_dir)) as d:   # stops, then kills
        yield d


@pytest.fixture(scope="module")
def tok(tiny_model_dir) -> Tokenizer:
    return Tokenizer(tiny_model_dir)


def run(dep, specs, **load) -> tuple[list[Result], float]:
    return asyncio.run(run_load(dep.info["url"], dep.api_key, MODEL, specs, **load))


def counters(dep) -> dict[str, float]:
    text = dep.metrics()
    return {n: metric(text, f"slurmserve:{n}_total") for n in
            ("requests", "prompt_tokens", "prompt_cached_tokens", "generation_tokens")}


def check_exact(results: list[Result], specs: list[datasets.RequestSpec]) -> None:
    """Every request completed, with the prompt and output token counts its spec promised."""
    assert sorted(r.index for r in results) == list(range(len(specs)))
    for r in results:
        assert r.ok, r.error
        spec = specs[r.index]
        assert spec.prompt_len is not None
        assert r.prompt_tokens == spec.prompt_len == r.expected_prompt_tokens
        assert r.output_tokens == spec.max_tokens


# ---- datasets: exact token counts through the served tokenizer ------------------------------------

def test_random_with_range_ratio(dep, tok):
    specs = datasets.build("random", 12, input_len=40, output_len=8, range_ratio=0.5, tokenizer=tok, seed=3)
    lens = [len(s.prompt) for s in specs]
    assert all(20 <= n <= 60 for n in lens) and len(set(lens)) > 1
    assert all(4 <= s.max_tokens <= 12 for s in specs) and len({s.max_tokens for s in specs}) > 1
    assert not set().union(*map(set, (s.prompt for s in specs))) & tok.special_ids
    results, _ = run(dep, specs, concurrency=4)
    check_exact(results, specs)
    assert summarize(results, 1.0)["prompt_tokens_mismatched"] == 0


def test_prefix_repetition_reports_cached_tokens(dep, tok):
    specs = datasets.build("prefix-repetition", 10, num_prefixes=2, prefix_len=4 * BLOCK, suffix_len=8,
                           output_len=4, tokenizer=tok, seed=1)
    prefixes = {tuple(s.prompt[:4 * BLOCK]) for s in specs}
    assert len(prefixes) == 2 and all(len(s.prompt) == 4 * BLOCK + 8 for s in specs)
    before = counters(dep)
    results, wall = run(dep, specs, concurrency=1)   # one at a time: each prefix is cached after its first use
    after = counters(dep)
    check_exact(results, specs)
    s = summarize(results, wall)
    served_cached = after["prompt_cached_tokens"] - before["prompt_cached_tokens"]
    assert s["cached_tokens"] == served_cached >= (10 - 2) * 4 * BLOCK
    assert s["cached_fraction"] == pytest.approx(served_cached / s["prompt_tokens"])


def test_multi_turn_exact_and_in_order(dep, tok):
    specs = datasets.build("multi-turn", 6, input_len=12, output_len=5, turns=3, tokenizer=tok, seed=2)
    assert len(specs) == 6 and len({s.session for s in specs}) == 2
    for s in specs:
        users = [m for m in s.messages if m["role"] == "user"]
        assert all(len(tok.backend.encode(m["content"], add_special_tokens=False).ids) == 12 for m in users)
        assert s.prompt_len == len(tok.apply_chat_template(s.messages))
    results, _ = run(dep, specs, concurrency=2)
    check_exact(results, specs)
    by_index = {r.index: r for r in results}
    for i, s in enumerate(specs):   # a conversation's next turn starts after the previous one ended
        if i and specs[i - 1].session == s.session:
            prev = by_index[i - 1]
            assert by_index[i].start >= prev.start + prev.e2e
            assert len(s.messages) == len(specs[i - 1].messages) + 2


def test_sharegpt_file(dep, tok, tmp_path):
    convs = [{"conversations": [{"from": "human", "value": f"question {i} : what is the capital of france ?"},
                                {"from": "gpt", "value": "the capital of france is paris . " * (i + 1)}]}
             for i in range(5)]
    convs.append({"conversations": [{"from": "human", "value": "no answer"}]})   # skipped: no reply
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(convs))
    specs = datasets.build("sharegpt", 4, dataset_path=path, tokenizer=tok)
    assert len(specs) == 4
    replies = {c["conversations"][0]["value"]: c["conversations"][1]["value"] for c in convs[:5]}
    for s in specs:
        reply = replies[s.messages[0]["content"]]
        assert s.max_tokens == len(tok.backend.encode(reply, add_special_tokens=False).ids)
    results, _ = run(dep, specs, concurrency=2)
    check_exact(results, specs)


def test_mooncake_trace_shared_prefixes_and_replay(dep, tok, tmp_path):
    records = [{"timestamp": 0, "input_length": 40, "output_length": 4, "hash_ids": [1, 2, 3]},
               {"timestamp": 150, "input_length": 56, "output_length": 3, "hash_ids": [1, 2, 4, 5]},
               {"timestamp": 300, "input_length": 20, "output_length": 5, "hash_ids": [6, 7]},
               {"timestamp": 450, "input_length": 47, "output_length": 2, "hash_ids": [1, 2, 4]}]
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    specs = datasets.build("mooncake", 10, dataset_path=path, block_tokens=BLOCK, tokenizer=tok)
    assert [len(s.prompt) for s in specs] == [40, 56, 20, 47]
    assert [s.max_tokens for s in specs] == [4, 3, 5, 2]
    assert [s.at for s in specs] == [0.0, 0.15, 0.3, 0.45]
    blk = lambda s, i: s.prompt[i * BLOCK:(i + 1) * BLOCK]  # noqa: E731
    assert specs[0].prompt[:2 * BLOCK] == specs[1].prompt[:2 * BLOCK] == specs[3].prompt[:2 * BLOCK]
    assert blk(specs[1], 2)[:15] == blk(specs[3], 2) and blk(specs[1], 2) != blk(specs[0], 2)
    assert blk(specs[2], 0) != blk(specs[0], 0)
    t0 = time.perf_counter()
    results, _ = run(dep, specs)   # no rate: replayed on the trace's timestamps
    check_exact(results, specs)
    for r in results:   # nothing is sent before its timestamp
        assert r.start >= t0 + specs[r.index].at - 1e-3


# ---- arrivals --------------------------------------------------------------------------------------

def test_closed_loop_exact_count_and_concurrency(dep, tok):
    specs = datasets.build("random", 24, input_len=32, output_len=6, tokenizer=tok)
    before = counters(dep)
    results, wall = run(dep, specs, concurrency=5)
    after = counters(dep)
    check_exact(results, specs)
    s = summarize(results, wall)
    assert s["completed"] == 24 and s["failed"] == 0
    assert s["max_concurrency"] == 5 and all(1 <= r.inflight <= 5 for r in results)
    assert after["requests"] - before["requests"] == 24
    assert after["prompt_tokens"] - before["prompt_tokens"] == s["prompt_tokens"] == 24 * 32
    assert after["generation_tokens"] - before["generation_tokens"] == s["output_tokens"] == 24 * 6


def test_arrival_times_poisson_and_gamma():
    specs = [datasets.RequestSpec([1]) for _ in range(4000)]
    for shape in (0.5, 1.0, 4.0):
        t = arrival_times(specs, rate=20.0, burstiness=shape, seed=5)
        gaps = [b - a for a, b in zip([0.0] + t, t)]
        assert all(g >= 0 for g in gaps)
        mean = statistics.fmean(gaps)
        assert mean == pytest.approx(1 / 20.0, rel=0.08)
        assert statistics.pvariance(gaps) / mean ** 2 == pytest.approx(1 / shape, rel=0.15)   # CV² of gamma
    assert arrival_times(specs[:5], 2.0, 1.0, seed=1) == arrival_times(specs[:5], 2.0, 1.0, seed=1)
    trace = [datasets.RequestSpec([1], at=x) for x in (0.0, 0.5, 2.0)]
    assert arrival_times(trace, None) == [0.0, 0.5, 2.0]


def test_open_loop_bounded_by_count(dep, tok):
    specs = datasets.build("random", 15, input_len=16, output_len=4, tokenizer=tok)
    t0 = time.perf_counter()
    results, _ = run(dep, specs, rate=100.0, burstiness=0.5, seed=7)
    check_exact(results, specs)
    at = arrival_times(specs, 100.0, 0.5, seed=7)
    assert all(r.start >= t0 + at[r.index] - 1e-3 for r in results)


def test_open_loop_bounded_by_time(dep, tok):
    specs = datasets.build("random", 500, input_len=16, output_len=4, tokenizer=tok)
    expected = sum(1 for t in arrival_times(specs, 40.0, 1.0, seed=3) if t <= 0.5)
    assert 5 < expected < 500
    results, _ = run(dep, specs, rate=40.0, seed=3, duration_s=0.5, concurrency=8)
    assert sorted(r.index for r in results) == list(range(expected))   # every arrival within 0.5 s, no other
    assert all(r.ok and r.inflight <= 8 for r in results)


# ---- metrics -----------------------------------------------------------------------------------------

def _rec(ttft_ms, e2e_ms, n_out, ok=True) -> Result:
    return Result(ok=ok, ttft=ttft_ms / 1000, e2e=e2e_ms / 1000, output_tokens=n_out, prompt_tokens=10,
                  itls=[(e2e_ms - ttft_ms) / 1000 / max(1, n_out - 1)] * max(0, n_out - 1))


def test_fanout_bench_runs_the_heads_own_path(tiny_model_dir, capsys):
    """`python -m slurmserve.bench.fanout`: every answer it streams through the head's fan-out ends
    (it raises otherwise), and each way gets a figure."""
    from slurmserve.bench import fanout

    assert fanout.main([str(tiny_model_dir), "--requests", "8", "--steps", "16", "--repeats", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    figures = {line.rsplit(" ", 4)[0].strip(): float(line.split()[-4]) for line in lines}
    assert set(figures) == {"head path", "flat Python floor", "decode + DecodeStream only"}
    assert all(f > 0 for f in figures.values())


def test_goodput_as_distserve_defines_it():
    recs = [_rec(100, 1100, 11),    # TPOT 100 ms
            _rec(300, 800, 11),     # TTFT over 200
            _rec(50, 550, 6),       # TPOT 100
            _rec(150, 2150, 11),    # TPOT 200 ms: over 150
            _rec(10, 10, 1),        # one token: TPOT 0
            _rec(0, 0, 0, ok=False)]   # failed requests are never good
    assert recs[0].tpot == pytest.approx(0.1) and recs[4].tpot == 0.0
    s = summarize(recs, 2.0, {"ttft": 200, "tpot": 150})
    assert s["goodput"] == pytest.approx(3 / 2.0)      # recs 0, 2, 4 meet every limit; per second of wall
    assert s["slo_attainment"] == pytest.approx(3 / 6)
    assert s["request_throughput"] == pytest.approx(5 / 2.0)
    assert summarize(recs, 2.0, {"e2e": 1000})["goodput"] == pytest.approx(3 / 2.0)   # recs 1, 2, 4
    assert [meets_slos(r, {"e2e": 1000}) for r in recs] == [False, True, True, False, True, False]
    assert "goodput" not in summarize(recs, 2.0)
    s = summarize(recs, 2.0)
    assert s["tpot_ms"]["p50"] == pytest.approx(100.0)   # over the 4 completed multi-token answers
    assert s["e2e_ms"]["mean"] == pytest.approx((1100 + 800 + 550 + 2150 + 10) / 5)


# ---- the CLI's result file -----------------------------------------------------------------------------

def documented_fields() -> set[str]:
    """Field names in the first column of docs/bench-result-schema.md's tables."""
    return set(re.findall(r"^\| `([a-z0-9_.]+)`", DOCS.read_text(), re.M))


def test_cli_result_json_has_documented_fields(dep, tiny_model_dir, tmp_path):
    out = tmp_path / "result.json"
    endpoint = Path(dep.info["api_key_file"]).parent / "endpoint.json"
    p = subprocess.run([sys.executable, "-m", "slurmserve", "bench", "serve", "--endpoint-file", str(endpoint),
                        "--tokenizer", str(tiny_model_dir), "--dataset", "prefix-repetition",
                        "--num-prefixes", "2", "--prefix-len", "32", "--suffix-len", "8", "--output-len", "4",
                        "--num-prompts", "8", "--warmup", "2", "--concurrency", "2",
                        "--goodput", "ttft:60000", "tpot:60000", "--result-json", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(out.read_text())
    assert res["completed"] == 8 and res["failed"] == 0 and res["prompt_tokens_mismatched"] == 0
    assert res["prompt_tokens"] == 8 * 40 and res["output_tokens"] == 8 * 4
    assert res["cached_tokens"] > 0 and res["goodput"] == pytest.approx(res["request_throughput"])
    assert set(res["cpu_ms_per_request"]) == {"head", "worker0"}
    for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(res[k]) == {"mean", "p50", "p90", "p99"} and res[k]["p50"] > 0
    documented = documented_fields()
    assert set(res) <= documented, set(res) - documented
    assert "| TTFT |" in p.stdout and "goodput" in p.stdout
    assert out.with_suffix(".md").read_text() in p.stdout
    assert out.with_suffix(".latency_cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- scenarios -----------------------------------------------------------------------------------------

def test_scenario_writes_report_directory(tiny_model_dir, tmp_path):
    base = tmp_path / "dep.yaml"
    base.write_text(yaml.safe_dump(config(tiny_model_dir)))
    scenario = tmp_path / "tiny.yaml"
    scenario.write_text(yaml.safe_dump({
        "name": "tiny", "base": "dep.yaml", "deployments": {"one-worker": {}},
        "workloads": {"rand": {"dataset": "random", "input_len": 24, "output_len": 4, "num_prompts": 6}},
        "loads": [{"concurrency": 2}], "repeats": 1, "goodput": {"ttft": 60000}}))
    out = tmp_path / "report"
    p = subprocess.run([sys.executable, "-m", "slurmserve", "bench", "scenario", str(scenario), "-o", str(out)],
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads((out / "results.json").read_text())
    assert report["scenario"] == "tiny" and len(report["rows"]) == 1
    row = report["rows"][0]
    assert (row["deployment"], row["workload"], row["load"]) == ("one-worker", "rand", {"concurrency": 2})
    run0 = row["runs"][0]
    assert run0["completed"] == 6 and run0["prompt_tokens"] == 6 * 24 and run0["max_concurrency"] == 2
    assert row["median"]["goodput"] == pytest.approx(row["median"]["request_throughput"])
    table = (out / "summary.md").read_text()
    assert "| one-worker | rand | concurrency=2 |" in table
    assert len(run0["samples_ms"]["ttft"]) == 6
    pngs = sorted(x.name for x in out.glob("*.png"))   # matplotlib is in the test extra
    assert pngs == ["latency_cdf.png", "vs_load.png"] and all((out / x).stat().st_size > 1000 for x in pngs)


def test_scenario_mistakes_are_reported_with_key_paths_before_any_run(tiny_model_dir, tmp_path):
    """Every mistake in a scenario file (its own keys, a deployment's resolved config, a workload's
    data file) is named by its key path, at once, and no deployment is started."""
    base = tmp_path / "dep.yaml"
    base.write_text(yaml.safe_dump(config(tiny_model_dir)))
    scenario = tmp_path / "bad.yaml"
    scenario.write_text(yaml.safe_dump({
        "base": "dep.yaml", "deployments": {"ok": {}, "typo": {"router.policy": "kv-aware"}},
        "workloads": {"chat": {"dataset": "sharegpt", "dataset_path": str(tmp_path / "missing.json")}}}))
    out = tmp_path / "report"
    p = subprocess.run([sys.executable, "-m", "slurmserve", "bench", "scenario", str(scenario), "-o", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "deployments.typo" in p.stderr and "router.policy: Input should be" in p.stderr
    assert "workloads.chat" in p.stderr and "missing.json" in p.stderr
    assert not out.exists()                  # nothing ran
    scenario.write_text(yaml.safe_dump({"base": "dep.yaml", "deployments": {"a": {}}, "workloads": {
        "w": {"input_len": 0, "num_prompt": 5}}, "loads": [{"concurrency": 0}], "repeats": 0}))
    p = subprocess.run([sys.executable, "-m", "slurmserve", "bench", "scenario", str(scenario), "-o", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "4 error(s)" in p.stderr, p.stderr
    for path in ("workloads.w.input_len", "workloads.w.num_prompt: Extra inputs", "loads.0.concurrency", "repeats"):
        assert f"  {path}" in p.stderr
