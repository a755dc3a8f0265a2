"""One check of a policy observation, shared by every entry point (numpy only, no torch).

`validate_observation` is what `SelfFlowPolicy.step`, `predict_action_chunk` (single, list and LeRobot
batches), `select_action` and the policy server all call, so each accepts and refuses the same inputs
with the same messages. It also bounds what one request may cost (`Limits`): pixels per frame, frames,
aspect ratio and instruction length. Messages never echo the offending value (it may be megabytes):
they name the key, the type or shape, and the fix.

openpi's observation keys (``observation/image``, ``observation/wrist_image``, ``observation/state``,
``prompt``) are accepted beside the toolkit's (``image``, ``state``, ``instruction``, ``seed``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from policies.stepper import check_state

# openpi key -> toolkit key (openpi's LIBERO / ALOHA-style examples; the wrist camera is checked, not used)
OPENPI_KEYS = {"observation/image": "image", "observation/state": "state", "prompt": "instruction",
               "observation/wrist_image": "wrist_image"}
MAX_ERROR_CHARS = 300  # error replies and log lines are cut to this many characters


@dataclass(frozen=True)
class Limits:
    """Bounds on one observation; beyond them it is refused with an error naming the bound.

    max_pixels: H * W of one frame (default 4096 * 4096 / 4 = 4.2 MPix: a 2048x2048 or 1920x1080 camera passes).
    max_frames: frames per request (the model keeps (context_frames - 1) * frame_stride + 1 at most).
    max_aspect: the longer image side over the shorter (panoramas beyond it cost pixels for nothing).
    max_instruction_chars: instruction length in characters (RT-1's longest is under 100).
    """

    max_pixels: int = 2048 * 2048
    max_frames: int = 64
    max_aspect: float = 8.0
    max_instruction_chars: int = 1000


DEFAULT_LIMITS = Limits()


def short(text: Any, limit: int = MAX_ERROR_CHARS) -> str:
    """``str(text)`` cut to ``limit`` characters (error replies and log lines never carry megabytes)."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... [{len(text) - limit} more characters cut]"


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    if isinstance(value, (str, bytes)):
        return f"{type(value).__name__} of length {len(value)}"
    return type(value).__name__


def check_instruction(instruction: Any, limits: Limits = DEFAULT_LIMITS, key: str = "instruction") -> str:
    """A non-blank str of at most ``limits.max_instruction_chars`` characters, else ValueError."""
    if instruction is None:
        raise ValueError(f"observation['{key}'] is missing; pass the task's language instruction as a str")
    if not isinstance(instruction, str):
        raise ValueError(f"observation['{key}'] must be a str, got {_describe(instruction)}; pass the task's "
                         "language instruction")
    if not instruction.strip():
        raise ValueError(f"observation['{key}'] is empty or blank; pass the task's language instruction (the "
                         "policy never runs unconditioned)")
    if len(instruction) > limits.max_instruction_chars:
        raise ValueError(f"observation['{key}'] has {len(instruction)} characters, over the limit of "
                         f"{limits.max_instruction_chars}; send the task's instruction, not a document")
    return instruction


def check_seed(seed: Any) -> int | None:
    """None or an integer (python or numpy, not bool, not float), else ValueError."""
    if seed is None:
        return None
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"observation['seed'] must be an int or None, got {_describe(seed)}"
                         + (f" {seed!r}" if isinstance(seed, float) else "") + "; seeds are not truncated")
    if not -(2**63) <= int(seed) < 2**64:
        raise ValueError("observation['seed'] must fit in 64 bits")
    return int(seed)


def check_image(image: Any, limits: Limits = DEFAULT_LIMITS, key: str = "image") -> np.ndarray:
    """(H, W, 3) or (T, H, W, 3) uint8 RGB within the limits -> (T, H, W, 3), else ValueError."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"observation['{key}'] must be a numpy array (H, W, 3) uint8, got {_describe(image)}")
    if image.dtype != np.uint8:
        nan = " and it holds NaNs" if image.dtype.kind == "f" and image.size and bool(np.isnan(image).any()) else ""
        raise ValueError(f"observation['{key}'] must be uint8 RGB in [0, 255], got dtype {image.dtype}{nan}; "
                         "convert with (img * 255).astype(np.uint8) if it is float in [0, 1]")
    if image.ndim not in (3, 4) or image.shape[-1] != 3:
        raise ValueError(f"observation['{key}'] must be (H, W, 3) RGB (or (T, H, W, 3) frames, oldest first), got "
                         f"shape {image.shape}; drop an alpha channel with img[..., :3] or stack a grey image to 3 "
                         "channels")
    frames = image if image.ndim == 4 else image[None]  # (T, H, W, 3)
    t, h, w = frames.shape[:3]
    if min(t, h, w) < 1:
        raise ValueError(f"observation['{key}'] is empty: shape {image.shape}; send at least one 1x1 frame")
    if t > limits.max_frames:
        raise ValueError(f"observation['{key}'] holds {t} frames, over the limit of {limits.max_frames}; send the "
                         "recent frames the metadata asks for ((context_frames - 1) * frame_stride + 1)")
    if h * w > limits.max_pixels:
        raise ValueError(f"observation['{key}'] is {h}x{w} = {h * w} pixels per frame, over the limit of "
                         f"{limits.max_pixels}; downscale it on the client (the model sees a few hundred pixels)")
    if max(h, w) > limits.max_aspect * min(h, w):
        raise ValueError(f"observation['{key}'] is {h}x{w}, an aspect ratio over {limits.max_aspect:g}:1; crop it "
                         "to the camera's field of view")
    return frames


def _check_states(state: Any, frames: int) -> np.ndarray:
    """(8,) or (T, 8) finite floats matching the frames -> float32, same shape (one (8,) state needs one frame)."""
    arr = np.asarray(state) if isinstance(state, (np.ndarray, list, tuple)) else None
    ok = arr is not None and arr.dtype.kind in "fiu" and arr.ndim in (1, 2) and arr.shape[-1:] == (8,)
    if ok and arr.ndim == 1 and frames != 1:
        raise ValueError(f"got one state for {frames} frames; pass one state per frame ({frames}, 8)")
    if not ok or (arr.ndim == 2 and arr.shape[0] != frames):
        raise ValueError(f"observation['state'] must be 8 finite floats per frame ((8,) or ({frames}, 8): tool "
                         f"x y z, quaternion w x y z, gripper closedness), got {_describe(state)}")
    return np.stack([check_state(s) for s in arr.reshape(-1, 8)]).reshape(arr.shape)


def validate_observation(obs: Any, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Check one observation; returns {"image" uint8 as given, "instruction" str, "seed" int | None,
    "state" float32 as given | None} or raises ValueError naming the key and the fix.

    obs: {"image" (H, W, 3) | (T, H, W, 3) uint8, "instruction" str, "seed"? int, "state"? (8,) | (T, 8)},
    or openpi's {"observation/image", "observation/state"?, "observation/wrist_image"?, "prompt"}.
    """
    if not isinstance(obs, dict):
        raise ValueError(f"observation must be a dict with 'image' and 'instruction' (or openpi's "
                         f"'observation/image' and 'prompt'), got {_describe(obs)}")
    obs = {OPENPI_KEYS.get(k, k): v for k, v in obs.items()}
    missing = [k for k in ("image", "instruction") if k not in obs]
    if missing:
        raise ValueError(f"observation lacks {missing}; send {{'image': (H, W, 3) uint8, 'instruction': str}} "
                         "(or openpi's 'observation/image' and 'prompt')")
    frames = check_image(obs["image"], limits)
    if obs.get("wrist_image") is not None:
        check_image(obs["wrist_image"], limits, key="observation/wrist_image")
    state = obs.get("state")
    return {"image": obs["image"], "instruction": check_instruction(obs["instruction"], limits),
            "seed": check_seed(obs.get("seed")),
            "state": None if state is None else _check_states(state, frames.shape[0])}
