"""The add-on's service client: multipart encoding, discovery and named errors."""

import email.parser
import email.policy
import json

import pytest
from addon_testlib import has_module

from addon import client, service_process

pytestmark = pytest.mark.blender  # importing the add-on package imports bpy


def test_multipart_parses_with_the_stdlib_mime_parser():
    body, ctype = client.encode_multipart({
        "job": ("job.json", b'{"a": 1}', "application/json"),
        "gbuffer": ("gbuffer.exr", bytes(range(256)) * 3, "application/octet-stream"),
        "options": json.dumps({"rays": 4}),
    })
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {ctype}\r\n\r\n".encode() + body)
    parts = {p.get_param("name", header="content-disposition"): p for p in msg.iter_parts()}
    assert parts["job"].get_content() == b'{"a": 1}'
    assert parts["job"].get_filename() == "job.json"
    assert parts["gbuffer"].get_content() == bytes(range(256)) * 3
    assert json.loads(parts["options"].get_content()) == {"rays": 4}


@pytest.mark.skipif(not has_module("python_multipart"), reason="python-multipart (FastAPI's form parser) missing")
def test_multipart_parses_with_fastapi():
    from fastapi import FastAPI, File, Form, UploadFile
    from fastapi.testclient import TestClient

    app = FastAPI()

    @app.post("/up")
    async def up(job: UploadFile = File(...), hdri: UploadFile = File(...), options: str = Form(None)):
        return {"job": (await job.read()).decode(), "hdri": len(await hdri.read()), "options": options}

    body, ctype = client.encode_multipart({
        "job": ("job.json", b'{"x": 2}', "application/json"),
        "hdri": ("hdri.exr", b"\0\r\n--" * 1000, "application/octet-stream"),
        "options": '{"rays": 8}',
    })
    reply = TestClient(app).post("/up", content=body, headers={"Content-Type": ctype}).json()
    assert reply == {"job": '{"x": 2}', "hdri": 5000, "options": '{"rays": 8}'}


def test_service_down_names_the_url_and_the_fix():
    url = f"http://127.0.0.1:{service_process.free_port()}"
    with pytest.raises(client.ServiceError) as err:
        client.ServiceClient(url).health()
    assert f"not reachable at {url}" in str(err.value)
    assert "pbnds serve" in str(err.value) and "auto-start" in str(err.value)


def test_missing_discovery_file_is_named(service_file, monkeypatch, tmp_path):
    monkeypatch.setenv("PBNDS_SERVICE_FILE", str(tmp_path / "none.json"))
    with pytest.raises(client.ServiceError, match="none.json does not exist"):
        client.discover()


def test_explicit_url_takes_the_token_of_a_matching_discovery_file(monkeypatch, tmp_path):
    path = tmp_path / "service.json"
    path.write_text(json.dumps({"url": "http://127.0.0.1:9", "token": "secret"}))
    monkeypatch.setenv("PBNDS_SERVICE_FILE", str(path))
    assert client.discover("http://127.0.0.1:9").token == "secret"
    assert client.discover("http://127.0.0.1:10").token == ""
    with pytest.raises(client.ServiceError, match="not an http"):
        client.ServiceClient("ftp://x")
