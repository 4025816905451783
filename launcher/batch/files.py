"""Batch files: OpenAI batch input lines, shards, the output store that makes a run resumable exactly
once, and merging shard outputs.

Input lines are `{custom_id, method: "POST", url, body}` (OpenAI's batch format), read one at a time:
memory grows with the number of custom_ids (for duplicates and resume), never with the bodies.

Output lines are what OpenAI and vLLM write: `{id, custom_id, response: {status_code, request_id,
body}, error}`. A failed line's `error` is `{code, message, line}` (its input line number), so every
input line leaves exactly one record that says which line it was:
- a record with `error: null` is the answer to its `custom_id`;
- a record with an `error` stands for its input `line` (a malformed line may have no custom_id).

Crash safety: records are appended with one write per checkpoint, then fsynced. Bytes reach the file
in order, so a crash (kill -9, node failure) can only leave a torn last line, which the next run
truncates before it reads which records exist; those are skipped, the rest is done again.

One writer at a time: the writer holds an exclusive flock on each file it appends to, taken before it
reads what is done, for as long as it may write. A run whose predecessor is still alive (a rank that
outlived a killed `slurmserve batch`) refuses instead of doing the same lines twice.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

URLS = {"/v1/chat/completions": True, "/v1/completions": False}   # url -> chat?


class BatchError(Exception):
    """A batch run that cannot go on for a reason the user can fix; the message names file and line."""


# ---- input ------------------------------------------------------------------------------------------

class _Line(msgspec.Struct, forbid_unknown_fields=False):
    custom_id: str
    url: str
    body: msgspec.Raw
    method: str = "POST"


class _IdOnly(msgspec.Struct, forbid_unknown_fields=False):
    custom_id: Any = None


class _StreamFlag(msgspec.Struct, forbid_unknown_fields=False):
    stream: Any = False


_line_decoder = msgspec.json.Decoder(_Line)
_id_decoder = msgspec.json.Decoder(_IdOnly)
_stream_decoder = msgspec.json.Decoder(_StreamFlag)


@dataclass(frozen=True)
class Request:
    line: int
    custom_id: str
    url: str
    chat: bool
    body: bytes


@dataclass(frozen=True)
class LineError:
    line: int
    custom_id: str | None
    code: str
    message: str


def parse_shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise BatchError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


def resolve_shard(text: str | None, env: dict | None = None) -> tuple[int, int]:
    """`--shard i/n`, else a Slurm job array's task (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN of
    SLURM_ARRAY_TASK_COUNT), else the whole file (0/1)."""
    if text:
        return parse_shard(text)
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_TASK_ID") and env.get("SLURM_ARRAY_TASK_COUNT"):
        task, lo = int(env["SLURM_ARRAY_TASK_ID"]), int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return parse_shard(f"{task - lo}/{env['SLURM_ARRAY_TASK_COUNT']}")
    return 0, 1


def shard_path(path: Path, shard: tuple[int, int]) -> Path:
    """OUT.jsonl for the whole file; OUT.shard-I-of-N.jsonl for shard I of N."""
    i, n = shard
    if n == 1:
        return path
    return path.with_name(f"{path.stem}.shard-{i}-of-{n}{path.suffix}")


def summary_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}.summary.json")


def iter_lines(path: Path, shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line) of the shard's non-blank lines: line L is in shard (L-1) mod n."""
    i, n = shard
    try:
        f = open(path, "rb")
    except OSError as e:
        raise BatchError(f"{path}: cannot read: {e.strerror}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if (lineno - 1) % n == i and raw.strip():
                yield lineno, raw


def parse_line(lineno: int, raw: bytes) -> Request | LineError:
    """One input line as a request, or the reason it cannot be one. The body itself is checked by
    the same code as the HTTP API's (the batch driver sends it through the head's app)."""
    try:
        obj = _line_decoder.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        cid = None
        try:
            cid = _id_decoder.decode(raw).custom_id
        except (msgspec.ValidationError, msgspec.DecodeError):
            pass
        return LineError(lineno, cid if isinstance(cid, str) else None, "invalid_line",
                         f"line {lineno}: not a batch request line: {e}")
    if obj.method.upper() != "POST":
        return LineError(lineno, obj.custom_id, "invalid_method",
                         f"line {lineno}: method {obj.method!r}: only POST is supported")
    chat = URLS.get(obj.url)
    if chat is None:
        return LineError(lineno, obj.custom_id, "invalid_url",
                         f"line {lineno}: url {obj.url!r}: supported are {', '.join(URLS)}")
    body = bytes(obj.body)
    try:
        stream = _stream_decoder.decode(body).stream
    except (msgspec.ValidationError, msgspec.DecodeError):
        stream = False      # not an object: the API's validation says so in its own words
    if stream:
        return LineError(lineno, obj.custom_id, "invalid_request",
                         f"line {lineno}: body.stream: streaming is not supported in a batch")
    return Request(lineno, obj.custom_id, obj.url, chat, body)


@dataclass
class Scan:
    total: int = 0                                          # non-blank lines in the shard
    duplicates: dict[int, int] = field(default_factory=dict)   # line -> line of the first occurrence
    dup_ids: dict[str, list[int]] = field(default_factory=dict)

    def report(self, limit: int = 10) -> list[str]:
        out = []
        for cid, lines in list(self.dup_ids.items())[:limit]:
            out.append(f"duplicate custom_id {cid!r} on lines {', '.join(map(str, lines))} "
                       f"(the first is run, the others become error records)")
        if len(self.dup_ids) > limit:
            out.append(f"... and {len(self.dup_ids) - limit} more duplicated custom_ids")
        return out


def scan_input(path: Path, shard: tuple[int, int] = (0, 1)) -> Scan:
    """Count the shard's lines and find duplicate custom_ids, before anything runs. Duplicates are
    found over the whole file, so that shards agree on which line is the first (the one that runs)."""
    scan, first = Scan(), {}
    i, n = shard
    for lineno, raw in iter_lines(path):
        mine = (lineno - 1) % n == i
        scan.total += mine
        try:
            cid = _id_decoder.decode(raw).custom_id
        except (msgspec.ValidationError, msgspec.DecodeError):
            continue
        if not isinstance(cid, str):
            continue
        at = first.setdefault(cid, lineno)
        if at != lineno:
            if mine:
                scan.duplicates[lineno] = at
            scan.dup_ids.setdefault(cid, [at]).append(lineno)
    return scan


# ---- output records ---------------------------------------------------------------------------------

class _Response(msgspec.Struct):
    status_code: int
    request_id: str
    body: msgspec.Raw | None = None


class _Record(msgspec.Struct):
    id: str
    custom_id: str | None
    response: _Response | None
    error: dict | None


def _rid() -> str:
    return "batch_req_" + uuid.uuid4().hex


def ok_record(custom_id: str, request_id: str, body: bytes) -> bytes:
    """A 200 answer; the body is embedded byte for byte as the API returned it."""
    return msgspec.json.encode(_Record(_rid(), custom_id, _Response(200, request_id, msgspec.Raw(body)),
                                       None)) + b"\n"


def error_record(line: int, custom_id: str | None, code: str, message: str,
                 status: int | None = None, body: bytes | None = None) -> bytes:
    response = None
    if status is not None:
        response = _Response(status, "batch_" + uuid.uuid4().hex,
                             msgspec.Raw(body) if body is not None else None)
    return msgspec.json.encode(_Record(_rid(), custom_id, response,
                                       {"code": code, "message": message, "line": line})) + b"\n"


class _ErrKey(msgspec.Struct, forbid_unknown_fields=False):
    line: int | None = None


class _Key(msgspec.Struct, forbid_unknown_fields=False):
    custom_id: str | None = None
    error: _ErrKey | None = None


_key_decoder = msgspec.json.Decoder(_Key)


def record_key(raw: bytes) -> tuple[str, Any]:
    """("id", custom_id) for an answer, ("line", n) for an error record."""
    k = _key_decoder.decode(raw)
    if k.error is not None and k.error.line is not None:
        return "line", k.error.line
    if k.custom_id is None:
        raise msgspec.ValidationError("a record needs a custom_id or error.line")
    return "id", k.custom_id


def repair_torn_tail(path: Path, fd: int | None = None) -> int:
    """Truncate a last line that a crash left without its newline (or unparsable); bytes removed.
    With `fd` (the writer's locked descriptor) the file is read and cut through it: closing another
    descriptor of the file would drop a POSIX lock (what flock is on NFS)."""
    try:
        size = os.fstat(fd).st_size if fd is not None else path.stat().st_size
    except FileNotFoundError:
        return 0
    if size == 0:
        return 0
    with (open(fd, "rb+", closefd=False) if fd is not None else open(path, "rb+")) as f:
        pos = max(0, size - (1 << 16))
        while True:
            f.seek(pos)
            tail = f.read(size - pos)
            nl = tail.rfind(b"\n", 0, len(tail) - 1)
            if nl >= 0 or pos == 0:
                break
            pos = max(0, pos - (1 << 16))
        start = pos + nl + 1 if nl >= 0 else 0
        last = tail[start - pos:]
        keep = size
        if not last.endswith(b"\n"):
            keep = start
        else:
            try:
                record_key(last)
            except (msgspec.ValidationError, msgspec.DecodeError):
                keep = start
        if keep < size:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        return size - keep


def iter_records(path: Path, fd: int | None = None) -> Iterator[tuple[int, bytes]]:
    if fd is not None:      # the writer's own descriptor (see repair_torn_tail)
        os.lseek(fd, 0, os.SEEK_SET)
        f = open(fd, "rb", closefd=False)
    else:
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return
    with f:
        yield from enumerate(f, 1)


def lock_holder(path: Path) -> int | None:
    """The pid that holds a flock on `path`, from /proc/locks (Linux), if it can be told."""
    try:
        st = path.stat()
        want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as f:
            for entry in f:
                parts = entry.split()
                if "->" not in parts and "FLOCK" in parts and want in parts:
                    return int(parts[parts.index(want) - 1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _busy(path: Path) -> BatchError:
    pid = lock_holder(path)
    who = f" (pid {pid})" if pid else ""
    return BatchError(f"{path}: another run is still writing it{who}; wait for it to end or stop it, "
                      f"then run again")


def lock_exclusive(fd: int, path: Path) -> str | None:
    """Take the writer's lock on `fd` without waiting: BatchError if another process holds it; a
    warning (the caller logs it) where the file system has no locks, which leaves the file unguarded."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise _busy(path) from None
        return f"{path}: cannot lock it ({e.strerror}): make sure no other run writes it at the same time"
    return None


def check_no_writer(paths: list[Path]) -> None:
    """Refuse to start while a process (a run that is still ending) holds the lock of one of these
    files; the run takes the lock itself later, this only gives the error before anything starts."""
    for p in paths:
        try:
            fd = os.open(p, os.O_WRONLY | os.O_APPEND)   # write access: flock is a POSIX lock on NFS
        except OSError:
            continue        # absent or not ours to write: the run itself says so
        try:
            lock_exclusive(fd, p)
        finally:
            os.close(fd)    # releases the probe's lock


class OutputStore:
    """The run's output (and error) file: what is already done, and checkpointed appends. Holds the
    files' exclusive locks from construction to close()."""

    def __init__(self, output: Path, errors: Path | None = None):
        self.paths = [output] + ([errors] if errors is not None and errors != output else [])
        self.done_ids: set[str] = set()
        self.done_lines: set[int] = set()
        self.repaired = 0
        self.warnings: list[str] = []
        self._fds: list[int] = []
        try:
            for p in self.paths:
                p.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(p, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
                self._fds.append(fd)
                if (warning := lock_exclusive(fd, p)) is not None:
                    self.warnings.append(warning)
            # read what is done only now: whoever wrote before has stopped writing
            for p, fd in zip(self.paths, self._fds):
                self.repaired += repair_torn_tail(p, fd)
                for n, raw in iter_records(p, fd):
                    try:
                        kind, key = record_key(raw)
                    except (msgspec.ValidationError, msgspec.DecodeError) as e:
                        raise BatchError(f"{p}:{n}: not a batch output record ({e}); "
                                         f"is this the output of another run?") from None
                    (self.done_ids if kind == "id" else self.done_lines).add(key)
        except BaseException:
            self._release()
            raise
        self._bufs: list[list[bytes]] = [[] for _ in self.paths]
        self.pending = 0

    @property
    def done(self) -> int:
        return len(self.done_ids) + len(self.done_lines)

    def add(self, record: bytes, error: bool) -> None:
        self._bufs[1 if error and len(self.paths) > 1 else 0].append(record)
        self.pending += 1

    def flush(self) -> None:
        """Append what is buffered, one write per file, and fsync: a checkpoint."""
        for fd, buf in zip(self._fds, self._bufs):
            if not buf:
                continue
            data = memoryview(b"".join(buf))
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
            buf.clear()
        self.pending = 0

    def close(self) -> None:
        """Flush and let go of the files (and their locks)."""
        if self._fds:
            self.flush()
        self._release()

    def _release(self) -> None:
        for fd in getattr(self, "_fds", ()):
            os.close(fd)
        self._fds = []

    def __del__(self) -> None:      # a store dropped without close() must not keep the lock
        self._release()


# ---- merge ----------------------------------------------------------------------------------------

def shard_files(path: Path) -> list[Path]:
    """OUT.shard-I-of-N.jsonl for I in 0..N-1, or a BatchError naming what is missing."""
    pat = re.compile(re.escape(path.stem) + r"\.shard-(\d+)-of-(\d+)" + re.escape(path.suffix) + "$")
    found: dict[int, dict[int, Path]] = {}
    for p in path.parent.glob(f"{path.stem}.shard-*-of-*{path.suffix}"):
        m = pat.match(p.name)
        if m:
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = p
    if not found:
        raise BatchError(f"no shard outputs {path.stem}.shard-I-of-N{path.suffix} in {path.parent}")
    if len(found) > 1:
        raise BatchError(f"shard outputs of different splits next to {path}: of "
                         f"{', '.join(map(str, sorted(found)))}")
    (n, files), = found.items()
    missing = sorted(set(range(n)) - set(files))
    if missing:
        raise BatchError(f"shard output(s) {', '.join(map(str, missing))} of {n} missing for {path}")
    return [files[i] for i in range(n)]


def merge(input_path: Path, output: Path, errors: Path | None = None) -> dict:
    """Combine the shard outputs of OUT (and ERR) into OUT (and ERR), after checking that every input
    line has exactly one record. Returns counts; raises BatchError listing what is missing or doubled."""
    outs = shard_files(output)
    errs = shard_files(errors) if errors is not None else []
    first_ids: dict[int, str] = {}        # line -> the custom_id it is the first occurrence of
    known: set[str] = set()
    lines: set[int] = set()
    for lineno, raw in iter_lines(input_path):
        lines.add(lineno)
        try:
            cid = _id_decoder.decode(raw).custom_id
        except (msgspec.ValidationError, msgspec.DecodeError):
            continue
        if isinstance(cid, str) and cid not in known:
            known.add(cid)
            first_ids[lineno] = cid
    seen_ids: set[str] = set()
    seen_lines: set[int] = set()
    dups: list[str] = []
    counts = {"ok": 0, "failed": 0}
    for p in outs + errs:
        for n, raw in iter_records(p):
            try:
                kind, key = record_key(raw)
            except (msgspec.ValidationError, msgspec.DecodeError):
                raise BatchError(f"{p}:{n}: not a batch output record") from None
            seen = seen_ids if kind == "id" else seen_lines
            if key in seen:
                dups.append(f"{p.name}:{n} ({'custom_id ' + repr(key) if kind == 'id' else f'line {key}'})")
            seen.add(key)
            counts["ok" if kind == "id" else "failed"] += 1
    missing = [f"line {ln}" for ln in sorted(lines)
               if ln not in seen_lines and first_ids.get(ln) not in seen_ids]
    unknown = sorted(seen_ids - known)
    problems = []
    if missing:
        problems.append(f"{len(missing)} input line(s) without a record: {', '.join(missing[:10])}"
                        + (" ..." if len(missing) > 10 else ""))
    if dups:
        problems.append(f"{len(dups)} duplicate record(s): {', '.join(dups[:10])}" + (" ..." if len(dups) > 10 else ""))
    if unknown:
        problems.append(f"{len(unknown)} custom_id(s) not in {input_path}: {', '.join(map(repr, unknown[:10]))}")
    if problems:
        raise BatchError("merge refused: " + "; ".join(problems))
    _concat(outs, output)
    if errors is not None:
        _concat(errs, errors)
    return dict(counts, shards=len(outs), lines=len(lines))


def _concat(parts: list[Path], dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, dest)
