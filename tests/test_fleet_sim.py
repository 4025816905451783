"""The virtual-time fleet simulator (bench/fleet_sim.py): deterministic, and on the SimEngine step model."""

from __future__ import annotations

import pytest

from slurmserve.bench.fleet_sim import (Fleet, GoodputSearch, Workload, simulate, step_decode_ms,
                                        step_prefill_ms)
from slurmserve.config import SimConfig
from slurmserve.runtime.sim.scheduler import Scheduler

SIM = SimConfig(speedup=float("inf"))
PROMPT, OUT = 100, 8            # 100 + 8 tokens stay within ceil(100 / 16) = 7 blocks: one decode cost


def one_request(**fleet):
    return Fleet(SIM, **fleet).run([(PROMPT, OUT)], [0.5])[0]


def test_deterministic_with_a_seed():
    wl = Workload(512, 32, duration_s=2.0, range_ratio=0.5, seed=3)
    a, sa = simulate({"workers": 3}, wl, 20.0, {"ttft": 200, "tpot": 50})
    b, sb = simulate({"workers": 3}, wl, 20.0, {"ttft": 200, "tpot": 50})
    assert [(r.start, r.ttft, r.e2e, r.output_tokens) for r in a] == [(r.start, r.ttft, r.e2e, r.output_tokens) for r in b]
    assert sa == sb
    c, _ = simulate({"workers": 3}, Workload(512, 32, duration_s=2.0, range_ratio=0.5, seed=4), 20.0)
    assert [r.e2e for r in c] != [r.e2e for r in a]


def test_single_engine_latencies_are_the_step_model():
    r = one_request(workers=1)
    assert r.ok and r.output_tokens == OUT
    assert r.ttft * 1000 == pytest.approx(step_prefill_ms(SIM, PROMPT))
    assert r.tpot * 1000 == pytest.approx(step_decode_ms(SIM, 7))
    a, b, c = SIM.prefill_coeffs        # the coefficients themselves, not the helper
    assert r.ttft * 1000 == pytest.approx(a * PROMPT ** 2 + b * PROMPT + c)


@pytest.mark.parametrize("transfer_ms", [None, 1.5])
def test_disaggregated_ttft_includes_the_transfer(transfer_ms):
    r = one_request(prefill=1, decode=1, transfer_ms=transfer_ms)
    per_block = Scheduler.remote_block_transfer_ms if transfer_ms is None else transfer_ms
    # prefill leg, then the decode engine's admitting step: one decode step plus 7 pulled blocks
    expected = step_prefill_ms(SIM, PROMPT) + step_decode_ms(SIM, 7) + 7 * per_block
    assert r.ok and r.output_tokens == OUT
    assert r.ttft * 1000 == pytest.approx(expected)
    assert r.tpot * 1000 == pytest.approx(step_decode_ms(SIM, 7))


def test_load_is_spread_and_every_request_completes():
    wl = Workload(256, 16, duration_s=3.0)
    for fleet in ({"workers": 4}, {"workers": 4, "policy": "round_robin"}, {"prefill": 1, "decode": 3}):
        results, summary = simulate(fleet, wl, 30.0)
        assert summary["completed"] == len(results) == wl.count(30.0)
        assert all(r.output_tokens == 16 for r in results)


def test_goodput_search_is_monotone_in_the_slo():
    wl = Workload(512, 32, duration_s=4.0)
    search = GoodputSearch(lambda rate: simulate({"workers": 2}, wl, rate)[0], start=10.0)
    tight = search.max_rate({"ttft": 100, "tpot": 25})
    loose = search.max_rate({"ttft": 400, "tpot": 60})
    looser = search.max_rate({"ttft": 2000, "tpot": 200})
    assert 0 < tight <= loose <= looser
    assert search.max_rate({"ttft": 1, "tpot": 1}) == 0.0        # nothing meets 1 ms
    n = len(search.cache)
    assert search.max_rate({"ttft": 400, "tpot": 60}) == loose and len(search.cache) == n   # all cached


def test_goodput_search_does_not_measure_above_its_ceiling():
    """Rates where a capped request count would be a burst count as missed, and the result says so."""
    from slurmserve.bench.loadgen import Result
    seen = []

    def run_at(rate):                       # a fleet that meets any SLO at any rate
        seen.append(rate)
        return [Result(ok=True, ttft=0.001, e2e=0.002, output_tokens=2)]
    search = GoodputSearch(run_at, start=10.0, ceiling=35.0)
    rate = search.max_rate({"ttft": 100})
    assert 10.0 * 2 ** 1.75 == pytest.approx(rate) and rate <= 35.0 < rate * search.step
    assert search.capped(rate) and not search.capped(rate / search.step) and not search.capped(0.0)
    assert max(seen) <= 35.0                # nothing above the ceiling was simulated


def shared_prefix_run(policy: str, n: int = 96, concurrency: int = 8):
    """6 shared prefixes of 8 blocks, each request one of them + 1 unique block, in a closed loop on
    2 engines of 40 blocks: one engine cannot cache all 6 prefixes, two can."""
    from slurmserve.bench.datasets import build
    sim = SimConfig(speedup=float("inf"), num_kv_blocks=40, block_size=16)
    specs = build("prefix-repetition", n, num_prefixes=6, prefix_len=128, suffix_len=16, output_len=8)
    fleet = Fleet(sim, workers=2, policy=policy, max_model_len=512)
    results = fleet.run([(len(s.prompt), s.max_tokens) for s in specs], prompts=[s.prompt for s in specs],
                        concurrency=concurrency)
    return fleet, results


def test_closed_loop_keeps_the_concurrency():
    fleet, results = shared_prefix_run("round_robin", n=40, concurrency=4)
    assert all(r.ok and r.output_tokens == 8 for r in results)
    assert [r.start for r in results[:4]] == [0.0] * 4
    # each completion sends the next request at once: 4 in flight, never more
    inflight = [sum(o.start <= r.start < o.start + o.e2e for o in results) for r in results]
    assert max(inflight) == 4 and min(inflight[4:]) >= 3
    with pytest.raises(ValueError, match="either arrivals or a concurrency"):
        fleet.run([(8, 2)])


def test_kv_policy_routes_by_the_engines_own_kv_events():
    kv_fleet, kv = shared_prefix_run("kv")
    _, rr = shared_prefix_run("round_robin")
    cached = lambda rs: sum(r.cached_tokens for r in rs) / sum(r.prompt_tokens for r in rs)  # noqa: E731
    # kv keeps each prefix on one engine; round robin sends every prefix to both, which evict them
    assert cached(kv) > cached(rr) + 0.1
    assert kv_fleet.index is not None and len(kv_fleet.index) > 0
    for eng in kv_fleet.pools["worker"]:
        assert eng.prefill_blocks == eng.decode_blocks == 0 and not eng.held_hashes   # all released
        # the index holds exactly what the engine's prefix cache holds
        assert kv_fleet.index.blocks(eng.index) == eng.scheduler.blocks.num_cached


def test_bench_routing_cli_writes_the_study(tmp_path):
    import json
    import subprocess
    import sys
    out = tmp_path / "study"
    p = subprocess.run([sys.executable, "-m", "slurmserve", "bench", "routing", "--workers", "2", "--num-kv-blocks",
                        "40", "--block-size", "16", "--prefixes", "6", "--prefix-len", "128", "--suffix-len", "16",
                        "--output-len", "8", "--requests", "48", "--concurrency", "8", "--max-model-len", "512",
                        "--seeds", "2", "--scales", "1", "4", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    study = json.loads((out / "results.json").read_text())
    assert set(study["policies"]) == {"least_loaded", "round_robin", "kv", "prefix-pinned (oracle)"}
    kv, rr = study["policies"]["kv"], study["policies"]["round_robin"]
    assert kv["cached"] > rr["cached"] and kv["full_hits"] > rr["full_hits"]
    assert study["policies"]["prefix-pinned (oracle)"]["full_hits"] > kv["full_hits"]   # the most there is
    assert "oracle_vs_round_robin" in study
    assert [row["prefill_load_scale"] for row in study["scale_sweep"]] == [1, 4]
    assert "| kv |" in p.stdout and (out / "summary.md").read_text().strip() in p.stdout


def test_bench_fleet_cli_marks_rates_it_could_not_measure(tmp_path):
    """A tiny `bench fleet`: with few requests allowed, the search stops where they would arrive as a
    burst and says "at least"; bad arguments are one-line usage errors."""
    import json
    import subprocess
    import sys
    out = tmp_path / "fleet"
    cmd = [sys.executable, "-m", "slurmserve", "bench", "fleet"]
    p = subprocess.run(cmd + ["--workloads", "256/16", "--engines", "3", "--slos", "500:50", "--duration", "2",
                              "--lifetimes", "1", "--max-requests", "200", "--jobs", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    study = json.loads((out / "results.json").read_text())
    [cell] = study["cells"]
    assert cell["workload"] == "256/16" and cell["slo"] == "TTFT 500 / TPOT 50"
    assert {r["name"] for r in study["rows"]} == {"3x agg least_loaded", "3x agg round_robin", "1P:2D"}
    assert cell["capped"] and "+: at least this rate" in p.stdout
    from slurmserve.bench.fleet_study import lifetime_s
    ceiling = 200 / lifetime_s(SIM, Workload(256, 16))     # 200 requests within 1 lifetime
    for row in study["rows"]:               # no rate above it was simulated
        assert row["curve"] and all(pt["rate"] <= ceiling for pt in row["curve"])
    for bad, msg in ((["--engines", "2"], "must be at least 3"), (["--workloads", "512"], "expected IN/OUT"),
                     (["--slos", "200:x"], "expected TTFT:TPOT"), (["--target", "0"], "above 0 and at most 1")):
        p = subprocess.run(cmd + bad, capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_bench_routing_refuses_unusable_arguments():
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "slurmserve", "bench", "routing"]
    for bad, code, msg in ((["--workers", "0"], 2, "must be at least 1"),
                           (["--prefix-len", "10"], 1, "shorter than a block"),
                           (["--prefix-len", "4000"], 1, "over --max-model-len 4096")):
        p = subprocess.run(cmd + bad, capture_output=True, text=True, timeout=60)
        assert p.returncode == code and msg in p.stderr and "Traceback" not in p.stderr, p.stderr
