"""Scratch directories named for the process that made them, and their removal once it is gone.

A rank or a `serve` that is killed (SIGKILL, the OOM killer, a node reboot) cannot clean up after
itself; the next one to start in the same place does, by the pid in each directory's name.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # someone else's: alive
        return True
    return True


def remove_stale_dirs(base: Path, prefix: str) -> None:
    """Remove directories `<prefix><pid>` or `<prefix><pid>-...` in `base` that this user owns and
    whose process has gone."""
    uid = os.getuid()
    for d in Path(base).glob(f"{prefix}*"):
        pid = d.name[len(prefix):].partition("-")[0]
        try:
            if not pid.isdigit() or d.stat().st_uid != uid or pid_alive(int(pid)):
                continue
        except OSError:
            continue
        shutil.rmtree(d, ignore_errors=True)
