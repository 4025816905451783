"""The test process ends once pytest has reported, even when an executor thread is stuck (as a
vLLM engine start once was in CI, which then held the run for an hour after its summary) or a
child process was left running."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil

STUCK = '''
import concurrent.futures, subprocess, threading, pathlib

def test_leaves_a_stuck_thread_and_a_child(tmp_path):
    pool = concurrent.futures.ThreadPoolExecutor(1)
    pool.submit(threading.Event().wait)          # joined at interpreter exit: never returns
    child = subprocess.Popen(["sleep", "600"])
    pathlib.Path(CHILD_PID_FILE).write_text(str(child.pid))
'''


def test_a_stuck_thread_does_not_hold_the_test_process(tmp_path):
    pid_file = tmp_path / "child.pid"
    test_file = tmp_path / "test_stuck.py"
    test_file.write_text(f"CHILD_PID_FILE = {str(pid_file)!r}\n" + STUCK)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent), SLURMSERVE_TEST_EXIT_GRACE_S="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "exit_guard", "-p", "no:cacheprovider",
                          "--rootdir", str(tmp_path), str(test_file)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed" in run.stdout
    assert "forcing exit 0" in run.stderr and "ThreadPoolExecutor" in run.stderr
    child = int(pid_file.read_text())
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
