"""`slurmserve gateway`: one OpenAI endpoint on the login node for all of a user's deployments.

The gateway reads only the `model` field of a request; the body goes to a ready job serving that
model (the one with the fewest outstanding requests) and the answer, a JSON body or an SSE stream,
comes back as the bytes the head sent. Jobs come from the registry and Slurm (`gateway/jobs.py`), the
connections to the heads are a keep-alive pool per job (`gateway/upstream.py`).

Security: clients authenticate with the user's gateway key (`<state_dir>/gateway_key`, 0600, made
on first start; compared in constant time), always, also on 127.0.0.1, which every user of a login
node can reach. The gateway authenticates to each head with that job's secret from the registry.
No secret goes into a log line, an error message or a command line.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import time
from pathlib import Path

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from slurmserve import registry
from slurmserve.gateway.jobs import Job, JobTable
from slurmserve.gateway.upstream import Conn, UpstreamError
from slurmserve.private_files import write_private
from slurmserve.router.bearer_app import JSON, BearerApp
from slurmserve.router.http_app import MAX_BODY_BYTES, SSE
from slurmserve.router.http_server import HTTPServer, Request, Response
from slurmserve.router.metrics import _LATENCY_BUCKETS
from slurmserve.router.openai_api import NESTED_TOO_DEEP, APIError, ChunkWriter

log = logging.getLogger("slurmserve.gateway")

_PASS_HEADERS = (b"content-type", b"retry-after", b"cache-control")


class _ModelOnly(msgspec.Struct, forbid_unknown_fields=False):
    model: str


_model_decoder = msgspec.json.Decoder(_ModelOnly)


def model_of(body: bytes) -> str:
    """The `model` of a request body (all the gateway reads of it); APIError 400 if it has none."""
    try:
        return _model_decoder.decode(body).model
    except msgspec.ValidationError as e:
        raise APIError(400, str(e).replace("Object missing required field", "missing field"),
                       param="model") from None
    except msgspec.DecodeError as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:    # (skipping an unknown field recurses too)
        raise APIError(400, NESTED_TOO_DEEP) from None


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("slurmserve_gateway:requests", "Requests answered, by job and status",
                                ["job", "model", "status"], registry=r)
        self.latency = Histogram("slurmserve_gateway:request_latency_seconds",
                                 "Time from a request's arrival to its last byte, by job",
                                 ["job", "model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.errors = Counter("slurmserve_gateway:upstream_errors",
                              "Failed exchanges with a head (connect, refused, broke off mid-response)",
                              ["job", "model", "kind"], registry=r)
        self.http_errors = Counter("slurmserve_gateway:http_errors", "Requests the gateway itself "
                                   "answered with an error", ["status"], registry=r)
        self.queue_depth = Gauge("slurmserve_gateway:queue_depth",
                                 "Requests waiting for a job of their model to become ready", registry=r)
        self.job_ready = Gauge("slurmserve_gateway:job_ready", "1 while a job takes requests",
                               ["job", "model"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class GatewayApp(BearerApp):
    def __init__(self, jobs: JobTable, metrics: GatewayMetrics, api_key: str):
        super().__init__(api_key, metrics)
        self.jobs = jobs
        self.created = int(time.time())
        self.routes.update({
            ("POST", "/v1/completions"): self.proxy,
            ("POST", "/v1/chat/completions"): self.proxy,
            ("GET", "/v1/models"): self.models,
            ("GET", "/health"): self.health,
        })

    async def models(self, request: Request, response: Response) -> None:
        data = [{"id": m, "object": "model", "created": self.created, "owned_by": "slurmserve"}
                for m in self.jobs.ready_models()]
        response.send(200, msgspec.json.encode({"object": "list", "data": data}), JSON)

    async def health(self, request: Request, response: Response) -> None:
        ready = sum(1 for j in self.jobs.jobs.values() if j.ready)
        response.send(200, msgspec.json.encode({"status": "ok", "jobs_ready": ready,
                                                "queue_depth": self.jobs.waiting}), JSON)

    # ---- proxying -------------------------------------------------------------------------------

    async def proxy(self, request: Request, response: Response) -> None:
        body = request.body
        model = model_of(body)
        path = request.path.encode("latin-1")
        start = time.perf_counter()
        task = asyncio.current_task()
        response.on_disconnect = task.cancel    # closing the upstream connection aborts the request
        job = conn = None
        status = 0
        try:
            job, conn = await self._open(model, path, body)
            status = conn.status
            if conn.status == 200 and _is_sse(conn.headers):
                await self._stream(response, job, conn)
            else:
                try:
                    data = await conn.read_all()
                except UpstreamError as e:
                    self.metrics.errors.labels(job.job_id, model, "broken").inc()
                    raise APIError(502, _gone(job, e), type_="server_error") from None
                headers = [(k, v) for k, v in conn.headers if k in _PASS_HEADERS]
                response.send(conn.status, data, headers)
        except asyncio.CancelledError:
            if not response.disconnected:
                raise
            task.uncancel()   # the client left; closing the connection aborts it
            status = 499
        finally:
            if job is not None:
                if conn is not None:
                    conn.release()
                self.jobs.release(job)
                if status:
                    self.metrics.requests.labels(job.job_id, model, str(status)).inc()
                    self.metrics.latency.labels(job.job_id, model).observe(time.perf_counter() - start)

    async def _open(self, model: str, path: bytes, body: bytes) -> tuple[Job, Conn]:
        """Send the request to a job serving `model`: another one (or, after waiting, the same) when
        a head cannot be reached or refuses it unprocessed (503: draining, no engine up)."""
        deadline = time.monotonic() + self.jobs.queue_timeout_s
        while True:
            job = await self.jobs.acquire(model, deadline)
            upstream = job.upstream
            try:
                conn = await upstream.request(b"POST", path, body)
            except UpstreamError as e:
                self.jobs.release(job)
                self.metrics.errors.labels(job.job_id, model, "connect").inc()
                if not e.retryable:
                    raise APIError(502, _gone(job, e), type_="server_error") from None
                self.jobs.suspect(job, str(e))
                continue
            if conn.status in (503, 401):
                kind = "refused" if conn.status == 503 else "auth"
                self.metrics.errors.labels(job.job_id, model, kind).inc()
                try:
                    await conn.read_all()
                except UpstreamError:
                    pass
                conn.release()
                self.jobs.release(job)
                self.jobs.suspect(job, f"the head answered {conn.status}")
                continue
            return job, conn

    async def _stream(self, response: Response, job: Job, conn: Conn) -> None:
        """The SSE bytes as they come. Only whole events are forwarded, so when the head goes away
        mid-stream the client gets a well-formed OpenAI error event and the end of the stream."""
        response.start(200, SSE)
        tail = b""
        while True:
            if conn.chunks:                  # everything that is in, as one write
                chunks = conn.chunks
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                if tail:
                    data, tail = tail + data, b""
                if not data.endswith(b"\n\n"):
                    end = data.rfind(b"\n\n")
                    cut = end + 2 if end >= 0 else 0      # a partial event waits for its rest
                    data, tail = data[:cut], data[cut:]
                if data:
                    response.write(data)
                    await response.drain()
                continue
            if conn.complete:
                break
            if conn.error is not None:
                self.metrics.errors.labels(job.job_id, job.model or "", "broken").inc()
                err = APIError(502, _gone(job, conn.error), type_="server_error")
                response.write(ChunkWriter.error(err) + ChunkWriter.DONE)
                break
            await conn.wait()
        response.end()


def _is_sse(headers) -> bool:
    return any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)


def _gone(job: Job, e: Exception) -> str:
    return f"job {job.job_id} serving `{job.model}`: {e}; the request did not complete"


# ---- the key, the server, the command -------------------------------------------------------------

def key_path() -> Path:
    return registry.state_dir() / "gateway_key"


def load_or_create_key(path: Path | None = None) -> tuple[str, Path]:
    """The user's gateway key: read, or generated into a 0600 file in the 0700 state dir."""
    path = path or key_path()
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        key = ""
    if not key:
        registry.jobs_dir()                    # the state dir, 0700
        key = "sk-gw-" + secrets.token_urlsafe(32)
        write_private(path, key + "\n")
    elif path.stat().st_mode & 0o077:
        raise SystemExit(f"slurmserve gateway: {path} is readable by other users; chmod 600 it")
    return key, path


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def serve(args) -> int:
    if not _loopback(args.host):
        log.warning("listening on %s, beyond this machine: only clients with the gateway key get in",
                    args.host)
    key, kpath = load_or_create_key(args.api_key_file)
    metrics = GatewayMetrics()
    jobs = JobTable(queue_timeout_s=args.queue_timeout, poll_s=args.poll_interval,
                    on_demand=args.launch_on_demand, idle_stop_s=args.idle_stop, metrics=metrics)
    await jobs.start()
    app = GatewayApp(jobs, metrics, key)
    try:
        listener = socket.create_server((args.host, args.port), backlog=2048)
    except OSError as e:
        raise SystemExit(f"slurmserve gateway: cannot listen on {args.host}:{args.port}: {e.strerror}")
    host, port = listener.getsockname()[:2]
    server = HTTPServer(app, max_body=MAX_BODY_BYTES, keep_alive_s=30.0)
    await server.start(listener)
    url = f"http://{host}:{port}/v1"
    write_private(registry.state_dir() / "gateway.json",
                  json.dumps({"url": url, "pid": os.getpid(), "api_key_file": str(kpath)}, indent=2) + "\n")
    log.info("gateway at %s for %d job(s) in %s; API key in %s", url, len(jobs.jobs),
             registry.jobs_dir(create=False), kpath)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await jobs.close()
    return 0
