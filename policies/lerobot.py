"""LeRobot's batch conventions <-> the toolkit's per-row observations (torch).

A LeRobot batch is a dict of torch tensors: images ``observation.images.<camera>`` (B, C, H, W) float in
[0, 1] (or (B, T, C, H, W) recent frames, oldest first), ``observation.state`` (B, S) and ``task``, a list
of B instruction strings. `rows_from_lerobot` turns it into B toolkit observations (uint8 (H, W, 3)
frames, as the cameras recorded them) that `policies.validation.validate_observation` then checks like
any other input.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

IMAGE_PREFIX = "observation.images."
EXPECTED = ("'observation.images.<camera>' (B, 3, H, W) float in [0, 1] (or 'observation.image'), "
            "'observation.state' (B, S) when the checkpoint uses proprioception, 'task' list of B str")


def is_lerobot_batch(batch: Any) -> bool:
    """True for a dict keyed like LeRobot's (``observation.*`` or ``task``)."""
    return isinstance(batch, dict) and ("task" in batch or any(str(k).startswith("observation.") for k in batch))


def _camera_key(batch: dict, camera: str | None) -> str:
    cameras = sorted(k for k in batch if k.startswith(IMAGE_PREFIX)) + (["observation.image"]
                                                                          if "observation.image" in batch else [])
    if camera is not None:
        key = camera if camera in batch else IMAGE_PREFIX + camera
        if key not in batch:
            raise ValueError(f"the batch has no camera {camera!r}; it has {cameras}")
        return key
    if len(cameras) != 1:
        raise ValueError(f"LeRobot batch with {len(cameras)} cameras {cameras}: the model sees one; pass "
                         f"camera=<name> to the policy (from_pretrained(..., camera='top')). Expected keys: {EXPECTED}")
    return cameras[0]


def _frames_uint8(images: Any, key: str) -> np.ndarray:
    """(B, C, H, W) | (B, T, C, H, W) float tensor in [0, 1] -> (B, T, H, W, 3) uint8 numpy."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        what = f"a {images.dtype} tensor" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"batch['{key}'] must be a float torch tensor in [0, 1] (LeRobot's convention), got {what}; "
                         "convert uint8 images with img.float() / 255")
    if images.ndim == 4:
        images = images[:, None]
    if images.ndim != 5 or images.shape[2] != 3:
        raise ValueError(f"batch['{key}'] must be (B, 3, H, W) (or (B, T, 3, H, W)), got {tuple(images.shape)}")
    if images.numel() and not bool(torch.isfinite(images).all()):
        raise ValueError(f"batch['{key}'] holds NaN or inf values")
    if images.numel() and (float(images.min()) < -1e-3 or float(images.max()) > 1 + 1e-3):
        raise ValueError(f"batch['{key}'] must be in [0, 1], got values in [{float(images.min()):.3g}, "
                         f"{float(images.max()):.3g}]; divide 0..255 images by 255")
    return (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy()


def rows_from_lerobot(batch: dict, camera: str | None = None) -> list[dict[str, Any]]:
    """A LeRobot batch -> B toolkit observations {"image" (T, H, W, 3) uint8, "instruction", "state"?, "seed"?}."""
    key = _camera_key(batch, camera)
    frames = _frames_uint8(batch[key], key)  # (B, T, H, W, 3)
    b = frames.shape[0]
    tasks = batch.get("task")
    if isinstance(tasks, str):
        tasks = [tasks] * b
    if not isinstance(tasks, (list, tuple)) or len(tasks) != b:
        got = f"{type(tasks).__name__} of length {len(tasks)}" if isinstance(tasks, (list, tuple)) else repr(tasks)[:80]
        raise ValueError(f"batch['task'] must be a list of {b} instruction strings (one per row), got {got}")
    states = batch.get("observation.state")
    if states is not None:
        states = states.detach().float().cpu().numpy() if isinstance(states, torch.Tensor) else np.asarray(states)
        if states.ndim not in (2, 3) or len(states) != b:
            raise ValueError(f"batch['observation.state'] must be (B, S) with B = {b}, got {states.shape}")
    seeds = batch.get("seed")
    if isinstance(seeds, torch.Tensor):
        seeds = seeds.tolist()
    if seeds is not None and (not isinstance(seeds, (list, tuple)) or len(seeds) != b):
        raise ValueError(f"batch['seed'] must be a list of {b} ints (one per row) or absent")
    rows = []
    for i in range(b):
        row = {"image": frames[i], "instruction": tasks[i]}
        if states is not None:
            row["state"] = states[i]
        if seeds is not None:
            row["seed"] = seeds[i]
        rows.append(row)
    return rows
