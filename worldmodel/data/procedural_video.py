"""Procedural videos: one textured shape moving in a straight line and bouncing off the walls.

Deterministic from (seed, index). Labels carry what the caption says (shape, colour, direction, speed)
plus the start position, so probes can test whether the model's features encode motion.
"""

from __future__ import annotations

import math

import numpy as np
from torch.utils.data import Dataset

from worldmodel.data.procedural_images import (
    COLOUR_NAMES,
    COLOURS,
    SHAPES,
    TEXTURES,
    background,
    checked_index,
    object_phrase,
    render_object,
    to_signed,
)

# Direction k moves at angle k * 45 degrees, counter-clockwise from "right" (image y points down).
DIRECTIONS = ("right", "up right", "up", "up left", "left", "down left", "down", "down right")
SPEED_MIN, SPEED_MAX, SPEED_FAST = 0.03, 0.12, 0.075  # fraction of the side per frame


def bounce(p0: float, v: float, lo: float, hi: float, steps: int) -> np.ndarray:
    """Positions over ``steps`` frames of a point moving at v per frame, reflected at lo and hi."""
    out = np.empty(steps, dtype=np.float64)
    p = p0
    for i in range(steps):
        out[i] = p
        p += v
        if p < lo:
            p, v = 2 * lo - p, -v
        elif p > hi:
            p, v = 2 * hi - p, -v
    return out


class ProceduralVideos(Dataset):
    """Map-style dataset of (T, 3, size, size) clips in [-1, 1] with captions and labels.

    Sample: ``{"video": (T, 3, H, W) float32, "caption": "a red striped circle moving up left fast",
    "labels": {"shape", "colour", "texture", "direction": int; "speed", "x0", "y0": float}}``.
    """

    label_names = ("shape", "colour", "texture", "direction", "speed", "x0", "y0")
    # Videos use the plain and striped textures only (stripes move rigidly with the object).
    num_classes = {"shape": len(SHAPES), "colour": len(COLOURS), "texture": 2, "direction": len(DIRECTIONS)}
    class_names = {"shape": SHAPES, "colour": COLOUR_NAMES, "texture": TEXTURES[:2], "direction": DIRECTIONS}

    def __init__(self, size: int = 32, frames: int = 8, length: int = 100_000, seed: int = 0):
        if size < 8:
            raise ValueError(f"ProceduralVideos needs size >= 8 pixels to draw shapes, got {size}")
        if frames < 1 or length <= 0:
            raise ValueError(f"ProceduralVideos needs frames >= 1 and length > 0, got frames={frames}, length={length}")
        self.size, self.frames, self.length, self.seed = int(size), int(frames), int(length), int(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        index = checked_index(index, self.length, "ProceduralVideos")
        rng = np.random.default_rng([self.seed, 0x51DE0, index])
        shape, colour, texture = int(rng.integers(len(SHAPES))), int(rng.integers(len(COLOURS))), int(rng.integers(2))
        direction = int(rng.integers(len(DIRECTIONS)))
        speed = float(rng.uniform(SPEED_MIN, SPEED_MAX))
        radius = float(rng.uniform(0.14, 0.2))
        x0, y0 = float(rng.uniform(radius, 1 - radius)), float(rng.uniform(radius, 1 - radius))
        period, phase = float(rng.uniform(0.08, 0.12)), float(rng.uniform(0, 8))
        angle = direction * math.pi / 4
        vx, vy = speed * math.cos(angle), -speed * math.sin(angle)  # image y points down
        xs = bounce(x0, vx, radius, 1 - radius, self.frames)
        ys = bounce(y0, vy, radius, 1 - radius, self.frames)
        s = self.size
        bg = background(rng, s, s)
        video = np.empty((self.frames, 3, s, s), dtype=np.float32)
        for f in range(self.frames):
            video[f] = bg
            # The texture moves with the object (phase follows the centre), so the pattern is rigid.
            shift = (xs[f] + ys[f]) * s
            render_object(video[f], shape, colour, texture, xs[f] * s, ys[f] * s, radius * s,
                          max(2.0, period * s), phase - shift)
        labels = {"shape": shape, "colour": colour, "texture": texture, "direction": direction, "speed": speed,
                  "x0": x0, "y0": y0}
        return {"video": to_signed(video), "caption": video_caption(labels), "labels": labels}


def video_caption(labels: dict) -> str:
    """'a red striped circle moving up left fast' from the labels."""
    pace = "fast" if labels["speed"] >= SPEED_FAST else "slowly"
    return f"{object_phrase(labels)} moving {DIRECTIONS[labels['direction']]} {pace}"
