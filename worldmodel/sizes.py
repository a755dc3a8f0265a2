"""Named backbone sizes (one registry, as DiT's ``DiT_models``) and the builders that read them.

The registry keys are the allowed ``model.size`` config values. ``build_model(size, **overrides)``
changes single fields; ``build_model(**model.config)`` rebuilds a saved architecture exactly.
"""

from __future__ import annotations

import json

from worldmodel.model import ModelConfig, WorldModel

MODEL_SIZES: dict[str, dict] = {
    # CPU tests and demos: seconds per step.
    "tiny": {"hidden": 96, "heads": 4, "depth_double": 2, "depth_single": 2, "mlp_ratio": 4.0, "rope_axes": (8, 8, 8)},
    # One GPU, about 112M parameters.
    "small": {
        "hidden": 640, "heads": 10, "depth_double": 4, "depth_single": 8, "mlp_ratio": 4.0, "rope_axes": (16, 24, 24),
    },
    # The paper's FLUX.2-style backbone: head dim 72 = 3 x 24, about 626M parameters without the projector.
    "base": {
        "hidden": 1152, "heads": 16, "depth_double": 7, "depth_single": 14, "mlp_ratio": 4.0,
        "rope_axes": (24, 24, 24),
    },
}


def model_config(size: str, **overrides) -> ModelConfig:
    """The ModelConfig of registry entry ``size`` with single fields overridden."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; valid sizes: {', '.join(MODEL_SIZES)}")
    allowed = ModelConfig.field_names() - {"size"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"unknown model config field(s) {unknown}; valid fields: {', '.join(sorted(allowed))}")
    return ModelConfig(size=size, **{**MODEL_SIZES[size], **overrides})


def build_model(size: str, **overrides) -> WorldModel:
    """A freshly initialised WorldModel of registry size ``size`` (tiny, small, base) with field overrides.

    Build on the meta device (``with torch.device("meta"): build_model("base")``) to count parameters
    or to load weights with ``load_state_dict(..., assign=True)`` without allocating twice.
    """
    return WorldModel(model_config(size, **overrides))


def model_config_from_json(config: dict | str) -> ModelConfig:
    """A validated ModelConfig from ``WorldModel.config`` (a dict, or its JSON text)."""
    if isinstance(config, str):
        config = json.loads(config)
    if not isinstance(config, dict) or "size" not in config:
        raise ValueError("a saved model config must be a dict with a 'size' key, as written from WorldModel.config")
    rest = dict(config)
    size = rest.pop("size")
    if size == "custom":
        unknown = sorted(set(rest) - ModelConfig.field_names())
        if unknown:
            raise ValueError(f"unknown model config field(s) {unknown}; valid: {sorted(ModelConfig.field_names())}")
        return ModelConfig(size=size, **rest)
    return model_config(size, **rest)


def build_model_from_config(config: dict | str) -> WorldModel:
    """Rebuild the architecture saved as ``WorldModel.config`` (dict or JSON text); weights are fresh."""
    return WorldModel(model_config_from_json(config))
