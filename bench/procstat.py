"""CPU time of process trees, read from /proc: how the head's per-request cost is measured."""

from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def tree(pid: int) -> list[int]:
    """pid and all its descendants alive now."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK   # utime, stime


class CpuSampler:
    """CPU seconds spent by named process trees between start() and stop()."""

    def __init__(self, roots: dict[str, int]):
        self.roots = roots
        self._start: dict[str, dict[int, float]] = {}
        self.seconds: dict[str, float] = {}
        self.own_seconds: dict[str, float] = {}     # each root process alone, without its children

    def _snapshot(self) -> dict[str, dict[int, float]]:
        return {name: {p: cpu_seconds(p) for p in tree(pid)} for name, pid in self.roots.items()}

    def start(self) -> None:
        self._start = self._snapshot()

    def stop(self) -> dict[str, float]:
        end = self._snapshot()
        self.seconds = {name: sum(t - self._start[name].get(p, 0.0) for p, t in end[name].items())
                        for name in self.roots}
        self.own_seconds = {name: end[name].get(pid, 0.0) - self._start[name].get(pid, 0.0)
                            for name, pid in self.roots.items()}
        return self.seconds
