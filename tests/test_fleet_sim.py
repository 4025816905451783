"""The virtual-time fleet simulator (bench/fleet_sim.py): deterministic, and on the SimEngine step model."""

from __future__ import annotations

import pytest

from slurmserve.bench.fleet_sim import (Fleet, GoodputSearch, Workload, simulate, step_decode_ms,
                                        step_prefill_ms)
from slurmserve.config import SimConfig
from slurmserve.runtime.sim_engine import SimEngine

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
    per_block = SimEngine.remote_block_transfer_ms if transfer_ms is None else transfer_ms
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
