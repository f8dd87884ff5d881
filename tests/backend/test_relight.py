"""Relighting from a cache (Renderer.relight_cache / relight) against plain renders with the same rays,
and the service's use of it (JobManager, in process)."""

import math
import time

import numpy as np
import pytest

from backend.envmap import EnvironmentMap
from backend.jobformat import Options
from backend.renderer import Renderer
from backend.service.jobs import DONE, JobManager
from backend.synthetic import demo_scene_job

# The cache contracts f cos / (pdf N) with Li in another order than the plain path sums f cos Li / pdf:
# float32 rounding only.
RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module")
def job():
    return demo_scene_job(40, 32)


@pytest.mark.parametrize("sampling", ["stratified", "uniform", "cosine"])
@pytest.mark.parametrize("model", ["default", "ggx", "lambert"])
def test_relight_from_cache_equals_a_plain_render_with_the_same_rays(job, sampling, model):
    renderer = Renderer("cpu")
    options = Options(model=model, rays=24, sampling=sampling, seed=3)
    prepared = renderer.prepare(job)
    cache = renderer.relight_cache(prepared, options)
    new_hdri = np.ascontiguousarray(job.hdri[:, ::-1] * 1.5)
    relit = renderer.relight(cache, new_hdri)
    plain = renderer.shade(prepared, new_hdri, options)
    for name in ("unshadowed", "shaded", "shadow"):
        np.testing.assert_allclose(getattr(relit, name), getattr(plain, name), rtol=RTOL, atol=ATOL, err_msg=name)
    assert relit.meta["sampling"] == sampling and "shade_ms" in relit.meta["timings"]


def test_the_reference_path_builds_the_same_cache(job):
    options = Options(rays=16, sampling="stratified")
    fast, plain = Renderer("cpu"), Renderer("cpu", fast=False)
    a = fast.relight(fast.relight_cache(fast.prepare(job), options), job.hdri)
    b = plain.relight(plain.relight_cache(plain.prepare(job), options), job.hdri)
    np.testing.assert_allclose(a.unshadowed, b.unshadowed, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("sampling", ["stratified", "cosine"])
def test_rotation_is_a_rotated_lookup(job, sampling):
    """A rotation by a whole number of texels is exact on both sides (EnvironmentMap.rotated rolls the image)."""
    renderer = Renderer("cpu")
    options = Options(model="ggx", rays=24, sampling=sampling)
    prepared = renderer.prepare(job)
    cache = renderer.relight_cache(prepared, options)
    width = job.hdri.shape[1]
    angle = 2 * math.pi * 37 / width
    relit = renderer.relight(cache, job.hdri, rotation=angle)
    rotated = EnvironmentMap(job.hdri).rotated(angle).image.numpy()
    plain = renderer.shade(prepared, rotated, options)
    np.testing.assert_allclose(relit.unshadowed, plain.unshadowed, rtol=1e-3, atol=1e-5)
    unrotated = renderer.relight(cache, job.hdri)
    assert np.abs(unrotated.unshadowed - relit.unshadowed).max() > 1e-2  # the rotation did something


def test_relight_options_must_match_the_cache(job):
    renderer = Renderer("cpu")
    cache = renderer.relight_cache(renderer.prepare(job), Options(rays=8, sampling="stratified"))
    with pytest.raises(ValueError, match="other model, rays"):
        renderer.relight(cache, job.hdri, options=Options(rays=16, sampling="stratified"))
    unshadowed = renderer.relight(cache, job.hdri, options=Options(rays=8, sampling="stratified", shadows=False))
    assert (unshadowed.shadow == 1).all()


def test_hdri_dependent_ray_sets_and_nonlinear_shaders_are_refused(job):
    renderer = Renderer("cpu")
    prepared = renderer.prepare(job)
    for sampling in ("importance", "mis"):
        assert not renderer.can_cache(Options(sampling=sampling))
        with pytest.raises(ValueError, match="does not depend on the HDRI"):
            renderer.relight_cache(prepared, Options(sampling=sampling, rays=8))
    assert not renderer.can_cache(Options(model="pbnds-paper", sampling="stratified"))
    with pytest.raises(ValueError, match="not linear"):
        renderer.relight_cache(prepared, Options(model="pbnds-paper", sampling="stratified", rays=8))


def wait(manager, record, timeout=120):
    deadline = time.monotonic() + timeout
    while manager.get(record.id).status not in ("done", "failed", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return manager.get(record.id)


def test_the_service_relights_from_its_cache(job):
    renderer = Renderer("cpu")
    manager = JobManager(renderer)
    manager.start()
    try:
        options = Options(rays=16, sampling="stratified")
        job.options = options
        source = wait(manager, manager.submit(job, decode_ms=0))
        assert source.status == DONE
        new_hdri = np.ascontiguousarray(job.hdri * 2)
        first = wait(manager, manager.relight(source, new_hdri, options, decode_ms=0))
        second = wait(manager, manager.relight(first, job.hdri, options, decode_ms=0, rotation=0.5))
        assert first.status == second.status == DONE, (first.error, second.error)
        assert "relight_cache_ms" in first.timings and "relight_cache_ms" not in second.timings
        assert "prepare_ms" not in first.timings
        prepared = renderer.prepare(job)
        expected = renderer.shade(prepared, new_hdri, options)
        np.testing.assert_allclose(first.result.shaded, expected.shaded, rtol=RTOL, atol=ATOL)
        cache = renderer.relight_cache(prepared, options)
        np.testing.assert_allclose(second.result.shaded, renderer.relight(cache, job.hdri, 0.5).shaded,
                                   rtol=RTOL, atol=ATOL)
        # an HDRI-dependent ray set is shaded plainly, rotation applied to the map
        mis = Options(rays=8, sampling="mis")
        third = wait(manager, manager.relight(source, job.hdri, mis, decode_ms=0, rotation=0.5))
        rotated = EnvironmentMap(job.hdri).rotated(0.5).image.numpy()
        np.testing.assert_array_equal(third.result.shaded, renderer.shade(prepared, rotated, mis).shaded)
        assert "relight_cache_ms" not in third.timings
        # shadows off reuses the cache and skips the shadow net
        no_shadows = Options(rays=16, sampling="stratified", shadows=False)
        fourth = wait(manager, manager.relight(source, job.hdri, no_shadows, decode_ms=0))
        assert "relight_cache_ms" not in fourth.timings and fourth.result.meta["shadows"] is False
        np.testing.assert_array_equal(fourth.result.shadow, 1.0)
    finally:
        manager.stop()
