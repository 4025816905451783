"""Fixtures shared by the test files."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny random-weight Llama (ascii BPE tokenizer, ChatML template), built once a session."""
    from slurmserve.runtime.tiny_model import make_tiny_model

    d = tmp_path_factory.mktemp("tiny-model")
    make_tiny_model(d)
    return d
