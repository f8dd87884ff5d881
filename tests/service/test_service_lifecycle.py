"""Start-up refusals, a full queue, graceful shutdown and a killed service, each on its own service process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from service_testlib import ROOT, job_files, multipart, slow_job, start_service, submit, wait

from backend.jobformat import Options
from backend.synthetic import sphere_job


@pytest.fixture
def small_service(tmp_path):
    """A service with room for one queued job that also serves foreign Host names (--allow-remote)."""
    svc = start_service(tmp_path / "svc", "--queue-size", "1", "--allow-remote")
    yield svc
    svc.process.kill()
    svc.process.wait(15)


def test_non_loopback_host_is_refused_without_allow_remote(tmp_path):
    env = {"PBNDS_SERVICE_FILE": str(tmp_path / "service.json"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "backend.cli", "serve", "--host", "0.0.0.0", "--port", "0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--allow-remote" in proc.stderr
    assert not (tmp_path / "service.json").exists()


def test_full_queue_is_503_with_retry_after_and_allow_remote_accepts_any_host(small_service, tmp_path):
    with small_service.client() as http:
        running = submit(http, job_files(slow_job(), tmp_path / "slow"))
        wait(http, running, until=("running",))
        tiny = job_files(sphere_job(16, 16, options=Options(model="lambert", rays=4)), tmp_path / "tiny")
        queued = submit(http, tiny)
        full = http.post("/v1/jobs", files=multipart(tiny))
        assert full.status_code == 503 and "queue is full" in full.json()["detail"]
        assert int(full.headers["Retry-After"]) >= 1
        assert http.get("/v1/health").json()["queue_length"] == 1
        assert http.get("/v1/health", headers={"Host": "render-box.example:8765"}).status_code == 200
        assert http.get("/v1/models", headers={"Host": "x.example", "Authorization": "Bearer no"}).status_code == 401
        http.post(f"/v1/jobs/{running}/cancel")
        assert wait(http, queued)["status"] == "done"
        assert http.post("/v1/jobs", files=multipart(tiny)).status_code == 202


def test_sigterm_cancels_the_running_job_and_removes_the_discovery_file(tmp_path):
    svc = start_service(tmp_path / "svc", "--threads", "1")
    try:
        with svc.client() as http:
            assert http.get("/v1/health").json()["threads"] == 1  # --threads reached torch
            job_id = submit(http, job_files(slow_job(), tmp_path / "slow"))
            wait(http, job_id, until=("running",))
        svc.process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal so the exit status tells how it ended
        assert svc.process.wait(20) == -signal.SIGTERM
    finally:
        svc.process.kill()
    assert not svc.service_file.exists()
    events = [json.loads(line) for line in svc.log_text().splitlines()]
    cancelled = [e for e in events if e["event"] == "job.cancelled"]
    assert [(e["job"], e["error"]) for e in cancelled] == [(job_id, "the service shut down")]
    assert any(e["event"] == "service.stopped" for e in events)


def test_killing_the_service_mid_job_gives_the_client_a_connection_error(tmp_path):
    svc = start_service(tmp_path / "svc")
    try:
        with svc.client() as http:
            job_id = submit(http, job_files(slow_job(), tmp_path / "slow"))
            wait(http, job_id, until=("running",))
            upload_started = threading.Event()
            errors: list[Exception] = []

            def slow_upload():  # a request in flight when the service dies
                def body():
                    yield b'--x\r\nContent-Disposition: form-data; name="gbuffer"; filename="g"\r\n\r\n'
                    upload_started.set()
                    for _ in range(200):
                        time.sleep(0.05)
                        yield bytes(1024)

                try:
                    http.post("/v1/jobs", content=body(), headers={"Content-Type": "multipart/form-data; boundary=x"})
                except httpx.TransportError as error:
                    errors.append(error)

            uploader = threading.Thread(target=slow_upload)
            uploader.start()
            assert upload_started.wait(10)
            time.sleep(0.2)
            svc.process.send_signal(signal.SIGKILL)
            svc.process.wait(10)
            uploader.join(20)
            assert len(errors) == 1, "the in-flight upload must fail with a transport error"
            with pytest.raises(httpx.ConnectError):
                http.get(f"/v1/jobs/{job_id}")
    finally:
        svc.process.kill()
