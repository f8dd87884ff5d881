"""The shipped default checkpoint is what `python -m training.default_checkpoint` builds, byte for byte, and it is
the untrained physics model: GGX gains of exactly 1 and a zero transport head."""

import json

import torch
from safetensors.torch import load_file

from backend.models import DEFAULT_CHECKPOINT, load_model
from training import default_checkpoint


def test_rebuilding_the_shipped_checkpoint_is_bit_identical(tmp_path):
    rebuilt = default_checkpoint.write(tmp_path / "default")
    shipped, fresh = load_file(str(DEFAULT_CHECKPOINT)), load_file(str(rebuilt))
    assert sorted(shipped) == sorted(fresh)
    different = [name for name in shipped if not torch.equal(shipped[name], fresh[name])]
    assert not different, f"rebuild the shipped checkpoint: python -m training.default_checkpoint ({different})"
    assert rebuilt.read_bytes() == DEFAULT_CHECKPOINT.read_bytes()
    assert json.loads(rebuilt.with_suffix(".json").read_text()) == \
        json.loads(DEFAULT_CHECKPOINT.with_suffix(".json").read_text())


def test_the_shipped_default_is_ggx_plus_the_physical_terms():
    model = load_model("default")
    assert model.info["checkpoint"] == DEFAULT_CHECKPOINT.name
    assert not (model.shader.out.weight.any() or model.shader.out.bias.any())  # every gain exp(0) = 1
    assert model.shadow.transport and not (model.shadow.head.weight.any() or model.shadow.head.bias.any())


def test_the_command_writes_where_it_is_told(tmp_path, capsys):
    assert default_checkpoint.main(["--out", str(tmp_path / "x")]) == 0
    assert (tmp_path / "x.safetensors").is_file() and (tmp_path / "x.json").is_file()
    assert "x.safetensors" in capsys.readouterr().out
