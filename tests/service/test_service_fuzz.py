"""Property tests: the job.json parser raises only JobError, and the submit endpoint answers 202 or 4xx."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from service_testlib import job_files

from backend.jobformat import JobError, Options, parse_job_json
from backend.synthetic import sphere_job

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
                    max_leaves=20)
VALID = json.loads(json.dumps({"format": "pbnds-job", "version": 1, "width": 16, "height": 16, "gbuffer": "g.exr",
                               "hdri": "h.exr", "frame": 1, "options": {"rays": 4},
                               "camera": {"world_to_camera": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
                                          "projection": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]}}))
KEYS = sorted(VALID) + ["options.model", "options.rays", "options.sampling", "options.seed", "options.shadows",
                        "options.extra", "camera.projection", "camera.world_to_camera", "unknown"]


@st.composite
def mutated_jobs(draw) -> object:
    """A valid job.json with some keys replaced by arbitrary JSON, dropped, or the whole thing arbitrary."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)
    data = json.loads(json.dumps(VALID))
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=3)):
        head, _, tail = key.partition(".")
        target, name = (data.get(head), tail) if tail else (data, head)
        if not isinstance(target, dict):
            continue
        if draw(st.booleans()):
            target[name] = draw(JSON)
        else:
            target.pop(name, None)
    return data


@settings(max_examples=400, deadline=None)
@given(mutated_jobs())
def test_parse_job_json_raises_only_job_error(data):
    try:
        parse_job_json(data)
    except JobError:
        pass


@pytest.fixture(scope="module")
def uploads(tmp_path_factory):
    return job_files(sphere_job(16, 16, options=Options(model="lambert", rays=4)),
                     tmp_path_factory.mktemp("fuzz"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(job=mutated_jobs(), gbuffer_cut=st.sampled_from([None, 0, 10, 400, -1]),
       hdri=st.sampled_from(["good", "empty", "garbage"]), drop=st.sampled_from([None, "job", "gbuffer", "hdri"]))
def test_submit_answers_202_or_400_never_5xx(service, uploads, job, gbuffer_cut, hdri, drop):
    files = {"job": json.dumps(job).encode(),
             "gbuffer": uploads["gbuffer"] if gbuffer_cut is None else uploads["gbuffer"][:gbuffer_cut],
             "hdri": {"good": uploads["hdri"], "empty": b"", "garbage": b"\x76\x2f\x31\x01" + bytes(64)}[hdri]}
    files.pop(drop, None)
    with service.client() as http:
        reply = http.post("/v1/jobs", files={k: (k, v) for k, v in files.items()})
        assert reply.status_code in (202, 400), reply.text
        assert isinstance(reply.json()["detail" if reply.status_code == 400 else "id"], str)
        if reply.status_code == 202:
            http.post(f"/v1/jobs/{reply.json()['id']}/cancel")
    assert httpx.get(service.url + "/v1/health").status_code == 200
