"""Messages between the ranks of one engine instance (its MPI sub-communicator): the leader talks
to its followers, and a waiting rank stays interruptible. A blocking MPI receive could not be
interrupted by a signal or a stop, so a receiver polls."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

POLL_S = 0.05              # how often a waiting rank checks for a message or a stop


def recv(comm, source: int, tag: int, stop: threading.Event, timeout_s: float | None = None,
         alive: Callable[[], bool] | None = None) -> Any:
    """A message from `source`, or None once `stop` is set, after `timeout_s`, or when `alive()`
    turns false."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not stop.is_set():
        if comm.Iprobe(source=source, tag=tag):
            return comm.recv(source=source, tag=tag)
        if deadline is not None and time.monotonic() > deadline:
            return None
        if alive is not None and not alive():
            return None
        time.sleep(POLL_S)
    return None


def send_to_followers(comm, msg: Any, tag: int) -> None:
    for r in range(1, comm.Get_size()):
        comm.send(msg, dest=r, tag=tag)
