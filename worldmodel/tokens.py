"""The packed multi-modal token sequence: the one data structure the backbone consumes.

Every token carries its own flow time (``tau``) and its own (t, h, w) RoPE position. Tokens of one
modality form contiguous segments whose layout is static Python metadata, so the model slices
segments without host synchronisation (the policy's sampling loop can be captured in a CUDA graph).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

MODALITIES = ("image", "video", "audio", "action", "state")
# Modalities that only ever enter as clean conditioning tokens (tau = 0, no loss): proprioception.
CONDITIONING_MODALITIES = ("state",)

Layout = tuple[tuple[str, int], ...]


@dataclass
class TokenSequence:
    """A batch of token sequences that share one layout.

    x:          (B, N, C) token values; C = widest modality in ``layout``, narrower ones zero-padded.
    tau:        (B, N) flow time per token (0 = data, 1 = pure noise).
    pos:        (N, 3) (t, h, w) coordinates for 3-D RoPE, shared across the batch.
    layout:     contiguous segments ``((modality, n_tokens), ...)``; the n sum to N.
    loss_mask:  (B, N) bool, tokens that are noised and trained (sampled, at inference).
    text:       (B, L, Dt) text features, or None for the unconditional (null) text.
    text_mask:  (B, L) bool, True for real text tokens.
    text_drop:  (B,) bool, rows that take the model's null text (dropped or blank captions) although
        ``text`` is given; such a row equals the same row with text None. None = no row dropped.
    time_levels/time_index: optional factorisation ``tau == time_levels.gather(1, time_index)``
        with K distinct times per sample, so adaLN modulation is computed K times, not N times.
    """

    x: Tensor
    tau: Tensor
    pos: Tensor
    layout: Layout
    loss_mask: Tensor
    text: Tensor | None = None
    text_mask: Tensor | None = None
    time_levels: Tensor | None = None
    time_index: Tensor | None = None
    text_drop: Tensor | None = None

    def __post_init__(self) -> None:
        validate_layout(self.layout)
        n = sum(count for _, count in self.layout)
        if self.x.dim() != 3 or self.x.shape[1] != n:
            raise ValueError(f"TokenSequence.x must be (B, {n}, C) for layout {self.layout}, got {tuple(self.x.shape)}")
        batch = self.x.shape[0]
        if tuple(self.tau.shape) != (batch, n):
            raise ValueError(f"TokenSequence.tau must be ({batch}, {n}), got {tuple(self.tau.shape)}")
        if tuple(self.pos.shape) != (n, 3):
            raise ValueError(f"TokenSequence.pos must be ({n}, 3), got {tuple(self.pos.shape)}")
        if tuple(self.loss_mask.shape) != (batch, n):
            raise ValueError(f"TokenSequence.loss_mask must be ({batch}, {n}), got {tuple(self.loss_mask.shape)}")
        if self.text is not None and (self.text.dim() != 3 or self.text.shape[0] != batch):
            raise ValueError(f"TokenSequence.text must be ({batch}, L, Dt), got {tuple(self.text.shape)}")
        if self.text_drop is not None and tuple(self.text_drop.shape) != (batch,):
            raise ValueError(f"TokenSequence.text_drop must be ({batch},), got {tuple(self.text_drop.shape)}")
        if (self.time_levels is None) != (self.time_index is None):
            raise ValueError("time_levels and time_index must be given together")

    @property
    def batch_size(self) -> int:
        return self.x.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1]

    def with_values(self, x: Tensor, tau: Tensor | None = None, **changes) -> TokenSequence:
        """Copy with new token values (and optionally new times); a new tau drops the level factorisation."""
        if tau is not None:
            changes.setdefault("time_levels", None)
            changes.setdefault("time_index", None)
            changes["tau"] = tau
        return replace(self, x=x, **changes)

    def to(self, device: torch.device | str) -> TokenSequence:
        def move(value):
            return value.to(device) if isinstance(value, Tensor) else value

        return TokenSequence(**{name: move(getattr(self, name)) for name in self.__dataclass_fields__})


def validate_layout(layout: Layout) -> None:
    """Raise ValueError if a layout names an unknown modality or a non-positive count."""
    if not layout:
        raise ValueError("a TokenSequence layout needs at least one segment")
    for modality, count in layout:
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r} in layout; valid ones: {', '.join(MODALITIES)}")
        if int(count) <= 0:
            raise ValueError(f"segment {modality!r} has {count} tokens; each segment needs at least one")


def segment_slices(layout: Layout) -> list[tuple[str, slice]]:
    """``[(modality, slice into the N axis), ...]`` in layout order."""
    out, start = [], 0
    for modality, count in layout:
        out.append((modality, slice(start, start + count)))
        start += count
    return out


def channel_mask(layout: Layout, token_dim: dict[str, int], channels: int, device=None) -> Tensor:
    """(N, C) bool: True where a channel is real for that token's modality (False in the zero padding)."""
    rows = []
    for modality, count in layout:
        row = torch.arange(channels, device=device) < token_dim[modality]
        rows.append(row.expand(count, channels))
    return torch.cat(rows, dim=0)


def concat_segments(
    segments: list[tuple[str, Tensor, Tensor]], channels: int | None = None
) -> tuple[Tensor, Tensor, Layout]:
    """Pack ``[(modality, values (B, n, C_m), pos (n, 3)), ...]`` into (x (B, N, C), pos (N, 3), layout).

    Values are zero-padded on the channel axis to ``channels`` (default: the widest segment).
    """
    if not segments:
        raise ValueError("concat_segments needs at least one segment")
    width = channels or max(values.shape[-1] for _, values, _ in segments)
    xs, positions, layout = [], [], []
    for modality, values, pos in segments:
        if values.shape[-1] > width:
            raise ValueError(f"segment {modality!r} has {values.shape[-1]} channels, more than {width}")
        if pos.shape != (values.shape[1], 3):
            raise ValueError(f"segment {modality!r}: pos must be ({values.shape[1]}, 3), got {tuple(pos.shape)}")
        xs.append(torch.nn.functional.pad(values, (0, width - values.shape[-1])))
        positions.append(pos.to(values.device, torch.float32))
        layout.append((modality, values.shape[1]))
    return torch.cat(xs, dim=1), torch.cat(positions, dim=0), tuple(layout)
