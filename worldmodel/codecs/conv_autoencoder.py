"""A small convolutional frame autoencoder (downsample 4x by default), trainable like any other module.

``reconstruction_loss(batch)`` is its training objective (MSE plus a tiny latent penalty);
``fit_scale(x)`` sets the latent scale factor so scaled latents have about unit std, as diffusion
latents should. Saved as ``config.json`` + ``model.safetensors``; wrap with ``LatentCodec`` for tokens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def save_module(module: nn.Module, folder: str | Path, config: dict) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (state dict, contiguous) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def read_saved(folder: str | Path, kind: str) -> tuple[dict, dict[str, Tensor]]:
    """(config without 'kind', state dict) of a module saved by ``save_module`` with ``config['kind'] == kind``."""
    folder = Path(folder).expanduser()
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder} must hold {CONFIG} and {WEIGHTS} written by {kind}.save(folder); "
                                "train and save an autoencoder first, or point the codec path at that folder")
    config = json.loads((folder / CONFIG).read_text())
    if config.pop("kind", None) != kind:
        raise ValueError(f"{folder / CONFIG} is not a {kind} checkpoint; point the codec path at one")
    return config, load_file(str(folder / WEIGHTS))


def media_frames(batch) -> Tensor:
    """(N, 3, H, W) frames from a tensor (images or videos) or a collated batch dict."""
    if isinstance(batch, dict):
        batch = batch["image"] if "image" in batch else batch["video"]
    return batch.reshape(-1, *batch.shape[-3:])


def conv_block(cin: int, cout: int, stride: int = 1, transpose: bool = False) -> nn.Sequential:
    if transpose:
        conv = nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1)
    else:
        conv = nn.Conv2d(cin, cout, 4 if stride == 2 else 3, stride=stride, padding=1)
    return nn.Sequential(conv, nn.GroupNorm(min(8, cout), cout), nn.SiLU())


class ConvAutoencoder(nn.Module):
    """(B, C, H, W) in [-1, 1] <-> latents (B, latent_channels, H/d, W/d), d = ``downsample`` (a power of 2)."""

    def __init__(self, in_channels: int = 3, latent_channels: int = 4, width: int = 32, downsample: int = 4):
        super().__init__()
        stages = int(math.log2(downsample))
        if downsample < 1 or 2**stages != downsample:
            raise ValueError(f"downsample must be a power of 2, got {downsample}")
        self.in_channels, self.latent_channels = in_channels, latent_channels
        self.width, self.downsample = width, downsample
        widths = [width * 2**i for i in range(stages + 1)]
        enc = [conv_block(in_channels, widths[0])]
        for i in range(stages):
            enc += [conv_block(widths[i], widths[i + 1], stride=2), conv_block(widths[i + 1], widths[i + 1])]
        enc.append(nn.Conv2d(widths[-1], latent_channels, 3, padding=1))
        self.encoder = nn.Sequential(*enc)
        dec = [conv_block(latent_channels, widths[-1])]
        for i in reversed(range(stages)):
            dec += [conv_block(widths[i + 1], widths[i], transpose=True), conv_block(widths[i], widths[i])]
        dec.append(nn.Conv2d(widths[0], in_channels, 3, padding=1))
        self.decoder = nn.Sequential(*dec)
        self.register_buffer("scale", torch.ones(()))  # latent scale factor: encode_latents = encoder(x) * scale

    @property
    def config(self) -> dict:
        return {"kind": "ConvAutoencoder", "in_channels": self.in_channels, "latent_channels": self.latent_channels,
                "width": self.width, "downsample": self.downsample}

    def encode_latents(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> scaled latents (B, c, H/d, W/d)."""
        return self.encoder(x) * self.scale

    def decode_latents(self, z: Tensor) -> Tensor:
        """Scaled latents (B, c, h, w) -> (B, C, h*d, w*d)."""
        return self.decoder(z / self.scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))

    def reconstruction_loss(self, batch) -> Tensor:
        """MSE of the reconstruction plus 1e-4 * mean latent^2 (keeps latents bounded); batch: tensor or dict."""
        x = media_frames(batch)
        z = self.encoder(x)
        return nn.functional.mse_loss(self.decoder(z), x) + 1e-4 * z.pow(2).mean()

    @torch.no_grad()
    def fit_scale(self, x) -> float:
        """Set ``scale`` = 1 / std of the unscaled latents of ``x`` (tensor or dict); returns the new scale."""
        std = self.encoder(media_frames(x)).float().std().clamp_min(1e-6)
        self.scale.fill_(1.0 / float(std))
        return float(self.scale)

    def save(self, folder: str | Path) -> Path:
        return save_module(self, folder, self.config)

    @classmethod
    def load(cls, folder: str | Path) -> ConvAutoencoder:
        """Rebuild from ``save(folder)`` output (strict weight loading)."""
        config, state = read_saved(folder, "ConvAutoencoder")
        model = cls(**config)
        model.load_state_dict(state, strict=True)
        return model
