"""Stage the model to each node's local disk once, over MPI, before any engine loads it.

Every rank calls `stage_weights(cfg, comm)` right after bootstrap; it returns the directory this
rank loads from. With `model.stage: broadcast` the lowest rank of each node (its leader) keeps a
copy: file i is read from the shared filesystem by one leader only (i mod nodes, so reads spread
over nodes) and fanned out in chunks with MPI_Bcast into preallocated buffers. `node-local` has
every leader read the source itself (the baseline the broadcast is measured against); `none`
loads from `model.path`.

A copy is written under a temporary name, checked (each receiver's sha256 of a file must equal its
reader's), given a manifest and only then renamed into place, so a partial copy is never used. A
requeued job finds the manifest, compares it with a stat of the source (names, sizes, mtimes),
checks the local sizes, and reuses the copy without reading the source.

Every failure is agreed on by all ranks before anyone raises (a rank that raised alone would leave
the others blocked in a collective): all ranks raise the same one-line `StageError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from slurmserve.stale_dirs import remove_stale_dirs

log = logging.getLogger("slurmserve.stage")

MANIFEST = ".slurmserve-manifest.json"
MANIFEST_FORMAT = 1
PROGRESS_FILE = "stage-progress.json"
CHUNK_BYTES = 64 << 20          # per MPI_Bcast; three such buffers per node leader
PROGRESS_INTERVAL_S = 2.0
GB = 1e9


class StageError(RuntimeError):
    """Staging cannot go on; the same one-line message is raised on every rank."""


@dataclass(frozen=True)
class SourceFile:
    path: str          # relative to the model directory
    size: int
    mtime_ns: int


def list_source(root: Path) -> list[SourceFile]:
    """Every regular file under the model directory (symlinks followed, as in a Hugging Face
    snapshot), sorted. Hidden names (.cache/, lock files, our own manifest) are left out."""
    if not root.is_dir():
        raise StageError(f"model.path {root}: not a directory")
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            full = Path(dirpath) / name
            st = full.stat()
            out.append(SourceFile(str(full.relative_to(root)), st.st_size, st.st_mtime_ns))
    if not out:
        raise StageError(f"model.path {root}: no files to stage")
    return sorted(out, key=lambda f: f.path)


def resolve_mode(stage: str, n_nodes: int) -> str:
    if stage == "auto":
        return "broadcast" if n_nodes > 1 else "none"
    return stage


def stage_root(stage_dir: str | None) -> Path:
    """The node-local directory: model.stage_dir, else $SLURMSERVE_STAGE_DIR, else $TMPDIR, else /tmp;
    $VARS and ~ expanded here, on the node."""
    env = os.environ
    raw = stage_dir or env.get("SLURMSERVE_STAGE_DIR") or env.get("TMPDIR") or "/tmp"
    expanded = os.path.expanduser(os.path.expandvars(raw))
    if "$" in expanded or not os.path.isabs(expanded):
        raise StageError(f"model.stage_dir {raw!r} is {expanded!r} on {socket.gethostname()}: "
                         f"not an absolute path (unset variable?)")
    return Path(expanded)


def local_target(root: Path, source: Path) -> Path:
    """<root>/slurmserve-stage-<uid>/<hash of the source path>/<source dir name>: the name is kept,
    so the served model name (the directory name by default) does not change."""
    key = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:16]
    return root / f"slurmserve-stage-{os.getuid()}" / key / source.name


def valid_copy(target: Path, files: list[SourceFile]) -> dict | None:
    """The manifest of a complete copy of exactly these source files, or None."""
    try:
        manifest = json.loads((target / MANIFEST).read_text())
        if manifest.get("format") != MANIFEST_FORMAT:
            return None
        listed = [SourceFile(f["path"], f["size"], f["mtime_ns"]) for f in manifest["files"]]
        if listed != files:
            return None
        for f in files:
            if (target / f.path).stat().st_size != f.size:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest


# ---- progress (rank 0) ---------------------------------------------------------------------------

class Progress:
    """Log lines (GB done, GB/s, ETA) and `<log_dir>/stage-progress.json` for `slurmserve status`."""

    def __init__(self, log_dir: Path | None, mode: str, total: int, n_files: int, nodes: int, target: Path):
        self.path = log_dir / PROGRESS_FILE if log_dir is not None else None
        self.info = dict(state="checking", mode=mode, bytes_total=total, bytes_done=0, files_total=n_files,
                         files_done=0, nodes=nodes, target=str(target), gb_per_s=None, eta_s=None,
                         elapsed_s=0.0, error=None)
        self.t0 = time.monotonic()
        self.last_log = self.last_write = self.t0
        self.write()

    def add(self, nbytes: int, file_done: bool = False) -> None:
        i = self.info
        i["bytes_done"] += nbytes
        i["files_done"] += file_done
        now = time.monotonic()
        i["elapsed_s"] = round(now - self.t0, 3)
        rate = i["bytes_done"] / max(now - self.t0, 1e-9)
        i["gb_per_s"] = round(rate / GB, 3)
        i["eta_s"] = round((i["bytes_total"] - i["bytes_done"]) / rate, 1) if rate > 0 else None
        if now - self.last_log >= PROGRESS_INTERVAL_S:
            self.last_log = now
            log.info("%s", self.line())
        if now - self.last_write >= 1.0:
            self.write()

    def line(self) -> str:
        return describe(self.info)

    def finish(self, state: str, error: str | None = None) -> None:
        self.info.update(state=state, error=error, elapsed_s=round(time.monotonic() - self.t0, 3), eta_s=0)
        self.write()

    def set(self, **fields) -> None:
        self.info.update(fields)
        self.write()

    def write(self) -> None:
        if self.path is None:
            return
        self.last_write = time.monotonic()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = self.path.with_name(f".{PROGRESS_FILE}.{os.getpid()}")
            tmp.write_text(json.dumps(dict(self.info, updated=time.time())) + "\n")
            os.replace(tmp, self.path)
        except OSError as e:      # progress is a nicety: staging goes on without it
            log.warning("cannot write %s: %s", self.path, e)


def describe(info: dict) -> str:
    """One line for a progress dict: what the log says and `slurmserve status` can show."""
    done, total = info["bytes_done"] / GB, info["bytes_total"] / GB
    head = f"weights {info['state']} ({info['mode']}, {info['nodes']} node(s)): {done:.2f}/{total:.2f} GB"
    if info.get("gb_per_s") is not None:
        head += f", {info['gb_per_s']:.2f} GB/s"
    if info["state"] == "staging" and info.get("eta_s") is not None:
        head += f", ETA {info['eta_s']:.0f} s"
    return head


def progress_summary(log_dir: str | os.PathLike | None) -> str | None:
    """`describe` of a deployment's stage-progress.json, or None when it has none."""
    if not log_dir:
        return None
    try:
        return describe(json.loads((Path(log_dir) / PROGRESS_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---- copying -------------------------------------------------------------------------------------

class _FileCopy:
    """One file into the temporary directory: writes and hashes chunks on a thread of its own, so
    the disk and the hash overlap the next read or Bcast. A write error is kept, not raised: the
    rank must still take part in every Bcast of the file."""

    def __init__(self, dest: Path, writer: ThreadPoolExecutor):
        self.writer = writer
        self.hash = hashlib.sha256()
        self.error: str | None = None
        self.dest = dest
        self.last: Future | None = None
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as e:
            self.fd, self.error = None, f"cannot write {dest} on {socket.gethostname()}: {e.strerror}"

    def submit(self, chunk: memoryview) -> Future:
        self.last = self.writer.submit(self._write, chunk)
        return self.last

    def _write(self, chunk: memoryview) -> None:
        self.hash.update(chunk)
        if self.error is None:
            try:
                while chunk:
                    chunk = chunk[os.write(self.fd, chunk):]
            except OSError as e:
                self.error = f"cannot write {self.dest} on {socket.gethostname()}: {e.strerror}"

    def close(self, syncer: ThreadPoolExecutor) -> tuple[str, Future | None]:
        """The file's sha256 once its last chunk is written, and its fsync, started on `syncer` so
        that the next file is not held up (writeback is the slowest step on a busy disk)."""
        if self.last is not None:
            self.last.result()
        if self.fd is None:
            return self.hash.hexdigest(), None
        return self.hash.hexdigest(), syncer.submit(self._sync)

    def _sync(self) -> str | None:
        try:
            if self.error is None:
                os.fsync(self.fd)     # the manifest must never describe data still in flight
        except OSError as e:
            self.error = f"cannot write {self.dest} on {socket.gethostname()}: {e.strerror}"
        finally:
            os.close(self.fd)
        return self.error


class _Reader:
    """Chunks of one source file into a ring of three buffers, read ahead on a thread. A read error
    (or a file that shrank) is kept and the chunk zero-filled, so the Bcasts stay matched."""

    def __init__(self, path: Path, size: int, chunk: int, bufs: list[bytearray], reader: ThreadPoolExecutor):
        self.path, self.size, self.chunk, self.bufs, self.pool = path, size, chunk, bufs, reader
        self.error: str | None = None
        try:
            self.f = open(path, "rb", buffering=0)
        except OSError as e:
            self.f, self.error = None, f"cannot read {path}: {e.strerror}"

    def submit(self, k: int) -> Future:
        return self.pool.submit(self._read, k)

    def _read(self, k: int) -> memoryview:
        n = min(self.chunk, self.size - k * self.chunk)
        mv = memoryview(self.bufs[k % len(self.bufs)])[:n]
        got = 0
        if self.error is None:
            try:
                while got < n:
                    r = self.f.readinto(mv[got:])
                    if not r:
                        self.error = f"{self.path} changed while staging (shorter than {self.size} bytes)"
                        break
                    got += r
            except OSError as e:
                self.error = f"cannot read {self.path}: {e.strerror}"
        if got < n:
            mv[got:] = bytes(n - got)
        return mv

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def _copy_file(comm, root: int | None, src: Path, dest: Path, size: int, chunk: int,
               bufs: list[bytearray], pools: dict[str, ThreadPoolExecutor],
               progress: Progress | None) -> tuple[str, str | None, Future | None]:
    """Copy one file into `dest`: read here (root is None: node-local, or root == comm's rank) and/or
    received by Bcast from `root`. Returns (sha256, error so far, the fsync's future: its error)."""
    from mpi4py import MPI

    def wait_write(k: int) -> None:        # chunk k's buffer is about to be reused
        if k in writes:
            writes.pop(k).result()

    n_chunks = math.ceil(size / chunk)
    reading = root is None or comm.Get_rank() == root
    rd = _Reader(src, size, chunk, bufs, pools["read"]) if reading else None
    out = _FileCopy(dest, pools["write"])
    writes: dict[int, Future] = {}
    try:
        nxt = rd.submit(0) if rd and n_chunks else None
        for k in range(n_chunks):
            if rd:           # read ahead: chunk k+1 is read while chunk k crosses the fabric
                mv = nxt.result()
                if k + 1 < n_chunks:
                    wait_write(k + 1 - len(bufs))
                    nxt = rd.submit(k + 1)
            else:
                wait_write(k - len(bufs))
                mv = memoryview(bufs[k % len(bufs)])[:min(chunk, size - k * chunk)]
            if root is not None:
                comm.Bcast([mv, MPI.BYTE], root=root)
            writes[k] = out.submit(mv)
            if progress:
                progress.add(len(mv))
    finally:
        for f in writes.values():
            f.result()
        digest, synced = out.close(pools["sync"])
        if rd:
            rd.close()
    return digest, (rd.error if rd and rd.error else None) or out.error, synced


def _temp_dir(target: Path) -> Path:
    return target.parent / f".{target.name}.partial-{socket.gethostname()}-{os.getpid()}"


def _remove_stale_partials(target: Path) -> None:
    """Partial copies that a killed rank on this node left behind (its pid has gone)."""
    remove_stale_dirs(target.parent, f".{target.name}.partial-{socket.gethostname()}-")


def _publish(tmp: Path, target: Path, files: list[SourceFile]) -> None:
    """Rename the finished temporary copy into place. Another job on this node may have finished
    the same copy first (keep theirs), or an outdated copy may be there (replace it)."""
    try:
        os.rename(tmp, target)
        return
    except OSError:
        pass
    if valid_copy(target, files) is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = target.with_name(f".{target.name}.old-{socket.gethostname()}-{os.getpid()}")
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _agree(comm, error: str | None) -> None:
    """Collective: raise the first error any rank of `comm` had, on every rank."""
    errors = [e for e in comm.allgather(error) if e]
    if errors:
        raise StageError(errors[0])


def _leader_stage(cfg, leaders, mode: str, files: list[SourceFile], target: Path,
                  progress: Progress | None, chunk: int) -> str:
    """Run by the leader of each node; returns 'reused' or 'staged'. Raises StageError on all leaders."""
    from mpi4py import MPI

    reused = valid_copy(target, files) is not None
    need = 0 if reused else sum(f.size for f in files)
    error = None
    if not reused:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.parent.parent.chmod(0o700)      # slurmserve-stage-<uid>: weights may be private
            _remove_stale_partials(target)
            free = shutil.disk_usage(target.parent).free
            if free < need:
                error = (f"model.stage_dir {target.parent} on {socket.gethostname()} has {free / GB:.2f} GB "
                         f"free, the model needs {need / GB:.2f} GB (set model.stage_dir, or model.stage: none)")
        except OSError as e:
            error = f"model.stage_dir {target.parent} on {socket.gethostname()}: {e.strerror}"
    _agree(leaders, error)
    all_reused = leaders.allreduce(int(reused), op=MPI.MIN)
    if progress:
        progress.set(state="reused" if all_reused else "staging",
                     bytes_done=progress.info["bytes_total"] if all_reused else 0)
    if all_reused:
        return "reused"
    # only the nodes without a valid copy take part (a requeue may land partly on new nodes)
    group = leaders.Split(0 if not reused else MPI.UNDEFINED, leaders.Get_rank())
    error = None
    if not reused:
        tmp = _temp_dir(target)
        try:
            _copy_all(cfg, group, mode, files, tmp, progress, chunk)
            _publish(tmp, target, files)
        except StageError as e:
            error = str(e)
        except OSError as e:
            error = f"staging to {target} on {socket.gethostname()}: {e.strerror or e}"
        finally:
            if error:
                shutil.rmtree(tmp, ignore_errors=True)
            group.Free()
    _agree(leaders, error)       # nodes that reused their copy wait here for the others
    return "staged"


def _copy_all(cfg, group, mode: str, files: list[SourceFile], tmp: Path, progress: Progress | None,
              chunk: int) -> None:
    """Copy every file into `tmp` and write the manifest; collective over `group` in broadcast mode."""
    shutil.rmtree(tmp, ignore_errors=True)
    bufs = [bytearray(chunk) for _ in range(3)]
    src = Path(cfg.model.path)
    entries, syncs = [], []
    pools = {name: ThreadPoolExecutor(1, f"stage-{name}") for name in ("read", "write", "sync")}
    try:
        for i, f in enumerate(files):
            root = i % group.Get_size() if mode == "broadcast" else None
            digest, error, synced = _copy_file(group, root, src / f.path, tmp / f.path, f.size, chunk,
                                               bufs, pools, progress)
            syncs.append(synced)
            if mode == "broadcast":
                # every copy must hold the reader's bytes; the reader's error says why not
                digests = group.allgather((digest, error))
                error = next((e for _, e in digests if e), None)
                if error is None and digest != digests[root][0]:
                    error = (f"{f.path}: sha256 on {socket.gethostname()} {digest[:16]}... differs from "
                             f"the reader's {digests[root][0][:16]}...")
                _agree(group, error)
            elif error:
                raise StageError(error)
            entries.append(dict(asdict(f), sha256=digest))
            if progress:
                progress.add(0, file_done=True)
        # no collective after this point: a failed fsync stops this node only (the caller agrees)
        error = next((e for e in (s.result() for s in syncs if s is not None) if e), None)
        if error:
            raise StageError(error)
    finally:
        for pool in pools.values():
            pool.shutdown()
    manifest = dict(format=MANIFEST_FORMAT, source=str(src), mode=mode, host=socket.gethostname(),
                    job_id=os.environ.get("SLURM_JOB_ID"), staged=time.time(),
                    bytes=sum(f.size for f in files), files=entries)
    # written last: its presence is what says the copy is complete
    with open(tmp / MANIFEST, "w") as out:
        out.write(json.dumps(manifest, indent=1) + "\n")
        out.flush()
        os.fsync(out.fileno())


def stage_weights(cfg, comm, chunk_bytes: int = CHUNK_BYTES, needs_weights: bool = True) -> Path:
    """Collective over `comm` (every rank calls it): the model directory this rank loads from.
    A node whose ranks all pass `needs_weights=False` (the head's own node, `--head own-node`: the
    head reads only the tokenizer and config) gets no copy and loads from model.path. The first
    staged node's leader logs progress and writes `<cfg.log_dir>/stage-progress.json`."""
    from mpi4py import MPI

    rank = comm.Get_rank()
    host = socket.gethostname()
    placed = comm.allgather((host, needs_weights))
    nodes = list(dict.fromkeys(h for h, _ in placed))
    staged_nodes = list(dict.fromkeys(h for h, needs in placed if needs))
    mode = resolve_mode(cfg.model.stage, len(staged_nodes))
    source = Path(cfg.model.path)
    if mode == "none":
        return source
    t0 = time.monotonic()
    files, error = None, None
    if rank == 0:               # one stat walk of the shared filesystem, not one per rank
        try:
            files = list_source(source)
        except OSError as e:
            error = f"model.path {source}: {e.strerror}"
        except StageError as e:
            error = str(e)
    files, error = comm.bcast((files, error), root=0)
    if error:
        raise StageError(error)

    node_comm = comm.Split(nodes.index(host), rank)
    leader = node_comm.Get_rank() == 0 and host in staged_nodes
    leaders = comm.Split(0 if leader else MPI.UNDEFINED, rank)
    result: tuple[str | None, str | None] = (str(source), None)    # a node that gets no copy
    progress = None
    if leader:
        try:
            target = local_target(stage_root(cfg.model.stage_dir), source)
            error = None
        except StageError as e:
            target, error = None, str(e)
        try:
            _agree(leaders, error)
            if leaders.Get_rank() == 0:
                progress = Progress(cfg.log_dir, mode, sum(f.size for f in files), len(files), len(staged_nodes),
                                    target)
            outcome = _leader_stage(cfg, leaders, mode, files, target, progress, chunk_bytes)
            result = (str(target), None)
            if progress:
                progress.finish("reused" if outcome == "reused" else "done")
                log.info("%s in %.1f s; engines load from %s", progress.line(), time.monotonic() - t0, target)
        except StageError as e:
            result = (None, str(e))
            if progress:
                progress.finish("failed", str(e))
        leaders.Free()
    path, error = node_comm.bcast(result, root=0)
    node_comm.Free()
    if len(staged_nodes) < len(nodes):   # an unstaged node fails with the others, as they do together
        error = next((e for e in comm.allgather(error) if e), None)
    if error:
        raise StageError(error)
    return Path(path)
