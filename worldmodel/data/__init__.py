"""Pretraining data sources and the one collate function.

A sample is a dict (docs/ARCHITECTURE.md): image ``{"image": (3, H, W) float32 in [-1, 1], "caption": str,
"labels": {name: int | float}}``; video ``{"video": (T, 3, H, W), ...}``; audio ``{"audio": (S,),
"sample_rate": int, ...}``. Folder and TFDS sources import their heavy dependencies lazily.
"""

from __future__ import annotations

import torch

from worldmodel.data.procedural import ProceduralAudio, ProceduralImages, ProceduralVideos

MEDIA_KEYS = ("image", "video", "audio")


def collate(samples: list[dict]) -> dict:
    """Stack media tensors; captions stay a list of str; labels become {name: (B,) tensor}.

    Integer labels become int64, the others float32. ``sample_rate`` (audio) must agree across the batch.
    """
    if not samples:
        raise ValueError("collate got an empty list of samples")
    keys = [k for k in MEDIA_KEYS if k in samples[0]]
    if len(keys) != 1:
        raise ValueError(f"a sample needs exactly one media key of {MEDIA_KEYS}, got keys {sorted(samples[0])}")
    key = keys[0]
    rates = {int(s["sample_rate"]) for s in samples if "sample_rate" in s}
    if len(rates) > 1:
        raise ValueError(f"audio samples in one batch have different sample rates {sorted(rates)}; "
                         "give every source the same sample_rate")
    out: dict = {"modality": key, key: torch.stack([torch.as_tensor(s[key], dtype=torch.float32) for s in samples])}
    out["caption"] = [s.get("caption") or "" for s in samples]
    names = samples[0].get("labels", {}).keys()
    labels = {}
    for name in names:
        values = [s["labels"][name] for s in samples]
        is_int = all(isinstance(v, int) or (torch.is_tensor(v) and not v.is_floating_point()) for v in values)
        labels[name] = torch.as_tensor(values, dtype=torch.int64 if is_int else torch.float32)
    out["labels"] = labels
    if rates:
        out["sample_rate"] = rates.pop()
    return out


def __getattr__(name: str):  # lazy: folders need imageio/scipy, TFDS needs tensorflow
    if name in ("ImageFolder", "VideoFolder", "AudioFolder"):
        from worldmodel.data import folders

        return getattr(folders, name)
    if name == "TFDSImages":
        from worldmodel.data.tfds_images import TFDSImages

        return TFDSImages
    raise AttributeError(f"module 'worldmodel.data' has no attribute {name!r}")


__all__ = ["AudioFolder", "ImageFolder", "ProceduralAudio", "ProceduralImages", "ProceduralVideos", "TFDSImages",
           "VideoFolder", "collate"]
