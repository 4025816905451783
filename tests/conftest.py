"""Fixtures shared by the test files."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny random-weight Llama (ascii BPE tokenizer, ChatML template), built once a session."""
    from slurmserve.tools.tiny_model import make_tiny_model

    d = tmp_path_factory.mktemp("tiny-model")
    make_tiny_model(d)
    return d


@pytest.fixture(scope="module", autouse=True)
def _report_leftover_processes(request):
    """Name a test module that leaves child processes running: they would outlive it and confuse
    later modules' checks that an engine reaps what it started."""
    import warnings

    import psutil

    before = set(psutil.Process().children(recursive=True))
    yield
    left = []
    for p in psutil.Process().children(recursive=True):
        if p not in before:
            try:
                cmd = " ".join(p.cmdline())
            except psutil.Error:   # ended meanwhile
                continue
            # the first spawn-context child starts multiprocessing's resource tracker, which by
            # design lives as long as the test process; it is not a process a test left behind
            if "multiprocessing.resource_tracker" not in cmd:
                left.append(f"{p.pid} {cmd[:160]}")
    if left:
        warnings.warn(f"{request.module.__name__} left child processes: {left}")


# A pytest that would not end once it has reported ends anyway (see exit_guard).
from exit_guard import pytest_sessionfinish, pytest_unconfigure  # noqa: E402,F401
