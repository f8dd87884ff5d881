"""Client for the local PBNDS shading service (docs/service-api.md), standard library only.

Blender's bundled Python has no `requests`, so HTTP goes through `http.client` and the multipart
body is built by hand. Proxies are never consulted: the service lives on loopback.
"""

import contextlib
import hashlib
import hmac
import http.client
import io
import json
import os
import pathlib
import secrets
import time
import urllib.parse

import numpy as np

START_HINT = "start it with `pbnds serve` or enable auto-start in preferences"


class ServiceError(Exception):
    """A failed exchange with the service; the message names the URL and the cause."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


class ServiceCancelled(ServiceError):
    """The job was cancelled (by the user here, or on the service)."""


def service_file_path():
    """The discovery file the service writes on start-up (PBNDS_SERVICE_FILE overrides it)."""
    override = os.environ.get("PBNDS_SERVICE_FILE")
    if override:
        return pathlib.Path(override)
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return pathlib.Path(config) / "pbnds" / "service.json"


def read_service_file(path=None):
    """The discovery file's content as a dict, or None when there is no file."""
    path = pathlib.Path(path) if path else service_file_path()
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ServiceError(f"PBNDS service file {path} is unreadable: {exc}") from exc


def discover(url="", token="", timeout=30.0):
    """A client for an explicit address/token, else for the address in the discovery file.

    An explicit URL without a token takes the file's token when the file names the same URL.
    """
    info = read_service_file()
    if not url:
        if info is None:
            raise ServiceError(
                f"PBNDS service not found: {service_file_path()} does not exist; {START_HINT}"
            )
        url = info.get("url", "")
    if not token and info and info.get("url", "").rstrip("/") == url.rstrip("/"):
        token = info.get("token", "")
    return ServiceClient(url, token, timeout=timeout)


def depth_maps(job):
    """The `shadow` objects of a job.json's lights and its `surround`: the depth maps uploaded with it."""
    return [light["shadow"] for light in job.get("lights", []) if "shadow" in light] + (
        [job["surround"]] if "surround" in job else [])


def encode_multipart(fields):
    """Encode {name: bytes | str | (filename, bytes, content_type) | [those]} as multipart/form-data.

    Returns (body, content_type header). Plain values become ordinary form fields; a list repeats the
    field once per item (several files under one name).
    """
    boundary = "pbnds-" + secrets.token_hex(16)
    out = io.BytesIO()
    parts = [(name, item) for name, value in fields.items()
             for item in (value if isinstance(value, list) else [value])]
    for name, value in parts:
        out.write(f"--{boundary}\r\n".encode())
        if isinstance(value, tuple):
            filename, data, ctype = value
            out.write(
                f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                f"Content-Type: {ctype}\r\n\r\n".encode()
            )
        else:
            data = value
            out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(data.encode() if isinstance(data, str) else data)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


class ServiceClient:
    def __init__(self, url, token="", timeout=30.0):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ServiceError(f"PBNDS service URL {url!r} is not an http://host:port address")
        self.url = url.rstrip("/")
        self.host = parsed.hostname
        self.port = parsed.port or 80
        self.token = token
        self.timeout = timeout
        self.verified = False  # set by health() once the service has proven that it holds the token

    # -- transport ------------------------------------------------------------------------------

    def request(self, method, path, body=None, content_type=None, timeout=None, auth=True):
        """Send one request; return (status, headers, body bytes) for 2xx, raise ServiceError else.

        The token is sent only to a service that has answered health's challenge (see health()).
        """
        headers = {"Accept": "application/json"}
        if auth and self.token:
            if not self.verified:
                self.health(timeout)
            headers["Authorization"] = f"Bearer {self.token}"
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout or self.timeout)
        try:
            try:
                conn.connect()
            except OSError as exc:
                raise ServiceError(f"PBNDS service not reachable at {self.url}: {START_HINT} ({exc})") from exc
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except TimeoutError as exc:
                raise ServiceError(
                    f"PBNDS service at {self.url} did not answer {method} {path} "
                    f"within {timeout or self.timeout:g} s"
                ) from exc
            except (OSError, http.client.HTTPException) as exc:
                raise ServiceError(f"PBNDS service at {self.url} dropped {method} {path}: {exc}") from exc
        finally:
            conn.close()
        if resp.status < 300:
            return resp.status, resp.headers, data
        detail = _detail(data)
        if resp.status == 401:
            raise ServiceError(
                f"PBNDS service at {self.url} rejected the token (401: {detail}); set the token in "
                f"the add-on preferences or check {service_file_path()}",
                status=401,
            )
        raise ServiceError(f"PBNDS service: {detail} (HTTP {resp.status} on {method} {path})", resp.status)

    def json(self, method, path, body=None, content_type=None, timeout=None, auth=True):
        _, _, data = self.request(method, path, body, content_type, timeout, auth)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise ServiceError(f"PBNDS service at {self.url} sent non-JSON for {method} {path}") from exc

    # -- endpoints ------------------------------------------------------------------------------

    def health(self, timeout=None):
        """The service's health. With a token, the service must also answer a random nonce with
        HMAC-SHA256(token, nonce): a discovery file left by a crashed service may name a port another
        program has taken since, and that program must get neither the token nor a job."""
        nonce = secrets.token_urlsafe(24)
        reply = self.json("GET", f"/v1/health?nonce={nonce}", timeout=timeout, auth=False)
        if self.token:
            expected = hmac.new(self.token.encode(), nonce.encode(), hashlib.sha256).hexdigest()
            proof = reply.get("proof") if isinstance(reply, dict) else None
            if not isinstance(proof, str) or not hmac.compare_digest(proof, expected):
                raise ServiceError(
                    f"the program at {self.url} is not the PBNDS service that wrote {service_file_path()} "
                    "(it cannot prove it holds that file's token; the file may be stale): nothing was sent; "
                    f"{START_HINT}"
                )
            self.verified = True
        return reply

    def models(self):
        return self.json("GET", "/v1/models")

    def submit(self, job_json):
        """Upload a job folder (given by its job.json) and return the new job's id."""
        job_json = pathlib.Path(job_json)
        job = json.loads(job_json.read_text())
        root = job_json.parent
        fields = {
            "job": ("job.json", job_json.read_bytes(), "application/json"),
            "gbuffer": ("gbuffer.exr", (root / job["gbuffer"]).read_bytes(), "application/octet-stream"),
            "hdri": ("hdri.exr", (root / job["hdri"]).read_bytes(), "application/octet-stream"),
            "shadow_maps": [(entry["file"], (root / entry["file"]).read_bytes(), "application/octet-stream")
                            for entry in depth_maps(job)],
        }
        body, ctype = encode_multipart(fields)
        return self.json("POST", "/v1/jobs", body, ctype)["id"]

    def relight(self, job_id, hdri, options=None, rotation=0.0):
        """Re-shade job `job_id`'s G-buffer (kept by the service) under a new HDRI (an EXR's path, or its
        bytes), rotated by `rotation` radians about +Z; new job id. With uniform, stratified or cosine rays
        the service re-shades from its relight cache (docs/performance.md)."""
        data = hdri if isinstance(hdri, bytes) else pathlib.Path(hdri).read_bytes()
        fields = {"hdri": ("hdri.exr", data, "application/octet-stream")}
        if options:
            fields["options"] = json.dumps(options)
        if rotation:
            fields["rotation"] = repr(float(rotation))
        body, ctype = encode_multipart(fields)
        return self.json("POST", f"/v1/jobs/{job_id}/relight", body, ctype)["id"]

    def status(self, job_id):
        return self.json("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id):
        return self.json("POST", f"/v1/jobs/{job_id}/cancel")

    def wait(self, job_id, progress=None, cancel_check=None, interval=0.1, timeout=None):
        """Poll until the job ends; return its final status dict. Each poll waits on the service up to
        `interval` seconds for the job to end (long polling), so the end is seen at once.

        `progress(fraction)` is called on every poll; `cancel_check()` returning true cancels the
        job on the service and raises ServiceCancelled. `timeout` bounds the whole wait.
        """
        start = time.monotonic()
        while True:
            if cancel_check and cancel_check():
                with contextlib.suppress(ServiceError):
                    self.cancel(job_id)
                raise ServiceCancelled(f"PBNDS job {job_id} cancelled")
            asked = time.monotonic()
            st = self.json("GET", f"/v1/jobs/{job_id}?wait={min(interval, 30):g}")  # answers when the job ends
            if progress:
                progress(float(st.get("progress") or 0.0))
            if st["status"] == "done":
                return st
            if st["status"] == "failed":
                raise ServiceError(f"PBNDS job {job_id} failed on the service: {st.get('error')}")
            if st["status"] == "cancelled":
                raise ServiceCancelled(f"PBNDS job {job_id} was cancelled on the service")
            if timeout is not None and time.monotonic() - start > timeout:
                raise ServiceError(f"PBNDS job {job_id} not done after {timeout:g} s (last: {st['status']})")
            time.sleep(max(0.0, interval - (time.monotonic() - asked)))  # a service without long polling

    def result_arrays(self, job_id, half=False, layers=None):
        """The result as float32 arrays shaded (H,W,3), unshadowed, shadow (H,W), lights, mask; top row first.
        `half`: sent as float16 (half the bytes; enough to display); `layers`: only these names."""
        query = urllib.parse.urlencode({**({"half": "true"} if half else {}), **({"layers": ",".join(layers)}
                                                                                if layers else {})})
        _, _, data = self.request("GET", f"/v1/jobs/{job_id}/result.npz" + (f"?{query}" if query else ""))
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {name: npz[name].astype(np.float32) for name in npz.files}

    def result_exr(self, job_id, path):
        """Download the result EXR to `path`; return the path."""
        _, _, data = self.request("GET", f"/v1/jobs/{job_id}/result")
        path = pathlib.Path(path)
        path.write_bytes(data)
        return path


def _detail(data):
    try:
        detail = json.loads(data).get("detail")
    except (ValueError, AttributeError):
        detail = None
    if detail is None:
        return data[:300].decode("utf-8", "replace") or "no detail"
    return detail if isinstance(detail, str) else json.dumps(detail)
