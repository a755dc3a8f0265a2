"""Codecs: media <-> tokens. ``encode(x) -> (tokens (B, N, C), pos (N, 3))``, ``decode(tokens, shape) -> x``.

Frames (images and videos share one codec): ``patch`` (identity pixel patches), ``conv_ae`` (a trained
``ConvAutoencoder`` folder) or ``diffusers`` (a local ``AutoencoderKL`` folder, extra [diffusers]).
Audio: ``patch`` (frames of raw samples) or ``audio_ae`` (a trained ``AudioAutoencoder`` folder).
"""

from __future__ import annotations

from worldmodel.codecs.audio_autoencoder import AudioAutoencoder
from worldmodel.codecs.conv_autoencoder import ConvAutoencoder
from worldmodel.codecs.patch import AudioLatentCodec, AudioPatchCodec, LatentCodec, PatchCodec

FRAME_CODECS = ("patch", "conv_ae", "diffusers")
AUDIO_CODECS = ("patch", "audio_ae")


def _need_path(kind: str, path) -> None:
    if not path:
        raise ValueError(f"codec {kind!r} loads a trained autoencoder: set its folder (codec.frames_path or "
                         "codec.audio_path), or use the 'patch' codec")


def build_frame_codec(kind: str = "patch", patch: int = 4, path: str | None = None, latent_patch: int | None = None):
    """Codec for images and videos. ``patch``: pixel patch (patch codec); ``latent_patch``: latent patch
    of the autoencoder codecs (default 1 for conv_ae, 2 for diffusers)."""
    if kind == "patch":
        return PatchCodec(patch=patch, channels=3)
    if kind == "conv_ae":
        _need_path(kind, path)
        return LatentCodec(ConvAutoencoder.load(path), patch=latent_patch or 1)
    if kind == "diffusers":
        _need_path(kind, path)
        from worldmodel.codecs.diffusers_vae import DiffusersVAE

        return LatentCodec(DiffusersVAE.from_folder(path), patch=latent_patch or 2)
    raise ValueError(f"unknown frame codec {kind!r}; choose one of {', '.join(FRAME_CODECS)}")


def build_audio_codec(kind: str = "patch", frame: int = 64, path: str | None = None, latent_frame: int = 1):
    """Codec for audio. ``frame``: samples per token (patch codec); ``latent_frame``: latent steps per token."""
    if kind == "patch":
        return AudioPatchCodec(frame=frame)
    if kind == "audio_ae":
        _need_path(kind, path)
        return AudioLatentCodec(AudioAutoencoder.load(path), frame=latent_frame)
    raise ValueError(f"unknown audio codec {kind!r}; choose one of {', '.join(AUDIO_CODECS)}")


def __getattr__(name: str):  # DiffusersVAE imports nothing heavy itself, but keep the module lazy anyway
    if name == "DiffusersVAE":
        from worldmodel.codecs.diffusers_vae import DiffusersVAE

        return DiffusersVAE
    raise AttributeError(f"module 'worldmodel.codecs' has no attribute {name!r}")


__all__ = ["AUDIO_CODECS", "FRAME_CODECS", "AudioAutoencoder", "AudioLatentCodec", "AudioPatchCodec",
           "ConvAutoencoder", "DiffusersVAE", "LatentCodec", "PatchCodec", "build_audio_codec", "build_frame_codec"]
