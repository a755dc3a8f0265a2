"""A small 1-D convolutional audio autoencoder: (B, S) waveforms <-> latents (B, c, S/d).

Same tooling as the frame autoencoder: ``reconstruction_loss(batch)``, ``fit_scale``, ``save``/``load``
(safetensors). Wrap with ``AudioLatentCodec`` for tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from worldmodel.codecs.conv_autoencoder import read_saved, save_module


def waveforms(batch) -> Tensor:
    """(B, S) waveforms from a tensor or a collated batch dict."""
    x = batch["audio"] if isinstance(batch, dict) else batch
    if x.dim() != 2:
        raise ValueError(f"AudioAutoencoder expects (B, S) mono waveforms, got {tuple(x.shape)}")
    return x


def block1d(cin: int, cout: int, kind: str = "same") -> nn.Sequential:
    if kind == "down":
        conv = nn.Conv1d(cin, cout, 4, stride=2, padding=1)
    elif kind == "up":
        conv = nn.ConvTranspose1d(cin, cout, 4, stride=2, padding=1)
    else:
        conv = nn.Conv1d(cin, cout, 7, padding=3)
    return nn.Sequential(conv, nn.GroupNorm(min(8, cout), cout), nn.SiLU())


class AudioAutoencoder(nn.Module):
    """(B, S) in [-1, 1] <-> latents (B, latent_channels, S/d); d = ``downsample`` (a power of 2)."""

    def __init__(self, latent_channels: int = 8, width: int = 32, downsample: int = 16):
        super().__init__()
        stages = int(math.log2(downsample))
        if downsample < 1 or 2**stages != downsample:
            raise ValueError(f"downsample must be a power of 2, got {downsample}")
        self.latent_channels, self.width, self.downsample = latent_channels, width, downsample
        widths = [min(width * 2**i, width * 4) for i in range(stages + 1)]
        enc = [block1d(1, widths[0])]
        for i in range(stages):
            enc += [block1d(widths[i], widths[i + 1], "down"), block1d(widths[i + 1], widths[i + 1])]
        enc.append(nn.Conv1d(widths[-1], latent_channels, 3, padding=1))
        self.encoder = nn.Sequential(*enc)
        dec = [block1d(latent_channels, widths[-1])]
        for i in reversed(range(stages)):
            dec += [block1d(widths[i + 1], widths[i], "up"), block1d(widths[i], widths[i])]
        dec.append(nn.Conv1d(widths[0], 1, 7, padding=3))
        self.decoder = nn.Sequential(*dec)
        self.register_buffer("scale", torch.ones(()))  # latent scale factor

    @property
    def config(self) -> dict:
        return {"kind": "AudioAutoencoder", "latent_channels": self.latent_channels, "width": self.width,
                "downsample": self.downsample}

    def _check_length(self, x: Tensor) -> None:
        if x.shape[-1] % self.downsample:
            raise ValueError(f"waveform length {x.shape[-1]} is not a multiple of downsample {self.downsample}; "
                             "pad or trim the clip (AudioLatentCodec pads for you)")

    def encode_latents(self, x: Tensor) -> Tensor:
        """(B, S) -> scaled latents (B, c, S/d)."""
        self._check_length(x)
        return self.encoder(x[:, None]) * self.scale

    def decode_latents(self, z: Tensor) -> Tensor:
        """Scaled latents (B, c, L) -> (B, L*d)."""
        return self.decoder(z / self.scale)[:, 0]

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x[:, None]))[:, 0]

    def reconstruction_loss(self, batch) -> Tensor:
        """MSE of the reconstructed waveform plus 1e-4 * mean latent^2; batch: (B, S) tensor or dict."""
        x = waveforms(batch)
        self._check_length(x)
        z = self.encoder(x[:, None])
        return nn.functional.mse_loss(self.decoder(z)[:, 0], x) + 1e-4 * z.pow(2).mean()

    @torch.no_grad()
    def fit_scale(self, batch) -> float:
        """Set ``scale`` = 1 / std of the unscaled latents of ``batch``; returns the new scale."""
        std = self.encoder(waveforms(batch)[:, None]).float().std().clamp_min(1e-6)
        self.scale.fill_(1.0 / float(std))
        return float(self.scale)

    def save(self, folder: str | Path) -> Path:
        return save_module(self, folder, self.config)

    @classmethod
    def load(cls, folder: str | Path) -> AudioAutoencoder:
        config, state = read_saved(folder, "AudioAutoencoder")
        model = cls(**config)
        model.load_state_dict(state, strict=True)
        return model
