"""export_job on the fixture scenes: contract layers, material values, depth, camera matrices."""

import json

import bmesh
import bpy
import numpy as np
import OpenEXR
import pytest
from blender_helpers import exr_channel_names, fixture, read_exr
from make_fixtures import SPHERES

from addon import compat, gbuffer

pytestmark = pytest.mark.blender
SIZE = 64
CHANNELS = {"albedo.R", "albedo.G", "albedo.B", "albedo.A", "specular.R", "specular.G", "specular.B",
            "specular.A", "roughness.V", "metallic.V", "normal.X", "normal.Y", "normal.Z", "depth.V",
            "ao.V", "mask.V", "position.X", "position.Y", "position.Z", "coverage.V", "back_depth.V",
            "next_depth.V"}


@pytest.fixture(scope="module")
def spheres_job(tmp_path_factory):
    bpy.ops.wm.open_mainfile(filepath=str(fixture("spheres")))
    out = tmp_path_factory.mktemp("spheres_job")
    path = gbuffer.export_job(bpy.context.scene, out, samples=4, width=SIZE, height=SIZE, hdri_width=64,
                              options={"rays": 64}, background=True)
    job = json.loads(path.read_text())
    return path, job, read_exr(out / "gbuffer.exr")


def project(job, point):
    """(row, col) of the pixel whose centre is nearest to the projection of a world point."""
    view = np.array(job["camera"]["world_to_camera"])
    proj = np.array(job["camera"]["projection"])
    clip = proj @ view @ np.array([*point, 1.0])
    ndc = clip[:3] / clip[3]
    col = (ndc[0] + 1) / 2 * job["width"] - 0.5
    row = (1 - ndc[1]) / 2 * job["height"] - 0.5
    return int(round(row)), int(round(col))


def pixel_ray(job, row, col):
    """Camera-space unit direction through the centre of pixel (row, col)."""
    ndc = np.array([(col + 0.5) / job["width"] * 2 - 1, 1 - (row + 0.5) / job["height"] * 2, 1.0, 1.0])
    p = np.linalg.inv(np.array(job["camera"]["projection"])) @ ndc
    d = p[:3] / p[3]
    return d / np.linalg.norm(d)


def sphere_hits(job, row, col, centre, radius):
    """Distances along the ray through pixel (row, col) where it enters and leaves the sphere."""
    c = (np.array(job["camera"]["world_to_camera"]) @ np.array([*centre, 1.0]))[:3]
    b = pixel_ray(job, row, col) @ c
    return b + np.array([-1, 1]) * np.sqrt(b * b - (c @ c - radius * radius))


def test_job_json_and_layers(spheres_job):
    path, job, layers = spheres_job
    assert job["format"] == "pbnds-job" and job["version"] == 2 and job["lights"] == []
    assert (job["width"], job["height"], job["gbuffer"], job["hdri"]) == (SIZE, SIZE, "gbuffer.exr", "hdri.exr")
    assert job["frame"] == 1 and job["options"] == {"rays": 64}
    assert set(exr_channel_names(path.parent / "gbuffer.exr")) == CHANNELS
    for name, layer in layers.items():
        assert layer.shape[:2] == (SIZE, SIZE), name
    hdri = read_exr(path.parent / "hdri.exr")[""]
    assert hdri.shape == (32, 64, 3) and np.isfinite(hdri).all() and hdri.min() >= 0
    fg = layers["mask"] > 0
    assert fg.mean() > 0.3 and set(np.unique(layers["mask"])) <= {0.0, 1.0}  # ~0-wide pixel filter
    for name in ("albedo", "specular", "roughness", "metallic", "ao"):
        values = layers[name][fg]
        assert np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1, name
    length = np.linalg.norm(layers["normal"][fg], axis=-1)
    assert np.abs(length - 1).max() < 1e-2
    # the second surface: the spheres' backs lie behind their visible surface; the ground plane has none (1e10)
    ground = fg & (layers["position"][..., 2] < 1e-3)
    assert ground.mean() > 0.2 and (layers["back_depth"][ground] >= 1e9).mean() > 0.99
    spheres = fg & (layers["position"][..., 2] > 0.05)
    assert (layers["back_depth"][spheres] > layers["depth"][spheres]).mean() > 0.99
    # behind a sphere's back: the ground where the ray goes on to meet it, nothing where it passes above
    assert (layers["next_depth"][spheres] > layers["back_depth"][spheres]).mean() > 0.99
    assert (layers["next_depth"][ground] >= 1e9).all()


def test_backdrop_is_the_world_cycles_renders(spheres_job, tmp_path):
    """background.exr (the G-buffer render's Environment pass) against a Cycles render of the world alone."""
    from addon import world

    path, _, layers = spheres_job
    backdrop = world.load_pixels(path.parent / "background.exr")
    reference = world.render_background(bpy.context.scene, tmp_path / "world.exr", SIZE, SIZE, samples=16)
    mask = layers["mask"] > 0
    assert np.abs(backdrop[mask]).max() == 0  # no world where a surface is hit
    sky = ~mask
    for _ in range(2):  # the reference's 1.5-pixel filter blends the spheres into their neighbours
        sky[1:-1, 1:-1] &= sky[:-2, 1:-1] & sky[2:, 1:-1] & sky[1:-1, :-2] & sky[1:-1, 2:]
    assert sky.sum() > 200
    assert backdrop[sky].mean() == pytest.approx(reference[sky].mean(), rel=0.02)
    assert np.median(np.abs(backdrop[sky] / reference[sky] - 1)) < 0.05


def test_coverage_is_the_alpha_cycles_renders(spheres_job, tmp_path):
    """The coverage layer against the alpha of a plain Cycles render (transparent film, the scene's own
    pixel filter): fractional along every silhouette, where the point-sampled mask is 0 or 1."""
    path, _, layers = spheres_job
    scene = bpy.context.scene
    render = scene.render
    saved = (render.film_transparent, render.resolution_x, render.resolution_y, render.resolution_percentage,
             scene.cycles.samples, render.filepath)
    try:
        render.film_transparent = True
        render.resolution_x = render.resolution_y = SIZE
        render.resolution_percentage = 100
        scene.cycles.samples = 64
        render.filepath = str(tmp_path / "alpha.exr")
        compat.set_file_format(render.image_settings, "OPEN_EXR")
        render.image_settings.color_mode = "RGBA"
        bpy.ops.render.render(write_still=True)
    finally:
        (render.film_transparent, render.resolution_x, render.resolution_y, render.resolution_percentage,
         scene.cycles.samples, render.filepath) = saved
    alpha = OpenEXR.File(str(tmp_path / "alpha.exr"), separate_channels=True).channels()["A"].pixels
    coverage, mask = layers["coverage"], layers["mask"]
    edge = (alpha > 0.05) & (alpha < 0.95)
    assert edge.sum() > 20 and np.isin(mask, (0.0, 1.0)).all()
    assert np.abs(coverage - alpha).mean() < 0.01
    assert np.abs(coverage - alpha)[edge].mean() < 0.1 < np.abs(mask - alpha)[edge].mean()


def test_backend_reads_the_job(spheres_job):
    jobformat = pytest.importorskip("backend.jobformat")
    job = jobformat.load_job(spheres_job[0])
    assert job.gbuffer.size == (SIZE, SIZE)


@pytest.mark.parametrize("name", list(SPHERES))
def test_material_values_depth_and_projection(spheres_job, name):
    _, job, layers = spheres_job
    centre, radius, base, metallic, roughness = SPHERES[name]
    row, col = project(job, centre)
    assert layers["mask"][row, col] == 1
    base = np.array(base)
    np.testing.assert_allclose(layers["albedo"][row, col], base * (1 - metallic), atol=1e-3)
    f0 = 0.08 * 0.5 * (1 - metallic) + base * metallic  # Specular IOR Level 0.5, white tint
    np.testing.assert_allclose(layers["specular"][row, col], f0, atol=1e-3)
    assert layers["roughness"][row, col] == pytest.approx(roughness, abs=1e-3)
    assert layers["metallic"][row, col] == pytest.approx(metallic, abs=1e-3)
    # Analytic ray-sphere hit through this pixel's centre, in camera space.
    view = np.array(job["camera"]["world_to_camera"])
    d = pixel_ray(job, row, col)
    t, leaves = sphere_hits(job, row, col, centre, radius)
    hit = d * t
    assert layers["depth"][row, col] == pytest.approx(-hit[2], abs=5e-3)  # along the view axis
    assert layers["back_depth"][row, col] == pytest.approx(-(d * leaves)[2], abs=5e-3)  # where the ray leaves
    hit_world = np.linalg.inv(view) @ np.array([*hit, 1.0])
    np.testing.assert_allclose(layers["position"][row, col], hit_world[:3], atol=5e-3)
    np.testing.assert_allclose(layers["normal"][row, col], (hit_world[:3] - centre) / radius, atol=2e-2)


def test_back_depth_is_where_the_ray_leaves_a_sphere_with_flipped_normals(tmp_path, open_fixture):
    """The second surface along the ray, not the first back face: an inside-out mesh (a common modelling
    slip) still gets its true thickness, not 0."""
    scene = open_fixture("spheres")
    centre, radius = SPHERES["RedRough"][:2]
    mesh, inside_out = bpy.data.objects["RedRough"].data, bmesh.new()
    inside_out.from_mesh(mesh)
    bmesh.ops.reverse_faces(inside_out, faces=inside_out.faces[:])
    inside_out.to_mesh(mesh)
    inside_out.free()
    path = gbuffer.export_job(scene, tmp_path, samples=1, width=SIZE, height=SIZE, hdri_width=16, shadow_map_size=0)
    job, layers = json.loads(path.read_text()), read_exr(tmp_path / "gbuffer.exr")
    row, col = project(job, centre)
    t, leaves = sphere_hits(job, row, col, centre, radius)
    d = pixel_ray(job, row, col)
    assert layers["depth"][row, col] == pytest.approx(-(d * t)[2], abs=5e-3)
    assert layers["back_depth"][row, col] == pytest.approx(-(d * leaves)[2], abs=5e-3)


def test_suzanne_procedural_and_sky(tmp_path, open_fixture):
    scene = open_fixture("suzanne")
    path = gbuffer.export_job(scene, tmp_path, samples=2, width=48, height=32, hdri_width=64)
    layers = read_exr(tmp_path / "gbuffer.exr")
    job = json.loads(path.read_text())
    assert layers["albedo"].shape == (32, 48, 3) and (job["width"], job["height"]) == (48, 32)
    row, col = project(job, bpy.data.objects["Suzanne"].location)
    albedo = layers["albedo"][max(row - 3, 0):row + 4, col - 3:col + 4].reshape(-1, 3)
    assert albedo.std(axis=0).max() > 0.01  # the noise texture reaches the albedo layer
    hdri = read_exr(tmp_path / "hdri.exr")[""]
    assert hdri[:16].mean() > hdri[16:].mean()  # the sky above the horizon is brighter


def test_node_fallbacks(tmp_path, open_fixture):
    """Mix Shader of Diffuse and Glossy, and a Principled BSDF inside a node group."""
    scene = open_fixture("spheres")
    mix_mat = bpy.data.materials.new("Mixed")
    tree = compat.node_tree(mix_mat)
    tree.nodes.remove(tree.nodes["Principled BSDF"])
    diffuse = tree.nodes.new("ShaderNodeBsdfDiffuse")
    diffuse.inputs["Color"].default_value = (0.2, 0.4, 0.6, 1)
    glossy = tree.nodes.new("ShaderNodeBsdfGlossy")
    glossy.inputs["Color"].default_value = (0.9, 0.8, 0.7, 1)
    glossy.inputs["Roughness"].default_value = 0.3
    mix = tree.nodes.new("ShaderNodeMixShader")
    mix.inputs["Fac"].default_value = 0.25
    tree.links.new(diffuse.outputs[0], mix.inputs[1])
    tree.links.new(glossy.outputs[0], mix.inputs[2])
    tree.links.new(mix.outputs[0], tree.nodes["Material Output"].inputs["Surface"])
    bpy.data.objects["RedRough"].material_slots[0].material = mix_mat

    group = bpy.data.node_groups.new("Shader Group", "ShaderNodeTree")
    group.interface.new_socket("Shader", in_out="OUTPUT", socket_type="NodeSocketShader")
    inner = group.nodes.new("ShaderNodeBsdfPrincipled")
    inner.inputs["Base Color"].default_value = (0.1, 0.7, 0.2, 1)
    inner.inputs["Roughness"].default_value = 0.33
    group.links.new(inner.outputs[0], group.nodes.new("NodeGroupOutput").inputs[0])
    group_mat = bpy.data.materials.new("Grouped")
    node = compat.node_tree(group_mat).nodes.new("ShaderNodeGroup")
    node.node_tree = group
    group_mat.node_tree.links.new(node.outputs[0], group_mat.node_tree.nodes["Material Output"].inputs["Surface"])
    bpy.data.objects["BlueGlossy"].material_slots[0].material = group_mat

    path = gbuffer.export_job(scene, tmp_path, samples=1, width=SIZE, height=SIZE, hdri_width=16)
    job = json.loads(path.read_text())
    layers = read_exr(tmp_path / "gbuffer.exr")
    r, c = project(job, SPHERES["RedRough"][0])
    base = 0.75 * np.array([0.2, 0.4, 0.6]) + 0.25 * np.array([0.9, 0.8, 0.7])
    metallic = 0.25
    np.testing.assert_allclose(layers["albedo"][r, c], base * (1 - metallic), atol=1e-3)
    np.testing.assert_allclose(layers["specular"][r, c], 0.04 * (1 - metallic) + base * metallic, atol=1e-3)
    assert layers["roughness"][r, c] == pytest.approx(0.75 * 1.0 + 0.25 * 0.3, abs=1e-3)
    r, c = project(job, SPHERES["BlueGlossy"][0])
    np.testing.assert_allclose(layers["albedo"][r, c], [0.1, 0.7, 0.2], atol=1e-3)
    assert layers["roughness"][r, c] == pytest.approx(0.33, abs=1e-3)
    assert len(group.nodes) == 2 and len(mix_mat.node_tree.nodes) == 4  # AOV wiring removed


def _dielectric_f0(ior, level):
    """Cycles' Principled dielectric F0 (svm/closure.h), clamped as the exporter does."""
    return min(max(((ior - 1) / (ior + 1)) ** 2 * 2 * level, 0.0), 1.0)


def test_specular_follows_ior(tmp_path, open_fixture):
    """specular = mix(clamp(((ior-1)/(ior+1))^2 x 2 x level) x tint, base, metallic) on every pixel of
    each object: IOR 1.33, 2.4 (half metal), a Value node linked into IOR with level 1 and a tint, and the
    ground's IOR 1.5 at level 0.5 (F0 0.04, the old 0.08 x level)."""
    scene = open_fixture("spheres")
    assert _dielectric_f0(1.5, 0.5) == pytest.approx(0.04)
    cases = {"RedRough": (1.33, 0.5, (1, 1, 1), 0.0), "GoldMetal": (2.4, 0.5, (1, 1, 1), 0.5),
             "BlueGlossy": (1.8, 1.0, (1.0, 0.5, 0.25), 0.0), "Ground": (1.5, 0.5, (1, 1, 1), 0.0)}
    expected = {}
    for name, (ior, level, tint, metallic) in cases.items():
        tree = bpy.data.objects[name].material_slots[0].material.node_tree
        bsdf = tree.nodes["Principled BSDF"]
        if name == "BlueGlossy":  # a linked IOR
            value = tree.nodes.new("ShaderNodeValue")
            value.outputs[0].default_value = ior
            tree.links.new(value.outputs[0], bsdf.inputs["IOR"])
        else:
            bsdf.inputs["IOR"].default_value = ior
        assert bsdf.inputs["IOR"].is_linked == (name == "BlueGlossy")
        bsdf.inputs["Specular IOR Level"].default_value = level
        bsdf.inputs["Specular Tint"].default_value = (*tint, 1.0)
        bsdf.inputs["Metallic"].default_value = metallic
        base = np.array(bsdf.inputs["Base Color"].default_value[:3])
        expected[name] = _dielectric_f0(ior, level) * np.array(tint) * (1 - metallic) + base * metallic
    assert expected["Ground"] == pytest.approx(0.04)

    path = gbuffer.export_job(scene, tmp_path, samples=1, width=SIZE, height=SIZE, hdri_width=16)
    job = json.loads(path.read_text())
    specular = read_exr(tmp_path / "gbuffer.exr")["specular"]
    mask = read_exr(tmp_path / "gbuffer.exr")["mask"] > 0
    # Label pixels by analytic ray-sphere hits: well inside a sphere (0.95 r) = that sphere, clear of
    # every sphere (1.05 r) and in the foreground = the ground; the silhouettes are left out.
    view = np.array(job["camera"]["world_to_camera"])
    labels = np.full((SIZE, SIZE), "", dtype=object)
    for row in range(SIZE):
        for col in range(SIZE):
            d = pixel_ray(job, row, col)
            near = {}
            for name in SPHERES:
                centre, radius = SPHERES[name][:2]
                c = (view @ np.array([*centre, 1.0]))[:3]
                miss = np.linalg.norm(c - (d @ c) * d)  # distance of the centre from the ray
                near[name] = miss / radius
            inside = [name for name, ratio in near.items() if ratio < 0.95]
            if inside:
                labels[row, col] = inside[0]
            elif min(near.values()) > 1.05 and mask[row, col]:
                labels[row, col] = "Ground"
    for name, f0 in expected.items():
        pixels = specular[labels == name]
        assert len(pixels) > 20, name
        np.testing.assert_allclose(pixels, np.broadcast_to(f0, pixels.shape), atol=1e-3, err_msg=name)
    assert expected["BlueGlossy"][0] == pytest.approx(0.16327, abs=1e-4)
    assert expected["RedRough"][0] == pytest.approx(0.02006, abs=1e-4)
    assert expected["GoldMetal"] == pytest.approx(0.5 * 0.16955 + 0.5 * np.array([1.0, 0.766, 0.336]), abs=1e-4)


def test_the_export_composites_in_a_tree_of_its_own(tmp_path, open_fixture):
    """The user's compositor holds a Render Layers node of their scene (the add-on's write-back makes one).
    The G-buffer render renders every scene its compositor names (the coverage scene is one), so the
    temporary scene must not inherit that tree: with the PBNDS engine, the user's scene would render the
    export again, recursively (seen on Blender 4.2). The user's tree is left as it was."""
    from addon.scene_state import preserved, temporary_copy

    scene = open_fixture("spheres")
    layers = compat.compositor_tree(scene).nodes.new("CompositorNodeRLayers")
    layers.scene = scene
    nodes_before = sorted(node.name for node in compat.compositor_tree(scene).nodes)
    with preserved(scene):
        own = compat.own_compositor_tree(temporary_copy(scene, "PBNDS Test"), "PBNDS Test Output")
        assert len(own.nodes) == 0 and own != compat.compositor_tree(scene)
    gbuffer.export_job(scene, tmp_path, samples=1, width=SIZE, height=SIZE, hdri_width=16, shadow_map_size=0)
    assert sorted(node.name for node in compat.compositor_tree(scene).nodes) == nodes_before


def test_errors_name_the_cause(tmp_path, open_fixture):
    scene = open_fixture("spheres")
    world = scene.world
    scene.world = None
    with pytest.raises(gbuffer.ExportError, match="no world"):
        gbuffer.export_job(scene, tmp_path, width=8, height=8)
    scene.world = world
    scene.camera = None
    with pytest.raises(gbuffer.ExportError, match="no active camera"):
        gbuffer.export_job(scene, tmp_path, width=8, height=8)


def test_render_size(open_fixture):
    scene = open_fixture("spheres")
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 400, 200, 50
    assert gbuffer.render_size(scene) == (200, 100)
    assert gbuffer.render_size(scene, width=64) == (64, 32)
    assert gbuffer.render_size(scene, height=64) == (128, 64)
    assert gbuffer.render_size(scene, 10, 20) == (10, 20)
