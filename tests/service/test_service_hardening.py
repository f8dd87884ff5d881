"""Hostile input and hostile neighbours: a corpus of bad uploads (each a 4xx naming the problem, and the
service renders a fixed job bit-identically afterwards), a decompression bomb, one rule per access check
(each fails against the broken variant it names), the health challenge, and half-open connections."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import io
import json
import os
import socket
import stat
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
from service_testlib import (
    GBUFFER_CHANNELS,
    box,
    exr_header,
    job_files,
    multipart,
    patch_attribute,
    peak_rss_mb,
    result_arrays,
    start_service,
    submit,
    wait,
    zero_exr,
)

from backend.exrio import exr_bytes, read_exr_bytes
from backend.jobformat import Options
from backend.synthetic import sphere_job

IDENTITY = np.eye(4).tolist()


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return job_files(sphere_job(32, 32, options=Options(model="lambert", rays=4)), tmp_path_factory.mktemp("good"))


@pytest.fixture(scope="module")
def reference(service, good):
    """The good job's result before any bad input was sent."""
    with service.client() as http:
        return result_arrays(http, _render(http, good))


def _render(http, files) -> str:
    job_id = submit(http, files)
    assert wait(http, job_id)["status"] == "done"
    return job_id


def _job(files, **changes) -> bytes:
    """job.json with dotted keys set ("options.seed": 1) or removed (value DROP)."""
    data = json.loads(files["job"])
    for key, value in changes.items():
        *heads, last = key.split(".")
        target = data
        for head in heads:
            target = target.setdefault(head, {})
        if value is DROP:
            target.pop(last, None)
        else:
            target[last] = value
    return json.dumps(data).encode()


DROP = object()


def _channels(files, name="gbuffer") -> dict[str, np.ndarray]:
    return read_exr_bytes(files[name], name)[0]


def _edited_gbuffer(files, edit, **kwargs) -> bytes:
    channels = _channels(files)
    edit(channels)
    return exr_bytes(channels, **kwargs)


def _hdri(array: np.ndarray, **kwargs) -> bytes:
    return exr_bytes({c: array[..., i] for i, c in enumerate("RGB")}, **kwargs)


def _with_meta(files, meta) -> bytes:
    """The G-buffer with its pbnds_meta attribute set to `meta` (any attribute type the bindings write)."""
    import OpenEXR

    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage, "pbnds_meta": meta}
    with OpenEXR.File(header, _channels(files)) as exr:
        stream = io.BytesIO()
        exr.write(stream)
        return stream.getvalue()


def _deep(depth: int, open_: str = "[", close: str = "]") -> bytes:
    return (open_ * depth + close * depth).encode()


WRONG_TYPES = {  # job.json field -> (wrong values, text the message must hold)
    "format": (["pbnds", 1, None, []], "'format'"),
    "version": ([0, 3, "2", True, None], "version"),
    "width": ([0, -1, 16385, 1.5, "32", True, None, 2**64], "'width'"),
    "height": ([0, 16385, 32.0, [], None], "'height'"),
    "frame": (["1", 1.5, True, None], "'frame'"),
    "gbuffer": ([1, [], {}], "'gbuffer'"),
    "hdri": ([1, None], "'hdri'"),
    "camera": ([None, [], "cam", 1], "'camera'"),
    "camera.world_to_camera": ([None, [[1, 2], [3, 4]], "x", [[float("nan")] * 4] * 4, [[0.0] * 4] * 4],
                               "camera.world_to_camera"),
    "camera.projection": ([None, np.eye(3).tolist(), [[1e308] * 4] * 4, [[0.0] * 4] * 4], "camera.projection"),
    "options": ([[], "x", 1], "'options'"),
    "options.model": ([1, "", None, "/etc/passwd", "../models/x"], "option 'model'"),
    "options.rays": ([0, 4097, 1.5, "8", True, None], "option 'rays'"),
    "options.sampling": (["nope", 1, None], "option 'sampling'"),
    "options.seed": ([-1, 2**63, 2**64, 1.5, "1", True], "option 'seed'"),
    "options.shadows": (["yes", 1, None], "option 'shadows'"),
    "options.colour": ([1], "unknown option(s) ['colour']"),
    "lights": (["sun", {}, 1], "'lights' must be a list"),
    "surprise": ([1], "unknown key(s) ['surprise']"),
}
SUN = {"type": "sun", "direction": [0, 0, 1], "irradiance": [1, 1, 1]}
SHADOWED = [{**SUN, "shadow": {"file": "s.exr", "projection": "orthographic", "world_to_light": IDENTITY,
                               "matrix": IDENTITY}}]
BAD_LIGHTS = [
    ([1], "lights[0] must be an object"),
    ([{"type": "laser"}], "lights[0].type"),
    ([{**SUN, "direction": [0, 0, 2]}], "lights[0].direction must be a unit vector"),
    ([{**SUN, "direction": [0, 0]}], "lights[0].direction"),
    ([{**SUN, "irradiance": [1, 1, float("nan")]}], "lights[0].irradiance"),
    ([{**SUN, "irradiance": [1, -1, 1]}], "lights[0].irradiance"),
    ([{**SUN, "colour": 1}], "unknown key(s)"),
    ([{"type": "sun"}], "needs"),
    ([{**SUN, "shadow": 1}], "lights[0].shadow must be an object"),
    ([{**SUN, "name": 5}], "lights[0].name must be a string"),
]


def _json_cases(files) -> list[tuple[str, dict, int, str]]:
    cases = [(f"{key}={value!r}"[:60], {**files, "job": _job(files, **{key: value})}, 400, text)
             for key, (values, text) in WRONG_TYPES.items() for value in values]
    cases += [(f"missing {key}", {**files, "job": _job(files, **{key: DROP})}, 400, text)
              for key, text in (("format", "'format'"), ("version", "version"), ("width", "'width'"),
                                ("camera", "'camera'"), ("camera.projection", "camera.projection"))]
    cases += [(f"lights {text}", {**files, "job": _job(files, lights=lights)}, 400, text)
              for lights, text in BAD_LIGHTS]
    cases += [("shadow map not uploaded", {**files, "job": _job(files, lights=SHADOWED)}, 400,
               "depth map file 's.exr' was not uploaded")]
    singular = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
    cases += [("singular world_to_camera", {**files, "job": _job(files, **{"camera.world_to_camera": singular})},
               400, "camera.world_to_camera is singular"),
              ("singular projection", {**files, "job": _job(files, **{"camera.projection": singular})},
               400, "camera.projection is singular")]
    deep = "job.json is nested too deeply"
    bombs = [("deep array", _deep(100_000), deep), ("deep object", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, deep),
             ("deep options", b'{"options":' + _deep(100_000) + b"}", deep),
             ("not JSON", b"{nope", "job.json is not valid JSON"), ("empty", b"", "job.json is not valid JSON"),
             ("not UTF-8", b"\xff\xfe{", "job.json is not valid JSON"), ("null", b"null", "JSON object"),
             ("a list", b"[1, 2]", "JSON object"), ("huge number", _job(files, width=float("inf")), "'width'")]
    cases += [(f"job.json {name}", {**files, "job": data}, 400, text) for name, data, text in bombs]
    cases += [("too many pixels", {**files, "job": _job(files, width=4096, height=2048)}, 413, "--max-pixels")]
    return cases


def _nan_one_channel(size=(8, 16)) -> np.ndarray:
    hdri = np.ones((*size, 3), np.float32)
    hdri[2, 3, 1] = np.nan
    return hdri


def _exr_cases(files) -> list[tuple[str, dict, int, str]]:
    gbuffer, hdri = files["gbuffer"], files["hdri"]
    cases = [(f"gbuffer cut at {cut}", {**files, "gbuffer": gbuffer[:cut]}, 400, "gbuffer.exr")
             for cut in (0, 4, 8, 100, exr_header(gbuffer)[1], len(gbuffer) // 2, len(gbuffer) - 1)]
    cases += [(f"hdri cut at {cut}", {**files, "hdri": hdri[:cut]}, 400, "hdri.exr") for cut in (0, 50, len(hdri) // 2)]
    cases += [("truncated says why", {**files, "gbuffer": gbuffer[:len(gbuffer) - 50]}, 400, "truncated or corrupt")]
    garbage = np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes()
    cases += [("garbage gbuffer", {**files, "gbuffer": garbage}, 400, "gbuffer.exr"),
              ("garbage after magic", {**files, "gbuffer": b"\x76\x2f\x31\x01" + garbage}, 400, "gbuffer.exr"),
              ("garbage hdri", {**files, "hdri": b"hello"}, 400, "hdri.exr"),
              ("garbage shadow map", {**files, "job": _job(files, lights=SHADOWED), "shadow_maps": b"junk"}, 400,
               "s.exr: cannot read EXR file s.exr"),
              ("shadow map bomb", {**files, "job": _job(files, lights=SHADOWED),
                                   "shadow_maps": zero_exr(4096, 2048, ("depth.Y",))}, 413, "s.exr")]
    lies = {"dataWindow taller than the job": (box(32, 64), 400, "is 32x64, the job is 32x32"),
            "dataWindow wider than the job": (box(64, 32), 400, "is 64x32, the job is 32x32"),
            "huge declared size": (box(16384, 16384), 413, "--max-pixels"),
            "zero-size dataWindow": (struct.pack("<4i", 0, 0, -1, -1), 400, "cannot read EXR file gbuffer.exr"),
            "inverted dataWindow": (struct.pack("<4i", 31, 31, 0, 0), 400, "cannot read EXR file gbuffer.exr"),
            "dataWindow past int32": (struct.pack("<4i", -2**31, -2**31, 2**31 - 1, 2**31 - 1), 400, "gbuffer.exr")}
    cases += [(name, {**files, "gbuffer": patch_attribute(gbuffer, "dataWindow", value)}, status, text)
              for name, (value, status, text) in lies.items()]
    cases += [("dataWindow larger than the data", {**files, "job": _job(files, height=64),
                                                   "gbuffer": patch_attribute(gbuffer, "dataWindow", box(32, 64))},
               400, "truncated or corrupt")]
    start, _ = exr_header(gbuffer)[0]["compression"]
    for code in (0, 1, 11, 12):  # the library ignores codes it does not know (13 and up)
        patched = gbuffer[:start] + bytes([code]) + gbuffer[start + 1:]
        cases.append((f"compression {code}", {**files, "gbuffer": patched}, 400, "gbuffer.exr"))
    cases += [("HDRI bomb", {**files, "hdri": zero_exr(4096, 2048, ("R", "G", "B"))}, 413, "hdri.exr"),
              ("HDRI NaN in one channel", {**files, "hdri": _hdri(_nan_one_channel())}, 400,
               "holds NaN or Inf in 1 pixel"),
              ("HDRI Inf", {**files, "hdri": _hdri(np.full((8, 16, 3), np.inf, np.float32))}, 400, "NaN or Inf"),
              ("HDRI negative", {**files, "hdri": _hdri(-np.ones((8, 16, 3), np.float32))}, 400, "negative"),
              ("HDRI not 2:1", {**files, "hdri": _hdri(np.ones((8, 8, 3), np.float32))}, 400, "must be 2:1"),
              ("HDRI without B", {**files, "hdri": exr_bytes({c: np.ones((8, 16), np.float32) for c in "RG"})},
               400, "needs R, G and B"),
              ("pbnds_meta not JSON", {**files, "gbuffer": _with_meta(files, "{nope")}, 400, "pbnds_meta"),
              ("pbnds_meta not a string", {**files, "gbuffer": _with_meta(files, 5)}, 400, "pbnds_meta"),
              ("pbnds_meta a JSON list", {**files, "gbuffer": _with_meta(files, "[1]")}, 400, "pbnds_meta"),
              ("pbnds_meta deep", {**files, "gbuffer": _with_meta(files, _deep(100_000).decode())}, 400, "pbnds_meta")]
    edits = {"albedo two channels": (lambda c: c.pop("albedo.B"), "layer 'albedo' needs channels"),
             "no mask": (lambda c: c.pop("mask.Y"), "required layer 'mask' is missing"),
             "albedo as UINT 7": (lambda c: c.update({"albedo.R": np.full((32, 32), 7, np.uint32)}),
                                  "layer 'albedo' must lie in [0, 1]"),
             "normal zero": (lambda c: [c[f"normal.{a}"].fill(0) for a in "XYZ"], "layer 'normal' is not unit length"),
             "roughness 2": (lambda c: c["roughness.Y"].fill(2), "layer 'roughness' must lie in [0, 1]"),
             "mask NaN": (lambda c: c["mask.Y"].fill(np.nan), "layer 'mask' holds NaN")}
    cases += [(name, {**files, "gbuffer": _edited_gbuffer(files, edit)}, 400, text)
              for name, (edit, text) in edits.items()]
    return cases


def _post(http, files):
    upload = {k: v for k, v in files.items() if k != "shadow_maps"}
    parts = multipart(upload)
    if "shadow_maps" in files:
        parts = [*parts.items(), ("shadow_maps", ("s.exr", files["shadow_maps"], "application/octet-stream"))]
    return http.post("/v1/jobs", files=parts)


@pytest.mark.parametrize("batch", ["job.json", "EXR"])
def test_bad_uploads_are_4xx_naming_the_problem_and_change_nothing(service, good, reference, batch):
    cases = (_json_cases if batch == "job.json" else _exr_cases)(good)
    assert len(cases) >= {"job.json": 100, "EXR": 40}[batch]
    failures = []
    with service.client() as http:
        for name, files, status, text in cases:
            reply = _post(http, files)
            detail = reply.json().get("detail", "") if reply.headers["content-type"] == "application/json" else ""
            if reply.status_code != status or text not in detail or "found []" in detail:
                failures.append(f"{name}: {reply.status_code} {reply.text[:300]}")
        after = result_arrays(http, _render(http, good))
    assert not failures, "\n".join(failures)
    for key, array in reference.items():
        np.testing.assert_array_equal(after[key], array, err_msg=key)


def test_bad_relights_are_400_and_change_nothing(service, good, reference):
    with service.client() as http:
        source = _render(http, good)
        cases = [*(({"rotation": value}, "rotation") for value in ("1e300", "inf", "nan", "-2e6", "abc")),
                 ({"options": "[" * 100_000}, "nested too deeply"), ({"options": "{nope"}, "not valid JSON"),
                 ({"options": "[1]"}, "must be a JSON object"),
                 ({"options": json.dumps({"seed": 2**64})}, "option 'seed'"),
                 ({"options": json.dumps({"rays": 0})}, "option 'rays'")]
        for data, text in cases:
            reply = http.post(f"/v1/jobs/{source}/relight", files={"hdri": good["hdri"]}, data=data)
            assert reply.status_code == 400 and text in reply.json()["detail"], (data, reply.text)
        bomb = http.post(f"/v1/jobs/{source}/relight", files={"hdri": zero_exr(4096, 2048, ("R", "G", "B"))})
        assert bomb.status_code == 413 and "hdri.exr" in bomb.json()["detail"], bomb.text
        relit = http.post(f"/v1/jobs/{source}/relight", files={"hdri": good["hdri"]}, data={"rotation": "1e6"})
        assert wait(http, relit.json()["id"])["status"] == "done"
        np.testing.assert_array_equal(result_arrays(http, _render(http, good))["shaded"], reference["shaded"])


def test_decompression_bomb_is_refused_from_its_header(service, good):
    """A 7 MB all-zero 16384x16384 G-buffer (17 GB of half floats decoded) is refused before decoding."""
    bomb = zero_exr(16384, 16384, GBUFFER_CHANNELS)
    assert len(bomb) < 8 * 2**20
    with service.client() as http:
        started = time.monotonic()
        reply = http.post("/v1/jobs", files=multipart({**good, "gbuffer": bomb}))
        elapsed = time.monotonic() - started
    assert reply.status_code == 413 and "gbuffer.exr" in reply.json()["detail"], reply.text
    assert elapsed < 2.0
    assert peak_rss_mb(service.process.pid) < 1024


# -- access rules: each test fails against the broken variant in its name -------------------------


def _status(url: str, headers: dict) -> int:
    """GET with headers exactly as given (httpx refuses some of them, such as 'Bearer ')."""
    parsed = httpx.URL(url)
    conn = http.client.HTTPConnection(parsed.host, parsed.port, timeout=10)
    try:
        conn.request("GET", parsed.raw_path.decode(), headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


def test_token_prefix_extension_and_empty_bearer_are_refused(service):
    url = service.url + "/v1/models"
    for value in (f"Bearer {service.token[:-1]}", f"Bearer {service.token[:8]}", f"Bearer {service.token}x",
                  "Bearer ", "Bearer", "Bearer  ", "", f"bearer{service.token}", service.token,
                  f"Basic {service.token}", f"Bearer {service.token} {service.token}"):
        assert _status(url, {"Authorization": value}) == 401, value
    assert _status(url, {"Authorization": f"Bearer {service.token}"}) == 200


def test_host_header_that_merely_contains_a_loopback_name_is_refused(service):
    auth = {"Authorization": f"Bearer {service.token}"}
    for host in ("127.0.0.1.evil.com", "evil.com.127.0.0.1", "localhost.evil.com", "evil.localhost",
                 "127.0.0.1@evil.com", "127.0.0.1:80@evil.com", "x127.0.0.1", "[::1].evil", "127.0.0.1:80:80", ""):
        reply = httpx.get(service.url + "/v1/models", headers={**auth, "Host": host})
        assert reply.status_code in (400, 403), (host, reply.text)


def test_no_cors_header_lets_a_foreign_origin_in(service):
    origin = {"Origin": "http://evil.example"}
    replies = [httpx.get(service.url + "/v1/health", headers=origin),
               httpx.get(service.url + "/v1/models", headers={**origin, "Authorization": f"Bearer {service.token}"}),
               httpx.options(service.url + "/v1/jobs", headers={**origin, "Access-Control-Request-Method": "POST",
                                                                "Access-Control-Request-Headers": "authorization"})]
    for reply in replies:
        allowed = reply.headers.get("access-control-allow-origin")
        assert allowed is None, (reply.request.method, reply.request.url, allowed)
        assert "access-control-allow-credentials" not in reply.headers


def test_health_proves_the_token_with_hmac_of_a_nonce(service):
    nonce = "n" * 16 + os.urandom(8).hex()
    reply = httpx.get(service.url + "/v1/health", params={"nonce": nonce}).json()
    assert reply["proof"] == hmac.new(service.token.encode(), nonce.encode(), hashlib.sha256).hexdigest()
    for bad in ("short", "x" * 129, "n" * 20 + "/", "n" * 20 + " "):
        refused = httpx.get(service.url + "/v1/health", params={"nonce": bad})
        assert refused.status_code == 400 and "'nonce'" in refused.json()["detail"], bad


class Impostor(BaseHTTPRequestHandler):
    """Another program on a port a stale discovery file names: answers everything like a healthy service."""

    seen: list = []

    def _answer(self):
        Impostor.seen.append((self.command, self.path, self.headers.get("Authorization")))
        body = json.dumps({"status": "ok", "api": 1, "proof": "0" * 64, "id": "x"}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


def test_addon_client_refuses_a_stale_discovery_file_before_sending_token_or_job(service, tmp_path, monkeypatch):
    from addon.client import ServiceError, discover

    impostor = ThreadingHTTPServer(("127.0.0.1", 0), Impostor)
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    try:
        stale = tmp_path / "service.json"
        stale.write_text(json.dumps({"url": f"http://127.0.0.1:{impostor.server_port}", "token": service.token}))
        monkeypatch.setenv("PBNDS_SERVICE_FILE", str(stale))
        job_files(sphere_job(16, 16, options=Options(model="lambert", rays=4)), tmp_path / "job")
        with pytest.raises(ServiceError, match="cannot prove it holds"):
            discover().submit(tmp_path / "job" / "job.json")
    finally:
        impostor.shutdown()
    assert Impostor.seen and all(method == "GET" and auth is None for method, _, auth in Impostor.seen)
    monkeypatch.setenv("PBNDS_SERVICE_FILE", str(service.service_file))
    client = discover()
    client.health()
    assert client.verified


# -- a second service: fresh token, private folder, half-open connections ---------------------------


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    """A service whose discovery folder existed with mode 0777, capped at 48 connections."""
    folder = tmp_path_factory.mktemp("crowded")
    (folder / "pbnds").mkdir(mode=0o777)
    os.chmod(folder / "pbnds", 0o777)
    svc = start_service(folder, "--max-connections", "48", service_file=folder / "pbnds" / "service.json")
    yield svc
    svc.stop()


def test_each_start_has_its_own_token_and_a_private_discovery_file(service, crowded):
    assert crowded.token != service.token and len(crowded.token) >= 43
    assert stat.S_IMODE(crowded.service_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(crowded.service_file.parent.stat().st_mode) == 0o700


def test_half_open_connections_do_not_stop_a_client(crowded, good):
    """300 sockets that send nothing or half a request (over 6x the cap): a client still renders, and the
    log holds a bounded number of lines about them."""
    sockets = []
    host, port = crowded.url.removeprefix("http://").split(":")
    try:
        for index in range(300):
            sock = socket.create_connection((host, int(port)))
            if index % 2:
                sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
            sockets.append(sock)
        time.sleep(0.5)
        open_files = len(os.listdir(f"/proc/{crowded.process.pid}/fd"))
        assert open_files < 48 + 40, f"the service holds {open_files} files: the cap did not evict"
        started = time.monotonic()
        with crowded.client() as http:
            job_id = _render(http, good)
            assert result_arrays(http, job_id)["shaded"].shape == (32, 32, 3)
        assert time.monotonic() - started < 20
    finally:
        for sock in sockets:
            sock.close()
    dropped = [line for line in crowded.log_text().splitlines() if "connections.dropped" in line]
    assert 1 <= len(dropped) <= 3, dropped
    assert len(crowded.log_text()) < 100_000


def test_keep_alive_requests_do_not_wait_for_delayed_acks(service):
    """Without TCP_NODELAY on accepted sockets each keep-alive request took ~44 ms (Nagle against the
    client's delayed ACK); with it ~2 ms."""
    with service.client() as http:
        times = []
        for _ in range(30):
            started = time.perf_counter()
            http.get("/v1/health")
            times.append(time.perf_counter() - started)
    assert sorted(times)[15] < 0.015, sorted(times)
