"""Procedural images: coloured, textured shapes on a dark background, deterministic from (seed, index).

The embedded default data: no download, thousands of 32x32 samples per second on one CPU core, and
every sample carries the labels its caption states (shape, colour, texture, position), so a linear
probe on the model's features can be scored against them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {  # name -> RGB in [0, 1]
    "red": (0.95, 0.15, 0.15),
    "green": (0.15, 0.85, 0.2),
    "blue": (0.2, 0.35, 0.95),
    "yellow": (0.95, 0.9, 0.15),
    "cyan": (0.15, 0.9, 0.9),
    "magenta": (0.9, 0.2, 0.85),
    "orange": (1.0, 0.55, 0.1),
    "white": (0.95, 0.95, 0.95),
}
COLOUR_NAMES = tuple(COLOURS)
COLOUR_RGB = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)  # (K, 3)
TEXTURES = ("plain", "striped", "checkered", "dotted")
TEXTURE_WORDS = ("", "striped ", "checkered ", "dotted ")  # adjective before the shape name
ROWS = ("top", "middle", "bottom")
COLS = ("left", "centre", "right")
REGIONS = tuple(
    "centre" if (r, c) == ("middle", "centre") else (c if r == "middle" else (r if c == "centre" else f"{r} {c}"))
    for r in ROWS for c in COLS
)  # 9 names, index = 3 * row + col

def checked_index(index: int, length: int, name: str) -> int:
    """``index`` wrapped once for negatives and bounds-checked (IndexError naming the dataset)."""
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for {name} of length {length}")
    return index



def region_index(x: float, y: float) -> int:
    """3x3 region of a point in [0, 1]^2 (x to the right, y downwards): 3 * row + col."""
    col = min(int(x * 3), 2)
    row = min(int(y * 3), 2)
    return 3 * row + col


def shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of a unit shape in object coordinates u (right), v (down), both ~[-1, 1]."""
    name = SHAPES[shape]
    if name == "circle":
        return u * u + v * v <= 1.0
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if name == "triangle":  # apex at the top
        return (v >= -0.9) & (v <= 0.8) & (np.abs(u) <= (v + 0.9) / 1.7)
    if name == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if name == "cross":
        return ((np.abs(u) <= 0.33) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.33) & (np.abs(u) <= 0.95))
    raise ValueError(f"unknown shape index {shape}; valid 0..{len(SHAPES) - 1}")


def texture_pattern(texture: int, xx: np.ndarray, yy: np.ndarray, period: float, phase: float) -> np.ndarray:
    """Boolean 'lit' pattern of a texture over pixel coordinates (True = full colour)."""
    name = TEXTURES[texture]
    if name == "plain":
        return np.ones_like(xx, dtype=bool)
    if name == "striped":  # diagonal stripes
        return np.floor((xx + yy + phase) / period) % 2 == 0
    if name == "checkered":
        return (np.floor((xx + phase) / period) + np.floor((yy + phase) / period)) % 2 == 0
    if name == "dotted":
        fx = (xx + phase) / period % 2.0 - 1.0
        fy = (yy + phase) / period % 2.0 - 1.0
        return fx * fx + fy * fy > 0.45
    raise ValueError(f"unknown texture index {texture}; valid 0..{len(TEXTURES) - 1}")


def render_object(
    canvas: np.ndarray,
    shape: int,
    colour: int,
    texture: int,
    cx: float,
    cy: float,
    radius: float,
    period: float,
    phase: float,
) -> np.ndarray:
    """Paint one object onto canvas (3, H, W) in [0, 1], in place; centre/radius in pixels. Returns canvas."""
    _, h, w = canvas.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5  # pixel centres
    mask = shape_mask(shape, (xx - cx) / radius, (yy - cy) / radius)  # (H, W)
    lit = texture_pattern(texture, xx, yy, period, phase)
    shade = np.where(lit, 1.0, 0.5).astype(np.float32)
    rgb = COLOUR_RGB[colour][:, None, None] * shade[None]  # (3, H, W)
    np.copyto(canvas, rgb, where=mask[None])
    return canvas


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A dark, slightly tinted vertical gradient (3, H, W) in [0, 1]."""
    top = rng.uniform(0.02, 0.22, size=3).astype(np.float32)
    bottom = rng.uniform(0.02, 0.22, size=3).astype(np.float32)
    ramp = np.linspace(0.0, 1.0, h, dtype=np.float32)[None, :, None]  # (1, H, 1)
    return np.broadcast_to(top[:, None, None] * (1 - ramp) + bottom[:, None, None] * ramp, (3, h, w)).copy()


def to_signed(x: np.ndarray) -> torch.Tensor:
    """[0, 1] float array -> float32 tensor in [-1, 1]."""
    return torch.from_numpy(np.clip(x * 2.0 - 1.0, -1.0, 1.0).astype(np.float32))


class ProceduralImages(Dataset):
    """Map-style dataset of (3, size, size) images in [-1, 1] with captions and labels.

    Sample: ``{"image": (3, H, W) float32, "caption": "a red striped triangle at the top left",
    "labels": {"shape", "colour", "texture", "region": int; "x", "y", "size": float}}``.
    The same (seed, index) always gives the same sample.
    """

    label_names = ("shape", "colour", "texture", "region", "x", "y", "size")
    num_classes = {"shape": len(SHAPES), "colour": len(COLOURS), "texture": len(TEXTURES), "region": len(REGIONS)}
    class_names = {"shape": SHAPES, "colour": COLOUR_NAMES, "texture": TEXTURES, "region": REGIONS}

    def __init__(self, size: int = 32, length: int = 100_000, seed: int = 0):
        if size < 8:
            raise ValueError(f"ProceduralImages needs size >= 8 pixels to draw shapes, got {size}")
        if length <= 0:
            raise ValueError(f"ProceduralImages length must be positive, got {length}")
        self.size, self.length, self.seed = int(size), int(length), int(seed)

    def __len__(self) -> int:
        return self.length

    def params(self, index: int) -> dict:
        """The latent parameters of sample ``index`` (what the labels and caption describe)."""
        rng = np.random.default_rng([self.seed, 0x1A6E, index])
        radius = float(rng.uniform(0.14, 0.22))  # fraction of the side
        return {
            "shape": int(rng.integers(len(SHAPES))),
            "colour": int(rng.integers(len(COLOURS))),
            "texture": int(rng.integers(len(TEXTURES))),
            "x": float(rng.uniform(radius, 1 - radius)),
            "y": float(rng.uniform(radius, 1 - radius)),
            "size": radius,
            "period": float(rng.uniform(0.07, 0.12)),  # texture period, fraction of the side
            "phase": float(rng.uniform(0, 8)),
            "rng": rng,
        }

    def __getitem__(self, index: int) -> dict:
        index = checked_index(index, self.length, "ProceduralImages")
        p = self.params(index)
        s = self.size
        canvas = background(p["rng"], s, s)
        period = max(2.0, p["period"] * s)
        render_object(canvas, p["shape"], p["colour"], p["texture"], p["x"] * s, p["y"] * s, p["size"] * s,
                      period, p["phase"])
        region = region_index(p["x"], p["y"])
        labels = {"shape": p["shape"], "colour": p["colour"], "texture": p["texture"], "region": region,
                  "x": p["x"], "y": p["y"], "size": p["size"]}
        return {"image": to_signed(canvas), "caption": image_caption(labels), "labels": labels}


def article(word: str) -> str:
    """'a' or 'an' for the word that follows."""
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(labels: dict) -> str:
    """'a red striped triangle' from the shape, colour and texture labels."""
    colour = COLOUR_NAMES[labels["colour"]]
    return f"{article(colour)} {colour} {TEXTURE_WORDS[labels['texture']]}{SHAPES[labels['shape']]}"


def image_caption(labels: dict) -> str:
    """'a red striped triangle at the top left' from categorical labels."""
    where = REGIONS[labels["region"]]
    where = {"centre": "in the centre", "left": "on the left", "right": "on the right"}.get(where, f"at the {where}")
    return f"{object_phrase(labels)} {where}"
