"""Load-time checks of a fine-tuning checkpoint: its config.json geometry against its weights, finite weights.

A checkpoint whose ``config.json`` was edited (or mixed with another run's weights) must fail when it is
loaded, naming the field, not at the first inference or, worse, by returning wrong actions. The backbone
places tokens with RoPE, so the weights do not record the horizon or the image size by themselves; what
they do fix is checked here: the token widths (action, frames through the codec), the text width, the
frame size the codec can tile, and positive integer geometry (horizon, context frames, stride, size).
"""

from __future__ import annotations

from pathlib import Path

import torch


def _positive_int(data: dict, key: str, path: Path, upper: int = 1 << 16) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise ValueError(f"{path / 'config.json'}: run.data.{key} must be an integer in [1, {upper}], got "
                         f"{value!r}; the file is corrupt or was edited by hand")
    return value


def check_geometry(path: Path, run: dict, model, codec, text_encoder) -> None:
    """Raise ValueError naming config.json's field when its geometry cannot be what the weights were trained on."""
    from worldmodel.action_modes import ACTION_TOKEN_DIM

    data = run.get("data") or {}
    height, width = _positive_int(data, "height", path), _positive_int(data, "width", path)
    for key in ("horizon", "context_frames", "frame_stride"):
        _positive_int(data, key, path, upper=4096)
    dims = model.config.get("token_dim") or {}
    if dims.get("action") != ACTION_TOKEN_DIM:
        raise ValueError(f"{path}: the weights' action tokens are {dims.get('action')} wide, a policy needs "
                         f"{ACTION_TOKEN_DIM} (7 RT-1 columns + terminate): not an action checkpoint")
    if dims.get("video") != codec.token_dim:
        raise ValueError(f"{path / 'config.json'}: run.codec makes {codec.token_dim}-wide frame tokens but the "
                         f"weights take {dims.get('video')}; the codec settings do not match the weights")
    text_dim = model.config.get("text_dim")
    if text_dim is not None and getattr(text_encoder, "feature_dim", text_dim) != text_dim:
        raise ValueError(f"{path / 'config.json'}: run.text gives {text_encoder.feature_dim}-wide features but the "
                         f"weights take {text_dim}")
    try:
        with torch.no_grad():
            codec.encode(torch.zeros(1, 1, 3, height, width))
    except ValueError as e:
        raise ValueError(f"{path / 'config.json'}: run.data.height x width = {height}x{width} does not fit the "
                         f"checkpoint's frame codec ({e})") from e


def check_finite_weights(path: Path, modules: dict) -> None:
    """Raise ValueError naming the tensors when any weight is NaN or infinite (a corrupt checkpoint)."""
    bad = [f"{name}.{key}" for name, module in modules.items()
           for key, tensor in module.state_dict().items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(f"{path}: {len(bad)} weight tensors hold NaN or inf ({', '.join(bad[:5])}{more}); the "
                         "checkpoint is corrupt or training diverged: use an earlier checkpoint")
