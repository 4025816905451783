"""A handle on a local deployment (`slurmserve serve` in a subprocess): start, wait ready, client, stop.

Tests and `slurmserve bench scenario` use it to run real deployments (mpirun and every rank).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml


def metric_value(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` in Prometheus text whose labels match; a label value may be a
    compiled regex."""
    total = 0.0
    for m in re.finditer(r"^(\S+?)(?:\{(.*)\})? (\S+)$", text, re.M):
        if m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(k in have and (v.fullmatch(have[k]) if isinstance(v, re.Pattern) else have[k] == str(v))
               for k, v in labels.items()):
            total += float(m.group(3))
    return total


def shm_files() -> set[str]:
    """Shared-memory files an MPI job could leave behind (Open MPI, PMIx)."""
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith(("vader_segment", "ompi", "pmix", "sm_segment"))}
    except FileNotFoundError:
        return set()


def processes_matching(needle: str) -> list[int]:
    """PIDs whose command line contains `needle` (a path unique to one deployment)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline and int(entry.name) != os.getpid():
            pids.append(int(entry.name))
    return pids


class LocalDeployment:
    def __init__(self, workdir: Path, config: dict, name: str = "dep"):
        self.dir = Path(workdir).resolve() / name   # the config below resolves paths against its own folder
        self.dir.mkdir(parents=True, exist_ok=True)
        config = dict(config, log_dir=str(self.dir / "logs"))
        self.config_path = self.dir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log = open(self.dir / "serve.log", "wb")
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}

    def launch(self) -> LocalDeployment:
        """Start `slurmserve serve` without waiting for it (`start` waits until it serves)."""
        self.proc = subprocess.Popen([sys.executable, "-m", "slurmserve", "serve", str(self.config_path)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def start(self, timeout: float = 120) -> LocalDeployment:
        self.launch()
        endpoint = self.dir / "logs" / "endpoint.json"
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}:\n{self.output()}")
            if endpoint.exists() and self.health() == 200:
                self.info = json.loads(endpoint.read_text())
                return self
            time.sleep(0.1)
        self.kill()   # leave nothing running behind a failed start
        raise TimeoutError(f"deployment not ready after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return (self.dir / "serve.log").read_text(errors="replace")[-6000:]

    @property
    def api_key(self) -> str:
        return Path(self.info["api_key_file"]).read_text().strip()

    @property
    def base(self) -> str:
        info = self.info or json.loads((self.dir / "logs" / "endpoint.json").read_text())
        return f"http://{info['host']}:{info['port']}"

    def health(self) -> int:
        try:
            with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (OSError, KeyError, ValueError):
            return 0

    def client(self, **kw):
        from openai import OpenAI   # the openai SDK is a test/bench extra, not a base dependency
        return OpenAI(base_url=self.info["url"], api_key=self.api_key, max_retries=0, **kw)

    def metrics(self) -> str:
        req = urllib.request.Request(self.base + "/metrics",
                                     headers={"Authorization": f"Bearer {self.api_key}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.read().decode()

    def pids(self) -> list[int]:
        return processes_matching(str(self.config_path))

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.log.close()

    def kill(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> LocalDeployment:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self.kill()
