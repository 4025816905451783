"""A head with several HTTP front-end processes (router.http_workers > 1) over real mpirun and
simulated engines: they share one port, check one key, answer /metrics for the whole head, drain
together, and one that dies is replaced without losing the deployment."""

from __future__ import annotations

import concurrent.futures as cf
import os
import re
import signal
import threading
import time

import httpx
import psutil
import pytest

from slurmserve.config import DeploymentConfig
from slurmserve.router.frontend_pool import frontend_count
from slurmserve.tools.local_deployment import LocalDeployment
from slurmserve.tools.local_deployment import metric_value as metric
from test_serve_sim import MODEL, sim_config

FRONTENDS = 3


def frontends_config(model_dir, **router):
    cfg = sim_config(model_dir, workers=2)
    cfg["router"] = dict(cfg["router"], http_workers=FRONTENDS, **router)
    return cfg


@pytest.fixture(scope="module")
def dep(tiny_model_dir, tmp_path_factory):
    d = LocalDeployment(tmp_path_factory.mktemp("frontends"), frontends_config(tiny_model_dir)).start()
    yield d
    d.stop()
    d.kill()


def frontend_pids(dep) -> list[int]:
    head = psutil.Process(int(dep.info["pid"]))
    return sorted(p.pid for p in head.children() if "slurmserve.router.frontend" in " ".join(p.cmdline()))


def connections_by_pid(port: int, pids: list[int]) -> dict[int, int]:
    return {pid: sum(1 for c in psutil.Process(pid).net_connections("tcp")
                     if c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED) for pid in pids}


def completion(client: httpx.Client, key: str, max_tokens: int = 8, stream: bool = False) -> httpx.Response:
    return client.post("/v1/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": MODEL, "prompt": "hello there", "max_tokens": max_tokens,
                             "ignore_eos": True, "stream": stream})


def test_the_front_ends_share_the_port_and_all_take_connections(dep):
    pids = frontend_pids(dep)
    assert len(pids) == FRONTENDS
    clients = [httpx.Client(base_url=dep.base, timeout=30) for _ in range(24)]
    try:
        for c in clients:
            r = completion(c, dep.api_key)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 8
        held = connections_by_pid(dep.info["port"], pids)
        assert sum(held.values()) == len(clients)
        assert sum(1 for n in held.values() if n) >= 2, held   # the kernel spread them
    finally:
        for c in clients:
            c.close()


def test_every_front_end_checks_the_key_and_metrics_cover_them_all(dep):
    before = metric(dep.metrics(), "slurmserve:requests_total", finish_reason="length")
    errors_before = metric(dep.metrics(), "slurmserve:http_errors_total", status="401")
    n = 30
    clients = [httpx.Client(base_url=dep.base, timeout=30) for _ in range(n)]
    try:
        with cf.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda c: completion(c, dep.api_key, stream=True), clients))
            refused = list(pool.map(lambda c: completion(c, "sk-wrong"), clients))
        assert all(r.status_code == 200 and r.text.endswith("data: [DONE]\n\n") for r in answers)
        assert {r.status_code for r in refused} == {401}
        assert refused[0].json()["error"]["code"] == "invalid_api_key"
        # Scraped over fresh connections (so through different front ends), the totals are the head's
        scrapes = [httpx.get(dep.base + "/metrics", headers={"Authorization": f"Bearer {dep.api_key}"})
                   for _ in range(6)]
    finally:
        for c in clients:
            c.close()
    for s in scrapes:
        assert s.status_code == 200
        assert metric(s.text, "slurmserve:requests_total", finish_reason="length") == before + n
        assert metric(s.text, "slurmserve:http_errors_total", status="401") == errors_before + n
        assert metric(s.text, "slurmserve:instance_up", instance="0", role="worker") == 1  # the router's own
        assert metric(s.text, "slurmserve:num_requests_running") == 0


def test_a_front_end_that_dies_is_replaced_and_its_requests_aborted(dep):
    pids = frontend_pids(dep)
    victim = pids[0]
    # long answers held open on many connections: some land on the victim
    clients = [httpx.Client(base_url=dep.base, timeout=60) for _ in range(12)]
    results: list = []

    def stream(c):
        try:
            with c.stream("POST", "/v1/completions", headers={"Authorization": f"Bearer {dep.api_key}"},
                          json={"model": MODEL, "prompt": "hello", "max_tokens": 300, "ignore_eos": True,
                                "stream": True}) as r:
                results.append(sum(1 for _ in r.iter_lines()))
        except httpx.HTTPError as e:
            results.append(e)
    threads = [threading.Thread(target=stream, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    deadline = time.time() + 10
    while connections_by_pid(dep.info["port"], [victim])[victim] == 0 and time.time() < deadline:
        time.sleep(0.05)
    assert connections_by_pid(dep.info["port"], [victim])[victim] > 0
    time.sleep(0.5)
    os.kill(victim, signal.SIGKILL)
    for t in threads:
        t.join(60)
    for c in clients:
        c.close()
    cut = [r for r in results if isinstance(r, Exception)]
    assert cut and len(cut) < len(clients), results   # the victim's streams only
    # a new front end takes its place, and the engines were told to drop the victim's requests
    deadline = time.time() + 30
    while (len(frontend_pids(dep)) < FRONTENDS or victim in frontend_pids(dep)) and time.time() < deadline:
        time.sleep(0.1)
    assert len(frontend_pids(dep)) == FRONTENDS and victim not in frontend_pids(dep)
    deadline = time.time() + 10
    while time.time() < deadline:
        text = dep.metrics()
        running = sum(metric(text, "slurmserve:instance_num_requests_running", instance=str(i), role="worker")
                      for i in range(2))
        if running == 0:
            break
        time.sleep(0.2)
    assert running == 0, "requests of the dead front end still run in the engines"
    with httpx.Client(base_url=dep.base, timeout=30) as c:
        assert all(completion(c, dep.api_key).status_code == 200 for _ in range(5))
    assert re.search(rf"HTTP front end \d \(pid {victim}\) exited with code -9; starting it again", dep.output())
    assert re.search(rf"front end \d \(pid {victim}\) is gone: \d+ request\(s\) aborted", dep.output())


def test_sigusr2_drains_every_front_end(tiny_model_dir, tmp_path):
    """Ctrl-C on `serve` sends the head SIGUSR2: requests in flight on every front end finish,
    new ones get 503, and the deployment ends cleanly."""
    cfg = frontends_config(tiny_model_dir)
    cfg["runtime"]["shutdown_grace_s"] = 30
    cfg["engine"]["sim"]["speedup"] = 0.2     # ~30 ms a token: 200 tokens outlast the checks below
    dep = LocalDeployment(tmp_path, cfg).start()
    try:
        pids = frontend_pids(dep)
        clients = [httpx.Client(base_url=dep.base, timeout=60) for _ in range(12)]
        with cf.ThreadPoolExecutor(len(clients)) as pool:
            futures = [pool.submit(completion, c, dep.api_key, 200) for c in clients]
            time.sleep(1.0)
            held = connections_by_pid(dep.info["port"], pids)
            assert sum(1 for n in held.values() if n) >= 2, held
            dep.proc.send_signal(signal.SIGINT)
            time.sleep(1.0)
            late = httpx.post(dep.base + "/v1/completions", headers={"Authorization": f"Bearer {dep.api_key}"},
                              json={"model": MODEL, "prompt": "hi", "max_tokens": 4}, timeout=10)
            answers = [f.result() for f in futures]
        assert late.status_code == 503, late.text
        assert all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 200 for r in answers)
        assert dep.proc.wait(60) == 0, dep.output()
        assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    finally:
        dep.kill()


def test_a_killed_head_leaves_no_front_end_and_its_socket_dir_is_removed_next_time(tiny_model_dir, tmp_path):
    import glob
    import tempfile
    from slurmserve.router.frontend_pool import IPC_DIR_PREFIX
    dep = LocalDeployment(tmp_path, frontends_config(tiny_model_dir)).start()
    head = int(dep.info["pid"])
    pids = frontend_pids(dep)
    mine = glob.glob(os.path.join(tempfile.gettempdir(), f"{IPC_DIR_PREFIX}{head}-*"))
    assert len(mine) == 1 and (os.stat(mine[0]).st_mode & 0o777) == 0o700
    os.kill(head, signal.SIGKILL)
    dep.proc.wait(60)
    deadline = time.time() + 10
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)
    dep.kill()
    assert os.path.isdir(mine[0])          # nobody could clean up after a SIGKILL...
    again = LocalDeployment(tmp_path, frontends_config(tiny_model_dir), name="again").start()
    try:
        assert not os.path.exists(mine[0])   # ...until the next head started
    finally:
        again.stop()
        again.kill()


def test_frontend_count(tiny_model_dir, tmp_path):
    base = {"model": {"path": str(tiny_model_dir)}, "engine": {"kind": "sim"}}
    cfg = DeploymentConfig.model_validate(base)
    assert frontend_count(cfg, env={}) == 1                         # outside Slurm
    assert frontend_count(cfg, env={"SLURM_JOB_ID": "7"}) == min(8, len(os.sched_getaffinity(0)))
    cfg = DeploymentConfig.model_validate(dict(base, router={"http_workers": 5}))
    assert frontend_count(cfg, env={"SLURM_JOB_ID": "7"}) == 5
    cfg = DeploymentConfig.model_validate(dict(base, router={"http_workers": 5},
                                               batch={"input": str(tmp_path / "in.jsonl"),
                                                      "output": str(tmp_path / "out.jsonl")}))
    assert frontend_count(cfg, env={}) == 1     # a batch run sends its lines in-process


def test_the_in_flight_limit_holds_across_front_ends(tiny_model_dir, tmp_path):
    """router.max_concurrent_requests is the deployment's, not each front end's: the router process
    counts every front end's requests."""
    cfg = frontends_config(tiny_model_dir, max_concurrent_requests=2)
    cfg["engine"]["sim"]["speedup"] = 0.2      # long enough to overlap
    with LocalDeployment(tmp_path, cfg) as dep:
        clients = [httpx.Client(base_url=dep.base, timeout=60) for _ in range(8)]
        try:
            with cf.ThreadPoolExecutor(len(clients)) as pool:
                answers = list(pool.map(lambda c: completion(c, dep.api_key, 100), clients))
        finally:
            for c in clients:
                c.close()
    codes = sorted(r.status_code for r in answers)
    assert codes.count(200) >= 2 and codes.count(429) >= 4, codes
    assert all(r.json()["error"]["type"] == "rate_limit_error" for r in answers if r.status_code == 429)
