"""Patchifying codecs: media (or autoencoder latents) <-> tokens with (t, h, w) positions.

Every codec has ``token_dim``, ``encode(x) -> (tokens (B, N, C), pos (N, 3))`` and
``decode(tokens, shape) -> x`` where ``shape`` is the media shape that was encoded (its batch size may
differ from the tokens'). Positions follow the conventions: images t = 0, video t = frame index,
audio t = time index with h = w = 0.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn


def grid_positions(t: int, h: int, w: int, device=None) -> Tensor:
    """(t*h*w, 3) float (t, h, w) coordinates in row-major (t, h, w) order."""
    tt, hh, ww = torch.meshgrid(
        torch.arange(t, device=device), torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
    )
    return torch.stack([tt, hh, ww], dim=-1).reshape(-1, 3).float()


def line_positions(n: int, device=None) -> Tensor:
    """(n, 3) positions (i, 0, 0) of a 1-D (audio) token sequence."""
    pos = torch.zeros(n, 3, device=device)
    pos[:, 0] = torch.arange(n, device=device, dtype=torch.float32)
    return pos


class PatchCodec:
    """Identity pixel patchifier: (B, C, H, W) images or (B, T, C, H, W) videos <-> (B, N, p*p*C) tokens.

    The round trip is exact. H and W must be multiples of ``patch``.
    """

    def __init__(self, patch: int = 4, channels: int = 3):
        if patch < 1 or channels < 1:
            raise ValueError(f"PatchCodec needs patch >= 1 and channels >= 1, got patch={patch}, channels={channels}")
        self.patch, self.channels = int(patch), int(channels)
        self.token_dim = self.patch * self.patch * self.channels

    def _check(self, shape) -> None:
        if len(shape) not in (4, 5) or shape[-3] != self.channels:
            raise ValueError(f"PatchCodec expects (B, {self.channels}, H, W) images or (B, T, {self.channels}, H, W) "
                             f"videos, got {tuple(shape)}")
        if shape[-1] % self.patch or shape[-2] % self.patch:
            raise ValueError(f"frame size {tuple(shape[-2:])} is not a multiple of patch {self.patch}; "
                             "resize the data or choose a patch size that divides it")

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x.shape)
        p = self.patch
        h, w = x.shape[-2] // p, x.shape[-1] // p
        if x.dim() == 4:
            tokens = rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)  # (B, h*w, p*p*C)
            return tokens, grid_positions(1, h, w, x.device)
        tokens = rearrange(x, "b t c (h p) (w q) -> b (t h w) (p q c)", p=p, q=p)  # (B, T*h*w, p*p*C)
        return tokens, grid_positions(x.shape[1], h, w, x.device)

    def decode(self, tokens: Tensor, shape) -> Tensor:
        shape = tuple(shape)
        self._check(shape)
        p = self.patch
        h, w = shape[-2] // p, shape[-1] // p
        if len(shape) == 4:
            return rearrange(tokens, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=p, q=p)
        return rearrange(tokens, "b (t h w) (p q c) -> b t c (h p) (w q)", t=shape[1], h=h, w=w, p=p, q=p)

    def num_tokens(self, shape) -> int:
        """Tokens produced for a media shape (without encoding anything)."""
        frames = shape[1] if len(shape) == 5 else 1
        return frames * (shape[-2] // self.patch) * (shape[-1] // self.patch)


class AudioPatchCodec:
    """(B, S) waveforms <-> (B, ceil(S / frame), frame) tokens of raw samples; positions (i, 0, 0).

    A length that is not a multiple of ``frame`` is zero-padded on encode and trimmed on decode.
    """

    def __init__(self, frame: int = 64):
        if frame < 1:
            raise ValueError(f"AudioPatchCodec needs frame >= 1, got {frame}")
        self.frame = int(frame)
        self.token_dim = self.frame

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() != 2:
            raise ValueError(f"AudioPatchCodec expects (B, S) mono waveforms, got {tuple(x.shape)}")
        pad = (-x.shape[1]) % self.frame
        tokens = nn.functional.pad(x, (0, pad)).reshape(x.shape[0], -1, self.frame)  # (B, N, frame)
        return tokens, line_positions(tokens.shape[1], x.device)

    def decode(self, tokens: Tensor, shape) -> Tensor:
        return tokens.reshape(tokens.shape[0], -1)[:, : tuple(shape)[-1]]


def _module_device(module: nn.Module) -> torch.device:
    return next(iter(module.parameters())).device


class LatentCodec:
    """Frames through an autoencoder's latents, patchified: images (B, 3, H, W) / videos (B, T, 3, H, W).

    ``autoencoder`` provides ``encode_latents(x) -> (B, c, H/d, W/d)`` (scaled to ~unit std),
    ``decode_latents(z)``, ``latent_channels`` and ``downsample`` (d). The autoencoder is frozen here and
    follows the device of the data.
    """

    def __init__(self, autoencoder: nn.Module, patch: int = 1):
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.down = int(autoencoder.downsample)
        self.latent = PatchCodec(patch, int(autoencoder.latent_channels))
        self.token_dim = self.latent.token_dim

    def _latent_shape(self, shape) -> tuple[int, ...]:
        shape = tuple(shape)
        if shape[-1] % self.down or shape[-2] % self.down:
            raise ValueError(f"frame size {shape[-2:]} is not a multiple of the autoencoder's downsampling "
                             f"{self.down}; resize the data")
        return (*shape[:-3], self.latent.channels, shape[-2] // self.down, shape[-1] // self.down)

    def _follow(self, x: Tensor) -> None:
        if _module_device(self.autoencoder) != x.device:
            self.autoencoder.to(x.device)

    @torch.no_grad()
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._follow(x)
        frames = x.reshape(-1, *x.shape[-3:])  # (B*T, 3, H, W)
        z = self.autoencoder.encode_latents(frames).float()  # (B*T, c, h, w)
        z = z.reshape(*x.shape[:-3], *z.shape[1:])
        return self.latent.encode(z)

    @torch.no_grad()
    def decode(self, tokens: Tensor, shape) -> Tensor:
        self._follow(tokens)
        latent_shape = self._latent_shape(shape)
        z = self.latent.decode(tokens, latent_shape)  # (B, [T,] c, h, w)
        frames = self.autoencoder.decode_latents(z.reshape(-1, *z.shape[-3:])).float()  # (B*T, 3, H, W)
        return frames.reshape(*z.shape[:-3], *frames.shape[1:])


class AudioLatentCodec:
    """(B, S) waveforms through a 1-D autoencoder's latents (B, c, S/d); ``frame`` latent steps per token.

    Tokens (B, L/frame, frame*c), positions (i, 0, 0). Lengths are zero-padded to a multiple of d*frame.
    """

    def __init__(self, autoencoder: nn.Module, frame: int = 1):
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.down, self.frame = int(autoencoder.downsample), int(frame)
        self.channels = int(autoencoder.latent_channels)
        self.token_dim = self.frame * self.channels

    @torch.no_grad()
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() != 2:
            raise ValueError(f"AudioLatentCodec expects (B, S) mono waveforms, got {tuple(x.shape)}")
        if _module_device(self.autoencoder) != x.device:
            self.autoencoder.to(x.device)
        pad = (-x.shape[1]) % (self.down * self.frame)
        z = self.autoencoder.encode_latents(nn.functional.pad(x, (0, pad))).float()  # (B, c, L)
        tokens = rearrange(z, "b c (n f) -> b n (f c)", f=self.frame)  # (B, N, frame*c)
        return tokens, line_positions(tokens.shape[1], x.device)

    @torch.no_grad()
    def decode(self, tokens: Tensor, shape) -> Tensor:
        if _module_device(self.autoencoder) != tokens.device:
            self.autoencoder.to(tokens.device)
        z = rearrange(tokens, "b n (f c) -> b c (n f)", f=self.frame, c=self.channels)
        return self.autoencoder.decode_latents(z).float()[:, : tuple(shape)[-1]]
