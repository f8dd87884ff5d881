"""The job queue: one worker thread shades jobs one at a time, in submission order.

Uploads are parsed and validated in the request, so only well-formed jobs get here. The queue is
bounded (QueueFull -> 503), finished jobs are kept a bounded count and time, and the prepared
G-buffers of the last few jobs are kept for relighting.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np
import torch

from ..envmap import EnvironmentMap
from ..jobformat import Job, Options, Result
from ..lights import Light
from ..renderer import Cancelled, PreparedGBuffer, RelightCache, Renderer
from .logs import event

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the job queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class UnknownJob(KeyError):
    def __str__(self) -> str:
        return f"unknown job {self.args[0]!r} (never submitted here, or expired)"


class GBufferGone(Exception):
    """A relight of a job whose prepared G-buffer is no longer kept."""


@dataclass
class ServiceJob:
    id: str
    options: Options
    hdri: np.ndarray | None  # dropped when the job ends
    gbuffer_key: str  # id of the job that uploaded the G-buffer this job shades
    job: Job | None = None  # the upload, until the worker has prepared its G-buffer; None for relights
    rotation: float = 0.0  # radians about +Z applied to the HDRI (relights)
    lights: list[Light] = field(default_factory=list)  # the upload's analytic lights, kept by its relights
    status: str = QUEUED
    progress: float = 0.0
    error: str | None = None
    result: Result | None = None
    timings: dict = field(default_factory=dict)
    created: float = field(default_factory=time.monotonic)
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def describe(self) -> dict:
        reply = {"id": self.id, "status": self.status, "progress": round(self.progress, 4), "error": self.error,
                 "timings": {k: round(v, 3) for k, v in self.timings.items()}}
        if self.gbuffer_key != self.id:
            reply["relight_of"] = self.gbuffer_key
        return reply


class JobManager:
    """relight_cache_bytes bounds the relight caches kept beside the prepared G-buffers (12 bytes per pixel
    and ray each, Renderer.relight_cache); a relight whose cache would not fit is shaded plainly."""

    def __init__(self, renderer: Renderer, *, queue_size: int = 8, keep_jobs: int = 32, keep_seconds: float = 3600,
                 keep_gbuffers: int = 4, relight_cache_bytes: int = 2 << 30):
        self.renderer = renderer
        self.queue_size = queue_size
        self.keep_jobs = keep_jobs
        self.keep_seconds = keep_seconds
        self.keep_gbuffers = keep_gbuffers
        self.relight_cache_bytes = relight_cache_bytes
        self._jobs: dict[str, ServiceJob] = {}
        self._pending: deque[ServiceJob] = deque()
        self._prepared: OrderedDict[str, PreparedGBuffer] = OrderedDict()
        self._relight_caches: OrderedDict[str, RelightCache] = OrderedDict()  # by G-buffer key, LRU
        self._running: ServiceJob | None = None
        self._last_run_s = 1.0
        self._stopping = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="pbnds-worker", daemon=True)

    # -- requests ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job, decode_ms: float) -> ServiceJob:
        job_id = uuid.uuid4().hex
        record = ServiceJob(job_id, job.options, job.hdri, job_id, job, lights=job.lights,
                            timings={"decode_ms": decode_ms})
        self._enqueue(record)
        return record

    def require_gbuffer(self, source: ServiceJob) -> None:
        """Raise GBufferGone unless the G-buffer of `source` is kept or still to be prepared."""
        with self._cond:
            key = source.gbuffer_key
            pending = any(j.id == key for j in self._pending) or (self._running is not None and self._running.id == key)
            if key not in self._prepared and not pending:
                raise GBufferGone(f"the G-buffer of job {source.id!r} is no longer kept (the service keeps the "
                                  f"last {self.keep_gbuffers} prepared G-buffers); submit the job again")

    def relight(self, source: ServiceJob, hdri: np.ndarray, options: Options, decode_ms: float,
                rotation: float = 0.0) -> ServiceJob:
        """Queue a job that shades the G-buffer of `source` under `hdri` rotated by `rotation` radians about +Z."""
        with self._cond:
            self.require_gbuffer(source)
            record = ServiceJob(uuid.uuid4().hex, options, hdri, source.gbuffer_key, rotation=rotation,
                                lights=source.lights, timings={"decode_ms": decode_ms})
            self._enqueue(record)
        return record

    def get(self, job_id: str) -> ServiceJob:
        with self._cond:
            self._expire()
            try:
                return self._jobs[job_id]
            except KeyError:
                raise UnknownJob(job_id) from None

    def wait_finished(self, job_id: str, timeout: float) -> ServiceJob:
        """The job as soon as it has finished, or as it is after `timeout` seconds (long polling)."""
        with self._cond:
            record = self.get(job_id)
            self._cond.wait_for(lambda: record.status in FINISHED, timeout)
            return record

    def cancel(self, job_id: str) -> ServiceJob:
        with self._cond:
            record = self.get(job_id)
            if record.status == QUEUED:
                self._pending.remove(record)
                self._finish(record, CANCELLED)
            elif record.status == RUNNING:
                record.cancel.set()  # the renderer checks it between chunks
        return record

    def counts(self) -> tuple[int, str | None]:
        """(queued jobs, id of the running job or None)"""
        with self._cond:
            return len(self._pending), self._running.id if self._running else None

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel the queued and the running job and wait for the worker to end."""
        with self._cond:
            self._stopping = True
            while self._pending:
                self._finish(self._pending.popleft(), CANCELLED, "the service shut down")
            if self._running is not None:
                self._running.cancel.set()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _enqueue(self, record: ServiceJob) -> None:
        with self._cond:
            if self._stopping:
                raise QueueFull(5)
            if len(self._pending) >= self.queue_size:
                wait = self._last_run_s * (len(self._pending) + 1)
                raise QueueFull(max(1, math.ceil(wait)))
            self._expire()
            self._jobs[record.id] = record
            self._pending.append(record)
            self._cond.notify_all()
        event("job.queued", job=record.id, relight_of=record.gbuffer_key if record.job is None else None,
              options=vars(record.options))

    def _expire(self) -> None:
        """Forget finished jobs beyond the kept count or age (oldest first)."""
        finished = [j for j in self._jobs.values() if j.status in FINISHED]
        now = time.monotonic()
        for index, record in enumerate(finished):
            if len(finished) - index > self.keep_jobs or now - record.finished > self.keep_seconds:
                del self._jobs[record.id]
                event("job.expired", job=record.id)

    def _finish(self, record: ServiceJob, status: str, error: str | None = None) -> None:
        record.status, record.error, record.finished = status, error, time.monotonic()
        record.job = record.hdri = None  # the uploads are no longer needed
        self._cond.notify_all()  # wakes wait_finished
        event(f"job.{status}", job=record.id, error=error, timings=record.describe()["timings"])

    # -- worker -----------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                record = self._running = self._pending.popleft()
                record.status = RUNNING
                record.timings["queued_ms"] = (time.monotonic() - record.created) * 1e3
            event("job.running", job=record.id)
            started = time.monotonic()
            status, error = self._run(record)
            with self._cond:
                record.timings["run_ms"] = (time.monotonic() - started) * 1e3
                self._last_run_s = time.monotonic() - started
                self._running = None
                self._finish(record, status, error)

    def _run(self, record: ServiceJob) -> tuple[str, str | None]:
        """Shade one job; every failure becomes the job's status, never the worker's end."""
        def progress(fraction: float) -> None:
            record.progress = fraction

        try:
            prepared = self._prepared_gbuffer(record)
            cache = self._relight_cache(record, prepared, progress) if record.job is None else None
            if cache is not None:
                result = self.renderer.relight(cache, record.hdri, record.rotation, options=record.options,
                                               lights=record.lights, progress=progress, timings=record.timings)
            else:
                hdri = record.hdri
                if record.rotation:
                    hdri = EnvironmentMap(hdri).rotated(record.rotation).image.numpy()
                result = self.renderer.shade(prepared, hdri, record.options, lights=record.lights, progress=progress,
                                             cancel=record.cancel.is_set, timings=record.timings)
        except Cancelled:
            return CANCELLED, "the service shut down" if self._stopping else "cancelled by request"
        except torch.OutOfMemoryError:
            with self._cond:
                self._prepared.pop(record.gbuffer_key, None)
                self._relight_caches.pop(record.gbuffer_key, None)
            if self.renderer.device.type == "cuda":
                torch.cuda.empty_cache()
            return FAILED, (f"out of memory on {self.renderer.device} even in the smallest chunks; "
                            "use fewer rays or a smaller image")
        except GBufferGone as error:
            return FAILED, str(error)
        except Exception as error:  # a bug or a broken model must not stop the service
            event("job.error", level=logging.ERROR, exc_info=True, job=record.id)
            return FAILED, f"{type(error).__name__}: {error}"
        record.timings.update(result.meta["timings"])
        record.result = result
        record.progress = 1.0
        return DONE, None

    def _prepared_gbuffer(self, record: ServiceJob) -> PreparedGBuffer:
        key = record.gbuffer_key
        if record.job is not None:
            started = time.perf_counter()
            prepared = self.renderer.prepare(record.job)
            record.timings["prepare_ms"] = (time.perf_counter() - started) * 1e3
        with self._cond:
            if record.job is None:
                try:
                    prepared = self._prepared.pop(key)
                except KeyError:
                    raise GBufferGone(f"the G-buffer of job {key!r} was not prepared or is no longer kept; "
                                      "submit the job again") from None
            self._prepared[key] = prepared  # most recently used last
            while len(self._prepared) > self.keep_gbuffers:
                evicted, _ = self._prepared.popitem(last=False)
                self._relight_caches.pop(evicted, None)
        return prepared

    def _relight_cache(self, record: ServiceJob, prepared: PreparedGBuffer, progress) -> RelightCache | None:
        """The relight cache of the record's G-buffer and options: kept, built now, or None when the options
        cannot be cached (an HDRI-dependent ray set, a shader not linear in Li) or it would not fit the budget."""
        options, key = record.options, record.gbuffer_key
        if not self.renderer.can_cache(options):
            return None
        with self._cond:
            cache = self._relight_caches.get(key)
            if cache is not None and cache.matches(prepared, options):
                self._relight_caches.move_to_end(key)
                return cache
        count = len(prepared.pixels) * options.rays
        if count * 12 > self.relight_cache_bytes:
            return None
        started = time.perf_counter()
        cache = self.renderer.relight_cache(prepared, options, progress=progress, cancel=record.cancel.is_set)
        record.timings["relight_cache_ms"] = (time.perf_counter() - started) * 1e3
        with self._cond:
            self._relight_caches[key] = cache
            while sum(c.nbytes for c in self._relight_caches.values()) > self.relight_cache_bytes:
                self._relight_caches.popitem(last=False)
        return cache
