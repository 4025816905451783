"""Offline batch generation (`slurmserve batch`): files, resume, shards and merge on their own, then
real runs over mpirun with simulated engines: mixed good and bad lines, kill -9 at random points with
exactly-once resume, and shards plus merge. vLLM and Slurm runs are in test_batch_vllm.py and
test_batch_slurm.py.

Bodies are compared without `id` and `created` (fresh per response) and without
`usage.prompt_tokens_details` (cached prompt tokens depend on what an engine's prefix cache held, which
restarts change); the text, finish reason and token counts must be equal. The simulator's tokens are a
function of (seed, request seed, prompt), so every run produces the same ones.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from slurmserve.launcher.batch import files as bf
from slurmserve.tools.local_deployment import metric_value as metric
from slurmserve.tools.local_deployment import processes_matching, shm_files

MODEL = "tiny-llama"


def sim_config(model_dir, log_dir, speedup: float = 4.0, workers: int = 2) -> dict:
    return {
        "model": {"path": str(model_dir), "name": MODEL, "max_model_len": 512},
        "engine": {"kind": "sim", "sim": {"speedup": speedup, "num_kv_blocks": 256, "block_size": 16}},
        "pools": {"workers": workers},
        "router": {"host": "127.0.0.1", "port": 0, "policy": "round_robin"},
        "runtime": {"heartbeat_interval_s": 0.25, "heartbeat_timeout_s": 1.5, "shutdown_grace_s": 2},
        "log_dir": str(log_dir),
    }


def line(cid, i: int, max_tokens: int = 16) -> dict:
    if i % 2:
        return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": MODEL, "messages": [{"role": "user", "content": f"question number {i} ?"}],
                         "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}}
    return {"custom_id": cid, "method": "POST", "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": f"the story of prompt {i} goes", "max_tokens": max_tokens,
                     "seed": i, "ignore_eos": True}}


def write_jsonl(path: Path, items) -> Path:
    with open(path, "w") as f:
        for it in items:
            f.write(it if isinstance(it, str) else json.dumps(it))
            f.write("\n")
    return path


BAD = ["this is not json",
       json.dumps({"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}),
       json.dumps({"custom_id": "bad-body", "method": "POST", "url": "/v1/completions",
                   "body": {"model": MODEL, "prompt": "x", "max_tokens": -3}}),
       json.dumps({"custom_id": "bad-model", "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}}),
       json.dumps({"custom_id": "no-url", "method": "POST", "body": {}}),
       json.dumps({"custom_id": "streamed", "method": "POST", "url": "/v1/completions",
                   "body": {"model": MODEL, "prompt": "x", "stream": True}})]


def mixed_lines(n_good: int = 24) -> list:
    """Good lines with bad ones between them and one duplicated custom_id (line 3's, again at the end)."""
    items = [line(f"req-{i}", i) for i in range(n_good)]
    for k, bad in enumerate(BAD):
        items.insert(2 + 3 * k, bad)
    items.append(line("req-1", 99))
    return items


def records(*paths: Path) -> list[dict]:
    out = []
    for p in paths:
        if p.exists():
            for raw in p.read_bytes().splitlines():
                out.append(json.loads(raw))
    return out


def comparable(body: dict) -> dict:
    body = {k: v for k, v in body.items() if k not in ("id", "created")}
    body["usage"] = {k: v for k, v in body["usage"].items() if k != "prompt_tokens_details"}
    return body


def answers(path: Path) -> dict[str, dict]:
    """custom_id -> comparable body of every answer; asserts each custom_id answers once."""
    out = {}
    for r in records(path):
        if r["error"] is None:
            assert r["custom_id"] not in out, f"custom_id {r['custom_id']} twice in {path}"
            assert r["response"]["status_code"] == 200 and r["id"].startswith("batch_req_")
            out[r["custom_id"]] = comparable(r["response"]["body"])
    return out


def batch_cmd(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "slurmserve", "batch", str(config), *args]


def run_batch(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(batch_cmd(config, *args), capture_output=True, text=True, timeout=timeout)


def write_config(tmp_path: Path, data: dict, name: str = "dep.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


# ---- files on their own ---------------------------------------------------------------------------

def test_parse_lines_and_scan(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", mixed_lines(6))
    parsed = [bf.parse_line(n, raw) for n, raw in bf.iter_lines(inp)]
    errors = {p.custom_id: p.code for p in parsed if isinstance(p, bf.LineError)}
    assert errors == {None: "invalid_line", "bad-url": "invalid_url", "no-url": "invalid_line",
                      "streamed": "invalid_request"}
    # bodies are checked by the API's own validation at run time, not here
    assert {p.custom_id for p in parsed if isinstance(p, bf.Request)} >= {"bad-body", "bad-model"}
    scan = bf.scan_input(inp)
    assert scan.total == len(mixed_lines(6))
    assert list(scan.dup_ids) == ["req-1"] and len(scan.duplicates) == 1
    assert "duplicate custom_id 'req-1' on lines" in scan.report()[0]


def test_shards_are_disjoint_and_cover(tmp_path, monkeypatch):
    inp = write_jsonl(tmp_path / "in.jsonl", [line(f"r{i}", i) for i in range(11)])
    seen = [n for i in range(3) for n, _ in bf.iter_lines(inp, (i, 3))]
    assert sorted(seen) == list(range(1, 12))
    assert bf.resolve_shard(None, {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4",
                                   "SLURM_ARRAY_TASK_COUNT": "3"}) == (1, 3)
    assert bf.resolve_shard(None, {}) == (0, 1)
    assert bf.shard_path(Path("/x/out.jsonl"), (1, 3)) == Path("/x/out.shard-1-of-3.jsonl")
    for bad in ("3/3", "a/b", "1"):
        with pytest.raises(bf.BatchError, match="expected i/n"):
            bf.parse_shard(bad)


def test_torn_last_line_is_repaired(tmp_path):
    out = tmp_path / "out.jsonl"
    good = bf.ok_record("a", "cmpl-1", b'{"id":"cmpl-1","usage":{"prompt_tokens":1,"completion_tokens":2}}')
    err = bf.error_record(7, None, "invalid_line", "line 7: nope")
    for cut in (1, len(good) // 2, len(good) - 1):      # a crash in the middle of the second record
        out.write_bytes(err + good[:cut])
        store = bf.OutputStore(out)
        assert store.repaired == cut and out.read_bytes() == err
        assert store.done_lines == {7} and store.done_ids == set()
        store.add(good, error=False)
        store.close()
        assert out.read_bytes() == err + good
    # a complete last line that is not a record (torn exactly before its newline... then garbage)
    out.write_bytes(err + b'{"id": "x", "cust\n')
    assert bf.OutputStore(out).repaired > 0 and out.read_bytes() == err
    # corruption in the middle is not silently dropped
    out.write_bytes(b"garbage\n" + err)
    with pytest.raises(bf.BatchError, match=r"out.jsonl:1: not a batch output record"):
        bf.OutputStore(out)


def test_output_is_locked_by_its_writer(tmp_path, tiny_model_dir):
    """One writer at a time: a second store (another run) is refused while the first holds the file,
    with the holder's pid, in one line; `slurmserve batch` says the same before anything starts."""
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    first = bf.OutputStore(out, err)
    try:
        cfg = write_config(tmp_path, sim_config(tiny_model_dir, tmp_path / "logs"))
        inp = write_jsonl(tmp_path / "in.jsonl", [line("a", 0)])
        r = run_batch(cfg, "-i", str(inp), "-o", str(tmp_path / "other.jsonl"), "--errors", str(err))
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
        assert r.stderr.strip() == (f"slurmserve batch: {err}: another run is still writing it (pid "
                                    f"{os.getpid()}); wait for it to end or stop it, then run again")
        assert not (tmp_path / "logs").exists()          # refused before any rank started
        for path in (out, err):
            with pytest.raises(bf.BatchError) as e:
                bf.check_no_writer([path])
            assert str(e.value) == (f"{path}: another run is still writing it (pid {os.getpid()}); "
                                    f"wait for it to end or stop it, then run again")
        with pytest.raises(bf.BatchError, match="another run is still writing it"):
            bf.OutputStore(out)
        first.add(bf.ok_record("a", "cmpl-1", b'{"id":"cmpl-1"}'), error=False)
    finally:
        first.close()
    bf.check_no_writer([out, err, tmp_path / "absent.jsonl"])      # free again
    second = bf.OutputStore(out, err)
    assert second.done_ids == {"a"}
    del second                     # dropped without close(): its lock goes with it
    bf.OutputStore(out).close()


def test_merge_checks_completeness(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [line(f"r{i}", i) for i in range(4)] + ["bad line"])
    out = tmp_path / "out.jsonl"
    rec = {i: bf.ok_record(f"r{i}", f"c{i}", b'{"id":"c"}') for i in range(4)}
    bad = bf.error_record(5, None, "invalid_line", "x")
    shard0, shard1 = bf.shard_path(out, (0, 2)), bf.shard_path(out, (1, 2))
    with pytest.raises(bf.BatchError, match="no shard outputs"):
        bf.merge(inp, out)
    shard0.write_bytes(rec[0] + rec[2])
    with pytest.raises(bf.BatchError, match="shard output.s. 1 of 2 missing"):
        bf.merge(inp, out)
    shard1.write_bytes(rec[1])
    with pytest.raises(bf.BatchError, match=r"2 input line\(s\) without a record: line 4, line 5"):
        bf.merge(inp, out)
    shard1.write_bytes(rec[1] + rec[3] + rec[3])
    shard0.write_bytes(rec[0] + rec[2] + bad)
    with pytest.raises(bf.BatchError, match=r"1 duplicate record\(s\): out.shard-1-of-2.jsonl:3 \(custom_id 'r3'\)"):
        bf.merge(inp, out)
    shard1.write_bytes(rec[1] + rec[3])
    assert bf.merge(inp, out) == {"ok": 4, "failed": 1, "shards": 2, "lines": 5}
    assert sorted(out.read_bytes().splitlines(keepends=True)) == sorted([*rec.values(), bad])


def test_cli_errors_are_one_line(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path, sim_config(tiny_model_dir, tmp_path / "logs"))
    r = run_batch(cfg, "-i", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o.jsonl"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no such file" in r.stderr, r.stderr
    inp = write_jsonl(tmp_path / "in.jsonl", [line("a", 0)])
    r = run_batch(cfg, "-i", str(inp), "-o", str(tmp_path / "o.jsonl"), "--shard", "2/2")
    assert r.returncode == 2 and "--shard '2/2': expected i/n" in r.stderr, r.stderr
    r = run_batch(cfg, "-i", str(inp), "-o", str(tmp_path / "o.jsonl"), "--set", "batch.max_inflight=0")
    assert r.returncode == 2 and "batch.max_inflight" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "slurmserve", "batch", "merge", "-i", str(inp), "-o",
                        str(tmp_path / "o.jsonl")], capture_output=True, text=True)
    assert r.returncode == 2 and "no shard outputs" in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---- real runs (mpirun, simulated engines) ------------------------------------------------------------

@pytest.fixture(scope="module")
def mixed(tiny_model_dir, tmp_path_factory):
    """One uninterrupted run over the mixed file, errors in their own file, in input order."""
    d = tmp_path_factory.mktemp("mixed")
    cfg = write_config(d, sim_config(tiny_model_dir, d / "logs", speedup=20.0))
    inp = write_jsonl(d / "in.jsonl", mixed_lines())
    r = run_batch(cfg, "-i", str(inp), "-o", str(d / "out.jsonl"), "--errors", str(d / "err.jsonl"),
                  "--ordered")
    return d, cfg, inp, r


def test_mixed_good_and_bad_lines(mixed):
    d, _, inp, r = mixed
    assert r.returncode == 0, r.stderr[-4000:]
    # duplicates are reported before the run starts (by the CLI, and again in the head's log)
    assert "duplicate custom_id 'req-1' on lines 2, 31" in r.stderr.split("rank0")[0], r.stderr[:2000]
    summary = json.loads(r.stdout)
    total = len(mixed_lines())
    assert (summary["total"], summary["ok"], summary["failed"], summary["skipped"]) == (total, 24, 7, 0)
    assert summary["complete"] and summary["completion_tokens"] == 24 * 16
    assert summary["prompt_tokens"] > 0 and summary["wall_s"] > 0 and summary["requests_per_s"] > 0
    assert json.loads((d / "out.summary.json").read_text()) == summary
    ok = records(d / "out.jsonl")
    assert [r["custom_id"] for r in ok] == [f"req-{i}" for i in range(24)]          # --ordered
    for rec in ok:
        assert set(rec) == {"id", "custom_id", "response", "error"} and rec["error"] is None
        assert set(rec["response"]) == {"status_code", "request_id", "body"}
        body = rec["response"]["body"]
        assert rec["response"]["request_id"] == body["id"]
        assert body["usage"]["completion_tokens"] == 16 and body["choices"][0]["finish_reason"] == "length"
    errs = {(e["custom_id"], e["error"]["code"], e["error"]["line"]) for e in records(d / "err.jsonl")}
    assert errs == {(None, "invalid_line", 3), ("bad-url", "invalid_url", 6),
                    ("bad-body", "invalid_request_error", 9), ("bad-model", "model_not_found", 12),
                    ("no-url", "invalid_line", 15), ("streamed", "invalid_request", 18),
                    ("req-1", "duplicate_custom_id", 31)}
    by_code = {e["error"]["code"]: e for e in records(d / "err.jsonl")}
    # what the HTTP API answers, as the response (status and body), e.g. an invalid max_tokens
    bad = by_code["invalid_request_error"]["response"]
    assert bad["status_code"] == 400 and bad["body"]["error"]["param"] == "max_tokens"
    assert by_code["model_not_found"]["response"]["status_code"] == 404
    assert by_code["invalid_url"]["response"] is None
    # running it again finds everything done
    r2 = run_batch(d / "dep.yaml", "-i", str(inp), "-o", str(d / "out.jsonl"), "--errors", str(d / "err.jsonl"))
    assert r2.returncode == 0, r2.stderr[-3000:]
    s2 = json.loads(r2.stdout)
    assert (s2["ok"], s2["failed"], s2["skipped"], s2["complete"]) == (0, 0, total, True)
    assert len(records(d / "out.jsonl")) == 24 and len(records(d / "err.jsonl")) == 7


def test_shards_then_merge(mixed, tmp_path):
    d, cfg, inp, _ = mixed
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    summaries = []
    for i in range(2):
        r = run_batch(cfg, "-i", str(inp), "-o", str(out), "--errors", str(err), "--shard", f"{i}/2")
        assert r.returncode == 0, r.stderr[-4000:]
        summaries.append(json.loads(r.stdout))
    assert [s["shard"] for s in summaries] == ["0/2", "1/2"]
    assert sum(s["total"] for s in summaries) == len(mixed_lines())
    r = subprocess.run([sys.executable, "-m", "slurmserve", "batch", "merge", "-i", str(inp), "-o", str(out),
                        "--errors", str(err)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"ok": 24, "failed": 7, "shards": 2, "lines": len(mixed_lines())}
    assert answers(out) == answers(d / "out.jsonl")      # the same answers as the unsharded run
    assert sorted(e["error"]["line"] for e in records(err)) == \
        sorted(e["error"]["line"] for e in records(d / "err.jsonl"))


def _kill_run(config: Path) -> None:
    """SIGKILL every process of the run (the CLI's group and mpirun's, with every rank) at once."""
    pids = processes_matching(str(config))
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    for g in groups:
        try:
            os.killpg(g, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30
    while processes_matching(str(config)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not processes_matching(str(config)), "processes survived SIGKILL"


def test_kill9_at_random_points_resumes_exactly_once(tiny_model_dir, tmp_path):
    n = 60
    items = [line(f"id-{i}", i, max_tokens=32) for i in range(n)]
    inp = write_jsonl(tmp_path / "in.jsonl", items)
    settings = ["--set", "batch.max_inflight=4", "--set", "batch.checkpoint_records=2",
                "--set", "batch.checkpoint_interval_s=0.1"]
    shm_before = shm_files()

    ref_cfg = write_config(tmp_path, sim_config(tiny_model_dir, tmp_path / "ref-logs", speedup=1.0), "ref.yaml")
    r = run_batch(ref_cfg, "-i", str(inp), "-o", str(tmp_path / "ref.jsonl"), *settings)
    assert r.returncode == 0, r.stderr[-4000:]
    reference = answers(tmp_path / "ref.jsonl")
    assert len(reference) == n

    cfg = write_config(tmp_path, sim_config(tiny_model_dir, tmp_path / "logs", speedup=1.0))
    out = tmp_path / "out.jsonl"
    rng = random.Random(1234)
    log = open(tmp_path / "runs.log", "wb")
    progress, scraped = [], None
    try:
        for k in range(10):
            before = len(out.read_bytes().splitlines()) if out.exists() else 0
            proc = subprocess.Popen(batch_cmd(cfg, "-i", str(inp), "-o", str(out), *settings),
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            # a random point: after 1..5 more records were written, or during the start itself
            target = min(before + rng.randint(0, 5), n - 15)
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                size = len(out.read_bytes().splitlines()) if out.exists() else 0
                if size >= target:
                    break
                time.sleep(0.01)
            if k >= 5 and scraped is None and target > before:   # once, while it runs: /metrics
                scraped = scrape(tmp_path / "logs")
            time.sleep(rng.uniform(0, 0.2))   # ... and somewhere inside a checkpoint's write
            assert proc.poll() is None, "the run ended before it was killed: make the file longer"
            _kill_run(cfg)
            proc.wait()
            progress.append(len(records_tolerant(out)))
        r = run_batch(cfg, "-i", str(inp), "-o", str(out), *settings)
        assert r.returncode == 0, r.stderr[-4000:]
    finally:
        log.close()
        _kill_run(cfg)
        for name in shm_files() - shm_before:     # what SIGKILLed MPI jobs leave in /dev/shm
            Path("/dev/shm", name).unlink(missing_ok=True)
    summary = json.loads(r.stdout)
    assert summary["complete"] and summary["skipped"] + summary["ok"] == n
    # kills landed at different points of the run (most after some records, before the end)
    assert len(set(progress)) >= 4 and progress[-1] < n, progress
    assert summary["skipped"] == progress[-1], progress    # every complete record survived
    assert scraped is not None, progress
    assert metric(scraped, "slurmserve:batch_lines") == n
    assert metric(scraped, "slurmserve:batch_records_total", status="skipped") > 0
    assert metric(scraped, "slurmserve:batch_records_total", status="ok") >= 1
    assert metric(scraped, "slurmserve:batch_completion_tokens_total") >= 32
    assert metric(scraped, "slurmserve:batch_requests_in_flight") <= 4
    raw = out.read_bytes()
    assert raw.endswith(b"\n")
    got = answers(out)              # every line parses; each custom_id once (asserted inside)
    assert len(records(out)) == n and got == reference


def test_kill9_of_the_batch_group_then_rerun_at_once_is_exactly_once(tiny_model_dir, tmp_path):
    """`kill -9` of the `slurmserve batch` process group (mpirun has a session of its own, so it is not
    in that group), then the same command at once, 10 times: during the start, or a random moment
    after the head has read the output and begun. The old deployment dies with its parent; a re-run
    that comes while it still writes refuses in one line; every custom_id ends up exactly once."""
    # long enough that a run which outlived its kill would still be writing when the next one starts
    n = 200
    inp = write_jsonl(tmp_path / "in.jsonl", [line(f"id-{i}", i, max_tokens=32) for i in range(n)])
    cfg = write_config(tmp_path, sim_config(tiny_model_dir, tmp_path / "logs", speedup=1.0))
    out, head_log = tmp_path / "out.jsonl", tmp_path / "logs" / "rank-0.log"
    settings = ["--set", "batch.max_inflight=2", "--set", "batch.checkpoint_records=2",
                "--set", "batch.checkpoint_interval_s=0.1"]
    rng = random.Random(20)
    killed, refused, files = [], 0, []

    def heads_started() -> int:     # every run's head logs this once it holds the output
        return head_log.read_text().count("already done, window") if head_log.exists() else 0

    def start(k: int):
        err = open(tmp_path / f"run-{k}.err", "w+")
        files.append(err)
        return subprocess.Popen(batch_cmd(cfg, "-i", str(inp), "-o", str(out), *settings),
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True), err

    def refusal(proc, err) -> bool:
        err.seek(0)
        text = err.read()
        if proc.returncode == 2 and "another run is still writing it" in text:
            assert "Traceback" not in text, text
            if "rank0" not in text:           # the CLI's check, before any rank: one line
                assert text.strip().count("\n") == 0, text
            return True                       # (or the head's own lock, when a killed run was
        return False                          # still starting at the CLI's check)

    try:
        runs = 0
        while len(killed) < 10:
            assert runs < 30, (killed, refused)
            started = heads_started()
            proc, err = start(runs)
            runs += 1
            if len(killed) % 3 == 0:          # somewhere in the start (CLI, mpirun, ranks)
                time.sleep(rng.uniform(0, 3))
            else:                             # a random moment of the run
                deadline = time.monotonic() + 60
                while proc.poll() is None and heads_started() == started and time.monotonic() < deadline:
                    time.sleep(0.01)
                time.sleep(rng.uniform(0, 1.0))
            if proc.poll() is not None:       # came while the last run's ranks were still writing
                assert refusal(proc, err), (proc.returncode, killed, err.seek(0) or err.read()[-3000:])
                refused += 1
                continue                      # and again at once
            os.killpg(proc.pid, signal.SIGKILL)       # the CLI's group only, and at once the next run
            proc.wait()
            killed.append(len(records_tolerant(out)))
        for k in range(runs, runs + 30):      # the last run, also at once: to the end
            proc, err = start(k)
            proc.wait(timeout=120)
            if not refusal(proc, err):
                break
            refused += 1
            time.sleep(0.2)
        err.seek(0)
        assert proc.returncode == 0, (proc.returncode, killed, err.read()[-4000:])
        # nothing of any run is left behind, even of the ones killed with their parent
        deadline = time.monotonic() + 15
        while processes_matching(str(cfg)) and time.monotonic() < deadline:
            time.sleep(0.1)
        leftover = processes_matching(str(cfg))
    finally:
        _kill_run(cfg)
        for f in files:
            f.close()
    assert leftover == [], leftover
    assert len(set(killed)) >= 3, (killed, refused)   # kills at different points of the file
    got = answers(out)              # each custom_id once (asserted inside)
    assert len(records(out)) == n and sorted(got) == sorted(f"id-{i}" for i in range(n))


def scrape(log_dir: Path) -> str:
    info = json.loads((log_dir / "endpoint.json").read_text())
    key = Path(info["api_key_file"]).read_text().strip()
    req = urllib.request.Request(f"http://{info['host']}:{info['port']}/metrics",
                                 headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode()


def records_tolerant(path: Path) -> list[bytes]:
    """Complete lines of a file a killed run may have left torn."""
    if not path.exists():
        return []
    return [ln for ln in path.read_bytes().split(b"\n")[:-1] if ln]


def test_sigterm_abandons_in_flight_work_and_resume_completes(tiny_model_dir, tmp_path):
    """SIGTERM (what `scancel` sends) gives in-flight lines no grace: they are aborted, not recorded
    (no error record either), everything finished is flushed, and the next run does the rest."""
    n, max_tokens = 24, 150
    inp = write_jsonl(tmp_path / "in.jsonl", [line(f"t{i}", i, max_tokens=max_tokens) for i in range(n)])
    cfg = write_config(tmp_path, sim_config(tiny_model_dir, tmp_path / "logs", speedup=1.0))
    out = tmp_path / "out.jsonl"
    settings = ["--set", "batch.max_inflight=4", "--set", "batch.checkpoint_records=1",
                "--set", "runtime.shutdown_grace_s=30"]    # USR2's grace, which SIGTERM must not wait for
    proc = subprocess.Popen(batch_cmd(cfg, "-i", str(inp), "-o", str(out), *settings),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while len(records_tolerant(out)) < 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        head = json.loads((tmp_path / "logs" / "endpoint.json").read_text())["pid"]
        os.kill(head, signal.SIGTERM)
        signalled = time.monotonic()
        stdout, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - signalled
    finally:
        _kill_run(cfg)
    assert proc.returncode == 3, stderr[-4000:]          # lines left for the next run
    assert took < 20, took                                # the 30 s grace was not waited for
    summary = json.loads(stdout)
    assert summary["stopped"] and not summary["complete"], summary
    first = records(out)
    assert 4 <= len(first) < n and all(r["error"] is None for r in first)
    assert "abandoning" in (tmp_path / "logs" / "rank-0.log").read_text()

    r = run_batch(cfg, "-i", str(inp), "-o", str(out), "--set", "batch.max_inflight=8")
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads(r.stdout)["skipped"] == len(first)
    got = records(out)
    assert sorted(rec["custom_id"] for rec in got) == sorted(f"t{i}" for i in range(n))
    assert all(rec["response"]["body"]["usage"]["completion_tokens"] == max_tokens for rec in got)
