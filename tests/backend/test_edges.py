"""Anti-aliased edges (backend/edges.py): the coverage layer turns the point-sampled shading into what a
filtered render shows at silhouettes."""

import dataclasses

import numpy as np
import pytest
import torch

from backend.edges import antialiased, footprint, over_background, world_background
from backend.jobformat import JobError, Options, validate_gbuffer
from backend.renderer import Renderer
from backend.synthetic import Material, Sphere, constant_hdri, sphere_job, trace


def box_coverage(job, factor=8):
    """The sphere's coverage of each pixel under a box filter: its mask traced at factor x the resolution."""
    fine = trace(job.camera, job.width * factor, job.height * factor, [Sphere((0.0, 0.0, 0.0), 1.0, Material())])
    return fine.mask.reshape(job.height, factor, job.width, factor).mean(axis=(1, 3)).astype(np.float32)


def test_premultiplies_and_fills_the_outer_ring():
    foreground = torch.zeros(4, 5, dtype=torch.bool)
    foreground[:, :2] = True
    image = torch.zeros(4, 5, 3)
    image[:, 0], image[:, 1] = 1.0, 3.0
    coverage = torch.tensor([1.0, 0.5, 0.25, 0.75, 0.0]).expand(4, 5)
    (out,), alpha = antialiased([image], foreground, coverage)
    assert torch.allclose(out[:, 1], torch.full((4, 3), 1.5))  # an inner edge pixel: its shading x coverage
    assert torch.allclose(out[:, 2], torch.full((4, 3), 0.25 * 3.0))  # outer: mean of its foreground neighbours
    assert torch.all(alpha[:, 3] == 0) and torch.all(out[:, 3] == 0)  # coverage with no shading next to it
    assert torch.equal(alpha[:, :3], coverage[:, :3])


def test_a_sphere_edge_blends_with_the_world_like_a_filtered_render():
    """White furnace: a grey sphere in a constant white world. A box-filtered render's pixel is
    coverage x sphere + (1 - coverage) x world; so must be ours over the world, and the point-sampled
    mask alone misses that by up to the whole contrast."""
    job = sphere_job(32, 32, Material((0.2, 0.2, 0.2), roughness=1.0), hdri=constant_hdri(),
                     options=Options(model="ggx", rays=64, shadows=False))
    coverage = box_coverage(job)
    renderer = Renderer(device="cpu")
    hard = renderer.render(job)
    job.gbuffer = dataclasses.replace(job.gbuffer, coverage=coverage)
    soft = renderer.render(job)
    world = world_background(job)
    assert np.allclose(world, 1.0, atol=1e-5)
    sphere = float(np.median(hard.shaded[job.gbuffer.mask > 0]))
    truth = coverage[..., None] * sphere + (1 - coverage[..., None]) * world
    edge = (coverage > 0) & (coverage < 1)
    assert edge.sum() > 40
    soft_error = np.abs(over_background(soft.shaded, soft.mask, world) - truth)[edge].max()
    hard_error = np.abs(over_background(hard.shaded, hard.mask, world) - truth)[edge].max()
    assert soft_error < 0.05 < 0.25 < hard_error, (soft_error, hard_error)  # the sphere is brighter at grazing angles
    assert np.array_equal(footprint(job.gbuffer) > 0, (coverage > 0) | (job.gbuffer.mask > 0))


def test_coverage_out_of_range_is_refused():
    job = sphere_job(8, 8)
    bad = np.zeros((8, 8), np.float32)
    bad[0, 3] = np.nan
    with pytest.raises(JobError, match="'coverage'"):
        validate_gbuffer(dataclasses.replace(job.gbuffer, coverage=bad))
    with pytest.raises(JobError, match="'coverage'"):
        validate_gbuffer(dataclasses.replace(job.gbuffer, coverage=bad * 0 + 1.5))
