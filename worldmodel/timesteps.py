"""Timestep distributions p(t) for training and shifted schedules for the samplers.

Convention (docs/ARCHITECTURE.md, kept here): x_t = (1 - t) x0 + t eps, t = 1 is pure noise, t = 0 is data.
A shift a > 1 moves mass toward noise: t' = a t / (1 + (a - 1) t) (SD3 / FLUX style).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

KINDS = ("uniform", "logit_normal")


def shift_time(t: Tensor, shift: float | Tensor) -> Tensor:
    """Apply t' = a t / (1 + (a - 1) t); a = 1 is the identity, a > 1 favours noisy times (a may be a tensor)."""
    if not isinstance(shift, Tensor) and shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def unshift_time(t: Tensor, shift: float) -> Tensor:
    """Inverse of ``shift_time``: t = t' / (a - (a - 1) t')."""
    if shift == 1.0:
        return t
    return t / (shift - (shift - 1.0) * t)


@dataclass(frozen=True)
class TimestepDistribution:
    """The training time distribution p(t) on [0, 1].

    kind:  "uniform" (U[0, 1]) or "logit_normal" (sigmoid of N(mean, std^2)).
    mean:  logit-normal location (ignored for uniform).
    std:   logit-normal scale (ignored for uniform).
    shift: a in t' = a t / (1 + (a - 1) t), applied after drawing; 1.0 = no shift.
    """

    kind: str = "logit_normal"  # "uniform" | "logit_normal"
    mean: float = 0.0  # logit-normal location
    std: float = 1.0  # logit-normal scale
    shift: float = 1.0  # time shift a; > 1 puts more mass near t = 1 (noise)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown timestep distribution kind {self.kind!r}; use one of {KINDS}")
        if not self.std > 0:
            raise ValueError(f"logit-normal std must be > 0, got {self.std}; pass e.g. std=1.0")
        if not self.shift > 0:
            raise ValueError(f"time shift must be > 0, got {self.shift}; use 1.0 for no shift")

    def sample(self, shape, generator: torch.Generator | None = None, device=None) -> Tensor:
        """Draw times of ``shape`` (float32) on ``device``; the generator must live on that device."""
        shape = tuple(shape) if not isinstance(shape, int) else (shape,)
        if self.kind == "uniform":
            t = torch.rand(shape, generator=generator, device=device)
        else:
            z = torch.randn(shape, generator=generator, device=device)
            t = torch.sigmoid(self.mean + self.std * z)
        return shift_time(t, self.shift)

    def cdf(self, t: Tensor | float) -> Tensor:
        """P(T <= t) for the shifted distribution (float64, for exact KS tests)."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0.0, 1.0)
        u = unshift_time(t, self.shift)
        if self.kind == "uniform":
            return u
        eps = 1e-300
        logit = torch.log(u.clamp_min(eps)) - torch.log((1.0 - u).clamp_min(eps))
        z = (logit - self.mean) / self.std
        return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


def shifted_schedule(steps: int, shift: float = 1.0, device=None) -> Tensor:
    """(steps + 1,) float32 times from 1 down to 0 for a sampler, uniform then shifted by ``shift``, made on
    ``device`` (no host-to-device copy, so it can be built inside a CUDA graph capture)."""
    if int(steps) < 1:
        raise ValueError(f"a sampler needs at least 1 step, got steps={steps}")
    if not shift > 0:
        raise ValueError(f"schedule shift must be > 0, got {shift}; use 1.0 for no shift")
    t = torch.linspace(1.0, 0.0, int(steps) + 1, dtype=torch.float64, device=device)
    return shift_time(t, float(shift)).to(torch.float32)
