"""pytest hooks that make the test process end once pytest has reported, even when a thread or a
child process would hold it: Python's exit joins every executor thread and every non-daemon child,
so one engine start stuck in a thread (a vLLM core that never sends its ready message) would hold
CI until its time limit, long after the summary was printed. Loaded by conftest.py; also usable
as `-p exit_guard`."""

from __future__ import annotations

import os

import pytest

# how long a normal exit may take before it is forced; tests of this guard shorten it
_EXIT_GRACE_S = float(os.environ.get("SLURMSERVE_TEST_EXIT_GRACE_S", "60"))


def pytest_sessionfinish(session, exitstatus):
    session.config._slurmserve_exitstatus = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """A daemon timer gives the normal exit a grace period, then names what is stuck, kills the
    leftover children and exits with pytest's own status."""
    import sys
    import threading

    status = getattr(config, "_slurmserve_exitstatus", 1)

    def force_exit() -> None:
        import psutil

        stuck = [t.name for t in threading.enumerate()
                 if t is not threading.current_thread() and t.is_alive() and not t.daemon]
        children = psutil.Process().children(recursive=True)
        sys.stderr.write(f"\ntest process still alive {_EXIT_GRACE_S:.0f} s after the session: "
                         f"threads {stuck}, children {[p.pid for p in children]}; forcing exit {status}\n")
        for p in children:
            try:
                p.kill()
            except psutil.Error:
                pass
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(status)

    timer = threading.Timer(_EXIT_GRACE_S, force_exit)
    timer.daemon = True
    timer.start()
