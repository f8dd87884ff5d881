"""`pbnds bench-service`: what the service adds (upload, decode, encode, download) against shading time.

Starts a real service as a child process and talks to it over loopback with the standard library,
as the add-on does, then writes a Markdown report.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ANALYSIS = "<!-- written by hand below this line; bench-service keeps it -->"


def add_parser(commands) -> None:
    bench = commands.add_parser("bench-service", help="measure the service's overhead against shading time")
    bench.add_argument("--sizes", default="512x512:64,1920x1080:16",
                       help="WIDTHxHEIGHT:RAYS,... (default 512x512:64,1920x1080:16)")
    bench.add_argument("--model", default="default")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--repeat", type=int, default=3, help="runs per size; medians are reported (default 3)")
    bench.add_argument("--relight", default="256x256:256", help="WIDTHxHEIGHT:RAYS of the relight round trips "
                       "(stratified rays, served from the relight cache; empty: none) (default 256x256:256)")
    bench.add_argument("--threads", type=int, help="torch CPU threads of the service (default: torch's own choice); "
                       "stated in the report")
    bench.add_argument("--output", type=Path, default=ROOT / "docs" / "service-benchmark.md")
    bench.set_defaults(handler=cmd_bench)


class Connection:
    """One keep-alive HTTP connection to the service; every call returns (status, headers, body, seconds)."""

    def __init__(self, url: str, token: str):
        parsed = urllib.parse.urlsplit(url)
        self.http = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=600)
        self.headers = {"Authorization": f"Bearer {token}"}

    def call(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None):
        headers = dict(self.headers, **({"Content-Type": content_type} if content_type else {}))
        started = time.perf_counter()
        self.http.request(method, path, body=body, headers=headers)
        response = self.http.getresponse()
        data = response.read()
        seconds = time.perf_counter() - started
        if response.status >= 300:
            raise RuntimeError(f"{method} {path}: HTTP {response.status}: {data[:300]!r}")
        return response.status, response.headers, data, seconds

    def json(self, method: str, path: str) -> dict:
        return json.loads(self.call(method, path)[2])


def multipart(files: dict[str, bytes | str]) -> tuple[bytes, str]:
    """A multipart/form-data body: bytes become file parts, str plain form fields."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files.items():
        if isinstance(data, str):
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{data}\r\n'.encode())
        else:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}"\r\n'
                         f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def server_timing(headers) -> float:
    """The `encode` duration (ms) the service reports in its Server-Timing header."""
    for item in headers.get("Server-Timing", "").split(","):
        name, _, duration = item.strip().partition(";dur=")
        if name == "encode":
            return float(duration)
    return float("nan")


def start_service(folder: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, dict]:
    service_file = folder / "service.json"
    env = dict(os.environ, PBNDS_SERVICE_FILE=str(service_file))
    threads = [] if args.threads is None else ["--threads", str(args.threads)]
    process = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve", "--port", "0", "--device", args.device,
                                "--model", args.model, *threads], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=open(folder / "service.log", "wb"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited: {(folder / 'service.log').read_text()[-2000:]}")
        if service_file.exists():
            return process, json.loads(service_file.read_text())
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("the service did not start within 120 s")


def wait_done(connection: Connection, job_id: str, interval: float = 0.02) -> dict:
    while (status := connection.json("GET", f"/v1/jobs/{job_id}"))["status"] in ("queued", "running"):
        time.sleep(interval)
    if status["status"] != "done":
        raise RuntimeError(f"job {job_id} {status['status']}: {status['error']}")
    return status


def measure(connection: Connection, files: dict[str, bytes]) -> dict:
    body, content_type = multipart(files)
    connection.http.close()  # reconnect: the service drops connections idle for 5 s (uvicorn's keep-alive)
    _, _, reply, submit_s = connection.call("POST", "/v1/jobs", body, content_type)
    job_id = json.loads(reply)["id"]
    timings = wait_done(connection, job_id)["timings"]
    _, exr_headers, exr, exr_s = connection.call("GET", f"/v1/jobs/{job_id}/result")
    _, npz_headers, npz, npz_s = connection.call("GET", f"/v1/jobs/{job_id}/result.npz")
    _, half_headers, half, half_s = connection.call("GET", f"/v1/jobs/{job_id}/result.npz?half=true")
    return {"upload_mb": len(body) / 2**20, "submit_ms": submit_s * 1e3, "decode_ms": timings["decode_ms"],
            "shading_ms": timings["prepare_ms"] + timings["shade_ms"] + timings["shadow_ms"],
            "exr_mb": len(exr) / 2**20, "exr_ms": exr_s * 1e3, "exr_encode_ms": server_timing(exr_headers),
            "npz_mb": len(npz) / 2**20, "npz_ms": npz_s * 1e3, "npz_encode_ms": server_timing(npz_headers),
            "half_mb": len(half) / 2**20, "half_ms": half_s * 1e3}


def measure_relight(connection: Connection, files: dict[str, bytes], repeat: int) -> dict:
    """Round trips of POST relight + polling + result.npz after one full job: the first relight builds the
    relight cache, the later ones (alternately rotated) reuse it."""
    body, content_type = multipart(files)
    connection.http.close()
    _, _, reply, _ = connection.call("POST", "/v1/jobs", body, content_type)
    job_id = json.loads(reply)["id"]
    wait_done(connection, job_id)
    runs = []
    for index in range(repeat + 1):
        fields = {"hdri": files["hdri"], **({"rotation": "0.5"} if index % 2 else {})}
        body, content_type = multipart(fields)
        started = time.perf_counter()
        _, _, reply, _ = connection.call("POST", f"/v1/jobs/{job_id}/relight", body, content_type)
        relight_id = json.loads(reply)["id"]
        status = wait_done(connection, relight_id, interval=0.002)
        connection.call("GET", f"/v1/jobs/{relight_id}/result.npz")
        runs.append({"round_trip_ms": (time.perf_counter() - started) * 1e3, **status["timings"]})
    cached = runs[1:]
    return {"first_ms": runs[0]["round_trip_ms"], "cache_ms": runs[0].get("relight_cache_ms", float("nan")),
            **{key: statistics.median(run.get(key, float("nan")) for run in cached)
               for key in ("round_trip_ms", "decode_ms", "shade_ms", "shadow_ms", "run_ms")}}


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .. import __version__
    from ..jobformat import Options, write_job
    from ..synthetic import demo_scene_job

    rows = []
    with tempfile.TemporaryDirectory(prefix="pbnds-bench-") as tmp:
        folder = Path(tmp)
        process, info = start_service(folder, args)
        try:
            connection = Connection(info["url"], info["token"])
            health = connection.json("GET", "/v1/health")
            for spec in args.sizes.split(","):
                size, _, rays = spec.partition(":")
                width, height = (int(v) for v in size.split("x"))
                job = demo_scene_job(width, height, options=Options(model=args.model, rays=int(rays or 64)))
                job_dir = folder / size
                write_job(job, job_dir)
                files = {name: (job_dir / f"{name}{ext}").read_bytes()
                         for name, ext in (("job", ".json"), ("gbuffer", ".exr"), ("hdri", ".exr"))}
                runs = [measure(connection, files) for _ in range(args.repeat)]
                row = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
                row.update(size=size, rays=int(rays or 64))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
            relight = None
            if args.relight:
                size, _, rays = args.relight.partition(":")
                width, height = (int(v) for v in size.split("x"))
                options = Options(model=args.model, rays=int(rays or 256), sampling="stratified")
                job_dir = folder / f"relight-{size}"
                write_job(demo_scene_job(width, height, options=options), job_dir)
                files = {name: (job_dir / f"{name}{ext}").read_bytes()
                         for name, ext in (("job", ".json"), ("gbuffer", ".exr"), ("hdri", ".exr"))}
                relight = {"size": size, "rays": options.rays, **measure_relight(connection, files, args.repeat * 2)}
                print(json.dumps(relight), file=sys.stderr)
        finally:
            process.terminate()
            process.wait(30)
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(),
               "python": platform.python_version(), "torch": torch.__version__, "pbnds": __version__,
               "device": health["device"], "model": health["model"],
               "torch threads": f"{health['threads']} ({'--threads' if args.threads else 'torch default'})",
               "load average at the end": "{:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg())}
    kept = args.output.read_text().partition(ANALYSIS)[2] if args.output.exists() else ""
    args.output.write_text(report(rows, machine, relight) + (f"\n{ANALYSIS}{kept}" if kept else ""))
    print(f"wrote {args.output}")
    return 0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(rows: list[dict], machine: dict, relight: dict | None = None) -> str:
    lines = ["# Service overhead benchmark", "",
             "Written by `pbnds bench-service` (backend/service/bench.py): a real `pbnds serve` child process, "
             "the synthetic demo scene, one keep-alive loopback connection from the standard library's "
             "http.client (as the add-on uses), medians of the runs.", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), "",
             "| size | rays | upload MiB | submit ms (of which decode) | shading ms | result.npz MiB, ms (encode) "
             "| overhead ms (submit + npz) | overhead / shading | result.npz?half=true MiB, ms "
             "| result EXR MiB, ms (encode) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        overhead = r["submit_ms"] + r["npz_ms"]
        lines.append(f"| {r['size']} | {r['rays']} | {r['upload_mb']:.1f} "
                     f"| {r['submit_ms']:.0f} ({r['decode_ms']:.0f}) "
                     f"| {r['shading_ms']:.0f} | {r['npz_mb']:.1f}, {r['npz_ms']:.0f} ({r['npz_encode_ms']:.0f}) "
                     f"| {overhead:.0f} | {100 * overhead / r['shading_ms']:.1f}% "
                     f"| {r.get('half_mb', float('nan')):.1f}, {r.get('half_ms', float('nan')):.0f} "
                     f"| {r['exr_mb']:.1f}, {r['exr_ms']:.0f} ({r['exr_encode_ms']:.0f}) |")
    if relight:
        lines += ["", f"Relight round trips at {relight['size']}, {relight['rays']} stratified rays (POST relight with "
                  "the HDRI, polling every 2 ms, GET result.npz; every other one rotated by 0.5 rad): the first builds "
                  f"the relight cache ({relight['first_ms']:.0f} ms, of which cache {relight['cache_ms']:.0f} ms); "
                  f"the cached ones take {relight['round_trip_ms']:.0f} ms (median; in the worker: run "
                  f"{relight['run_ms']:.0f} ms = lookup and contraction {relight['shade_ms']:.0f} ms + shadow net "
                  f"{relight['shadow_ms']:.0f} ms; HDRI decode {relight['decode_ms']:.0f} ms)."]
    return "\n".join(lines) + "\n"
