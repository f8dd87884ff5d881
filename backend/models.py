"""Shading models (a shader plus an optional shadow estimator), their registry and checkpoints.

A checkpoint is `<name>.safetensors` (tensors `shader.*` and `shadow.*`, the config as JSON in the
metadata) with the same config beside it as `<name>.json` for people and tools to read. Never pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import __version__
from .shaders import CLASSICAL, LinearNeuralShader, PaperShader, Shader
from .shadow import ShadowNet

CHECKPOINT_FORMAT = "pbnds-checkpoint"
CHECKPOINT_VERSION = 1
DEFAULT_CHECKPOINT = Path(__file__).parent / "data" / "default.safetensors"
NEURAL = ("default", "pbnds-paper")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not match its architecture."""


@dataclass
class ShadingModel:
    name: str
    shader: Shader
    shadow: ShadowNet | None = None
    info: dict = field(default_factory=dict)  # config and training summary, reported with results

    def to(self, device) -> ShadingModel:
        self.shader.to(device).eval()
        if self.shadow is not None:
            self.shadow.to(device).eval()
        return self


def build_shader(config: dict) -> Shader:
    arch = config.get("arch")
    if arch == "linear-gain":
        return LinearNeuralShader(hidden=config["hidden"], layers=config["layers"])
    if arch == "pbnds-paper":
        return PaperShader()
    if arch in CLASSICAL:
        return CLASSICAL[arch]()
    raise CheckpointError(f"unknown shader architecture {arch!r}")


def build_shadow(config: dict | None) -> ShadowNet | None:
    if config is None:
        return None
    if config.get("arch") != "unet":
        raise CheckpointError(f"unknown shadow architecture {config.get('arch')!r}")
    if config.get("visibility"):
        raise CheckpointError("this checkpoint's shadow net takes the older visibility-only input; "
                              "retrain it (pbnds train) for the screen-space transport inputs")
    return ShadowNet(base=config["base"], depth=config["depth"], indirect=config["indirect"],
                     transport=config.get("transport", False))


def new_model(name: str) -> ShadingModel:
    """An untrained model by name: default, pbnds-paper, or a classical shader (no shadow net)."""
    if name == "default":
        return ShadingModel(name, LinearNeuralShader(), ShadowNet(transport=True), {"trained": False})
    if name == "pbnds-paper":
        return ShadingModel(name, PaperShader(), ShadowNet(base=64, depth=4, indirect=False), {"trained": False})
    if name in CLASSICAL:
        return ShadingModel(name, CLASSICAL[name](), None, {"trained": False})
    raise CheckpointError(f"unknown model {name!r}; use one of {list(NEURAL) + list(CLASSICAL)} "
                          "or a .safetensors checkpoint path")


def model_config(model: ShadingModel) -> dict:
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "backend_version": __version__,
            "name": model.name, "shader": model.shader.config(),
            "shadow": model.shadow.config() if model.shadow is not None else None}


def save_checkpoint(model: ShadingModel, path: str | Path, training: dict | None = None) -> Path:
    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {**model_config(model), "training": training or {}}
    tensors = {f"shader.{k}": v.detach().cpu().contiguous() for k, v in model.shader.state_dict().items()}
    if model.shadow is not None:
        tensors.update({f"shadow.{k}": v.detach().cpu().contiguous() for k, v in model.shadow.state_dict().items()})
    save_file(tensors, str(path), metadata={"pbnds_config": json.dumps(config)})
    path.with_suffix(".json").write_text(json.dumps(config, indent=1))
    return path


def load_checkpoint(path: str | Path) -> ShadingModel:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"checkpoint {path.name} is not a readable safetensors file: {error}") from None
    try:
        config = json.loads(metadata["pbnds_config"])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"checkpoint {path.name} has no PBNDS config in its metadata") from None
    if config.get("format") != CHECKPOINT_FORMAT or config.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path.name}: format {config.get('format')!r} version "
                              f"{config.get('version')!r} is not {CHECKPOINT_FORMAT!r} {CHECKPOINT_VERSION}")
    model = ShadingModel(config.get("name", path.stem), build_shader(config["shader"]), build_shadow(config["shadow"]),
                         {"trained": True, "checkpoint": path.name, "training": config.get("training", {})})
    for prefix, module in (("shader.", model.shader), ("shadow.", model.shadow)):
        if module is None:
            continue
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise CheckpointError(f"checkpoint {path.name} does not match its {prefix[:-1]} architecture: "
                                  f"{str(error).splitlines()[0]}") from None
    return model


def load_model(spec: str) -> ShadingModel:
    """A model by name or checkpoint path; 'default' is the shipped checkpoint when it exists."""
    if spec.endswith(".safetensors") or "/" in spec:
        return load_checkpoint(spec)
    if spec == "default" and DEFAULT_CHECKPOINT.is_file():
        model = load_checkpoint(DEFAULT_CHECKPOINT)
        model.name = "default"
        return model
    return new_model(spec)


def available_models() -> list[dict]:
    trained = DEFAULT_CHECKPOINT.is_file()
    return [{"name": "default", "kind": "neural", "description": "linear-in-Li neural shader + a net refining the "
             "screen-space shadows, bounce light and reflections"
             + ("" if trained else " (no checkpoint: equals GGX without shadows)")},
            {"name": "pbnds-paper", "kind": "neural", "description": "paper-faithful architecture (untrained)"},
            *({"name": name, "kind": "classical", "description": f"{name} by Monte Carlo over the HDRI"}
              for name in CLASSICAL)]
