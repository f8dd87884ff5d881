"""Procedural generation and .blend export: determinism, a tiny real run, resume, splits, bad files."""

import argparse
import json

import numpy as np
import pytest

from backend.edges import footprint
from backend.exrio import read_exr
from training import data, datagen, scenes

HDRIS = ["city.exr", "courtyard.exr", "interior.exr", "studio.exr", "sunrise.exr", "sunset.exr"]


def _generate_args(out, *flags, **overrides):
    parser = argparse.ArgumentParser()
    datagen.add_parser(parser.add_subparsers(dest="command"))
    argv = ["generate", str(out), "--scenes", "1", "--val", "0", "--test", "1", "--views", "1", "--hdris", "1",
            "--anim-frames", "2", "--size", "32", "--gt-samples", "8", "--gbuffer-samples", "2",
            "--hdri-width", "64", "--low-samples", "1"]
    for key, value in overrides.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return parser.parse_args([*argv, *flags])


def test_description_is_deterministic():
    assert scenes.describe(7, HDRIS, 2) == scenes.describe(7, HDRIS, 2)
    assert json.loads(json.dumps(scenes.describe(7, HDRIS, 2))) == scenes.describe(7, HDRIS, 2)
    assert scenes.describe(7, HDRIS, 2) != scenes.describe(8, HDRIS, 2)
    described = [scenes.describe(seed, HDRIS, 2) for seed in range(200)]
    assert {len(d["objects"]) for d in described} == {1, 2, 3, 4}
    assert {o["kind"] for d in described for o in d["objects"]} == set(scenes.KINDS)
    lightings = [w for d in described for w in d["lightings"]]
    assert {w["type"] for w in lightings} == {"hdri", "sky", "gradient"}
    assert {w["hdri"] for w in lightings if w["type"] == "hdri"} <= set(HDRIS)


def test_plan_splits_by_scene(tmp_path):
    tasks = datagen.plan(_generate_args(tmp_path, scenes=5, val=2, test=3))
    by_split = {}
    for task in tasks:
        by_split.setdefault(task["split"], set()).add(task["scene_seed"])
    assert not (by_split["train"] & by_split["val"] or by_split["train"] & by_split["test"]
                or by_split["val"] & by_split["test"])
    assert by_split["relight"] == by_split["test"] and by_split["anim"] <= by_split["test"]
    order = list(dict.fromkeys(t["split"] for t in tasks))
    assert order == ["test", "relight", "anim", "val", "train"]  # evaluation data first
    assert all(task["render"]["denoise"] for task in tasks)
    assert datagen.render_settings(_generate_args(tmp_path, "--no-denoise"))["denoise"] is False
    relight = datagen.lightings_for(next(t for t in tasks if t["split"] == "relight"), {})[0]
    assert sorted(w["hdri"] for w in relight) == sorted(scenes.HELD_OUT_HDRIS)


def test_lamps_split_plan_and_lightings(tmp_path):
    tasks = datagen.plan(_generate_args(tmp_path, scenes=3, val=1, test=2, lamps=2, lamp_share=0.5))
    seeds = {}
    for task in tasks:
        seeds.setdefault(task["split"], set()).add(task["scene_seed"])
    assert len(seeds["lamps"]) == 2 and not seeds["lamps"] & (seeds["train"] | seeds["val"] | seeds["test"])
    assert {t["lamp_share"] for t in tasks if t["split"] in ("train", "val")} == {0.5}
    assert {t["lamp_share"] for t in tasks if t["split"] not in ("train", "val")} == {0.0}
    # the scenes of a run without lamps keep their seeds when a lamps split is added
    before = {t["folder"]: t["scene_seed"] for t in datagen.plan(_generate_args(tmp_path, scenes=3, val=1, test=2))}
    assert all(before[t["folder"]] == t["scene_seed"] for t in tasks if t["folder"] in before)
    lamps_task = next(t for t in tasks if t["split"] == "lamps")
    lightings, sequence = datagen.lightings_for({**lamps_task, "lightings": 40}, {})
    assert not sequence and {w["type"] for w in lightings} == {"lamps"}
    assert {w["setup"] for w in lightings} == set(scenes.LAMP_SETUPS)
    for w in lightings:
        if w["setup"] == "sky_sun":
            assert w["lamps"] == [] and abs(w["world"]["sun_size"] - 0.545 * np.pi / 180) < 1e-9
        else:
            assert w["lamps"] and all(lamp["energy"] > 0 for lamp in w["lamps"])
            assert abs(np.linalg.norm(w["lamps"][0]["direction"]) - 1) < 1e-9
    assert lightings == datagen.lightings_for({**lamps_task, "lightings": 40}, {})[0]
    # with share 0, scene lightings are the description's own (gen-v1 reproduces)
    description = scenes.describe(3, HDRIS, 2)
    train = next(t for t in tasks if t["split"] == "train")
    assert datagen.lightings_for({**train, "lamp_share": 0.0}, description)[0] == description["lightings"]


@pytest.mark.blender
def test_lamp_lighting_builds_its_lights(tmp_path):
    bpy = pytest.importorskip("bpy")
    import random

    from mathutils import Vector

    from addon.dataset import select_lamps

    bpy.ops.wm.read_factory_settings(use_empty=True)
    rng = random.Random(5)
    lightings = [scenes.lamp_lighting(rng, HDRIS) for _ in range(12)]
    with_lamps = [w for w in lightings if w["lamps"]][:2]
    description = {**scenes.describe(1, HDRIS, 1), "lightings": with_lamps}
    scene, worlds = scenes.build(description, datagen.hdri_folder())
    bpy.context.view_layer.update()
    lamps = [ob for ob in scene.objects if ob.type == "LIGHT"]
    assert len(lamps) == sum(len(w["lamps"]) for w in with_lamps)
    for world, lighting in zip(worlds, with_lamps, strict=True):
        select_lamps(scene, world)
        shown = [ob for ob in lamps if not ob.hide_render]
        assert [ob.data.type for ob in shown] == [lamp["type"] for lamp in lighting["lamps"]]
        for ob, lamp in zip(shown, lighting["lamps"], strict=True):  # -Z of the light points along "direction"
            axis = ob.matrix_world.to_3x3() @ Vector((0, 0, -1))
            assert np.allclose(axis, lamp["direction"], atol=1e-5)
        assert world["pbnds_world"]["setup"] == lighting["setup"]


@pytest.mark.blender
@pytest.mark.parametrize("kind", [k for k in (*scenes.KINDS, *scenes.THIN_KINDS) if k != "suzanne"])
def test_generated_shapes_face_outwards(kind):
    """Every closed shape the generator builds has its normals pointing out of it (a positive signed volume,
    the divergence theorem over its triangles), as a user's meshes do; the torus's is also its analytic
    volume. (Suzanne is not closed.)"""
    bpy = pytest.importorskip("bpy")
    import random

    bpy.ops.wm.read_factory_settings(use_empty=True)
    spec = scenes._object_spec(random.Random(3), kind, [0.0, 0.0], 1.0)
    ob = scenes._object(bpy.context.scene, 0, spec)
    mesh = ob.evaluated_get(bpy.context.evaluated_depsgraph_get()).to_mesh()
    mesh.calc_loop_triangles()
    corners = np.array([[ob.matrix_world @ mesh.vertices[v].co for v in tri.vertices] for tri in mesh.loop_triangles])
    volume = np.einsum("ij,ij->i", corners[:, 0], np.cross(corners[:, 1], corners[:, 2])).sum() / 6
    extent = corners.reshape(-1, 3).max(0) - corners.reshape(-1, 3).min(0)
    assert volume > 0.01 * np.prod(extent)  # outwards, and more than a sliver of its bounding box
    if kind == "torus":  # major 0.7, minor 0.3 scaled to a largest extent of 1: 2 pi^2 R r^2 / 2^3
        assert volume == pytest.approx(2 * np.pi**2 * 0.7 * 0.3**2 / 8, rel=0.02)


@pytest.mark.blender
def test_tiny_generation(tmp_path):
    pytest.importorskip("bpy")
    args = _generate_args(tmp_path / "gen")
    summary = datagen.generate(args)
    assert summary["failed"] == [] and summary["rendered_samples"] == 6
    root = tmp_path / "gen"
    assert (root / "READY").exists()
    table = data.splits(root)
    assert table["val"] == [] and all(len(table[split]) == 1 for split in ("train", "test", "relight", "anim"))
    assert table["train"] != table["test"]
    for split in data.SPLITS:
        for sample in data.load_split(root, split):  # loading validates the G-buffer and HDRI
            mask = footprint(sample.job.gbuffer) > 0  # the mask widened by the coverage layer
            assert 0 < mask.mean() <= 1 and sample.job.gbuffer.coverage is not None
            raw = read_exr(root / sample.name / "gt_full.exr")[0]
            raw = np.stack([raw[c] for c in "RGB"], axis=-1)
            assert np.isfinite(raw).all() and raw.min() > -1e-3
            world = sample.job.gbuffer.mask == 0
            assert world.any() and raw[world].mean() > 1e-3  # opaque film: the world is behind the objects
            for image in [sample.gt_full, sample.gt_unshadowed] + [c["image"] for c in sample.cycles_low]:
                assert np.isfinite(image).all() and image.min() >= 0 and np.all(image[~mask] == 0)
            assert sample.gt_full[mask].mean() > 0.01
            assert len(sample.cycles_low) == (1 if split in ("test", "relight") else 0)
            if split == "relight":
                assert sample.hdri in scenes.HELD_OUT_HDRIS
            elif sample.hdri.endswith(".exr"):
                assert sample.hdri not in scenes.HELD_OUT_HDRIS
    anim = data.load_split(root, "anim")
    assert [s.frame for s in anim] == [0, 1]
    assert np.array_equal(anim[0].job.camera.world_to_camera, anim[1].job.camera.world_to_camera)
    assert anim[1].rotation_z - anim[0].rotation_z == pytest.approx(np.radians(datagen.ANIM_STEP_DEGREES))
    test_scene = json.loads((root / table["test"][0] / "scene.json").read_text())
    assert test_scene["objects"] == scenes.describe(test_scene["seed"], HDRIS, 1)["objects"]

    # Resumable: a second run renders nothing and touches no sample file.
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*.exr")}
    again = datagen.generate(args)
    assert again["rendered_samples"] == 0 and again["skipped"] == again["scenes"] == 4
    assert stamps == {p: p.stat().st_mtime_ns for p in root.rglob("*.exr")}


def _blend_files(folder):
    """good.blend (Diffuse/Glossy materials, a bare mesh, a light, 10 units wide), bad.blend (a missing
    texture) and junk.blend (not a .blend at all)."""
    import bmesh
    import bpy

    def mesh_object(name, make, location):
        mesh = bpy.data.meshes.new(name)
        bm = bmesh.new()
        make(bm)
        bm.to_mesh(mesh)
        bm.free()
        ob = bpy.data.objects.new(name, mesh)
        ob.location = location
        bpy.context.scene.collection.objects.link(ob)
        return ob

    def material(name, shader):
        mat = bpy.data.materials.new(name)
        tree = mat.node_tree
        tree.nodes.remove(tree.nodes["Principled BSDF"])
        node = tree.nodes.new(shader)
        tree.links.new(node.outputs[0], tree.nodes["Material Output"].inputs["Surface"])
        return mat, node

    folder.mkdir()
    bpy.ops.wm.read_factory_settings(use_empty=True)
    cube = mesh_object("Cube", lambda bm: bmesh.ops.create_cube(bm, size=4.0), (-3.0, 0.0, 2.0))
    cube.data.materials.append(material("Matte", "ShaderNodeBsdfDiffuse")[0])
    ball = mesh_object("Ball", lambda bm: bmesh.ops.create_uvsphere(bm, u_segments=16, v_segments=8, radius=2.0),
                       (3.0, 0.0, 2.0))
    ball.data.materials.append(material("Shiny", "ShaderNodeBsdfGlossy")[0])
    mesh_object("Bare", lambda bm: bmesh.ops.create_cube(bm, size=1.0), (0.0, 3.0, 0.5))
    bpy.context.scene.collection.objects.link(bpy.data.objects.new("Lamp", bpy.data.lights.new("Lamp", "POINT")))
    bpy.ops.wm.save_as_mainfile(filepath=str(folder / "good.blend"))

    bpy.ops.wm.read_factory_settings(use_empty=True)
    plane = mesh_object("Plane", lambda bm: bmesh.ops.create_grid(bm, x_segments=1, y_segments=1, size=1.0),
                        (0, 0, 0))
    mat, bsdf = material("Textured", "ShaderNodeBsdfPrincipled")
    image = mat.node_tree.nodes.new("ShaderNodeTexImage")
    image.image = bpy.data.images.new("wood", 4, 4)
    image.image.source = "FILE"
    image.image.filepath = str(folder / "textures" / "wood.png")
    mat.node_tree.links.new(image.outputs["Color"], bsdf.inputs["Base Color"])
    plane.data.materials.append(mat)
    (folder / "sub").mkdir()
    bpy.ops.wm.save_as_mainfile(filepath=str(folder / "sub" / "bad.blend"))
    (folder / "junk.blend").write_bytes(b"BLENDER-v500 but nothing else" * 10)
    bpy.ops.wm.read_factory_settings(use_empty=True)


@pytest.mark.blender
def test_blendervault_export(tmp_path):
    pytest.importorskip("bpy")
    _blend_files(tmp_path / "vault")
    parser = argparse.ArgumentParser()
    datagen.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", str(tmp_path / "vault"), str(tmp_path / "out"), "--views", "1", "--hdris",
                              "1", "--size", "32", "--gt-samples", "8", "--gbuffer-samples", "2", "--hdri-width",
                              "64", "--low-samples", "", "--test-fraction", "0", "--val-fraction", "0"])
    from training import blendervault

    summary = blendervault.export_folder(args)
    assert summary["exported"] == ["good.blend"] and summary["failed"] == []
    reasons = {s["file"]: s["reason"] for s in summary["skipped"]}
    assert reasons.keys() == {"sub/bad.blend", "junk.blend"}
    assert reasons["sub/bad.blend"].startswith("missing textures: wood")
    assert "cannot open" in reasons["junk.blend"]
    out = tmp_path / "out"
    assert json.loads((out / "export_report.json").read_text())["skipped"] == summary["skipped"]
    assert data.splits(out)["train"] == ["train/good"]
    report = json.loads((out / "train/good/export.json").read_text())
    assert report["scale"] == pytest.approx(1 / 10, rel=1e-3)  # -5 .. 5 along x
    glossy = {"ShaderNodeBsdfGlossy", "ShaderNodeBsdfAnisotropic"}  # Blender 4+ makes the latter for both
    assert report["replaced_nodes"].pop("ShaderNodeBsdfDiffuse") == 1
    assert report["replaced_nodes"].keys() <= glossy and sum(report["replaced_nodes"].values()) == 1
    assert report["hidden_lights"] == 1 and report["grey_material_objects"] == 1
    (sample,) = data.load_split(out, "train")
    g = sample.job.gbuffer
    fg = g.mask > 0
    assert fg.mean() > 0.05 and np.isfinite(sample.gt_full).all()
    assert sample.hdri not in scenes.HELD_OUT_HDRIS
    # The Glossy ball became a metal (roughness 0.5 -> metallic 0.5): some pixels carry metallic > 0.
    assert g.metallic[fg].max() == pytest.approx(0.5, abs=0.01)
