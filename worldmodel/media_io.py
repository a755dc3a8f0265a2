"""Writing what a model generated so people can look and listen: PNG grids, GIF/MP4 videos, WAV audio.

All inputs are float arrays in [-1, 1] (the data convention); files are written to a temporary name
and renamed, so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import math
import os
import wave
from pathlib import Path

import imageio.v3 as iio
import numpy as np


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip((np.asarray(x, dtype=np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def write_atomic(path: str | Path, write) -> Path:
    """``write(tmp)`` to a hidden sibling named per process (concurrent writers never share one), then rename it over
    ``path``: readers never see half a file. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)
    return path


def image_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] -> one (rows*(H+pad), cols*(W+pad), 3) uint8 grid."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"image_grid expects (B, 3, H, W), got {images.shape}")
    b, _, h, w = images.shape
    cols = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(_to_uint8(images.transpose(0, 2, 3, 1))):  # (B, H, W, 3)
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    return grid


def upscale(frame: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of an (H, W, 3) uint8 frame, so tiny samples are visible."""
    return frame.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else frame


def write_image_grid(path: str | Path, images: np.ndarray, scale: int = 4) -> Path:
    """Write (B, 3, H, W) images in [-1, 1] as one PNG grid."""
    grid = upscale(image_grid(images), scale)
    return write_atomic(Path(path), lambda tmp: iio.imwrite(tmp, grid))


def write_video_grid(path: str | Path, videos: np.ndarray, fps: int = 4, scale: int = 4) -> Path:
    """Write (B, T, 3, H, W) videos in [-1, 1] side by side as one GIF or MP4 (by suffix)."""
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise ValueError(f"write_video_grid expects (B, T, 3, H, W), got {videos.shape}")
    frames = [upscale(image_grid(videos[:, t], columns=videos.shape[0]), scale) for t in range(videos.shape[1])]
    return write_frames(path, frames, fps=fps)


def write_frames(path: str | Path, frames: list[np.ndarray], fps: int = 4) -> Path:
    """Write a list of (H, W, 3) uint8 frames as GIF (loops) or MP4 (by suffix)."""
    path = Path(path)
    if path.suffix.lower() == ".gif":
        return write_atomic(path, lambda tmp: iio.imwrite(tmp, np.stack(frames), duration=1000 / fps, loop=0))
    if path.suffix.lower() == ".mp4":
        even = [f[: f.shape[0] // 2 * 2, : f.shape[1] // 2 * 2] for f in frames]  # yuv420p needs even sides
        return write_atomic(path, lambda tmp: iio.imwrite(tmp, np.stack(even), fps=fps, codec="libx264",
                                                          plugin="pyav"))
    raise ValueError(f"unsupported video suffix {path.suffix!r}; use .gif or .mp4")


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int, gap_seconds: float = 0.25) -> Path:
    """Write (B, S) or (S,) audio in [-1, 1] as one 16-bit mono WAV, clips separated by silence."""
    audio = np.asarray(audio, dtype=np.float32)
    clips = audio[None] if audio.ndim == 1 else audio
    if clips.ndim != 2:
        raise ValueError(f"write_wav expects (S,) or (B, S), got {audio.shape}")
    gap = np.zeros(int(gap_seconds * sample_rate), dtype=np.float32)
    joined = np.concatenate([piece for clip in clips for piece in (clip, gap)])
    pcm = (np.clip(joined, -1.0, 1.0) * 32767).astype("<i2")

    def write(tmp: Path) -> None:
        with wave.open(str(tmp), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(int(sample_rate))
            out.writeframes(pcm.tobytes())

    return write_atomic(Path(path), write)


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """(samples (S,) float32 in [-1, 1], sample_rate) of a 16-bit mono WAV."""
    with wave.open(str(path), "rb") as src:
        if src.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit WAV is supported here, got {8 * src.getsampwidth()}-bit")
        raw = np.frombuffer(src.readframes(src.getnframes()), dtype="<i2").reshape(-1, src.getnchannels())
        return raw.mean(axis=1).astype(np.float32) / 32768.0, src.getframerate()
