"""The HTTP API of docs/service-api.md on top of a JobManager.

Endpoints that parse uploads or encode results are plain `def`s, so FastAPI runs them in its
thread pool and the event loop keeps answering status polls meanwhile.
"""

from __future__ import annotations

import io
import math
import time
from contextlib import asynccontextmanager

import numpy as np
import torch
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from .. import __version__
from ..exrio import exr_bytes
from ..jobformat import (
    JobError,
    JobTooLarge,
    Options,
    Result,
    hdri_from_bytes,
    job_from_bytes,
    parse_json,
    result_channels,
)
from ..models import available_models
from .jobs import DONE, GBufferGone, JobManager, QueueFull, UnknownJob
from .security import NONCE, Guard, token_proof

API_VERSION = 1
RESULT_ARRAYS = ("shaded", "unshadowed", "shadow", "lights", "mask")
MAX_WAIT = 30.0  # seconds a status request may wait for its job to finish (long polling)
MAX_ROTATION = 1e6  # radians; beyond it the HDRI's pixel shift overflows and the rotation means nothing


class NotReady(Exception):
    """The result of a job that is not done."""


def _error(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _validation_message(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors():
        where = [str(part) for part in item.get("loc", ()) if part != "body"]
        name = f"form field '{'.'.join(where)}'" if where else "request body"
        parts.append(f"{name} is missing" if item.get("type") == "missing" else f"{name}: {item.get('msg')}")
    return "; ".join(parts) or "malformed request"


def encode_exr(result: Result, half: bool = False) -> bytes:
    return exr_bytes(result_channels(result), half=half, meta=result.meta)


def encode_npz(result: Result, half: bool = False, layers: tuple[str, ...] = RESULT_ARRAYS) -> bytes:
    dtype = np.float16 if half else np.float32
    buffer = io.BytesIO()
    with np.errstate(over="ignore"):
        np.savez(buffer, **{name: np.ascontiguousarray(getattr(result, name), dtype) for name in layers})
    return buffer.getvalue()


def requested_layers(layers: str | None) -> tuple[str, ...]:
    """result.npz's ?layers=a,b (default: all of RESULT_ARRAYS); JobError naming an unknown one."""
    if layers is None:
        return RESULT_ARRAYS
    names = tuple(name.strip() for name in layers.split(","))
    unknown = [name for name in names if name not in RESULT_ARRAYS]
    if unknown:
        raise JobError(f"unknown result layer(s) {unknown}; known: {', '.join(RESULT_ARRAYS)}")
    return names


def create_app(manager: JobManager, *, token: str, max_body: int, max_pixels: int,
               allow_remote: bool = False) -> FastAPI:
    renderer = manager.renderer
    default_model = renderer.defaults.model
    offered = sorted({m["name"] for m in available_models()} | {default_model})

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        manager.start()
        yield
        await run_in_threadpool(manager.stop)

    app = FastAPI(title="PBNDS shading service", version=__version__, lifespan=lifespan)
    app.add_middleware(Guard, token=token, max_body=max_body, allow_remote=allow_remote)

    @app.exception_handler(JobError)
    async def bad_job(_request: Request, error: JobError) -> JSONResponse:
        return _error(400, str(error))

    @app.exception_handler(JobTooLarge)
    async def too_large(_request: Request, error: JobTooLarge) -> JSONResponse:
        return _error(413, str(error))

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, error: RequestValidationError) -> JSONResponse:
        return _error(400, _validation_message(error))

    @app.exception_handler(UnknownJob)
    async def unknown_job(_request: Request, error: UnknownJob) -> JSONResponse:
        return _error(404, str(error))

    @app.exception_handler(GBufferGone)
    async def gbuffer_gone(_request: Request, error: GBufferGone) -> JSONResponse:
        return _error(409, str(error))

    @app.exception_handler(NotReady)
    async def not_ready(_request: Request, error: NotReady) -> JSONResponse:
        return _error(409, str(error))

    @app.exception_handler(QueueFull)
    async def queue_full(_request: Request, error: QueueFull) -> JSONResponse:
        return _error(503, str(error), {"Retry-After": str(error.retry_after)})

    def check_model(options: Options) -> None:
        if options.model not in offered:
            raise JobError(f"option 'model': this service offers {offered}, not {options.model!r}")

    def finished_result(job_id: str) -> Result:
        record = manager.get(job_id)
        if record.status != DONE:
            raise NotReady(f"job {job_id!r} is {record.status}" + (f": {record.error}" if record.error else "")
                           + ("" if record.status in ("failed", "cancelled") else "; poll GET /v1/jobs/{id}"))
        return record.result

    @app.get("/v1/health")
    def health(nonce: str | None = None) -> dict:
        """?nonce=<16-128 of A-Z a-z 0-9 _ -> adds "proof": HMAC-SHA256(token, nonce) in hex."""
        queued, running = manager.counts()
        reply = {"status": "ok", "version": __version__, "api": API_VERSION, "device": str(renderer.device),
                 "model": default_model, "threads": torch.get_num_threads(), "queue_length": queued,
                 "running": running}
        if nonce is not None:
            if not NONCE.match(nonce):
                raise JobError("query parameter 'nonce' must be 16 to 128 characters of A-Z, a-z, 0-9, _ and -")
            reply["proof"] = token_proof(token, nonce)
        return reply

    @app.get("/v1/models")
    def models() -> dict:
        return {"models": available_models(), "default": default_model}

    @app.post("/v1/jobs", status_code=202)
    def submit(job: bytes = File(description="job.json"), gbuffer: bytes = File(description="gbuffer.exr"),
               hdri: bytes = File(description="hdri.exr"),
               shadow_maps: list[UploadFile] = File(default=[], description="the lights' shadow maps and the "
                                                    "surround map, each under the file name job.json gives it")
               ) -> dict:
        started = time.perf_counter()
        files = {}
        for upload in shadow_maps:
            if upload.filename in files:
                raise JobError(f"depth map file {upload.filename!r} was uploaded twice")
            files[upload.filename] = upload.file.read()
        parsed = job_from_bytes(job, gbuffer, hdri, renderer.defaults, files, max_pixels=max_pixels)
        check_model(parsed.options)
        record = manager.submit(parsed, decode_ms=(time.perf_counter() - started) * 1e3)
        return {"id": record.id, "status": record.status}

    @app.get("/v1/jobs/{job_id}")
    def status(job_id: str, wait: float = Query(0.0, description=f"long poll: answer as soon as the job has "
                                                  f"finished, or after this many seconds (<= {MAX_WAIT:g})")) -> dict:
        if not (math.isfinite(wait) and 0 <= wait <= MAX_WAIT):
            raise JobError(f"wait must be a number of seconds within 0..{MAX_WAIT:g}, got {wait!r}")
        return (manager.wait_finished(job_id, wait) if wait else manager.get(job_id)).describe()

    def download(job_id: str, encode, half: bool) -> Response:
        result = finished_result(job_id)
        started = time.perf_counter()
        data = encode(result, half)
        timing = f"encode;dur={(time.perf_counter() - started) * 1e3:.1f}"
        return Response(data, media_type="application/octet-stream", headers={"Server-Timing": timing})

    @app.get("/v1/jobs/{job_id}/result", response_class=Response)
    def result_exr(job_id: str, half: bool = False) -> Response:
        """The result EXR; ?half=true writes half floats (half the bytes)."""
        return download(job_id, encode_exr, half)

    @app.get("/v1/jobs/{job_id}/result.npz", response_class=Response)
    def result_npz(job_id: str, half: bool = False, layers: str | None = None) -> Response:
        """The result arrays; ?half=true sends float16 (half the bytes; ~3 significant digits); ?layers=shaded,mask
        only those."""
        names = requested_layers(layers)
        return download(job_id, lambda result, half: encode_npz(result, half, names), half)

    @app.post("/v1/jobs/{job_id}/cancel")
    def cancel(job_id: str) -> dict:
        record = manager.cancel(job_id)
        return {"id": record.id, "status": record.status}

    @app.post("/v1/jobs/{job_id}/relight", status_code=202)
    def relight(job_id: str, hdri: bytes = File(description="hdri.exr"),
                options: str | None = Form(None, description="JSON object of options to change"),
                rotation: float = Form(0.0, description="radians about +Z applied to the HDRI")) -> dict:
        started = time.perf_counter()
        source = manager.get(job_id)
        manager.require_gbuffer(source)
        changes = parse_json(options, "relight options") if options else {}
        if not isinstance(changes, dict):
            raise JobError("relight options must be a JSON object")
        new_options = Options.from_dict(changes, source.options)
        check_model(new_options)
        if not (math.isfinite(rotation) and abs(rotation) <= MAX_ROTATION):
            raise JobError(f"relight rotation must be a finite number of radians within +-{MAX_ROTATION:g}, "
                           f"got {rotation!r}")
        lighting = hdri_from_bytes(hdri, max_pixels=max_pixels)
        record = manager.relight(source, lighting, new_options, decode_ms=(time.perf_counter() - started) * 1e3,
                                 rotation=rotation)
        return {"id": record.id, "status": record.status}

    return app
