"""A pretrained diffusers ``AutoencoderKL`` from a LOCAL folder as a frozen frame autoencoder.

Optional dependency (``pip install -e .[diffusers]``), imported only when used. Nothing is downloaded:
the folder must hold what ``AutoencoderKL.save_pretrained`` wrote (config.json + weights). Latents are
the posterior mean, shifted and scaled with the VAE's own ``shift_factor`` / ``scaling_factor``:
``z = (mean - shift) * scale``. Wrap with ``LatentCodec`` for tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn


def import_autoencoder_kl():
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise ImportError("DiffusersVAE needs the optional `diffusers` package: pip install -e .[diffusers]") from err
    return AutoencoderKL


class DiffusersVAE(nn.Module):
    """Frozen AutoencoderKL: ``encode_latents`` (B, 3, H, W) -> (B, c, H/d, W/d), ``decode_latents`` back."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)

    @classmethod
    def from_folder(cls, path: str | Path, dtype: torch.dtype | None = None) -> DiffusersVAE:
        """Load an AutoencoderKL saved with ``save_pretrained`` in ``path`` (local files only, no hub)."""
        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} does not hold a diffusers AutoencoderKL (no config.json); save one with "
                                    "AutoencoderKL.save_pretrained(path), or for a full pipeline folder point at its "
                                    "vae/ subfolder")
        AutoencoderKL = import_autoencoder_kl()
        kwargs = {"local_files_only": True}
        if dtype is not None:
            kwargs["torch_dtype"] = dtype
        return cls(AutoencoderKL.from_pretrained(str(path), **kwargs))

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode_latents(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, c, H/d, W/d) (posterior mean, no sampling)."""
        mean = self.vae.encode(x.to(self._dtype)).latent_dist.mean
        return (mean - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode_latents(self, z: Tensor) -> Tensor:
        """Scaled latents (B, c, h, w) -> (B, 3, h*d, w*d)."""
        return self.vae.decode(z.to(self._dtype) / self.scaling_factor + self.shift_factor).sample

    def reconstruction_loss(self, batch) -> Tensor:
        """MSE of the frozen VAE's reconstruction (for reporting; the VAE is not trained here)."""
        from worldmodel.codecs.conv_autoencoder import media_frames

        x = media_frames(batch)
        return nn.functional.mse_loss(self.decode_latents(self.encode_latents(x)).float(), x.float())
