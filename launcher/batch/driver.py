"""The head's batch driver: a batch file's requests through the head's own OpenAI app, engines kept full.

Each input line is sent in-process to the same app that serves HTTP (`HeadApp`), so validation,
chat templates, routing policy and response bodies are byte for byte the online API's. A bounded
window of requests in flight (`batch.max_inflight`, default twice the engines' batch capacity) keeps
every engine's batch full without reading the whole file. Finished records are appended to the output
in checkpoints (`launcher/batch/files.py`: append, fsync, resume, torn-line repair).

Stopping (the head's drain: SIGUSR2 or SIGTERM): no new lines are dispatched; in-flight requests
finish within the grace period (none for SIGTERM), the rest are abandoned (aborted in the engine, not
recorded, so the next run does them); everything finished is flushed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
from prometheus_client import Counter, Gauge

from slurmserve.config import DeploymentConfig
from slurmserve.launcher.batch import files as bf
from slurmserve.router.http_server import BufferedResponse, Request

log = logging.getLogger(__name__)

INCOMPLETE_EXIT = 3     # the head's exit code when lines are left for the next run


class _Usage(msgspec.Struct, forbid_unknown_fields=False):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Answer(msgspec.Struct, forbid_unknown_fields=False):
    id: str = ""
    usage: _Usage | None = None


class _ErrBody(msgspec.Struct, forbid_unknown_fields=False):
    message: str = ""
    type: str = ""
    code: str | None = None


class _Err(msgspec.Struct, forbid_unknown_fields=False):
    error: _ErrBody | None = None


_answer = msgspec.json.Decoder(_Answer)
_err = msgspec.json.Decoder(_Err)


def default_window(cfg: DeploymentConfig) -> int:
    """Twice the generating instances' batch capacity (their max_num_seqs), within the head's limit."""
    if cfg.engine.kind == "sim":
        per = cfg.engine.sim.max_num_seqs
    else:
        per = int(cfg.engine.args.get("max_num_seqs") or 256)
    n = sum(1 for r in cfg.pools.instances() if r != "prefill")
    return max(1, min(2 * per * n, cfg.router.max_concurrent_requests))


class BatchMetrics:
    """The run's figures in the head's /metrics (same registry)."""

    def __init__(self, registry):
        self.records = Counter("slurmserve:batch_records", "Batch lines finished by this run, by outcome "
                               "(ok, failed; skipped: recorded by an earlier run)", ["status"],
                               registry=registry)
        self.total = Gauge("slurmserve:batch_lines", "Lines in this run's input shard", registry=registry)
        self.inflight = Gauge("slurmserve:batch_requests_in_flight", "Batch requests in flight",
                              registry=registry)
        self.prompt_tokens = Counter("slurmserve:batch_prompt_tokens", "Prompt tokens of batch answers",
                                     registry=registry)
        self.completion_tokens = Counter("slurmserve:batch_completion_tokens",
                                         "Completion tokens of batch answers", registry=registry)
        self.elapsed = Gauge("slurmserve:batch_elapsed_seconds", "Wall time of this run",
                             registry=registry)
        self.req_rate = Gauge("slurmserve:batch_requests_per_second", "Finished requests per second",
                              registry=registry)
        self.tok_rate = Gauge("slurmserve:batch_completion_tokens_per_second",
                              "Completion tokens per second", registry=registry)


class Stats:
    def __init__(self, total: int):
        self.total, self.ok, self.failed, self.skipped, self.unfinished = total, 0, 0, 0, 0
        self.prompt_tokens = self.completion_tokens = 0
        self.start = time.monotonic()

    @property
    def done(self) -> int:
        return self.ok + self.failed + self.skipped

    def wall(self) -> float:
        return time.monotonic() - self.start

    def summary(self, **extra) -> dict:
        wall = self.wall()
        ran = self.ok + self.failed
        return dict(extra, total=self.total, ok=self.ok, failed=self.failed, skipped=self.skipped,
                    unfinished=self.total - self.done, complete=self.done == self.total,
                    prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                    wall_s=round(wall, 3),
                    requests_per_s=round(ran / wall, 3) if wall > 0 else 0.0,
                    completion_tokens_per_s=round(self.completion_tokens / wall, 3) if wall > 0 else 0.0,
                    total_tokens_per_s=round((self.prompt_tokens + self.completion_tokens) / wall, 3)
                    if wall > 0 else 0.0)


class Progress:
    """A tqdm bar on stderr when `slurmserve batch` runs on a terminal (it sets SLURMSERVE_BATCH_BAR=1;
    a rank cannot tell: mpirun may give it a pty of its own), else a log line every `interval_s`."""

    def __init__(self, stats: Stats, interval_s: float):
        self.stats, self.interval_s = stats, interval_s
        self._last = time.monotonic()
        self._bar = None
        if os.environ.get("SLURMSERVE_BATCH_BAR") == "1":
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=stats.total, initial=stats.skipped, unit="req", dynamic_ncols=True,
                                 file=sys.stderr, desc="batch")
            except ImportError:
                pass

    def line(self) -> str:
        s, wall = self.stats, self.stats.wall()
        ran = s.ok + s.failed
        rate = ran / wall if wall > 0 else 0.0
        eta = (s.total - s.done) / rate if rate > 0 else float("inf")
        return (f"batch: {s.done}/{s.total} ({100 * s.done / max(1, s.total):.1f}%) ok={s.ok} "
                f"failed={s.failed} skipped={s.skipped} {rate:.2f} req/s "
                f"{s.completion_tokens / wall if wall > 0 else 0:.1f} tok/s ETA "
                f"{'-' if eta == float('inf') else f'{eta:.0f} s'}")

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            s, wall = self.stats, self.stats.wall()
            self._bar.update(n)
            self._bar.set_postfix_str(f"{s.completion_tokens / wall if wall > 0 else 0:.0f} tok/s "
                                      f"failed={s.failed}", refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            log.info("%s", self.line())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        log.info("%s", self.line())


class BatchDriver:
    def __init__(self, cfg: DeploymentConfig, app, api_key: str, registry, ready: Callable[[], bool]):
        assert cfg.batch is not None
        self.cfg, self.bc, self.app, self.ready = cfg, cfg.batch, app, ready
        self.headers = [(b"authorization", b"Bearer " + api_key.encode()),
                        (b"content-type", b"application/json")]
        self.metrics = BatchMetrics(registry)
        self.window = min(self.bc.max_inflight or default_window(cfg), cfg.router.max_concurrent_requests)
        self.shard = bf.resolve_shard(self.bc.shard)
        self.output = bf.shard_path(self.bc.output, self.shard)
        self.errors = bf.shard_path(self.bc.errors, self.shard) if self.bc.errors else None
        self._inflight: dict[int, BufferedResponse | None] = {}   # seq -> the answer it awaits
        self._abandoned = False
        self._slot = asyncio.Event()
        self._stopping = False
        # ordered mode: records wait here until every earlier one is written
        self._results: dict[int, tuple[bytes, bool] | None] = {}
        self._next_write = 0

    # ---- the run ------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, grace: Callable[[], float]) -> int:
        """Until every line has a record or `stop` is set; returns the head's exit code. Sets `stop`
        when it ends, so the head shuts the deployment down."""
        try:
            return await self._run(stop, grace)
        except bf.BatchError as e:     # a user's mistake: one line, no traceback
            log.error("batch: %s", e)
            return 2
        finally:
            stop.set()

    async def _run(self, stop: asyncio.Event, grace: Callable[[], float]) -> int:
        bc = self.bc
        scan = await asyncio.to_thread(bf.scan_input, bc.input, self.shard)
        for msg in scan.report():
            log.warning("%s: %s", bc.input, msg)
        # takes the output's lock (a BatchError while an earlier run still writes it), held to the end
        self.store = await asyncio.to_thread(bf.OutputStore, self.output, self.errors)
        try:
            return await self._run_locked(scan, stop, grace)
        finally:
            self.store.close()

    async def _run_locked(self, scan: bf.Scan, stop: asyncio.Event, grace: Callable[[], float]) -> int:
        bc = self.bc
        for warning in self.store.warnings:
            log.warning("batch: %s", warning)
        if self.store.repaired:
            log.warning("%s: removed a torn last line (%d bytes) left by an interrupted run",
                        self.output, self.store.repaired)
        stats = self.stats = Stats(scan.total)
        self.metrics.total.set(scan.total)
        self.metrics.elapsed.set_function(stats.wall)
        self.metrics.req_rate.set_function(lambda: (stats.ok + stats.failed) / max(stats.wall(), 1e-9))
        self.metrics.tok_rate.set_function(lambda: stats.completion_tokens / max(stats.wall(), 1e-9))
        log.info("batch: %s shard %d/%d -> %s: %d lines, %d already done, window %d", bc.input,
                 *self.shard, self.output, scan.total, self.store.done, self.window)
        watcher = asyncio.create_task(self._watch_stop(stop))
        while not self.ready() and not stop.is_set():
            await asyncio.sleep(0.05)
        stats.start = time.monotonic()     # throughput counts from the moment the engines are up
        self.progress = Progress(stats, bc.progress_interval_s)
        flusher = asyncio.create_task(self._flush_periodically())
        tasks: set[asyncio.Task] = set()
        try:
            await self._dispatch(scan, stop, tasks)
            pending = set(tasks)
            stopped = asyncio.create_task(stop.wait())
            while pending and not stop.is_set():
                _, pending = await asyncio.wait(pending | {stopped}, return_when=asyncio.FIRST_COMPLETED)
                pending.discard(stopped)
            stopped.cancel()
            if pending:                      # stopping: in-flight requests get the grace period
                _, pending = await asyncio.wait(pending, timeout=grace())
            if pending:
                log.info("batch: abandoning %d in-flight request(s); the next run does them", len(pending))
                self._abandoned = True
                for response in self._inflight.values():
                    if response is not None:
                        response.client_left()   # the head aborts it in the engine
                await asyncio.wait(pending)
        finally:
            flusher.cancel()
            watcher.cancel()
            self.store.flush()      # closed (and unlocked) by _run once the summary is written too
            self.progress.close()
        summary = stats.summary(input=str(bc.input), output=str(self.output),
                                errors=str(self.errors) if self.errors else None,
                                shard=f"{self.shard[0]}/{self.shard[1]}",
                                stopped=stop.is_set() and stats.done < stats.total,
                                repaired_bytes=self.store.repaired)
        path = bf.summary_path(self.output)
        path.write_text(json.dumps(summary, indent=2) + "\n")
        log.info("batch summary (%s): %s", path, json.dumps(summary))
        return 0 if summary["complete"] else INCOMPLETE_EXIT

    async def _watch_stop(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._stopping = True
        self._slot.set()

    def _room(self, seq: int) -> bool:
        if len(self._inflight) >= self.window:
            return False
        return not self.bc.ordered or seq - self._next_write < self.window

    async def _dispatch(self, scan: bf.Scan, stop: asyncio.Event, tasks: set) -> None:
        store, stats = self.store, self.stats
        seq = 0
        for lineno, raw in bf.iter_lines(self.bc.input, self.shard):
            if stop.is_set():
                return
            if lineno in store.done_lines:
                self._skip()
                continue
            item = bf.parse_line(lineno, raw)
            if isinstance(item, bf.Request) and lineno in scan.duplicates:
                item = bf.LineError(lineno, item.custom_id, "duplicate_custom_id",
                                    f"line {lineno}: custom_id {item.custom_id!r} is also on line "
                                    f"{scan.duplicates[lineno]}, which is run instead")
            if isinstance(item, bf.LineError):
                self._finish(seq, bf.error_record(item.line, item.custom_id, item.code, item.message), True)
                seq += 1
                continue
            if item.custom_id in store.done_ids:
                self._skip()
                continue
            while not self._room(seq) and not stop.is_set():
                self._slot.clear()
                await self._slot.wait()
            if stop.is_set():
                return
            self._inflight[seq] = None      # counted now, not when the task first runs
            self.metrics.inflight.inc()
            t = asyncio.create_task(self._one(seq, item))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            seq += 1

    def _skip(self) -> None:
        self.stats.skipped += 1
        self.metrics.records.labels("skipped").inc()
        self.progress.update()

    # ---- one request --------------------------------------------------------------------------------

    async def _one(self, seq: int, req: bf.Request) -> None:
        try:
            for attempt in range(self.bc.retries + 1):
                status, body = await self._call(seq, req)
                if status is None:                          # abandoned: left for the next run
                    self._finish(seq, None, False)
                    return
                if status == 200:
                    self._finish(seq, self._ok(req, body), False)
                    return
                if status < 500 and status != 429:          # the request's own fault: a record
                    self._finish(seq, self._failed(req, status, body), True)
                    return
                if self._stopping or attempt == self.bc.retries:
                    break
                await asyncio.sleep(min(8.0, 0.5 * 2 ** attempt))
            log.warning("batch: line %d (%s): %d %s; left for the next run", req.line, req.custom_id,
                        status, body[:200].decode(errors="replace"))
            self._finish(seq, None, False)
        finally:
            del self._inflight[seq]
            self.metrics.inflight.dec()
            self._slot.set()

    async def _call(self, seq: int, req: bf.Request) -> tuple[int | None, bytes]:
        """POST the body to the head's app in-process: (status, body), or (None, b"") if abandoned."""
        if self._abandoned:
            return None, b""
        response = self._inflight[seq] = BufferedResponse()
        await self.app(Request("POST", req.url, self.headers, req.body), response)
        if self._abandoned or not response.finished:
            return None, b""
        return response.status, response.body

    def _ok(self, req: bf.Request, body: bytes) -> bytes:
        ans = _answer.decode(body)
        if ans.usage is not None:
            self.stats.prompt_tokens += ans.usage.prompt_tokens
            self.stats.completion_tokens += ans.usage.completion_tokens
            self.metrics.prompt_tokens.inc(ans.usage.prompt_tokens)
            self.metrics.completion_tokens.inc(ans.usage.completion_tokens)
        return bf.ok_record(req.custom_id, ans.id, body)

    def _failed(self, req: bf.Request, status: int, body: bytes) -> bytes:
        try:
            e = _err.decode(body).error or _ErrBody()
        except (msgspec.ValidationError, msgspec.DecodeError):
            e = _ErrBody(message=body.decode(errors="replace"))
        return bf.error_record(req.line, req.custom_id, e.code or e.type or "error",
                               f"line {req.line}: {e.message}", status, body)

    # ---- writing ------------------------------------------------------------------------------------

    def _finish(self, seq: int, record: bytes | None, error: bool) -> None:
        """A line's outcome: a record (answer or error), or None when it is left for the next run."""
        if record is not None:
            if error:
                self.stats.failed += 1
                self.metrics.records.labels("failed").inc()
            else:
                self.stats.ok += 1
                self.metrics.records.labels("ok").inc()
            self.progress.update()
        if not self.bc.ordered:
            if record is not None:
                self._add(record, error)
            return
        self._results[seq] = None if record is None else (record, error)
        while self._next_write in self._results:
            r = self._results.pop(self._next_write)
            self._next_write += 1
            if r is not None:
                self._add(*r)

    def _add(self, record: bytes, error: bool) -> None:
        self.store.add(record, error)
        if self.store.pending >= self.bc.checkpoint_records:
            self.store.flush()

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.bc.checkpoint_interval_s)
            if self.store.pending:
                self.store.flush()


def summary_of(output: Path) -> dict | None:
    try:
        return json.loads(bf.summary_path(output).read_text())
    except (OSError, ValueError):
        return None
