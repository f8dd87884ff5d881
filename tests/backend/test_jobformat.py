import json

import numpy as np
import pytest

from backend.exrio import write_exr
from backend.jobformat import PEELED_DEPTHS, JobError, Options, load_job, read_result, write_job, write_result
from backend.renderer import Renderer
from backend.synthetic import sphere_job


@pytest.fixture
def job_dir(tmp_path):
    job = sphere_job(24, 16, options=Options(model="lambert", rays=8))
    write_job(job, tmp_path)
    return tmp_path


@pytest.mark.parametrize("half", [False, True])
def test_job_round_trip(tmp_path, half):
    job = sphere_job(24, 16)
    write_job(job, tmp_path, half=half)
    again = load_job(tmp_path)
    assert (again.width, again.height) == (24, 16)
    tolerance = 2e-3 if half else 0
    for name, layer in job.gbuffer.layers().items():
        fg = job.gbuffer.foreground
        read = getattr(again.gbuffer, name)
        if name in PEELED_DEPTHS:  # "no surface": Blender's 1e10 is +Inf in half floats, and both mean it
            read, layer = np.minimum(read, 1e9), np.minimum(layer, 1e9)
        np.testing.assert_allclose(read[fg], layer[fg], atol=tolerance, rtol=tolerance)
    np.testing.assert_array_equal(again.camera.projection, job.camera.projection)
    assert again.options == job.options


def _rewrite_gbuffer(job_dir, edit):
    """Load the job's G-buffer channels, let `edit` change them, write them back."""
    from backend.exrio import read_exr

    channels, _ = read_exr(job_dir / "gbuffer.exr")
    edit(channels)
    write_exr(job_dir / "gbuffer.exr", channels)


def _set_json(job_dir, **changes):
    data = json.loads((job_dir / "job.json").read_text())
    data.update(changes)
    (job_dir / "job.json").write_text(json.dumps(data))


def _first_foreground(job_dir):
    from backend.exrio import read_exr

    mask = read_exr(job_dir / "gbuffer.exr")[0]["mask.Y"]
    return tuple(np.argwhere(mask > 0)[0])


@pytest.mark.parametrize("edit, message", [
    (lambda c, fg: c.pop("roughness.Y"), "required layer 'roughness' is missing"),
    (lambda c, fg: c.pop("albedo.G"), "layer 'albedo' needs channels"),
    (lambda c, fg: c["albedo.R"].__setitem__(fg, np.nan), "layer 'albedo' holds NaN or Inf"),
    (lambda c, fg: c["depth.Y"].__setitem__(fg, np.inf), "layer 'depth' holds NaN or Inf"),
    (lambda c, fg: c["back_depth.Y"].__setitem__(fg, np.nan), "layer 'back_depth' holds NaN or Inf"),
    (lambda c, fg: c["back_depth.Y"].__setitem__(fg, -np.inf), "layer 'back_depth' holds NaN or Inf"),
    (lambda c, fg: c["next_depth.Y"].__setitem__(fg, np.nan), "layer 'next_depth' holds NaN or Inf"),
    (lambda c, fg: c["normal.X"].__setitem__(fg, 3.0), "layer 'normal' is not unit length"),
    (lambda c, fg: c["roughness.Y"].__setitem__(fg, 1.5), "layer 'roughness' must lie in [0, 1]"),
])
def test_bad_gbuffer_is_named(job_dir, edit, message):
    fg = _first_foreground(job_dir)
    _rewrite_gbuffer(job_dir, lambda channels: edit(channels, fg))
    with pytest.raises(JobError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        load_job(job_dir)


def test_background_may_hold_anything(job_dir):
    def edit(channels):
        background = channels["mask.Y"] == 0
        channels["depth.Y"][background] = 1e10
        channels["normal.X"][background] = np.nan
    _rewrite_gbuffer(job_dir, edit)
    load_job(job_dir)


def test_no_surface_behind_may_be_written_as_infinity(job_dir):
    def edit(channels):
        channels["back_depth.Y"][:] = channels["next_depth.Y"][:] = np.inf
    _rewrite_gbuffer(job_dir, edit)
    gbuffer = load_job(job_dir).gbuffer
    assert np.isinf(gbuffer.back_depth).all() and np.isinf(gbuffer.next_depth).all()


def test_wrong_size_layer(job_dir):
    from backend.exrio import read_exr

    channels, _ = read_exr(job_dir / "gbuffer.exr")
    write_exr(job_dir / "gbuffer.exr", {k: v[:, :-1] for k, v in channels.items()})
    with pytest.raises(JobError, match="is 23x16, the job is 24x16"):
        load_job(job_dir)


@pytest.mark.parametrize("changes, message", [
    ({"version": 3}, "unknown format version 3"),
    ({"format": "other"}, "'format' must be 'pbnds-job'"),
    ({"width": 0}, "'width' must be an integer"),
    ({"options": {"rays": 0}}, "'rays' must be an integer"),
    ({"options": {"sampling": "magic"}}, "'sampling' must be one of"),
    ({"options": {"exposure": 2}}, "unknown option"),
    ({"extra": 1}, "unknown key"),
    ({"camera": {"world_to_camera": [[1, 0], [0, 1]], "projection": np.eye(4).tolist()}}, "4x4 matrix"),
    ({"gbuffer": "missing.exr"}, "does not exist"),
])
def test_bad_job_json_is_named(job_dir, changes, message):
    _set_json(job_dir, **changes)
    with pytest.raises(JobError, match=message):
        load_job(job_dir)


def test_hdri_errors(job_dir):
    write_exr(job_dir / "hdri.exr", {c: np.ones((16, 16), np.float32) for c in "RGB"})
    with pytest.raises(JobError, match="must be 2:1, got 16x16"):
        load_job(job_dir)
    write_exr(job_dir / "hdri.exr", {c: np.full((16, 32), -1.0, np.float32) for c in "RGB"})
    with pytest.raises(JobError, match="negative radiance"):
        load_job(job_dir)


def test_unreadable_file(job_dir):
    (job_dir / "gbuffer.exr").write_bytes(b"not an exr at all")
    with pytest.raises(JobError, match="gbuffer.exr: cannot read EXR"):
        load_job(job_dir)
    (job_dir / "job.json").write_text("{")
    with pytest.raises(JobError, match="not valid JSON"):
        load_job(job_dir)


def test_blender_style_channel_names(job_dir):
    """Blender's multilayer files prefix the view layer and name value passes .V or .X."""
    from backend.exrio import read_exr

    channels, _ = read_exr(job_dir / "gbuffer.exr")
    renamed = {f"ViewLayer.{k}".replace("roughness.Y", "roughness.V").replace("ao.Y", "ao.X"): v
               for k, v in channels.items()}
    write_exr(job_dir / "gbuffer.exr", renamed)
    load_job(job_dir)


def test_result_round_trip(job_dir, tmp_path):
    job = load_job(job_dir)
    result = Renderer("cpu").render(job)
    write_result(tmp_path / "result.exr", result)
    again = read_result(tmp_path / "result.exr")
    np.testing.assert_array_equal(again.shaded, result.shaded)
    np.testing.assert_array_equal(again.shadow, result.shadow)
    assert again.meta["model"] == "lambert" and again.meta["device"] == "cpu"
