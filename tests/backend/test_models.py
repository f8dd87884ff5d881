import json

import numpy as np
import pytest
import torch

from backend.jobformat import Options
from backend.models import CheckpointError, load_checkpoint, load_model, new_model, save_checkpoint
from backend.renderer import Renderer
from backend.sampling import make_rays
from backend.shaders import GGX, PaperShader, PixelInputs
from backend.synthetic import demo_scene_job


def random_pixels(count=32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    normal = torch.nn.functional.normalize(torch.randn(count, 3, generator=g), dim=-1)
    wo = torch.nn.functional.normalize(normal + 0.5 * torch.randn(count, 3, generator=g), dim=-1)
    return PixelInputs(*(t.to(device) for t in (torch.rand(count, 3, generator=g), torch.rand(count, 3, generator=g),
                                                  torch.rand(count, 1, generator=g), normal, wo)))


def test_untrained_default_shader_is_exactly_ggx(device):
    pixels = random_pixels(device=device)
    rays = make_rays("uniform", 64, 0, device=device)
    radiance = torch.rand(1, 64, 3, device=device) * 3
    default = new_model("default").to(device).shader
    torch.testing.assert_close(default(pixels, rays, radiance), GGX().to(device)(pixels, rays, radiance))


def test_paper_shader_matches_the_reference_architecture():
    shader = PaperShader()
    assert shader.encoder[0].in_features == 187 and shader.decoder[0].in_features == 263
    parameters = sum(p.numel() for p in shader.parameters())
    assert 300_000 < parameters < 330_000, parameters  # docs/design.md section 5: about 313k


def test_default_shader_is_linear_in_radiance():
    shader = new_model("default").shader
    torch.nn.init.normal_(shader.out.weight, std=0.3)  # a non-trivial network
    pixels = random_pixels()
    rays = make_rays("uniform", 32, 0)
    radiance = torch.rand(1, 32, 3)
    torch.testing.assert_close(shader(pixels, rays, 7.5 * radiance), 7.5 * shader(pixels, rays, radiance))
    assert (shader.brdf_cos(pixels, rays.directions) >= 0).all()


def test_checkpoint_round_trip_gives_identical_output(tmp_path):
    model = new_model("default")
    for module in (model.shader, model.shadow):
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.1)
    path = save_checkpoint(model, tmp_path / "model", training={"steps": 3})
    assert json.loads(path.with_suffix(".json").read_text())["shader"]["arch"] == "linear-gain"
    loaded = load_checkpoint(path)
    assert loaded.info["training"] == {"steps": 3}
    job = demo_scene_job(32, 24, options=Options(rays=16))
    renderer = Renderer("cpu")
    renderer._models = {"a": model.to("cpu"), "b": loaded.to("cpu")}
    a = renderer.render(_opts(job, "a"))
    b = renderer.render(_opts(job, "b"))
    np.testing.assert_array_equal(a.shaded, b.shaded)
    assert not np.array_equal(a.shadow, np.ones_like(a.shadow))


def _opts(job, model):
    job.options = Options(model=model, rays=16)
    return job


def test_mismatching_checkpoint_is_a_clear_error(tmp_path):
    path = save_checkpoint(new_model("default"), tmp_path / "model")
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    config = json.loads(metadata["pbnds_config"])
    config["shader"]["hidden"] = 64
    save_file(tensors, str(path), metadata={"pbnds_config": json.dumps(config)})
    with pytest.raises(CheckpointError, match="does not match its shader architecture"):
        load_checkpoint(path)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="unknown model 'nope'"):
        load_model("nope")
