"""Build the shipped default checkpoint, backend/data/default.safetensors + default.json, bit for bit.

    python -m training.default_checkpoint                    # rewrites backend/data/default.*
    python -m training.default_checkpoint --out DIR/NAME     # writes DIR/NAME.safetensors + DIR/NAME.json

The shipped default is not trained (docs/model-card.md): `new_model("default")` under `torch.manual_seed(0)`.
Its shader's output layer starts at zero (every learned gain is exp(0) = 1: exactly the multiple-scattering
GGX model) and its transport shadow net's head starts at zero (the shadow and indirect light are exactly the
physical screen-space terms), so the seeded hidden layers do not change a single output value; the seed is
there so that the file's bytes are reproducible. Nothing is drawn from data, and no thread count, device or
machine enters: torch's CPU generator gives the same weights everywhere (checked with torch 2.13 on CPU).
tests/backend/test_default_checkpoint.py rebuilds it and compares it with the shipped file byte for byte.
"""

from __future__ import annotations

import argparse
from pathlib import Path

SEED = 0
NOTE = ("not trained: the shader's gains are 1 (exactly multiple-scattering GGX) and the shadow net's head is zero "
        "(exactly the physical screen-space terms). Trained variants (docs/model-card.md) did worse on held-out "
        "scene families and were not shipped.")


def build():
    """The default model as shipped: seeded fresh weights, zero output layer and zero shadow head."""
    import torch

    from backend.models import new_model

    torch.manual_seed(SEED)
    model = new_model("default")
    shader_out, head = model.shader.out, model.shadow.head
    if shader_out.weight.any() or shader_out.bias.any() or head.weight.any() or head.bias.any():
        raise RuntimeError("new_model('default') no longer starts at GGX + the physical terms (zero output layer "
                           "and zero shadow head); the shipped checkpoint's definition must be revisited")
    return model


def write(path: str | Path) -> Path:
    """Write the checkpoint (and its .json) to `path`; returns the .safetensors path."""
    from backend.models import save_checkpoint

    return save_checkpoint(build(), path, training={"note": NOTE})


def main(argv: list[str] | None = None) -> int:
    from backend.models import DEFAULT_CHECKPOINT

    parser = argparse.ArgumentParser(prog="python -m training.default_checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT,
                        help=f"checkpoint path (default: the shipped one, {DEFAULT_CHECKPOINT.name} in backend/data)")
    path = write(parser.parse_args(argv).out)
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
