"""The gateway's view of the user's deployments: discovery, liveness, readiness, launch on demand,
idle stop.

Every `poll_s` the table re-reads the job registry (the heads write endpoint, secret and readiness
there) and asks Slurm, with one `squeue` for all of the user's jobs, which of them are still alive.
A job serves traffic while Slurm runs it, its head says `ready` and it has an endpoint. A job that
Slurm no longer runs has its connections cut, so its in-flight requests end at once instead of
waiting on a node that is gone.

Requests for a model with no ready job wait (up to the queue timeout) while a job for it is queued,
starting or being requeued; a model configured with `--launch-on-demand` and with no live job gets
one submitted. Jobs the gateway launched are stopped after `idle_stop_s` without requests.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from slurmserve import registry
from slurmserve.launcher.sbatch import ACTIVE_STATES
from slurmserve.gateway.upstream import Upstream
from slurmserve.router.openai_api import APIError

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    job_id: str
    model: str | None = None
    status: str | None = None            # the registry's: starting | ready | draining | exited
    slurm_state: str = "UNKNOWN"
    reason: str | None = None
    url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    stop_requested: bool = False
    upstream: Upstream | None = field(default=None, repr=False)
    outstanding: int = 0
    last_used: float = field(default_factory=time.monotonic)
    suspect_until: float = 0.0           # after a failed connect: out of rotation until then
    launched: bool = False               # by this gateway (launch on demand)
    stopping: bool = False

    @property
    def alive(self) -> bool:
        """Slurm still runs or queues it and nobody is stopping it."""
        return (self.slurm_state in ACTIVE_STATES and self.status != "exited" and not self.stop_requested
                and not self.stopping)

    @property
    def ready(self) -> bool:
        return (self.alive and self.slurm_state == "RUNNING" and self.status == "ready"
                and self.upstream is not None and time.monotonic() >= self.suspect_until)

    def describe(self) -> str:
        why = f", {self.reason}" if self.reason else ""
        if self.slurm_state == "RUNNING" and self.status != "ready":
            return f"job {self.job_id} is {self.status or 'starting'} (Slurm: RUNNING)"
        return f"job {self.job_id} is {self.slurm_state}{why}"


@dataclass
class OnDemand:
    model: str
    config: Path


class JobTable:
    def __init__(self, *, queue_timeout_s: float = 60.0, poll_s: float = 1.0,
                 on_demand: dict[str, Path] | None = None, idle_stop_s: float | None = None,
                 metrics=None):
        self.jobs: dict[str, Job] = {}
        self.queue_timeout_s = queue_timeout_s
        self.poll_s = poll_s
        self.on_demand = {m: OnDemand(m, Path(p)) for m, p in (on_demand or {}).items()}
        self.idle_stop_s = idle_stop_s
        self.metrics = metrics
        self.waiting = 0
        self.known_models: set[str] = set(self.on_demand)
        self._changed = asyncio.Event()
        self._launching: dict[str, asyncio.Task] = {}
        self._launch_errors: dict[str, str] = {}
        self._task: asyncio.Task | None = None
        self._user = getpass.getuser()

    # ---- discovery and liveness ---------------------------------------------------------------------

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._poll())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for t in self._launching.values():
            t.cancel()
        for job in self.jobs.values():
            if job.upstream is not None:
                job.upstream.close()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.refresh()
                self._stop_idle()
            except Exception:   # noqa: BLE001 - the gateway keeps serving on what it knew
                log.exception("refreshing the job table failed")

    async def _squeue(self) -> dict[str, tuple[str, str | None]] | None:
        """{job id: (state, reason)} for the user's jobs Slurm knows; None when squeue fails."""
        try:
            proc = await asyncio.create_subprocess_exec(
                "squeue", "-h", "--states=all", "-u", self._user, "-o", "%i|%T|%r",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 30)
        except (OSError, asyncio.TimeoutError) as e:
            log.warning("squeue failed: %s", e)
            return None
        if proc.returncode != 0:
            log.warning("squeue failed: %s", " ".join(err.decode(errors="replace").split()))
            return None
        states = {}
        for line in out.decode().splitlines():
            jid, _, rest = line.partition("|")
            state, _, reason = rest.partition("|")
            states[jid.strip()] = (state.strip(), None if reason in ("", "None") else reason.strip())
        return states

    async def refresh(self) -> None:
        entries = {str(e.get("job_id")): e for e in registry.list_entries() if e.get("job_id")}
        states = await self._squeue()
        changed = False
        for jid, e in entries.items():
            job = self.jobs.get(jid)
            if job is None:
                job = self.jobs[jid] = Job(jid)
            was_ready = job.ready
            job.model, job.status, job.stop_requested = e.get("model"), e.get("status"), bool(e.get("stop_requested"))
            if job.model:
                self.known_models.add(job.model)
            if states is not None:
                job.slurm_state, job.reason = states.get(jid, ("GONE", None))
            self._set_endpoint(job, e.get("url"), e.get("api_key"))
            if not job.alive and job.upstream is not None:
                job.upstream.close()       # in-flight requests end now, with a clean error
                job.upstream = None
                log.info("job %s (%s) ended: %s", jid, job.model, job.describe())
            if job.ready and not was_ready:
                job.last_used = time.monotonic()     # idle time counts from readiness
                changed = True
            changed |= was_ready != job.ready
            if self.metrics is not None:
                self.metrics.job_ready.labels(jid, job.model or "").set(1 if job.ready else 0)
        for jid in list(self.jobs):
            if jid not in entries:                 # removed from the registry
                job = self.jobs.pop(jid)
                if job.upstream is not None:
                    job.upstream.close()
                changed = True
        if changed:
            self._notify()

    def _set_endpoint(self, job: Job, url: str | None, api_key: str | None) -> None:
        if url == job.url and api_key == job.api_key:
            return
        if job.upstream is not None:
            job.upstream.close()
            job.upstream = None
        job.url, job.api_key, job.suspect_until = url, api_key, 0.0
        if url and api_key and job.alive:
            parts = urlsplit(url)
            job.upstream = Upstream(parts.hostname, parts.port or 80, api_key)
        elif not url or not api_key:
            job.url = job.api_key = None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def suspect(self, job: Job, why: str) -> None:
        """A connect failed or the head refused: out of rotation until the next refresh says more."""
        log.warning("job %s: %s; routing around it", job.job_id, why)
        job.suspect_until = time.monotonic() + max(5.0, 3 * self.poll_s)

    # ---- routing -----------------------------------------------------------------------------------

    def ready_models(self) -> list[str]:
        return sorted({j.model for j in self.jobs.values() if j.ready and j.model})

    def _pick(self, model: str) -> Job | None:
        best = None
        for j in self.jobs.values():
            if j.model == model and j.ready and (best is None or j.outstanding < best.outstanding):
                best = j
        return best

    async def acquire(self, model: str, deadline: float) -> Job:
        """A ready job serving `model`, its outstanding count taken (give it back with `release`).
        Waits until `deadline` (time.monotonic) while a job for the model is on its way."""
        job = self._pick(model)
        if job is None:
            job = await self._wait_for(model, deadline)
        job.outstanding += 1
        job.last_used = time.monotonic()
        return job

    def release(self, job: Job) -> None:
        job.outstanding -= 1
        job.last_used = time.monotonic()

    def _coming(self, model: str) -> list[Job]:
        return [j for j in self.jobs.values() if j.model == model and j.alive]

    async def _wait_for(self, model: str, deadline: float) -> Job:
        if model not in self.known_models:
            raise APIError(404, f"The model `{model}` does not exist. Models with a running job: "
                                f"{', '.join(self.ready_models()) or 'none'}.",
                           type_="NotFoundError", param="model", code="model_not_found")
        self.waiting += 1
        self._gauge()
        try:
            while True:
                job = self._pick(model)
                if job is not None:
                    return job
                if not self._coming(model):
                    if model not in self.on_demand:
                        ended = [j for j in self.jobs.values() if j.model == model]
                        last = f" (last: {ended[-1].describe()})" if ended else ""
                        raise APIError(503, f"no running job serves model `{model}`{last}; start "
                                            f"one with `slurmserve submit`", type_="service_unavailable",
                                       code="no_job_for_model")
                    if model in self._launch_errors and model not in self._launching:
                        raise APIError(503, f"model `{model}`: launching a job on demand failed: "
                                            f"{self._launch_errors.pop(model)}",
                                       type_="service_unavailable", code="launch_failed")
                    self._launch(model)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise APIError(503, self._timeout_message(model), type_="service_unavailable",
                                   code="queue_timeout", headers={"retry-after": "30"})
                changed = self._changed
                try:
                    await asyncio.wait_for(changed.wait(), min(left, self.poll_s))
                except asyncio.TimeoutError:
                    pass
        finally:
            self.waiting -= 1
            self._gauge()

    def _timeout_message(self, model: str) -> str:
        jobs = self._coming(model)
        state = "; ".join(j.describe() for j in jobs) or "no job yet"
        launched = [j for j in jobs if j.launched]
        how = (f"the gateway submitted job {launched[0].job_id} for it on demand" if launched
               else "no job serving it is ready")
        if model in self._launching and not launched:
            how = "the gateway is submitting a job for it on demand"
        return (f"model `{model}`: {how}, and none was ready within the {self.queue_timeout_s:g} s "
                f"queue timeout ({state}). Retry later.")

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.waiting)

    # ---- launch on demand and idle stop ---------------------------------------------------------------

    def _launch(self, model: str) -> None:
        if model in self._launching:
            return
        self._launching[model] = asyncio.get_running_loop().create_task(self._submit(model))

    async def _submit(self, model: str) -> None:
        spec = self.on_demand[model]
        try:
            job_id = await asyncio.to_thread(_submit_job, spec.config)
        except Exception as e:   # noqa: BLE001 - reported to the waiting requests
            log.error("launch on demand of %s (%s) failed: %s", model, spec.config, e)
            self._launch_errors[model] = str(e)
            del self._launching[model]
            self._notify()
            return
        log.info("launched job %s for model %s on demand (%s)", job_id, model, spec.config)
        await self.refresh()
        self.jobs.setdefault(job_id, Job(job_id, model=model, slurm_state="PENDING")).launched = True
        del self._launching[model]
        self._notify()

    def _stop_idle(self) -> None:
        if not self.idle_stop_s:
            return
        now = time.monotonic()
        for job in self.jobs.values():
            if (job.launched and job.ready and job.outstanding == 0
                    and now - job.last_used > self.idle_stop_s):
                job.stopping = True
                if job.upstream is not None:
                    job.upstream.close()
                    job.upstream = None
                log.info("job %s (%s): idle for %.0f s, stopping it", job.job_id, job.model, now - job.last_used)
                asyncio.get_running_loop().create_task(self._stop(job))

    async def _stop(self, job: Job) -> None:
        from slurmserve.launcher.slurm_cli import stop_job
        try:
            msg = await asyncio.to_thread(stop_job, job.job_id)
            log.info("%s", msg)
        except Exception as e:   # noqa: BLE001
            log.error("stopping idle job %s failed: %s", job.job_id, e)


def _submit_job(config: Path) -> str:
    from slurmserve.config import load_config
    from slurmserve.launcher.sbatch import submit
    from slurmserve.slurm_config import load_site
    return submit(load_config(config), config, None, load_site(None))
