"""A model of a slow shared filesystem: a read-only FUSE mirror of a directory whose reads, by all
readers together, never exceed a fixed bandwidth.

    python -m slurmserve.bench.throttle_fs SRC MOUNTPOINT --mb-per-s 100     # foreground; Ctrl-C unmounts

Why FUSE and not a throttle in the reader: the staging code reads an ordinary path and knows
nothing of the limit, and the limit is shared, as a parallel filesystem's is, so nodes that read
at once divide it (a `pv -L` per reader would give each reader the full rate). `direct_io` sends
every read to this process, so the kernel page cache, shared by every "node" of the single-host
test cluster, cannot serve a second node's read for free. Needs libfuse2 (apt `libfuse2`) and
`fusepy` (pip), as root or with /dev/fuse access; bench-only, not a dependency of slurmserve.
"""

from __future__ import annotations

import argparse
import errno
import os
import threading
import time


class Throttle:
    """One pipe of `rate` bytes/s that every read goes through in turn (first come, first served)."""

    def __init__(self, rate: float):
        self.rate = rate
        self.lock = threading.Lock()
        self.free_at = 0.0

    def take(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            done = max(now, self.free_at) + n / self.rate
            self.free_at = done
        delay = done - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def make_ops(src: str, throttle: Throttle):
    from fuse import FuseOSError, Operations

    class Mirror(Operations):
        def _real(self, path: str) -> str:
            return os.path.join(src, path.lstrip("/"))

        def getattr(self, path, fh=None):
            try:
                st = os.lstat(self._real(path))
            except OSError as e:
                raise FuseOSError(e.errno) from None
            return {k: getattr(st, k) for k in ("st_mode", "st_size", "st_uid", "st_gid", "st_nlink",
                                                "st_atime", "st_mtime", "st_ctime")}

        def readdir(self, path, fh):
            return [".", ".."] + os.listdir(self._real(path))

        def open(self, path, flags):
            if flags & (os.O_WRONLY | os.O_RDWR):
                raise FuseOSError(errno.EROFS)
            return os.open(self._real(path), os.O_RDONLY)

        def read(self, path, size, offset, fh):
            data = os.pread(fh, size, offset)
            throttle.take(len(data))
            return data

        def release(self, path, fh):
            os.close(fh)

        def statfs(self, path):
            st = os.statvfs(self._real(path))
            return {k: getattr(st, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
                                                "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")}

    return Mirror()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("mountpoint")
    ap.add_argument("--mb-per-s", type=float, required=True, help="aggregate read bandwidth (1 MB = 1e6 B)")
    a = ap.parse_args(argv)
    from fuse import FUSE
    FUSE(make_ops(os.path.abspath(a.src), Throttle(a.mb_per_s * 1e6)), a.mountpoint, foreground=True,
         ro=True, direct_io=True, allow_other=True, nothreads=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
