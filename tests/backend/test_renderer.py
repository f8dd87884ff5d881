import numpy as np
import pytest

import backend.renderer as renderer_module
from backend.jobformat import Options
from backend.renderer import Cancelled, Renderer
from backend.synthetic import demo_scene_job


@pytest.fixture(scope="module")
def job():
    return demo_scene_job(48, 32, options=Options(rays=32))


def test_deterministic_and_background_is_black(job, device):
    renderer = Renderer(device)
    a, b = renderer.render(job), renderer.render(job)
    np.testing.assert_array_equal(a.shaded, b.shaded)
    background = job.gbuffer.mask == 0
    assert background.any() and (a.shaded[background] == 0).all()
    assert (a.shaded[~background] > 0).all()
    assert a.meta["device"].startswith(device)


def test_chunking_does_not_change_the_image(job, monkeypatch):
    whole = Renderer("cpu").render(job).unshadowed
    monkeypatch.setattr(renderer_module, "chunk_pixels", lambda *args: 100)
    chunked = Renderer("cpu").render(job).unshadowed
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)


def test_progress_and_cancel(job, monkeypatch):
    monkeypatch.setattr(renderer_module, "chunk_pixels", lambda *args: 200)
    seen = []
    Renderer("cpu").render(job, progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) > 3
    calls = []
    with pytest.raises(Cancelled):
        Renderer("cpu").render(job, cancel=lambda: calls.append(1) or len(calls) > 2)


def test_exposure_is_exact(job):
    """Doubling the HDRI doubles the image, shadow estimator included (linear pipeline)."""
    renderer = Renderer("cpu")
    base = renderer.render(job)
    job2 = demo_scene_job(48, 32, hdri=job.hdri * 2, options=job.options)
    np.testing.assert_allclose(renderer.render(job2).shaded, 2 * base.shaded, rtol=1e-4, atol=1e-6)


def test_relight_equals_fresh_render(job):
    renderer = Renderer("cpu")
    prepared = renderer.prepare(job)
    new_hdri = np.ascontiguousarray(job.hdri[:, ::-1])
    relit = renderer.shade(prepared, new_hdri, job.options)
    fresh = renderer.render(demo_scene_job(48, 32, hdri=new_hdri, options=job.options))
    np.testing.assert_array_equal(relit.shaded, fresh.shaded)
