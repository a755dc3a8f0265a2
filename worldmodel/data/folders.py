"""Your own media as map-style datasets: folders of images, videos and wav audio.

Unreadable files never crash a run: they are skipped, counted in ``skipped`` and named in one warning.
Images are checked when read (a bad one is replaced by the next good index); videos and audio are
probed when the dataset is built (their lengths decide how many clips there are).
"""

from __future__ import annotations

import json
import logging
import warnings
from math import gcd
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
AUDIO_EXTS = (".wav",)


def list_files(root: str | Path, exts: tuple[str, ...], kind: str, config_key: str) -> tuple[Path, list[Path]]:
    """Sorted files under ``root`` (recursive) with one of ``exts``; clear errors if none."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{kind} folder {root} does not exist; create it and put {', '.join(exts)} files "
                                f"in it, or point `{config_key}` at an existing folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
    if not files:
        raise ValueError(f"no {kind} files ({', '.join(exts)}) found under {root} (searched recursively); "
                         f"add some, or point `{config_key}` at the folder that holds them")
    return root, files


class SkipCounter:
    """Mixin: ``skipped`` counts unreadable files; the first one triggers a single warning."""

    skipped: int
    skipped_files: list[str]

    def _init_skips(self) -> None:
        self.skipped, self.skipped_files = 0, []

    def _skip(self, path: Path, err: Exception) -> None:
        if str(path) in self.skipped_files:
            return
        self.skipped += 1
        self.skipped_files.append(str(path))
        if self.skipped == 1:
            warnings.warn(f"{type(self).__name__}: skipping unreadable file {path} ({type(err).__name__}: {err}); "
                          "further skips are counted in `.skipped` without a warning", stacklevel=3)
        log.debug("skipped %s: %s", path, err)


def resize_center_crop(img, size: int) -> np.ndarray:
    """PIL image -> (3, size, size) float32 in [-1, 1]: resize the short side to ``size``, crop the centre."""
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC if scale > 1 else Image.LANCZOS)
    left, top = (nw - size) // 2, (nh - size) // 2
    arr = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32)  # (H, W, 3)
    return np.clip(arr / 127.5 - 1.0, -1.0, 1.0).transpose(2, 0, 1).copy()


class ImageFolder(SkipCounter, Dataset):
    """png/jpg images under ``root`` (recursive), resized and centre-cropped to ``size``.

    captions: "sidecar" (``name.txt`` beside ``name.png``; missing -> ""), "jsonl" (``root/captions.jsonl``
    with ``{"file": path relative to root, "caption": ...}`` per line) or None (empty captions).
    Images in sub-folders get a categorical label ``class`` (sub-folder index) for probes.
    """

    def __init__(self, root: str | Path, size: int = 32, captions: str | None = "sidecar"):
        if captions not in ("sidecar", "jsonl", None):
            raise ValueError(f"captions must be 'sidecar', 'jsonl' or None, got {captions!r}")
        self.root, self.files = list_files(root, IMAGE_EXTS, "image", "image_root")
        self.size, self.captions_mode = int(size), captions
        self._init_skips()
        self._jsonl = self._read_jsonl() if captions == "jsonl" else {}
        rel_parts = [p.relative_to(self.root).parts for p in self.files]
        classes = sorted({parts[0] for parts in rel_parts if len(parts) > 1})
        self.class_names = {"class": tuple(classes)} if classes else {}
        self.num_classes = {"class": len(classes)} if classes else {}
        self.label_names = ("class",) if classes else ()
        self._class_of = {name: i for i, name in enumerate(classes)}

    def _read_jsonl(self) -> dict[str, str]:
        path = self.root / "captions.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"captions='jsonl' needs {path} with one "
                                    '{"file": ..., "caption": ...} per line; write it, '
                                    "or use captions='sidecar' (name.txt beside each image) or None")
        out = {}
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out[str(Path(row["file"]))] = str(row["caption"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{n} is not a JSON object with 'file' and 'caption' ({err}); "
                                 "fix that line") from err
        return out

    def __len__(self) -> int:
        return len(self.files)

    def caption(self, path: Path) -> str:
        if self.captions_mode == "sidecar":
            txt = path.with_suffix(".txt")
            return txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""
        if self.captions_mode == "jsonl":
            rel = str(path.relative_to(self.root))
            return self._jsonl.get(rel, self._jsonl.get(path.name, ""))
        return ""

    def __getitem__(self, index: int) -> dict:
        from PIL import Image

        n = len(self.files)
        for attempt in range(n):
            path = self.files[(index + attempt) % n]
            try:
                with Image.open(path) as img:
                    image = resize_center_crop(img, self.size)
            except Exception as err:  # noqa: BLE001 - any decoder failure means "unreadable file"
                self._skip(path, err)
                continue
            parts = path.relative_to(self.root).parts
            labels = {"class": self._class_of[parts[0]]} if self.label_names and len(parts) > 1 else {}
            if self.label_names and not labels:
                labels = {"class": -1}  # an image directly in root, beside class folders
            return {"image": torch.from_numpy(image), "caption": self.caption(path), "labels": labels}
        raise ValueError(f"none of the {n} image files under {self.root} could be read; "
                         "check that they are valid images")


class VideoFolder(SkipCounter, Dataset):
    """Clips of ``frames`` frames taking every ``stride``-th frame, from videos under ``root`` (imageio + pyav).

    Each video gives ``max(1, n_frames // (frames * stride))`` non-overlapping clips; a video shorter
    than one clip repeats its last frame. Captions come from a sidecar ``name.txt`` if present.
    """

    def __init__(self, root: str | Path, frames: int = 8, stride: int = 1, size: int = 32):
        if frames < 1 or stride < 1:
            raise ValueError(f"VideoFolder needs frames >= 1 and stride >= 1, got frames={frames}, stride={stride}")
        self.root, files = list_files(root, VIDEO_EXTS, "video", "video_root")
        self.frames, self.stride, self.size = int(frames), int(stride), int(size)
        self._init_skips()
        self.label_names, self.num_classes, self.class_names = (), {}, {}
        span = self.frames * self.stride
        self.clips: list[tuple[Path, int]] = []  # (file, first frame)
        for path in files:
            try:
                count = self._count_frames(path)
            except Exception as err:  # noqa: BLE001
                self._skip(path, err)
                continue
            self.clips += [(path, k * span) for k in range(max(1, count // span))]
        if not self.clips:
            raise ValueError(f"none of the {len(files)} video files under {self.root} could be read "
                             f"({self.skipped} skipped); check that they are valid videos (pip install av)")

    @staticmethod
    def _count_frames(path: Path) -> int:
        import imageio.v3 as iio

        n = iio.improps(path, plugin="pyav").shape[0]
        if n <= 0:
            raise ValueError("video has no frames")
        return int(n)

    def __len__(self) -> int:
        return len(self.clips)

    def _read(self, path: Path, start: int) -> np.ndarray:
        import imageio.v3 as iio
        from PIL import Image

        wanted = set(range(start, start + self.frames * self.stride, self.stride))
        out = []
        for i, frame in enumerate(iio.imiter(path, plugin="pyav")):  # frame (H, W, 3) uint8
            if i in wanted:
                out.append(resize_center_crop(Image.fromarray(frame), self.size))
            if len(out) == self.frames:
                break
        if not out:
            raise ValueError(f"no frames decoded from {start}")
        out += [out[-1]] * (self.frames - len(out))
        return np.stack(out)  # (T, 3, H, W)

    def __getitem__(self, index: int) -> dict:
        n = len(self.clips)
        for attempt in range(n):
            path, start = self.clips[(index + attempt) % n]
            if str(path) in self.skipped_files:
                continue
            try:
                video = self._read(path, start)
            except Exception as err:  # noqa: BLE001
                self._skip(path, err)
                continue
            txt = path.with_suffix(".txt")
            caption = txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""
            return {"video": torch.from_numpy(video), "caption": caption, "labels": {}}
        raise ValueError(f"none of the videos under {self.root} could be decoded; check that they are valid videos")


def read_wav(path: Path, mmap: bool = False) -> tuple[int, np.ndarray]:
    """(sample rate, mono float32 samples in [-1, 1]) of a wav file (PCM 8/16/32-bit or float)."""
    from scipy.io import wavfile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", wavfile.WavFileWarning)  # unknown chunks (LIST, ...) are fine to skip
        rate, data = wavfile.read(path, mmap=mmap)
    if mmap:
        return int(rate), data
    if data.dtype == np.uint8:
        data = (data.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(data.dtype, np.integer):
        data = data.astype(np.float32) / float(-np.iinfo(data.dtype).min)
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 2:
        data = data.mean(axis=1)
    return int(rate), np.clip(data, -1.0, 1.0)


def resample(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    """Polyphase resampling of a 1-D signal from ``src`` Hz to ``dst`` Hz."""
    if src == dst:
        return x
    from scipy.signal import resample_poly

    g = gcd(src, dst)
    return resample_poly(x, dst // g, src // g).astype(np.float32)


class AudioFolder(SkipCounter, Dataset):
    """Mono clips of ``seconds`` at ``sample_rate`` from wav files under ``root`` (resampled if needed).

    Each file gives ``max(1, duration // seconds)`` non-overlapping clips; a short file is zero-padded.
    Captions come from a sidecar ``name.txt`` if present.
    """

    def __init__(self, root: str | Path, sample_rate: int = 8000, seconds: float = 1.0):
        self.root, files = list_files(root, AUDIO_EXTS, "audio", "audio_root")
        self.sample_rate, self.seconds = int(sample_rate), float(seconds)
        self.num_samples = int(round(sample_rate * seconds))
        if self.num_samples < 1:
            raise ValueError(f"AudioFolder clip is empty: sample_rate={sample_rate}, seconds={seconds}")
        self._init_skips()
        self.label_names, self.num_classes, self.class_names = (), {}, {}
        self.clips: list[tuple[Path, int]] = []  # (file, clip number)
        for path in files:
            try:
                rate, data = read_wav(path, mmap=True)
                if data.shape[0] == 0:
                    raise ValueError("wav file has no samples")
            except Exception as err:  # noqa: BLE001
                self._skip(path, err)
                continue
            duration = data.shape[0] / rate
            self.clips += [(path, k) for k in range(max(1, int(duration // self.seconds)))]
        if not self.clips:
            raise ValueError(f"none of the {len(files)} wav files under {self.root} could be read "
                             f"({self.skipped} skipped); check that they are valid PCM wav files")

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict:
        n = len(self.clips)
        for attempt in range(n):
            path, k = self.clips[(index + attempt) % n]
            if str(path) in self.skipped_files:
                continue
            try:
                rate, data = read_wav(path)
                data = resample(data, rate, self.sample_rate)
            except Exception as err:  # noqa: BLE001
                self._skip(path, err)
                continue
            clip = np.zeros(self.num_samples, dtype=np.float32)
            piece = data[k * self.num_samples: (k + 1) * self.num_samples]
            clip[: len(piece)] = np.clip(piece, -1.0, 1.0)
            txt = path.with_suffix(".txt")
            caption = txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""
            return {"audio": torch.from_numpy(clip), "sample_rate": self.sample_rate, "caption": caption, "labels": {}}
        raise ValueError(f"none of the wav files under {self.root} could be decoded; check that they are valid")
