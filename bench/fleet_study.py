"""`slurmserve bench fleet`: where P/D disaggregation raises goodput and where it lowers it.

For each workload (input/output lengths) and fixed engine count N it runs, on virtual time
(`bench.fleet_sim`): N aggregated engines (least_loaded and round_robin routing) and every P:D
split of N. Per fleet the request rate is searched (`GoodputSearch`) for each SLO pair; the cell's
answer is the best disaggregated rate against the best aggregated rate. Goodput is DistServe's:
the highest request rate at which >= target (default 90%) of the requests meet both TTFT and TPOT.

Output: results.json, summary.md (the table) and goodput_vs_rate.png (goodput vs offered rate, one SLO pair).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from slurmserve.launcher.argtypes import non_negative_float, non_negative_int, pair, positive_float, positive_int, share
from slurmserve.bench.fleet_sim import GoodputSearch, Workload, attainment, simulate, step_decode_ms, step_prefill_ms
from slurmserve.config import SimConfig
from slurmserve.runtime.sim.scheduler import Scheduler


def fleets(n: int) -> list[dict]:
    out = [{"workers": n, "policy": "least_loaded"}, {"workers": n, "policy": "round_robin"}]
    return out + [{"prefill": p, "decode": n - p} for p in range(1, n - 1)]


def fleet_name(f: dict) -> str:
    return f"{f['prefill']}P:{f['decode']}D" if "prefill" in f else f"{f['workers']}x agg {f['policy']}"


def start_rate(sim: SimConfig, wl: Workload, engines: int) -> float:
    """A rough per-fleet capacity from the step model, divided by 8: where the rate search starts."""
    blocks = -(-(wl.input_len + wl.output_len) // sim.block_size)
    conc = min(sim.max_num_seqs, sim.num_kv_blocks // max(1, blocks))
    life_s = (wl.output_len * step_decode_ms(sim, sim.num_kv_blocks // 2) + step_prefill_ms(sim, wl.input_len)) / 1000
    return max(0.05, engines * conc / life_s / 4)


def lifetime_s(sim: SimConfig, wl: Workload) -> float:
    """A request's rough lifetime on a busy engine (step model at full KV)."""
    return (wl.output_len * step_decode_ms(sim, sim.num_kv_blocks) + step_prefill_ms(sim, wl.input_len)) / 1000


def _search(job: dict) -> dict:
    sim = SimConfig(**job["sim"])
    wl = Workload(**job["workload"])
    fleet = dict(job["fleet"])
    if job["transfer_ms"] is not None:
        fleet["transfer_ms"] = job["transfer_ms"]
    t0 = time.process_time()
    # above this rate the capped request count (max_n) would arrive within fewer request lifetimes
    # than asked for: a burst, which a fleet can absorb whatever its sustained rate
    ceiling = wl.max_n / job["min_span_s"] if job["min_span_s"] > 0 else math.inf
    search = GoodputSearch(lambda r: simulate(fleet, wl, r, sim=sim)[0], job["start"], job["target"],
                           job["step"], ceiling=ceiling)
    rates = {name: search.max_rate(slos) for name, slos in job["slos"].items()}
    capped = [name for name, rate in rates.items() if search.capped(rate)]
    curve = []
    for rate, results in search.curve():
        ok = [r for r in results if r.ok]
        ttft = sorted(r.ttft * 1000 for r in ok)
        tpot = sorted(r.tpot * 1000 for r in ok if r.output_tokens > 1)
        p = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None  # noqa: E731
        curve.append({"rate": rate, "attainment": {n: attainment(results, s) for n, s in job["slos"].items()},
                      "ttft_p50_ms": p(ttft, .5), "ttft_p90_ms": p(ttft, .9),
                      "tpot_p50_ms": p(tpot, .5), "tpot_p90_ms": p(tpot, .9)})
    return {"workload": job["workload"], "fleet": job["fleet"], "name": fleet_name(job["fleet"]),
            "goodput_rate": rates, "capped": capped, "curve": curve, "cpu_s": time.process_time() - t0}


def run_study(a) -> dict:
    sim = SimConfig(speedup=float("inf"))
    slos = {f"TTFT {ttft:g} / TPOT {tpot:g}": {"ttft": ttft, "tpot": tpot} for ttft, tpot in a.slos}
    jobs = []
    for i, o in a.workloads:
        wl = {"input_len": i, "output_len": o, "range_ratio": a.range_ratio, "seed": a.seed,
              "max_n": a.max_requests}
        span = a.lifetimes * lifetime_s(sim, Workload(**wl))
        wl["duration_s"] = max(a.duration, span)
        start = start_rate(sim, Workload(**wl), a.engines)
        for f in fleets(a.engines):
            jobs.append({"sim": sim.model_dump(), "workload": wl, "fleet": f, "slos": slos, "start": start,
                         "target": a.target, "step": a.rate_step, "transfer_ms": a.transfer_ms,
                         "min_span_s": span})
    t0 = time.time()
    with ProcessPoolExecutor(a.jobs) as pool:
        rows = list(pool.map(_search, jobs))
    cells = []
    for i, o in a.workloads:
        w = f"{i}/{o}"
        mine = [r for r in rows if (r["workload"]["input_len"], r["workload"]["output_len"]) == (i, o)]
        for name in slos:
            agg = max((r for r in mine if "workers" in r["fleet"]), key=lambda r: r["goodput_rate"][name])
            dis = max((r for r in mine if "prefill" in r["fleet"]), key=lambda r: r["goodput_rate"][name])
            ga, gd = agg["goodput_rate"][name], dis["goodput_rate"][name]
            cells.append({"workload": w, "slo": name, "best_agg": agg["name"], "agg_rate": ga,
                          "best_disagg": dis["name"], "disagg_rate": gd,
                          "ratio": (gd / ga) if ga else (math.inf if gd else None),
                          "capped": [r["name"] for r in (agg, dis) if name in r["capped"]],
                          "per_split": {r["name"]: r["goodput_rate"][name] for r in mine}})
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "elapsed_s": time.time() - t0,
            "virtual_time": True, "engines": a.engines, "target_attainment": a.target,
            "duration_s": a.duration, "lifetimes": a.lifetimes, "max_requests": a.max_requests, "rate_step": a.rate_step, "slos_ms": slos,
            "sim": {k: v for k, v in sim.model_dump().items() if k in
                    ("prefill_coeffs", "decode_coeffs", "num_kv_blocks", "block_size", "max_num_seqs",
                     "max_num_batched_tokens")},
            "remote_block_transfer_ms": Scheduler.remote_block_transfer_ms if a.transfer_ms is None else a.transfer_ms,
            "cells": cells, "rows": rows}


def markdown(study: dict) -> str:
    n = study["engines"]
    lines = [f"| in/out | SLO (ms) | best agg ({n} engines) | req/s | best P:D | req/s | disagg/agg |",
             "|---|---|---|---|---|---|---|"]
    for c in study["cells"]:
        r = c["ratio"]
        ratio = "-" if r is None else ("inf" if math.isinf(r) else f"{r:.2f}x")
        capped = c.get("capped", [])
        agg = f"{c['agg_rate']:.2f}" + ("+" if c["best_agg"] in capped else "")
        dis = f"{c['disagg_rate']:.2f}" + ("+" if c["best_disagg"] in capped else "")
        ratio += "?" if capped else ""
        lines.append(f"| {c['workload']} | {c['slo']} | {c['best_agg'].replace(f'{n}x agg ', '')} | {agg} "
                     f"| {c['best_disagg']} | {dis} | {ratio} |")
    if any(c.get("capped") for c in study["cells"]):
        lines += ["", "+: at least this rate. Above it --max-requests requests would arrive within fewer than "
                      "--lifetimes request lifetimes, so the search stopped; raise --max-requests to measure further "
                      "(?: the ratio is uncertain)."]
    return "\n".join(lines)


def split_table(study: dict) -> str:
    """Goodput rate of every fleet, per workload and SLO."""
    names = list(study["cells"][0]["per_split"]) if study["cells"] else []
    short = [x.replace(f"{study['engines']}x agg ", "agg ").replace("least_loaded", "LL").replace("round_robin", "RR")
             for x in names]
    lines = ["| in/out | SLO (ms) | " + " | ".join(short) + " |", "|---|---|" + "---|" * len(names)]
    for c in study["cells"]:
        lines.append(f"| {c['workload']} | {c['slo']} | " + " | ".join(f"{c['per_split'][x]:.2f}" for x in names) + " |")
    return "\n".join(lines)


def plot(study: dict, path: Path, slo: str | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    workloads = list(dict.fromkeys(c["workload"] for c in study["cells"]))
    slo = slo or list(study["slos_ms"])[len(study["slos_ms"]) // 2]
    cols = min(3, len(workloads))
    rows = -(-len(workloads) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(workloads):]:
        ax.set_visible(False)
    for ax, w in zip(axes.flat, workloads):
        cell = next(c for c in study["cells"] if c["workload"] == w and c["slo"] == slo)
        for name in dict.fromkeys((cell["best_agg"], cell["best_disagg"])):
            row = next(r for r in study["rows"] if r["name"] == name and
                       f"{r['workload']['input_len']}/{r['workload']['output_len']}" == w)
            xs = [p["rate"] for p in row["curve"]]
            ax.plot(xs, [p["attainment"][slo] * p["rate"] for p in row["curve"]], "o-", label=name)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(f"{w} tokens, {slo} ms", fontsize=9)
        ax.set_xlabel("request rate (req/s, virtual time)")
        ax.set_ylabel("req/s meeting both SLOs")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_fleet(a) -> int:
    study = run_study(a)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(study, indent=1))
    md = markdown(study) + "\n\nGoodput rate (req/s) of every fleet:\n\n" + split_table(study)
    (a.out / "summary.md").write_text(md + "\n")
    try:
        plot(study, a.out / "goodput_vs_rate.png")
    except ImportError:
        pass
    print(md)
    print(f"\n{len(study['rows'])} fleets searched in {study['elapsed_s']:.0f} s; results in {a.out}")
    return 0


def _fleet_size(text: str) -> int:
    n = positive_int(text)
    if n < 3:       # the smallest P:D split, 1P:2D
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 3")
    return n


def _range_ratio(text: str) -> float:
    x = non_negative_float(text)
    if x >= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be below 1")
    return x


def _rate_step(text: str) -> float:
    x = positive_float(text)
    if x <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be above 1")
    return x


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workloads", nargs="+", type=pair(int, "/", "IN/OUT"),
                   default=[(512, 64), (2048, 128), (4096, 256), (256, 1024)],
                   metavar="IN/OUT", help="input/output lengths in tokens")
    p.add_argument("--engines", type=_fleet_size, default=8, help="engines per fleet (aggregated, and P+D; at least 3)")
    p.add_argument("--slos", nargs="+", type=pair(float, ":", "TTFT:TPOT"),
                   default=[(200, 25), (1000, 25), (400, 50), (1000, 100)], metavar="TTFT:TPOT", help="SLO pairs in ms")
    p.add_argument("--target", type=share, default=0.9, help="share of requests that must meet the SLOs")
    p.add_argument("--duration", type=positive_float, default=20.0, help="virtual seconds of arrivals per run, at least")
    p.add_argument("--lifetimes", type=non_negative_float, default=3.0,
                   help="... and at least this many request lifetimes (output_len decode steps at full KV)")
    p.add_argument("--max-requests", type=positive_int, default=6000, help="cap on requests per run")
    p.add_argument("--range-ratio", type=_range_ratio, default=0.0, help="lengths uniform within +-this share")
    p.add_argument("--rate-step", type=_rate_step, default=2 ** 0.25, help="rate grid ratio (resolution), above 1")
    p.add_argument("--transfer-ms", type=non_negative_float, help="KV transfer cost per block "
                   f"(default: Scheduler.remote_block_transfer_ms = {Scheduler.remote_block_transfer_ms})")
    p.add_argument("--jobs", type=positive_int, default=2, help="processes")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/fleet-study"))


def register(sub) -> None:
    p = sub.add_parser("fleet", help="P/D disaggregation vs aggregation at fleet scale, on virtual time")
    add_arguments(p)
    p.set_defaults(func=cmd_fleet)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    raise SystemExit(cmd_fleet(ap.parse_args()))
