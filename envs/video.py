"""Per-episode MP4s with the instruction and step number drawn on each frame (imageio + PIL)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def annotate(frame: np.ndarray, instruction: str, step: int, extra: str = "") -> np.ndarray:
    """Draw `instruction` and `step N` (plus `extra`) in a dark band at the top of frame (H, W, 3) uint8."""
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"frames must be (H, W, 3) uint8, got {frame.shape} {frame.dtype}")
    img = Image.fromarray(frame)
    size = max(10, frame.shape[0] // 28)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(img, "RGBA")
    text = f"step {step}  {extra}".rstrip()
    band = 2 * size + 8
    draw.rectangle([0, 0, frame.shape[1], band], fill=(0, 0, 0, 150))
    draw.text((4, 2), instruction, fill=(255, 255, 255, 255), font=font)
    draw.text((4, size + 4), text, fill=(255, 255, 0, 255), font=font)
    return np.asarray(img)


def write_video(path: str | Path, frames: list[np.ndarray], instructions: list[str], fps: int = 5,
                extras: list[str] | None = None) -> Path:
    """Write frames (each (H, W, 3) uint8) as an H.264 MP4, annotated with instruction and step index.

    `instructions[i]` is the instruction in force at frame i (it changes when a subtask advances).
    """
    if not frames:
        raise ValueError(f"no frames to write to {path}")
    if len(instructions) != len(frames):
        raise ValueError(f"{len(frames)} frames but {len(instructions)} instructions; give one per frame")
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    pad_h, pad_w = (-h) % 16, (-w) % 16  # even sizes for yuv420p (macro blocks of 16 avoid resizing warnings)
    with imageio.get_writer(path, fps=fps, codec="libx264", macro_block_size=1, quality=7) as writer:
        for i, (f, ins) in enumerate(zip(frames, instructions)):
            f = annotate(np.asarray(f, dtype=np.uint8), ins, i, extras[i] if extras else "")
            if pad_h or pad_w:
                f = np.pad(f, ((0, pad_h), (0, pad_w), (0, 0)))
            writer.append_data(f)
    return path
