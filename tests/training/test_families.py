"""Scene families of `pbnds generate`: each family's characteristic geometry, determinism, held-out families
in the test split only, --families, and one tiny real render of a "single" and a "room" scene."""

import json
import math

import numpy as np
import pytest
from test_datagen import HDRIS, _generate_args

from training import data, datagen, scenes

SEEDS = range(40)


def _described(family):
    return [scenes.describe(seed, HDRIS, 2, family) for seed in SEEDS]


def _normal(wall):
    u, v = np.array(wall["u"]), np.array(wall["v"])
    return np.cross(u, v) / np.linalg.norm(np.cross(u, v))


def test_descriptions_are_deterministic_and_json():
    for family in scenes.FAMILIES:
        a = scenes.describe(5, HDRIS, 2, family)
        assert a["family"] == family and a["seed"] == 5
        assert a == scenes.describe(5, HDRIS, 2, family) == json.loads(json.dumps(a))
        assert a != scenes.describe(6, HDRIS, 2, family)
    assert scenes.describe(5, HDRIS, 2) == scenes.describe(5, HDRIS, 2, "ground")  # the default family
    with pytest.raises(ValueError, match="unknown scene family 'cave'"):
        scenes.describe(5, HDRIS, 2, "cave")


def test_ground_family_is_the_scene_of_before_families():
    """Same seed, same scene as the generator before families (gen-v1 reproduces with --families ground)."""
    for seed, objects, roughness in ((3, [("bevel_box", 0.388368), ("cube", 0.746298), ("blob", 0.789418),
                                          ("sphere", 0.673278)], 0.789784),
                                     (11, [("bevel_box", 0.354379)], 0.938835)):
        d = scenes.describe(seed, HDRIS, 2, "ground")
        assert [(o["kind"], round(o["size"], 6)) for o in d["objects"]] == objects
        assert round(d["ground"]["roughness"], 6) == roughness and "walls" not in d and "camera" not in d


def test_each_family_has_its_geometry():
    for d in _described("ground") + _described("glossy-ground"):
        assert d["ground"] is not None and {o["kind"] for o in d["objects"]} <= set(scenes.KINDS)
    glossy = [d["ground"] for d in _described("glossy-ground")]
    assert all(g["roughness"] <= 0.3 for g in glossy) and {g["metallic"] for g in glossy} == {0.0, 1.0}
    assert all(d["ground"]["roughness"] >= 0.3 for d in _described("ground"))

    for d in _described("single"):  # one object, nothing under it, HDRI light
        assert d["ground"] is None and len(d["objects"]) == 1 and "walls" not in d and "backdrop" not in d
        assert {w["type"] for w in d["lightings"]} == {"hdri"}

    shapes = set()
    for d in _described("room"):
        walls = d["walls"]
        assert d["ground"] is not None and len(walls) == {"corner": 2, "alcove": 3}[d["room"]["shape"]]
        shapes.add(d["room"]["shape"])
        for wall in walls:  # upright, facing the objects, reaching under the floor
            assert wall["v"][2] > 1.0 and wall["origin"][2] < 0 and abs(_normal(wall)[2]) < 1e-9
            for o in d["objects"]:
                assert np.dot(_normal(wall), np.array([*o["location"], 0.0]) - wall["origin"]) > 0.5
    assert shapes == {"corner", "alcove"}

    thin = _described("thin-concave")
    assert all(d["ground"] is not None for d in thin)
    assert {o["kind"] for d in thin for o in d["objects"]} == set(scenes.THIN_KINDS)
    training = [d for f in scenes.TRAINING_FAMILIES for d in _described(f)]
    assert not {o["kind"] for d in training for o in d["objects"]} & set(scenes.THIN_KINDS)  # held-out shapes

    for d in _described("studio"):
        assert d["ground"] is None and d["backdrop"]["height"] > 2
        turn = d["backdrop"]["rotation_z"]
        front = np.array([math.cos(turn + math.pi / 2), math.sin(turn + math.pi / 2), 0.0])  # the open side
        for w in d["lightings"]:
            assert w["type"] in ("studio", "hdri")
            if w["type"] == "studio":  # the key light shines from the open side, not through the backdrop
                assert 1 <= len(w["boxes"]) <= 4 and np.dot(w["boxes"][0]["direction"], front) > 0
                assert all(b["strength"] > 0 and 40 <= b["power"] <= 400 for b in w["boxes"])

    everything = [o["material"] for f in scenes.FAMILIES for d in _described(f) for o in d["objects"]]
    assert any(m["metallic"] == 1.0 for m in everything) and any("texture" in m for m in everything)


def test_room_and_studio_views_are_on_the_open_side():
    half_fov = math.radians(19.8)
    for family in ("room", "studio"):
        for d in _described(family):
            lo, hi = d["camera"]["azimuth"]
            centre = [*np.mean([o["location"] for o in d["objects"]], axis=0), 0.3]
            for view in range(4):
                location = scenes.view_location(d, view, d["seed"], centre, 0.8, half_fov)
                assert not any(scenes.wall_blocks(w, location, centre) for w in d.get("walls", []))
                azimuth = math.atan2(location[1] - centre[1], location[0] - centre[0])
                assert (azimuth - lo) % (2 * math.pi) <= (hi - lo) + 1e-9 and location[2] > centre[2]
    wall = {"origin": [-1.0, -1.0, 0.0], "u": [0.0, 2.0, 0.0], "v": [0.0, 0.0, 2.0]}  # x = -1, facing +x
    assert scenes.wall_blocks(wall, [-2.0, 0.0, 1.0], [0.0, 0.0, 0.5])  # behind it
    assert scenes.wall_blocks(wall, [-0.95, 0.0, 1.0], [0.0, 0.0, 0.5])  # just in front: within the margin
    assert not scenes.wall_blocks(wall, [2.0, 0.0, 1.0], [0.0, 0.0, 0.5])
    assert not scenes.wall_blocks(wall, [-2.0, 3.0, 1.0], [0.0, 2.5, 0.5])  # beside it


def test_plan_holds_held_out_families_in_test_only(tmp_path):
    assert scenes.HELD_OUT_FAMILIES == ("room", "thin-concave")
    tasks = datagen.plan(_generate_args(tmp_path, scenes=9, val=5, test=8, lamps=4))
    by_split = {}
    for task in tasks:
        by_split.setdefault(task["split"], []).append(task["family"])
    assert by_split["test"] == [scenes.FAMILIES[i % 6] for i in range(8)]  # round-robin over every family
    for split in ("train", "val", "lamps"):
        assert by_split[split] == [scenes.TRAINING_FAMILIES[i % 4] for i in range(len(by_split[split]))]
        assert not set(by_split[split]) & set(scenes.HELD_OUT_FAMILIES)
    test_family = {t["scene_seed"]: t["family"] for t in tasks if t["split"] == "test"}
    assert all(t["family"] == test_family[t["scene_seed"]] for t in tasks if t["split"] in ("relight", "anim"))
    assert datagen.families_entry(list(scenes.FAMILIES)) == {"all": list(scenes.FAMILIES),
                                                             "held_out": ["room", "thin-concave"]}

    tasks = datagen.plan(_generate_args(tmp_path, scenes=3, test=4, families="room,ground"))
    assert [t["family"] for t in tasks if t["split"] == "test"] == ["ground", "room", "ground", "room"]
    assert {t["family"] for t in tasks if t["split"] == "train"} == {"ground"}
    tasks = datagen.plan(_generate_args(tmp_path, scenes=0, test=2, families="thin-concave"))
    assert {t["family"] for t in tasks} == {"thin-concave"} and not [t for t in tasks if t["split"] == "train"]
    with pytest.raises(ValueError, match="every family is held out"):
        datagen.plan(_generate_args(tmp_path, families="room"))
    with pytest.raises(ValueError, match="unknown cave"):
        datagen.plan(_generate_args(tmp_path, families="ground,cave"))
    assert datagen.selected_families("all") == list(scenes.FAMILIES)
    assert datagen.selected_families(" studio, single") == ["single", "studio"]


def test_lamps_stay_on_the_open_side(tmp_path):
    task = next(t for t in datagen.plan(_generate_args(tmp_path, lamps=1)) if t["split"] == "lamps")
    description = scenes.describe(2, HDRIS, 1, "studio")
    lo, hi = description["light_azimuth"]
    lightings, _ = datagen.lightings_for({**task, "lightings": 30}, description)
    lamps = [lamp for w in lightings for lamp in w["lamps"]]
    assert {lamp["type"] for lamp in lamps} == {"SUN", "AREA", "SPOT", "POINT"}
    for lamp in lamps:  # where the light comes from: opposite to where it points
        azimuth = math.atan2(-lamp["direction"][1], -lamp["direction"][0])
        assert (azimuth - lo) % (2 * math.pi) <= (hi - lo) + 1e-9


def test_resume_keeps_families(tmp_path):
    folder = tmp_path / "test/scene_00000"
    folder.mkdir(parents=True)
    assert datagen.scene_family(folder) is None
    (folder / "scene.json").write_text(json.dumps({"seed": 0}))  # made before families: "ground"
    assert datagen.scene_family(folder) == "ground"
    (folder / "scene.json").write_text(json.dumps({"seed": 0, "family": "room"}))
    assert not datagen.scene_complete(folder, 0, [], "ground")
    (tmp_path / "generate.json").write_text(json.dumps({"scenes": 40}))  # a dataset made before families
    with pytest.raises(ValueError, match="generated with --families ground"):
        datagen.generate(_generate_args(tmp_path))


@pytest.mark.blender
def test_single_and_room_render(tmp_path):
    """Two test scenes (single, room) through `pbnds generate`: the scene.json family, splits.json's families,
    a single object against the HDRI (no ground) and room views from the open side."""
    pytest.importorskip("bpy")
    root = tmp_path / "gen"
    summary = datagen.generate(_generate_args(root, scenes=0, test=2, families="single,room", anim_frames=0,
                                              low_samples="", gt_samples=4))
    assert summary["failed"] == []
    splits = json.loads((root / "splits.json").read_text())
    assert splits["families"] == {"all": ["single", "room"], "held_out": ["room"]}
    assert splits["train"] == splits["val"] == [] and len(splits["test"]) == 2
    samples = {s.family: s for s in data.load_split(root, "test")}
    assert samples.keys() == {"single", "room"}
    for family, sample in samples.items():
        assert json.loads((root / sample.scene / "scene.json").read_text())["family"] == family
    single = samples["single"].job
    mask = single.gbuffer.mask
    assert 0.02 < mask.mean() < 0.6 and mask[0, 0] == mask[0, -1] == mask[-1, 0] == mask[-1, -1] == 0
    assert single.hdri.mean() > 0 and samples["single"].gt_full[mask > 0].mean() > 0.01
    room = samples["room"]
    assert room.job.gbuffer.mask.mean() > 0.6  # floor and walls fill most of the frame
    description = json.loads((root / room.scene / "scene.json").read_text())
    camera = np.linalg.inv(room.job.camera.world_to_camera)[:3, 3]
    centre = [*np.mean([o["location"] for o in description["objects"]], axis=0), 0.2]
    assert not any(scenes.wall_blocks(w, camera, centre) for w in description["walls"])
    assert [s.family for s in data.load_split(root, "relight")] == ["single"] * 2 + ["room"] * 2
