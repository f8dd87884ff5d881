"""GGX against Cycles' Principled BSDF (Multiscatter GGX) in a white furnace.

Four spheres under an orthographic camera in a uniform white world of strength 1: a white and a gold
metal, and a white and a grey dielectric (IOR 1.5), all at roughness 0.7. For a convex object under a uniform unit
environment the radiance leaving a pixel is the BSDF's directional albedo at that pixel's n.o, so the
Cycles render is compared, sphere by sphere, with the backend shading the same pixels, from the exported
G-buffer:

- the metals through the backend's GGX shader (shaders.GGX, its Monte Carlo over mis rays), which the
  single-scattering lobe alone would miss by far more than the tolerance (the test can fail);
- the dielectrics analytically from brdf: the compensated specular's albedo, plus the base colour weighted
  by 1 - the specular layer's albedo (brdf.diffuse_weight with roughness, Cycles' layering, which the GGX
  shader uses); 1 - F(n.o) (diffuse_weight without roughness) is measured beside it. A white base
  checks that the layering conserves energy as Cycles' does, a grey one the specular's albedo too.

A ~0-wide pixel filter makes both images sample each pixel's centre. The spheres are visible to camera
rays only, so that none sees another. Cycles' bounces: the world reaches a convex sphere in one, and the
multiple scattering is inside the BSDF (its energy compensation).
Tolerance: 3 % on the mean over a sphere's pixels, per channel.
"""

import json

import bpy
import numpy as np
import pytest
from blender_helpers import read_exr
from make_fixtures import add_mesh, principled

from addon import compat, gbuffer

pytestmark = pytest.mark.blender
torch = pytest.importorskip("torch")
from backend import brdf  # noqa: E402
from backend.sampling import make_rays  # noqa: E402
from backend.shaders import GGX, PixelInputs  # noqa: E402

SIZE = 64  # pixels per sphere across the image's height
SPACING = 2.4  # the spheres' centres along x, radius 1
ROUGHNESS = 0.7
# name: (base colour, metallic)
SPHERES = {"white metal": ((1.0, 1.0, 1.0), 1.0), "gold metal": ((1.0, 0.766, 0.336), 1.0),
           "white dielectric": ((1.0, 1.0, 1.0), 0.0), "grey dielectric": ((0.5, 0.5, 0.5), 0.0)}
SAMPLES = 32  # Cycles; a uniform world makes every path's weight near its mean: ~0.1 % on a sphere's mean
RAYS = 256  # backend mis rays per pixel


@pytest.fixture(scope="module")
def furnace(tmp_path_factory):
    """(Cycles radiance (H, W, 3), G-buffer layers, job json) of the three spheres."""
    out = tmp_path_factory.mktemp("furnace")
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.render.resolution_x, scene.render.resolution_y = SIZE * len(SPHERES), SIZE
    scene.cycles.device = "CPU"
    for index, (name, (base, metallic)) in enumerate(SPHERES.items()):
        material = principled(name, base, metallic, ROUGHNESS)
        bsdf = material.node_tree.nodes["Principled BSDF"]
        bsdf.inputs["IOR"].default_value = 1.5
        assert bsdf.distribution == "MULTI_GGX"  # the default
        sphere = add_mesh(bpy.ops.mesh.primitive_uv_sphere_add, name, material, segments=64, ring_count=32,
                          radius=1.0, location=((index - (len(SPHERES) - 1) / 2) * SPACING, 0.0, 0.0))
        # seen by the camera only: each sphere sees the white world alone (the gold one would tint the others)
        sphere.visible_diffuse = sphere.visible_glossy = sphere.visible_transmission = False
        sphere.visible_shadow = sphere.visible_volume_scatter = False
    scene.world = bpy.data.worlds.new("Furnace")
    background = compat.node_tree(scene.world).nodes["Background"]
    background.inputs["Color"].default_value = (1.0, 1.0, 1.0, 1.0)
    background.inputs["Strength"].default_value = 1.0
    camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    camera.data.type, camera.data.ortho_scale, camera.location = "ORTHO", SPACING * len(SPHERES), (0, 0, 10)
    scene.collection.objects.link(camera)
    scene.camera = camera

    job_json = gbuffer.export_job(scene, out / "job", samples=1, hdri_width=16)
    layers = read_exr(out / "job" / "gbuffer.exr")

    cycles = scene.cycles
    cycles.samples, cycles.use_denoising, cycles.use_adaptive_sampling = SAMPLES, False, False
    cycles.max_bounces = cycles.glossy_bounces = cycles.diffuse_bounces = 2
    cycles.filter_width, cycles.blur_glossy = 0.01, 0.0
    settings = scene.render.image_settings
    compat.set_file_format(settings, "OPEN_EXR")
    settings.color_depth = "32"
    scene.render.filepath = str(out / "cycles.exr")
    bpy.ops.render.render(write_still=True)
    (image,) = read_exr(out / "cycles.exr").values()
    return image[..., :3], layers, json.loads(job_json.read_text())


def sphere_pixels(layers, index):
    """The G-buffer's pixels of sphere ``index`` (its square of the image) as backend inputs, and their mask."""
    mask = layers["mask"] > 0
    mask[:, :index * SIZE] = False
    mask[:, (index + 1) * SIZE:] = False
    count = int(mask.sum())
    tensors = [torch.from_numpy(np.ascontiguousarray(layers[name][mask].reshape(count, -1))).float()
               for name in ("albedo", "specular", "roughness", "normal")]
    tensors[3] = torch.nn.functional.normalize(tensors[3], dim=-1)
    wo = torch.tensor([[0.0, 0.0, 1.0]]).expand(count, 3)  # the orthographic camera looks down -z
    return PixelInputs(*tensors, wo), mask


def shader_furnace(shader, pixels, chunk=2048):
    """The shader under a unit environment, per pixel, over mis rays (cosine and GGX-lobe halves)."""
    out = []
    for start in range(0, len(pixels), chunk):
        part = pixels.slice(start, start + chunk)
        rays = make_rays("mis", RAYS, 0, normals=part.normal, wo=part.wo, roughness=part.roughness)
        out.append(shader(part, rays, torch.ones(1, RAYS, 3)))
    return torch.cat(out)


def analytic(pixels, layering):
    """Directional albedo per pixel: the compensated GGX specular plus the base colour under it, the diffuse
    weighted by 1 - the layer's albedo (``layering``) or by 1 - F(n.o); and the single-scattering specular
    (F0 E + (1 - F0) E5) with the same diffuse."""
    n_dot_o = (pixels.normal * pixels.wo).sum(-1, keepdim=True).clamp(min=brdf.EPS)
    f0, roughness = pixels.specular, pixels.roughness
    weight = brdf.diffuse_weight_at(f0, n_dot_o, roughness if layering else None)
    e, e5, _ = brdf.ggx_albedo(roughness, n_dot_o)
    diffuse = pixels.albedo * weight
    return brdf.ggx_specular_albedo(f0, roughness, n_dot_o) + diffuse, f0 * e + (1 - f0) * e5 + diffuse


def test_gbuffer_of_the_furnace_scene(furnace):
    _, layers, job = furnace
    assert job["lights"] == []
    for index, (name, (base, metallic)) in enumerate(SPHERES.items()):
        pixels, mask = sphere_pixels(layers, index)
        assert 2000 < mask.sum() < SIZE * SIZE * 0.8, name
        f0 = np.array(base) * metallic + 0.04 * (1 - metallic)  # IOR 1.5, Specular IOR Level 0.5
        np.testing.assert_allclose(pixels.specular.mean(0).numpy(), f0, atol=2e-3, err_msg=name)
        assert pixels.roughness.sub(ROUGHNESS).abs().max() < 1e-3


@pytest.mark.parametrize("name", ["white metal", "gold metal"])
def test_metal_matches_multiscatter_ggx(furnace, name):
    image, layers, _ = furnace
    pixels, mask = sphere_pixels(layers, list(SPHERES).index(name))
    cycles = torch.from_numpy(image[mask].astype(np.float32)).mean(0)
    with torch.inference_mode():
        ours = shader_furnace(GGX(), pixels).mean(0)
    _, single = analytic(pixels, layering=True)
    single = single.mean(0)
    message = (f"{name}: Cycles {cycles.numpy().round(4)}, ours {ours.numpy().round(4)}, "
               f"single scattering {single.numpy().round(4)}")
    assert (ours / cycles - 1).abs().max() < 0.03, message
    assert (single / cycles - 1).abs().max() > 0.05, message  # without the compensation this test fails
    print(message)


@pytest.mark.parametrize("name", ["white dielectric", "grey dielectric"])
def test_dielectric_matches_principled_layering(furnace, name):
    image, layers, _ = furnace
    pixels, mask = sphere_pixels(layers, list(SPHERES).index(name))
    cycles = torch.from_numpy(image[mask].astype(np.float32)).mean(0)
    layered, _ = analytic(pixels, layering=True)
    fresnel_weighted, _ = analytic(pixels, layering=False)
    with torch.inference_mode():
        shader = shader_furnace(GGX(), pixels).mean(0)
    layered, fresnel_weighted = layered.mean(0), fresnel_weighted.mean(0)
    message = (f"{name}: Cycles {cycles.numpy().round(4)}, ours (albedo layering) {layered.numpy().round(4)}, "
               f"1 - F(n.o) layering {fresnel_weighted.numpy().round(4)}, GGX shader {shader.numpy().round(4)}")
    assert (layered / cycles - 1).abs().max() < 0.03, message
    assert (layered - cycles).abs().max() < (fresnel_weighted - cycles).abs().max(), message
    # the GGX shader's Monte Carlo is the analytic albedo of the layering it uses (1 - the lobe's albedo)
    torch.testing.assert_close(shader, layered, atol=5e-3, rtol=0, msg=message)
    print(message)
