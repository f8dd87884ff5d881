"""Scene families in `pbnds eval`: Sample.family from scene.json, the per-family table against GGX and the
do-no-harm gate (--gate MODEL exits 1 when MODEL is worse than GGX on a family)."""

import argparse
import csv
import json

import numpy as np
import pytest

from backend import cli
from backend.exrio import write_exr
from backend.jobformat import Options, write_job
from backend.renderer import Renderer
from backend.synthetic import Material, load_bundled_hdri, sphere_job
from training import data, evaluate, materialfusion, report

GOLD = Material((1.0, 0.78, 0.34), metallic=1.0, roughness=0.3)


def _rgb(path, image):
    write_exr(path, {c: image[..., i] for i, c in enumerate("RGB")})


def _write_scene(root, scene, job, truth=None, family=None, describe=True):
    """One scene folder with one sample; ``truth`` (default: a constant grey) is its gt_full; scene.json
    holds ``family`` when given (a scene.json without the key when None, none at all without ``describe``)."""
    folder = root / scene
    write_job(job, folder / "v000_h00")
    if truth is None:
        truth = np.full((job.height, job.width, 3), 0.5, np.float32)
    _rgb(folder / "v000_h00" / "gt_full.exr", truth.astype(np.float32))
    entry = {"name": "v000_h00", "job": "v000_h00/job.json", "gt_full": "v000_h00/gt_full.exr", "rotation_z": 0.0,
             "world": {"type": "hdri", "hdri": "courtyard.exr"}}
    (folder / "dataset.json").write_text(json.dumps({"format": "pbnds-dataset", "version": 1, "samples": [entry]}))
    if describe:
        (folder / "scene.json").write_text(json.dumps({"seed": 1, **({"family": family} if family else {})}))


def _splits(root, families=None, **table):
    table = {split: table.get(split, []) for split in ("train", "val", "test", "relight", "anim")}
    (root / "splits.json").write_text(json.dumps({"format": "pbnds-splits", "version": 1, **table,
                                                  **({"families": families} if families else {})}))


def test_family_from_scene_json(tmp_path):
    job = sphere_job(8, 8)
    _write_scene(tmp_path, "test/room", job, family="room")
    _write_scene(tmp_path, "test/old", job)  # scene.json from before families: "ground"
    _write_scene(tmp_path, "test/bare", job, describe=False)  # no scene.json: "ground"
    _write_scene(tmp_path, "test/vault", job, describe=False)
    (tmp_path / "test/vault/export.json").write_text("{}")  # pbnds export: "blendervault"
    _splits(tmp_path, test=["test/room", "test/old", "test/bare", "test/vault"])
    samples = data.load_split(tmp_path, "test")
    assert [s.family for s in samples] == ["room", "ground", "ground", "blendervault"]
    assert evaluate.dataset_families(tmp_path) == ([], [])  # no "families" key: tolerated
    _splits(tmp_path, {"all": ["ground", "room"], "held_out": ["room"]}, test=["test/room"])
    assert evaluate.dataset_families(tmp_path) == (["ground", "room"], ["room"])
    (tmp_path / "test/room/scene.json").write_text(json.dumps({"family": 3}))
    with pytest.raises(data.DatasetError, match="test/room/scene.json: 'family' must be a non-empty string"):
        data.load_split(tmp_path, "test")


def test_materialfusion_family(tmp_path):
    root = materialfusion.write_fixture(tmp_path, size=8, views=1)
    assert [s.family for s in data.load_split(root, "test")] == ["blendervault"]


def _row(method, family, psnr, kind="model"):
    return {"split": "test", "method": method, "kind": kind, "sample": f"{family}/{psnr}", "family": family,
            "psnr_fg": psnr, "ssim_fg": 0.9, "flip_fg": 0.1, "device": "cpu"}


def test_family_table_and_gate_on_a_synthetic_score_table():
    rows = [_row("ggx", "ground", 30.0), _row("ggx", "ground", 32.0), _row("default", "ground", 33.0),
            _row("default", "ground", 34.0), _row("ggx", "room", 25.0), _row("default", "room", 24.0),
            _row("lambert", "ground", 20.0), _row("lambert", "ground", 20.0), _row("lambert", "room", 26.0),
            _row("cycles-1spp+denoise", "room", 10.0, kind="cycles"), _row("ggx", "studio", float("nan")),
            _row("default", "studio", 40.0)]
    result = evaluate.SplitResult("test", rows)
    table = report.family_summaries(result, held_out=["room"], order=["studio", "room", "ground"])
    assert [r["family"] for r in table if r["method"] == "ggx"] == ["studio", "room", "ground"]
    by = {(r["family"], r["method"]): r for r in table}
    assert by["ground", "ggx"]["n"] == 2 and by["ground", "ggx"]["psnr_fg"] == 31.0
    assert by["ground", "ggx"]["margin_vs_ggx_db"] is None and not by["ground", "ggx"]["worse_than_ggx"]
    assert by["ground", "default"]["margin_vs_ggx_db"] == pytest.approx(2.5)
    assert not by["ground", "default"]["worse_than_ggx"]
    assert by["room", "default"]["margin_vs_ggx_db"] == pytest.approx(-1.0) and by["room", "default"]["worse_than_ggx"]
    assert by["room", "default"]["held_out"] and not by["ground", "default"]["held_out"]
    assert by["ground", "lambert"]["worse_than_ggx"] and not by["room", "lambert"]["worse_than_ggx"]
    assert not by["room", "cycles-1spp+denoise"]["worse_than_ggx"]  # margins for Cycles, flags for models only
    assert not by["studio", "default"]["worse_than_ggx"]  # no GGX score on the family: nothing to compare
    assert [(r["family"], r["method"]) for r in report.gate_failures(table, "default")] == [("room", "default")]
    assert [r["family"] for r in report.gate_failures(table, "lambert")] == ["ground"]
    assert report.gate_failures(table, "ggx") == []
    summary = "\n".join(report.ggx_summary(table, ["room"], gate="default"))
    assert "`default`: WORSE THAN GGX on room (held out) in split test (-1.00 dB)" in summary
    assert "**FAILED**" in summary
    markdown = "\n".join(report._family_section(table, ["room"]))
    assert "| room (held out) | default | model | 1 | 24.00 | 0.9000 | 0.1000 | -1.00 | **WORSE THAN GGX** |" \
        in markdown
    assert "| ground | default | model | 2 | 33.50 | 0.9000 | 0.1000 | +2.50 |  |" in markdown
    no_ggx = report.family_summaries(evaluate.SplitResult("test", [_row("default", "ground", 30.0)]))
    assert no_ggx[0]["margin_vs_ggx_db"] is None and "GGX was not evaluated" in report.ggx_summary(no_ggx)[0]


def test_gate_needs_the_model_and_ggx_among_the_evaluated(tmp_path, capsys):
    assert evaluate.gate_model("default", ["default", "ggx"]) == "default"
    assert evaluate.gate_model("runs/a/model.safetensors", ["runs/a/model.safetensors", "ggx"]) == "a/model"
    with pytest.raises(ValueError, match="add ggx to --models"):
        evaluate.gate_model("default", ["default", "lambert"])
    with pytest.raises(ValueError, match="--gate lambert: not among the evaluated models"):
        evaluate.gate_model("lambert", ["default", "ggx"])
    with pytest.raises(ValueError, match="GGX is the baseline"):
        evaluate.gate_model("ggx", ["default", "ggx"])
    # through the command line: exit status 2, message on stderr, before any dataset is read
    assert cli.main(["eval", str(tmp_path / "missing"), "--models", "lambert", "--gate", "lambert",
                     "--out", str(tmp_path / "r")]) == 2
    assert "add ggx to --models" in capsys.readouterr().err


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Split test: a "ground" scene whose truth is Lambert (a gold metal sphere: Lambert sees no albedo, so
    black) and a held-out "glossy-ground" scene whose truth is GGX; split val: only the "ground" scene.
    Lambert must win on "ground" and lose on "glossy-ground"."""
    root = tmp_path_factory.mktemp("families")
    renderer = Renderer("cpu")
    hdri = load_bundled_hdri()
    for scene, family, truth_model in (("test/ground_0", None, "lambert"), ("val/ground_1", None, "lambert"),
                                       ("test/glossy_0", "glossy-ground", "ggx")):
        job = sphere_job(16, 16, GOLD, hdri)
        job.options = Options(model=truth_model, rays=512, seed=7)
        _write_scene(root, scene, job, renderer.render(job).shaded, family)
    _splits(root, {"all": ["ground", "glossy-ground"], "held_out": ["glossy-ground"]},
            test=["test/ground_0", "test/glossy_0"], val=["val/ground_1"])
    return root


def _read(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_gate_fails_where_the_model_is_worse(dataset, tmp_path, capsys):
    out = tmp_path / "report"
    status = cli.main(["eval", str(dataset), "--models", "lambert,ggx", "--out", str(out), "--rays", "32",
                       "--device", "cpu", "--gate", "lambert"])
    captured = capsys.readouterr()
    assert status == 1
    assert ("gate failed: lambert is worse than GGX (mean PSNR fg) on scene families: glossy-ground (held out) "
            "(split test -") in captured.err
    assert " ground" not in captured.err.replace("glossy-ground", "")
    assert "test / glossy-ground (held out) (n=1): lambert" in captured.out and "WORSE THAN GGX" in captured.out
    assert json.loads(captured.out.strip().splitlines()[-1])["families"] == str(out / "metrics_families.csv")
    rows = {(r["family"], r["method"]): r for r in _read(out / "metrics_families.csv")}
    assert set(rows) == {(f, m) for f in ("ground", "glossy-ground") for m in ("lambert", "ggx")}
    assert rows["glossy-ground", "lambert"]["worse_than_ggx"] == "True"
    assert rows["glossy-ground", "lambert"]["held_out"] == "True" and rows["ground", "lambert"]["held_out"] == "False"
    assert float(rows["glossy-ground", "lambert"]["margin_vs_ggx_db"]) < -3
    assert rows["ground", "lambert"]["worse_than_ggx"] == "False"
    assert float(rows["ground", "lambert"]["margin_vs_ggx_db"]) > 3
    assert rows["ground", "ggx"]["margin_vs_ggx_db"] == "" and rows["ground", "lambert"]["n"] == "1"
    assert {r["family"] for r in _read(out / "metrics_samples.csv")} == {"ground", "glossy-ground"}
    text = (out / "report.md").read_text()
    assert "## Against GGX, per scene family" in text and "gate `--gate lambert`: **FAILED**" in text
    assert "| glossy-ground (held out) | lambert | model | 1 |" in text and "**WORSE THAN GGX** |" in text
    assert "| ground | lambert | model | 1 |" in text and "--gate lambert" in text


def test_gate_passes_where_the_model_is_not_worse(dataset, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    evaluate.add_parser(parser.add_subparsers())
    args = parser.parse_args(["eval", str(dataset), "--models", "lambert,ggx", "--split", "val", "--out",
                              str(tmp_path / "r"), "--rays", "32", "--device", "cpu", "--gate", "lambert"])
    assert args.handler(args) == 0
    captured = capsys.readouterr()
    assert "gate --gate lambert: passed" in captured.out and "gate failed" not in captured.err
    assert "val / ground (n=1): lambert" in captured.out and "WORSE THAN GGX" not in captured.out
