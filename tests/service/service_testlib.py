"""Helpers for the service tests: a real `python -m backend.cli serve` child process, jobs as uploads."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from backend.jobformat import Job, Options, write_job
from backend.synthetic import demo_scene_job

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0


@dataclass
class Service:
    process: subprocess.Popen
    url: str
    token: str
    service_file: Path
    log: Path

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=60,
                            **kwargs)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)


def start_service(folder: Path, *args: str, service_file: Path | None = None) -> Service:
    """Start the service on a free port and wait (bounded) for its discovery file (default
    folder/config/service.json) and health."""
    folder.mkdir(parents=True, exist_ok=True)
    service_file = service_file or folder / "config" / "service.json"
    log = folder / "service.log"
    env = dict(os.environ, PBNDS_SERVICE_FILE=str(service_file), PYTHONPATH=str(ROOT))
    with open(log, "wb") as handle:
        process = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve", "--port", "0", "--device", "cpu",
                                    *args], cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited with {process.returncode}:\n{log.read_text()}")
        if service_file.exists():
            info = json.loads(service_file.read_text())
            try:
                if httpx.get(info["url"] + "/v1/health", timeout=2).status_code == 200:
                    return Service(process, info["url"], info["token"], service_file, log)
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    process.kill()
    process.wait()
    raise RuntimeError(f"the service did not come up within {START_TIMEOUT} s:\n{log.read_text()}")


def job_files(job: Job, folder: Path) -> dict[str, bytes]:
    """The job's upload fields (job, gbuffer, hdri) as bytes, written by the one job writer."""
    write_job(job, folder)
    return {"job": (folder / "job.json").read_bytes(), "gbuffer": (folder / "gbuffer.exr").read_bytes(),
            "hdri": (folder / "hdri.exr").read_bytes()}


def multipart(files: dict[str, bytes]) -> dict:
    return {name: (name, data, "application/octet-stream") for name, data in files.items()}


def submit(http: httpx.Client, files: dict[str, bytes]) -> str:
    reply = http.post("/v1/jobs", files=multipart(files))
    assert reply.status_code == 202, reply.text
    return reply.json()["id"]


def wait(http: httpx.Client, job_id: str, timeout: float = 120, until: tuple = ("done", "failed", "cancelled")) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = http.get(f"/v1/jobs/{job_id}").json()
        if status["status"] in until:
            return status
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} still {status} after {timeout} s")


def result_arrays(http: httpx.Client, job_id: str) -> dict[str, np.ndarray]:
    import io

    reply = http.get(f"/v1/jobs/{job_id}/result.npz")
    assert reply.status_code == 200, reply.text
    with np.load(io.BytesIO(reply.content), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def slow_job() -> Job:
    """A job that shades for tens of seconds on a CPU (cancelled or killed by the tests that use it)."""
    return demo_scene_job(128, 96, options=Options(model="default", rays=4096))


# -- hand-made EXR files: the lies an upload can tell in its header ---------------------------------


def exr_header(data: bytes) -> tuple[dict[str, tuple[int, int]], int]:
    """{attribute name: (value start, value end)} of a single-part EXR, and the offset after the header."""
    attributes, at = {}, 8
    while data[at] != 0:
        name_end = data.index(b"\0", at)
        type_end = data.index(b"\0", name_end + 1)
        size = struct.unpack_from("<i", data, type_end + 1)[0]
        attributes[data[at:name_end].decode()] = (type_end + 5, type_end + 5 + size)
        at = type_end + 5 + size
    return attributes, at + 1


def patch_attribute(data: bytes, name: str, value: bytes) -> bytes:
    """The file with attribute `name`'s value replaced by `value` of the same size."""
    start, end = exr_header(data)[0][name]
    assert len(value) == end - start
    return data[:start] + value + data[end:]


def box(width: int, height: int) -> bytes:
    """A box2i attribute value: (0, 0) .. (width - 1, height - 1)."""
    return struct.pack("<4i", 0, 0, width - 1, height - 1)


def zero_exr(width: int, height: int, channels: tuple[str, ...]) -> bytes:
    """A valid all-zero half-float ZIP EXR of any size, written without ever holding its pixels: one
    16-line chunk of zeros is compressed once and repeated (a 16384x16384 G-buffer is ~7 MB)."""
    from backend.exrio import exr_bytes

    assert height % 16 == 0
    chunk = exr_bytes({name: np.zeros((16, width), np.float32) for name in channels}, half=True)
    chunk = patch_attribute(chunk, "displayWindow", box(width, height))
    chunk = patch_attribute(chunk, "dataWindow", box(width, height))
    _, header_end = exr_header(chunk)
    (offset,) = struct.unpack_from("<Q", chunk, header_end)
    _, size = struct.unpack_from("<2i", chunk, offset)
    data = chunk[offset + 8:offset + 8 + size]
    count = height // 16
    first = header_end + 8 * count
    table = struct.pack(f"<{count}Q", *(first + i * (8 + size) for i in range(count)))
    chunks = b"".join(struct.pack("<2i", 16 * i, size) + data for i in range(count))
    return chunk[:header_end] + table + chunks


GBUFFER_CHANNELS = ("albedo.R", "albedo.G", "albedo.B", "specular.R", "specular.G", "specular.B", "roughness.Y",
                    "normal.X", "normal.Y", "normal.Z", "depth.Y", "ao.Y", "mask.Y")


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")
