"""Start and stop the PBNDS service as a child process (the add-on's auto-start).

The service needs torch, which Blender's Python does not have, so it runs under a separate
interpreter named in the preferences: `<python> -m backend.cli serve --port N`.
"""

import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

from . import client


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServiceProcess:
    """A running service child: `client` talks to it, `stop()` ends it."""

    def __init__(self, popen, url, log_path):
        self.popen = popen
        self.url = url
        self.log_path = log_path
        self.client = None

    def alive(self):
        return self.popen.poll() is None

    def log_tail(self, chars=2000):
        try:
            return pathlib.Path(self.log_path).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout=10.0):
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)


def start(python="", port=0, cwd=None, env=None, timeout=60.0):
    """Start `python -m backend.cli serve` and wait (at most `timeout` s) until it answers health.

    The token is read from the discovery file the service writes (PBNDS_SERVICE_FILE in `env`
    or this process's environment). Raises client.ServiceError with the service's log tail when
    it exits early or does not come up in time.
    """
    python = python or sys.executable
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ if env is None else env)
    log_fd, log_path = tempfile.mkstemp(prefix="pbnds-service-", suffix=".log")
    with os.fdopen(log_fd, "wb") as log:
        popen = subprocess.Popen(
            [python, "-m", "backend.cli", "serve", "--port", str(port)],
            cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    proc = ServiceProcess(popen, url, log_path)
    service_file = pathlib.Path(env["PBNDS_SERVICE_FILE"]) if env.get("PBNDS_SERVICE_FILE") else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise client.ServiceError(
                f"PBNDS service ({python} -m backend.cli serve) exited with code {popen.returncode}:\n"
                f"{proc.log_tail()}"
            )
        info = client.read_service_file(service_file)
        if info and info.get("url", "").rstrip("/") == url:
            candidate = client.ServiceClient(url, info.get("token", ""), timeout=2.0)
            try:
                candidate.health()
            except client.ServiceError:
                pass
            else:
                candidate.timeout = 30.0
                proc.client = candidate
                return proc
        time.sleep(0.2)
    proc.stop()
    raise client.ServiceError(
        f"PBNDS service at {url} did not come up within {timeout:g} s:\n{proc.log_tail()}"
    )


_started = None  # the service this Blender session started, reused by later renders


def connect(url="", token="", auto_start=False, python="", cwd=None, timeout=60.0):
    """A client for a service that answers health, starting one when allowed and none does.

    Only an unreachable or undiscoverable service triggers auto-start; a 401 or any other
    answer from a running service is passed on as it is.
    """
    global _started
    if _started is not None and _started.alive() and not url:
        return _started.client
    try:
        svc = client.discover(url, token)
        svc.health(timeout=5.0)
        return svc
    except client.ServiceError as exc:
        if not auto_start or exc.status is not None:
            raise
    _started = start(python, cwd=cwd or None, timeout=timeout)
    return _started.client


def stop_started():
    """Stop the service this session started, if any."""
    global _started
    if _started is not None:
        _started.stop()
        _started = None
