"""The login-node gateway (`slurmserve gateway`) on the test cluster: real Slurm jobs (simulated
engines on the tiny model), a real gateway process, the openai client.

One gateway and three deployments (`tiny-a` twice, `tiny-b`) serve the whole module; `tiny-c` is launched on
demand by the first request for it and stopped again when idle; `tiny-d`'s on-demand config asks for
a partition that does not exist. A second unix user, created here, tries to get at all of it.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import yaml
from openai import OpenAI

from slurmserve.tools.local_deployment import metric_value

pytestmark = pytest.mark.slurm

OTHER_USER = "ssgwother"


def _config(model_dir: Path, home: Path, name: str, speedup: float, tag: str = "", **extra) -> Path:
    data = {
        "model": {"path": str(model_dir), "name": name, "max_model_len": 512},
        "engine": {"kind": "sim", "sim": {"speedup": speedup, "num_kv_blocks": 256, "block_size": 16}},
        "pools": {"workers": 1},
        "router": {"port": 0},
        "runtime": {"heartbeat_interval_s": 0.25, "heartbeat_timeout_s": 1.5, "shutdown_grace_s": 5},
        "log_dir": str(home / f"logs-{name}{tag}"),
        **extra,
    }
    path = home / f"{name}{tag}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slurmserve", *args], capture_output=True, text=True,
                          timeout=timeout)


def _squeue_state(job: str) -> str:
    r = subprocess.run(["squeue", "-h", "--states=all", "-j", job, "-o", "%T"], capture_output=True, text=True)
    return r.stdout.strip()


def _until(cond, timeout: float, what: str, poll: float = 0.25):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(poll)
    raise AssertionError(f"{what}: not within {timeout:g} s")


class Gateway:
    def __init__(self, home: Path, state: Path, args: list[str]):
        self.state = state
        self.log_path = home / "gateway.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "slurmserve", "gateway", "--port", "0", *args],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        info_path = state / "gateway.json"

        def up():
            assert self.proc.poll() is None, self.output()
            if info_path.exists():
                info = json.loads(info_path.read_text())
                return info if info["pid"] == self.proc.pid else None
        self.info = _until(up, 60, "the gateway listens")
        self.url = self.info["url"]
        self.base = self.url.removesuffix("/v1")
        self.key = Path(self.info["api_key_file"]).read_text().strip()

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def client(self, key: str | None = None, **kw) -> OpenAI:
        return OpenAI(base_url=self.url, api_key=key or self.key, max_retries=0, timeout=kw.pop("timeout", 120), **kw)

    def get(self, path: str, key: str | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.base + path, headers={"Authorization": f"Bearer {key}"} if key else {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def gw(tiny_model_dir):
    """Three jobs (tiny-a twice, tiny-b) and the gateway, in a registry of this module's own."""
    r = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    assert r.returncode == 0 and any(s in r.stdout for s in ("idle", "mix")), \
        f"the test cluster is not up (tests/cluster/start.sh): {r.stderr}"
    # A home the other user may enter (like /home/<user>), so only the state dir's own mode protects it.
    home = Path(tempfile.mkdtemp(prefix="slurmserve-gw-"))
    home.chmod(0o755)
    model_dir = home / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    for p in [model_dir, *model_dir.iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    state = home / "state"
    mp = pytest.MonkeyPatch()
    mp.setenv("SLURMSERVE_STATE_DIR", str(state))
    cfg_a = _config(model_dir, home, "tiny-a", speedup=1.0)
    cfg_a2 = _config(model_dir, home, "tiny-a", speedup=1.0, tag="-2")
    cfg_b = _config(model_dir, home, "tiny-b", speedup=1.0)
    cfg_c = _config(model_dir, home, "tiny-c", speedup=20.0)
    cfg_d = _config(model_dir, home, "tiny-d", speedup=20.0, slurm={"partition": "nosuchpartition"})
    jobs = {}
    gateway = None
    try:
        for name, cfg in (("tiny-a", cfg_a), ("tiny-a-2", cfg_a2), ("tiny-b", cfg_b)):
            r = _cli("submit", str(cfg), "--time", "15")
            assert r.returncode == 0, r.stderr
            jobs[name] = r.stdout.strip()
        for name, job in jobs.items():
            r = _cli("wait", job, "--timeout", "150")
            assert r.returncode == 0, r.stderr + _cli("logs", job).stdout
        gateway = Gateway(home, state, ["--queue-timeout", "150", "--poll-interval", "0.5", "--idle-stop", "2",
                                        "--launch-on-demand", f"tiny-c={cfg_c}",
                                        "--launch-on-demand", f"tiny-d={cfg_d}"])
        gateway.home, gateway.jobs = home, jobs
        yield gateway
    finally:
        if gateway is not None:
            gateway.stop()
        from slurmserve import registry
        ids = [e["job_id"] for e in registry.list_entries()]
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True)
            for job in ids:
                _until(lambda: _squeue_state(job) in ("", "CANCELLED", "COMPLETED", "FAILED", "TIMEOUT"),
                       60, f"job {job} ends")
        mp.undo()
        shutil.rmtree(home, ignore_errors=True)


def test_routes_by_model_and_lists_the_union(gw):
    c = gw.client()
    assert sorted(m.id for m in c.models.list().data) == ["tiny-a", "tiny-b"]
    r = c.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                  extra_body={"ignore_eos": True})
    assert r.model == "tiny-a" and r.usage.completion_tokens == 6
    r = c.completions.create(model="tiny-b", prompt="hello", max_tokens=3, extra_body={"ignore_eos": True})
    assert r.model == "tiny-b" and r.usage.completion_tokens == 3
    # a stream passes through whole: every chunk, the usage chunk, the end
    chunks = list(c.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=8, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert {ch.model for ch in chunks} == {"tiny-a"}
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-2].choices[0].finish_reason == "length"
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="tiny-zzz", prompt="x", max_tokens=1)
    assert e.value.body["code"] == "model_not_found"
    status, text = gw.get("/metrics", gw.key)
    assert status == 200
    text = text.decode()
    b = gw.jobs["tiny-b"]
    assert metric_value(text, "slurmserve_gateway:requests_total", model="tiny-a", status="200") == 2
    assert metric_value(text, "slurmserve_gateway:requests_total", job=b, model="tiny-b", status="200") == 1
    assert metric_value(text, "slurmserve_gateway:request_latency_seconds_count", model="tiny-a") == 2
    assert metric_value(text, "slurmserve_gateway:job_ready", job=b) == 1
    assert "slurmserve_gateway:queue_depth 0.0" in text
    status, body = gw.get("/health")
    assert status == 200 and json.loads(body)["jobs_ready"] == 3


def _streams(c: OpenAI, n: int, max_tokens: int, started: threading.Barrier | None = None) -> tuple[list, list]:
    """n concurrent streamed tiny-a requests in threads; each result is its finish reason or its error."""
    results: list = [None] * n

    def go(i):
        count, finish = 0, None
        try:
            for ch in c.completions.create(model="tiny-a", prompt=f"story {i}", max_tokens=max_tokens,
                                           stream=True, extra_body={"ignore_eos": True}):
                count += 1
                finish = ch.choices[0].finish_reason if ch.choices else finish
                if count == 1 and started is not None:
                    started.wait(60)
            results[i] = finish
        except Exception as e:           # noqa: BLE001 - asserted on by the caller
            results[i] = e
    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results


def test_jobs_of_one_model_share_by_outstanding_requests(gw):
    """Four concurrent streams for tiny-a: two on each of its jobs (each stream takes > 1 s)."""
    a, a2 = gw.jobs["tiny-a"], gw.jobs["tiny-a-2"]
    text = gw.get("/metrics", gw.key)[1].decode()
    before = [metric_value(text, "slurmserve_gateway:requests_total", job=j, status="200") for j in (a, a2)]
    threads, results = _streams(gw.client(), 4, 200)
    for t in threads:
        t.join(120)
    assert results == ["length"] * 4, results
    text = gw.get("/metrics", gw.key)[1].decode()
    after = [metric_value(text, "slurmserve_gateway:requests_total", job=j, status="200") for j in (a, a2)]
    assert [x - y for x, y in zip(after, before)] == [2, 2]


def test_head_killed_mid_stream_ends_its_stream_with_an_error_event(gw):
    """SIGKILL to the head of one tiny-a job while two streams run, one on each job: the head
    sends nothing more, so the gateway ends that stream with an OpenAI error event; the other stream
    and new requests are served by the other job."""
    a, a2 = gw.jobs["tiny-a"], gw.jobs["tiny-a-2"]
    started = threading.Barrier(3)
    threads, results = _streams(gw.client(timeout=60), 2, 400, started)
    started.wait(60)                      # both streams have their first chunk
    head_pid = json.loads((gw.home / "logs-tiny-a-2" / "endpoint.json").read_text())["pid"]
    os.kill(head_pid, signal.SIGKILL)      # the test cluster's nodes are this host: a node failure
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "a stream hangs"
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(errors) == 1 and "length" in results, results
    assert isinstance(errors[0], openai.APIError) and not isinstance(errors[0], openai.APIConnectionError)
    assert f"job {a2} serving `tiny-a`" in str(errors[0]) and "middle of the response" in str(errors[0])
    r = gw.client().completions.create(model="tiny-a", prompt="next", max_tokens=3, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3
    subprocess.run(["scancel", a2], check=True)
    _until(lambda: _squeue_state(a2) in ("", "FAILED", "CANCELLED", "COMPLETED"), 60, f"job {a2} ends")
    text = gw.get("/metrics", gw.key)[1].decode()
    assert metric_value(text, "slurmserve_gateway:upstream_errors_total", job=a2, kind="broken") == 1
    assert metric_value(text, "slurmserve_gateway:requests_total", job=a, status="200") >= 3


def test_wrong_or_missing_key_gets_401(gw):
    with pytest.raises(openai.AuthenticationError) as e:
        gw.client(key="sk-gw-wrong").chat.completions.create(
            model="tiny-a", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    for key in (None, "sk-gw-wrong"):
        status, body = gw.get("/v1/models", key)
        err = json.loads(body)["error"]
        assert status == 401 and err["code"] == "invalid_api_key" and err["type"] and err["message"]
    # the job's own secret is not the gateway's key
    from slurmserve import registry
    assert gw.get("/v1/models", registry.read_entry(gw.jobs["tiny-a"])["api_key"])[0] == 401


def _other_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(OTHER_USER)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER_USER], check=True)
        return pwd.getpwnam(OTHER_USER)


def _as_other(*cmd: str) -> subprocess.CompletedProcess:
    u = _other_user()
    return subprocess.run(list(cmd), user=u.pw_uid, group=u.pw_gid, extra_groups=[], capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": "/"})


def _curl_status(url: str, key: str | None = None, data: str | None = None) -> tuple[int, str]:
    cmd = ["curl", "-s", "-w", "\n%{http_code}", url]
    if key:
        cmd += ["-H", f"Authorization: Bearer {key}"]     # in this test's argv only: a wrong key
    if data:
        cmd += ["-H", "content-type: application/json", "-d", data]
    r = _as_other(*cmd)
    body, _, code = r.stdout.rpartition("\n")
    return int(code), body


def test_another_user_gets_nothing(gw):
    from slurmserve import registry
    job = gw.jobs["tiny-a"]
    entry = registry.read_entry(job)
    state = gw.state
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for p in (registry.entry_path(job), state / "gateway_key"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    # cannot read the registry, the gateway key or the job's key file
    for cmd in (["ls", str(state / "jobs")], ["cat", str(registry.entry_path(job))],
                ["cat", str(state / "gateway_key")], ["cat", str(Path(entry["log_dir"]) / "api_key")]):
        r = _as_other(*cmd)
        assert r.returncode != 0 and "Permission denied" in r.stderr, (cmd, r.stdout, r.stderr)
    body = json.dumps({"model": "tiny-a", "prompt": "hi", "max_tokens": 2})
    # cannot call the head without the job's secret
    for key in (None, "sk-guess"):
        code, text = _curl_status(entry["url"] + "/completions", key, body)
        assert code == 401 and json.loads(text)["error"]["code"] == "invalid_api_key", text
    # cannot use the first user's gateway
    for key in (None, "sk-gw-guess"):
        code, text = _curl_status(gw.url + "/completions", key, body)
        assert code == 401 and json.loads(text)["error"]["code"] == "invalid_api_key", text
        code, text = _curl_status(gw.url + "/models", key)
        assert code == 401 and "tiny-a" not in text
    # no secret in any process's command line, nor in the gateway's log
    secrets = [gw.key] + [e["api_key"] for e in registry.list_entries() if e.get("api_key")]
    assert len(secrets) >= 3
    for entry_dir in Path("/proc").iterdir():
        try:
            cmd = (entry_dir / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        assert not any(s in cmd for s in secrets), f"a secret in the command line of pid {entry_dir.name}"
    assert not any(s in gw.output() for s in secrets)


def test_launch_on_demand_answers_once_ready_then_stops_when_idle(gw):
    from slurmserve import registry
    before = {e["job_id"] for e in registry.list_entries()}
    r = gw.client(timeout=170).completions.create(model="tiny-c", prompt="wake up", max_tokens=4,
                                                  extra_body={"ignore_eos": True})
    assert r.model == "tiny-c" and r.usage.completion_tokens == 4
    new = [e for e in registry.list_entries() if e["job_id"] not in before]
    assert [(e["model"], e["launcher"]) for e in new] == [("tiny-c", "sbatch")]
    job = new[0]["job_id"]
    assert "tiny-c" in [m.id for m in gw.client().models.list().data]
    # --idle-stop 2: the gateway drains and cancels the job it launched
    _until(lambda: (registry.read_entry(job) or {}).get("status") == "exited", 120, f"idle job {job} stopped")
    _until(lambda: _squeue_state(job) in ("", "COMPLETED", "CANCELLED"), 60, f"job {job} ends")
    assert f"job {job} (tiny-c): idle" in gw.output()
    # a launch Slurm refuses is a clear 503, not a hang
    with pytest.raises(openai.InternalServerError) as e:
        gw.client().completions.create(model="tiny-d", prompt="x", max_tokens=1)
    assert e.value.status_code == 503 and e.value.body["code"] == "launch_failed"
    assert "nosuchpartition" in e.value.body["message"]


def test_job_cancelled_mid_stream(gw):
    """scancel of tiny-b while it streams: that client gets an OpenAI error event and the end of the
    stream; tiny-a keeps serving throughout; new tiny-b requests get a 503 saying why."""
    job_b = gw.jobs["tiny-b"]
    c = gw.client(timeout=60)
    got_chunks = threading.Event()
    outcome: dict = {}

    def stream_b():
        n = 0
        try:
            for ch in c.completions.create(model="tiny-b", prompt="a long story", max_tokens=400, stream=True,
                                           extra_body={"ignore_eos": True}):
                n += 1
                if n == 3:
                    got_chunks.set()
            outcome["result"] = f"finished after {n} chunks"
        except Exception as e:          # noqa: BLE001 - asserted on below
            outcome["result"] = e
        outcome["chunks"] = n
        got_chunks.set()

    served_a: list = []
    stop_a = threading.Event()

    def keep_a():
        while not stop_a.is_set():
            try:
                r = c.completions.create(model="tiny-a", prompt="still there?", max_tokens=2,
                                         extra_body={"ignore_eos": True})
                served_a.append(r.usage.completion_tokens)
            except Exception as e:      # noqa: BLE001
                served_a.append(e)

    t_b, t_a = threading.Thread(target=stream_b), threading.Thread(target=keep_a)
    t_b.start()
    t_a.start()
    try:
        assert got_chunks.wait(60), "no chunks from tiny-b"
        assert "result" not in outcome, outcome
        subprocess.run(["scancel", job_b], check=True)
        t_b.join(90)
        assert not t_b.is_alive(), "the stream hangs"
        n_before = len(served_a)
        _until(lambda: "tiny-b" not in [m.id for m in c.models.list().data], 60, "tiny-b leaves /v1/models")
        _until(lambda: len(served_a) > n_before + 3, 60, "tiny-a serves after the cancel")
    finally:
        stop_a.set()
        t_a.join(60)
    err = outcome["result"]
    assert isinstance(err, openai.APIError) and not isinstance(err, openai.APIConnectionError), repr(err)
    print("mid-stream error:", repr(err))
    assert 3 <= outcome["chunks"] < 400
    assert served_a and all(x == 2 for x in served_a), served_a
    with pytest.raises(openai.InternalServerError) as e:
        c.completions.create(model="tiny-b", prompt="x", max_tokens=1)
    assert e.value.status_code == 503 and e.value.body["code"] == "no_job_for_model"
    assert f"job {job_b}" in e.value.body["message"]
    status, text = gw.get("/metrics", gw.key)
    assert metric_value(text.decode(), "slurmserve_gateway:job_ready", job=job_b) == 0


def test_gateway_refuses_a_port_out_of_range():
    p = subprocess.run([sys.executable, "-m", "slurmserve", "gateway", "--port", "70000"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "must be a port, 0 to 65535" in p.stderr and "Traceback" not in p.stderr
