"""The HTTP API of docs/service-api.md against a real service process."""

from __future__ import annotations

import importlib.util
import io
import json
import stat
import threading
import time

import numpy as np
import pytest
from service_testlib import ROOT, job_files, multipart, result_arrays, slow_job, submit, wait

from backend.exrio import read_exr, write_exr
from backend.jobformat import Options, load_job, read_result, write_job
from backend.renderer import Renderer
from backend.synthetic import constant_hdri, demo_scene_job, load_bundled_hdri, sphere_job


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer("cpu")


def test_discovery_file_is_private_and_names_the_service(service):
    info = json.loads(service.service_file.read_text())
    assert set(info) == {"url", "token", "pid", "version"}
    assert info["pid"] == service.process.pid and info["url"].startswith("http://127.0.0.1:")
    assert len(info["token"]) >= 43
    assert stat.S_IMODE(service.service_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(service.service_file.parent.stat().st_mode) == 0o700


def test_health_needs_no_token_and_models_list_the_default(service, client):
    import httpx

    health = httpx.get(service.url + "/v1/health").json()
    assert health["status"] == "ok" and health["api"] == 1 and health["device"] == "cpu"
    assert health["model"] == "default" and health["threads"] >= 1
    models = client.get("/v1/models").json()
    assert models["default"] == "default"
    assert {"default", "lambert", "ggx"} <= {m["name"] for m in models["models"]}


def test_job_through_the_service_equals_in_process_render_bit_for_bit(client, renderer, tmp_path):
    files = job_files(demo_scene_job(32, 32, options=Options(model="default", rays=8)), tmp_path)
    job_id = submit(client, files)
    status = wait(client, job_id)
    assert status["status"] == "done", status
    assert {"decode_ms", "queued_ms", "prepare_ms", "shade_ms", "shadow_ms"} <= set(status["timings"])
    expected = renderer.render(load_job(tmp_path))
    arrays = result_arrays(client, job_id)
    (tmp_path / "result.exr").write_bytes(client.get(f"/v1/jobs/{job_id}/result").content)
    from_exr = read_result(tmp_path / "result.exr")
    for name in ("shaded", "unshadowed", "shadow", "mask"):
        assert arrays[name].dtype == np.float32
        np.testing.assert_array_equal(arrays[name], getattr(expected, name), err_msg=name)
        np.testing.assert_array_equal(getattr(from_exr, name), getattr(expected, name), err_msg=name)
    assert from_exr.meta["model"] == "default" and from_exr.meta["rays"] == 8


def test_relight_equals_a_fresh_render_under_the_new_hdri(client, renderer, tmp_path):
    job = sphere_job(32, 32, options=Options(model="default", rays=8))
    job_id = submit(client, job_files(job, tmp_path / "first"))
    new_hdri = load_bundled_hdri()
    write_exr(tmp_path / "new_hdri.exr", {c: new_hdri[..., i] for i, c in enumerate("RGB")})
    reply = client.post(f"/v1/jobs/{job_id}/relight", files={"hdri": (tmp_path / "new_hdri.exr").read_bytes()},
                        data={"options": json.dumps({"rays": 16})})
    assert reply.status_code == 202, reply.text
    relit = reply.json()["id"]
    status = wait(client, relit)
    assert status["status"] == "done" and status["relight_of"] == job_id
    assert "prepare_ms" not in status["timings"], "a relight must reuse the prepared G-buffer"
    job.hdri, job.options = new_hdri, Options(model="default", rays=16)
    expected = renderer.render(job)
    arrays = result_arrays(client, relit)
    for name in ("shaded", "unshadowed", "shadow"):
        np.testing.assert_array_equal(arrays[name], getattr(expected, name), err_msg=name)
    # a relight of a relight shades the same G-buffer
    again = client.post(f"/v1/jobs/{relit}/relight", files={"hdri": (tmp_path / "new_hdri.exr").read_bytes()},
                        data={"options": json.dumps({"rays": 16})})
    assert wait(client, again.json()["id"])["status"] == "done"
    np.testing.assert_array_equal(result_arrays(client, again.json()["id"])["shaded"], expected.shaded)


def test_eight_clients_twenty_jobs_each_get_their_own_results(service, renderer, tmp_path):
    """160 tiny jobs from 8 threads; each job's HDRI is a different constant, which scales its image."""
    base_job = sphere_job(16, 16, hdri=constant_hdri(height=8), options=Options(model="lambert", rays=8))
    base = renderer.render(base_job).shaded
    scales = {(t, k): 0.5 + (20 * t + k) / 160 for t in range(8) for k in range(20)}
    uploads = {}
    for key, scale in scales.items():
        base_job.hdri = constant_hdri((scale,) * 3, height=8)
        uploads[key] = job_files(base_job, tmp_path / f"{key[0]}-{key[1]}")
    results: dict = {}
    errors: list = []

    def client_thread(t: int) -> None:
        try:
            with service.client() as http:
                for k in range(20):
                    while (reply := http.post("/v1/jobs", files=multipart(uploads[t, k]))).status_code == 503:
                        time.sleep(min(float(reply.headers["Retry-After"]), 0.1))
                    assert reply.status_code == 202, reply.text
                    job_id = reply.json()["id"]
                    assert wait(http, job_id)["status"] == "done"
                    results[t, k] = (job_id, result_arrays(http, job_id)["shaded"])
        except Exception as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=client_thread, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    assert len(results) == 160 and len({job_id for job_id, _ in results.values()}) == 160
    for key, (_, shaded) in results.items():
        np.testing.assert_allclose(shaded, base * scales[key], rtol=1e-5, atol=1e-7, err_msg=str(key))


def _bad_gbuffer(tmp_path, edit) -> bytes:
    channels, _ = read_exr(tmp_path / "gbuffer.exr")
    edit(channels)
    write_exr(tmp_path / "bad.exr", channels)
    return (tmp_path / "bad.exr").read_bytes()


def _with_json(files: dict, **changes) -> dict:
    data = json.loads(files["job"])
    for key, value in changes.items():
        if key == "options":
            data["options"].update(value)
        else:
            data[key] = value
    return {**files, "job": json.dumps(data).encode()}


def _nan_albedo(channels):
    mask = channels["mask.Y"]
    row, col = np.argwhere(mask > 0)[0]
    channels["albedo.R"][row, col] = np.nan


BAD_UPLOADS = {
    "truncated EXR": (lambda f, p: {**f, "gbuffer": f["gbuffer"][: len(f["gbuffer"]) // 2]}, 400, "gbuffer.exr"),
    "not an EXR": (lambda f, p: {**f, "hdri": b"hello"}, 400, "hdri.exr"),
    "NaN in foreground": (lambda f, p: {**f, "gbuffer": _bad_gbuffer(p, _nan_albedo)}, 400,
                          "layer 'albedo' holds NaN or Inf in foreground"),
    "missing layer": (lambda f, p: {**f, "gbuffer": _bad_gbuffer(p, lambda c: c.pop("ao.Y"))}, 400,
                      "required layer 'ao' is missing"),
    "wrong size": (lambda f, p: _with_json(f, width=31), 400, "the job is 31x32"),
    "unknown version": (lambda f, p: _with_json(f, version=3), 400, "unknown format version 3"),
    "bad light": (lambda f, p: _with_json(f, lights=[{"type": "sun", "direction": [0, 0, 2], "irradiance": [1, 1, 1]}]),
                  400, "lights[0].direction must be a unit vector"),
    "unknown option": (lambda f, p: _with_json(f, options={"colour": 1}), 400, "unknown option(s) ['colour']"),
    "bad option": (lambda f, p: _with_json(f, options={"rays": 0}), 400, "option 'rays'"),
    "unknown model": (lambda f, p: _with_json(f, options={"model": "/etc/passwd"}), 400, "option 'model'"),
    "job.json not JSON": (lambda f, p: {**f, "job": b"{nope"}, 400, "job.json is not valid JSON"),
    "missing field": (lambda f, p: {k: v for k, v in f.items() if k != "hdri"}, 400, "form field 'hdri' is missing"),
    "HDRI not 2:1": (lambda f, p: {**f, "hdri": _square_hdri(p)}, 400, "must be 2:1"),
}


def _square_hdri(tmp_path) -> bytes:
    write_exr(tmp_path / "square.exr", {c: np.ones((8, 8), np.float32) for c in "RGB"})
    return (tmp_path / "square.exr").read_bytes()


@pytest.fixture(scope="module")
def good_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    return folder, job_files(sphere_job(32, 32, options=Options(model="lambert", rays=4)), folder)


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_upload_gets_400_naming_the_problem(client, good_files, case):
    folder, files = good_files
    edit, status, message = BAD_UPLOADS[case]
    reply = client.post("/v1/jobs", files=multipart(edit(files, folder)))
    assert reply.status_code == status, reply.text
    assert message in reply.json()["detail"]


def test_access_control_and_limits(service, good_files):
    import httpx

    _, files = good_files
    url = service.url + "/v1/models"
    cases = [
        (httpx.get(url), 401, "missing bearer token"),
        (httpx.get(url, headers={"Authorization": "Bearer nope"}), 401, "wrong bearer token"),
        (httpx.get(url, headers={"Authorization": f"Bearer {service.token}x"}), 401, "wrong bearer token"),
        (httpx.get(url, headers={"Authorization": f"Bearer {service.token}", "Host": "evil.example:80"}), 403,
         "Host header 'evil.example:80' is not a loopback name"),
        (httpx.get(service.url + "/v1/health", headers={"Host": "attacker.test"}), 403, "Host header"),
    ]
    auth = {"Authorization": f"Bearer {service.token}"}
    oversized = {**files, "gbuffer": files["gbuffer"] + bytes(17 * 2**20)}
    cases.append((httpx.post(service.url + "/v1/jobs", headers=auth, files=multipart(oversized)), 413, "too large"))

    def chunked():  # no Content-Length: the limit is enforced on the bytes received
        yield b'--x\r\nContent-Disposition: form-data; name="gbuffer"; filename="g"\r\n\r\n'
        for _ in range(20):
            yield bytes(2**20)

    cases.append((httpx.post(service.url + "/v1/jobs", headers={**auth, "Content-Type": "multipart/form-data; "
                                                                "boundary=x"}, content=chunked()), 413, "too large"))
    for reply, status, message in cases:
        assert reply.status_code == status, reply.text
        assert message in reply.json()["detail"]
    assert cases[0][0].headers["WWW-Authenticate"] == "Bearer"
    for host in ("localhost", "127.0.0.1", "[::1]"):
        port = service.url.rsplit(":", 1)[1]
        assert httpx.get(url, headers={**auth, "Host": f"{host}:{port}"}).status_code == 200


def test_health_is_ok_after_bad_requests(service):
    import httpx

    assert httpx.get(service.url + "/v1/health").json()["status"] == "ok"


def test_unknown_job_cancel_and_result_not_ready(client, tmp_path):
    assert client.get("/v1/jobs/nope").status_code == 404
    assert "unknown job 'nope'" in client.get("/v1/jobs/nope/result").json()["detail"]
    assert client.post("/v1/jobs/nope/relight", files={"hdri": b"x"}).status_code == 404
    job_id = submit(client, job_files(slow_job(), tmp_path))
    wait(client, job_id, until=("running",))
    early = client.get(f"/v1/jobs/{job_id}/result")
    assert early.status_code == 409 and "is running" in early.json()["detail"]
    reply = client.post(f"/v1/jobs/{job_id}/cancel")
    assert reply.status_code == 200
    status = wait(client, job_id, timeout=30)
    assert status["status"] == "cancelled" and status["error"] == "cancelled by request"
    late = client.get(f"/v1/jobs/{job_id}/result.npz")
    assert late.status_code == 409 and "is cancelled" in late.json()["detail"]
    bad_hdri = client.post(f"/v1/jobs/{job_id}/relight", files={"hdri": b"x"})  # its G-buffer was prepared
    assert bad_hdri.status_code == 400 and "hdri.exr" in bad_hdri.json()["detail"]


def test_relight_of_an_evicted_gbuffer_is_409(client, tmp_path):
    files = job_files(sphere_job(16, 16, options=Options(model="lambert", rays=4)), tmp_path)
    first = submit(client, files)
    for _ in range(4):  # the service keeps 4 prepared G-buffers
        wait(client, submit(client, files))
    gone = client.post(f"/v1/jobs/{first}/relight", files={"hdri": files["hdri"]})
    assert gone.status_code == 409 and "no longer kept" in gone.json()["detail"]


def test_npz_has_no_pickled_objects(client, tmp_path):
    job_id = submit(client, job_files(sphere_job(16, 16, options=Options(model="lambert", rays=4)), tmp_path))
    wait(client, job_id)
    data = client.get(f"/v1/jobs/{job_id}/result.npz").content
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        assert {name: npz[name].shape for name in npz.files} == {
            "shaded": (16, 16, 3), "unshadowed": (16, 16, 3), "shadow": (16, 16), "lights": (16, 16, 3),
            "mask": (16, 16)}


def test_addon_client_end_to_end(service, renderer, tmp_path, monkeypatch):
    """The add-on's stdlib client (addon/client.py, loaded without bpy) finds the service and gets the result."""
    path = ROOT / "addon" / "client.py"
    if not path.exists():
        pytest.skip("addon/client.py is not there")
    spec = importlib.util.spec_from_file_location("pbnds_addon_client", path)
    addon_client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(addon_client)
    monkeypatch.setenv("PBNDS_SERVICE_FILE", str(service.service_file))
    job_files(sphere_job(32, 32, options=Options(model="ggx", rays=8)), tmp_path)
    svc = addon_client.discover()
    job_id = svc.submit(tmp_path / "job.json")
    svc.wait(job_id, timeout=60)
    arrays = svc.result_arrays(job_id)
    np.testing.assert_array_equal(arrays["shaded"], renderer.render(load_job(tmp_path)).shaded)


def test_shadow_maps_are_uploaded_with_the_job_and_used(service, renderer, tmp_path):
    """The add-on's client sends each light's shadow map as a repeated `shadow_maps` field; the service
    renders the job exactly as the file path does. A map whose caster covers everything shadows the sun
    completely; a map the job names but the upload lacks is a 400 naming the file."""
    from addon.client import ServiceClient
    from backend.lights import Sun
    from backend.shadowmaps import ShadowMap
    from backend.synthetic import look_at, orthographic

    world_to_light = look_at((0.0, 0.0, 10.0), (0.0, 0.0, 0.0), (0.0, 1.0, 0.0))
    for name, depth in (("open", np.inf), ("covered", 1.0)):
        depth = np.full((16, 16), depth, np.float32)
        ceiling = ShadowMap("Sun", "shadow_0.exr", "orthographic", world_to_light, orthographic(3.0, 1.0, 0.1, 20.0),
                            0.0, depth)
        job = sphere_job(32, 32, hdri=constant_hdri((0.0, 0.0, 0.0)), options=Options(model="ggx", rays=4))
        job.lights = [Sun(name="Sun", direction=(0.0, 0.0, 1.0), irradiance=(2.0, 2.0, 2.0), shadow=ceiling)]
        write_job(job, tmp_path / name)
        client = ServiceClient(service.url, service.token)
        job_id = client.submit(tmp_path / name / "job.json")
        with service.client() as http:
            assert wait(http, job_id)["status"] == "done"
            arrays = result_arrays(http, job_id)
        expected = renderer.render(load_job(tmp_path / name))
        np.testing.assert_array_equal(arrays["lights"], expected.lights)
        assert (arrays["lights"].max() > 0.1) == (name == "open")
    with service.client() as http:
        files = {n: (tmp_path / "covered" / f).read_bytes() for n, f in
                 (("job", "job.json"), ("gbuffer", "gbuffer.exr"), ("hdri", "hdri.exr"))}
        reply = http.post("/v1/jobs", files=multipart(files))
    assert reply.status_code == 400 and "shadow_0.exr" in reply.json()["detail"]


def test_a_long_poll_answers_when_the_job_ends_and_npz_layers_can_be_chosen(client, tmp_path):
    job_id = submit(client, job_files(slow_job(), tmp_path))
    wait(client, job_id, until=("running",))
    assert client.get(f"/v1/jobs/{job_id}", params={"wait": 0.05}).json()["status"] == "running"  # timed out
    client.post(f"/v1/jobs/{job_id}/cancel")
    assert client.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()["status"] == "cancelled"  # ended first
    for bad in (31, -1, "nan"):
        reply = client.get(f"/v1/jobs/{job_id}", params={"wait": bad})
        assert reply.status_code == 400 and "wait" in reply.json()["detail"]
    done = submit(client, job_files(sphere_job(16, 16, options=Options(model="lambert", rays=4)), tmp_path))
    assert client.get(f"/v1/jobs/{done}", params={"wait": 30}).json()["status"] == "done"
    data = client.get(f"/v1/jobs/{done}/result.npz", params={"layers": "shaded,mask", "half": "true"}).content
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        assert {name: (npz[name].shape, npz[name].dtype) for name in npz.files} == {
            "shaded": ((16, 16, 3), np.float16), "mask": ((16, 16), np.float16)}
    unknown = client.get(f"/v1/jobs/{done}/result.npz", params={"layers": "shaded,normal"})
    assert unknown.status_code == 400 and "'normal'" in unknown.json()["detail"]
