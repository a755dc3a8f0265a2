"""Video-action training modes, made possible by per-token flow times.

One RT-1 window (context frames, future frames, an action chunk) becomes one TokenSequence whose
per-token times say what the model is asked to do (docs/ARCHITECTURE.md, "Actions and video-action fine-tuning"):

    mode       context frames   future frames        actions              trained on
    policy     clean (tau 0)    left out            noised               actions
    joint      clean            noised               noised               future + actions
    dynamics   clean            noised               clean (tau 0)        future
    video      clean            noised               absent (tau 1)       future

Positions share one time axis: a frame at step offset o has t = o; the action of step i (acting
from the frame at offset i) has t = i. ``loss_mask`` marks the noised tokens. Action slots past an
episode's end do not exist at deployment, so they are absent (tau = 1, pure noise, no loss) in every
mode, never clean tokens the model could read the episode's end from. Optional proprioception (one
state token per context frame, at that frame's time) is clean conditioning in every mode. The policy
samples with exactly the ``policy`` layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from worldmodel.state import STATE_DIM
from worldmodel.tokens import TokenSequence, concat_segments

MODES = ("policy", "joint", "dynamics", "video")
ACTION_DIM = 7  # x, y, z, roll, pitch, yaw (normalized to [-1, 1]) and gripper (as is)
ACTION_TOKEN_DIM = ACTION_DIM + 1  # + terminate as -1 / +1


@dataclass(frozen=True)
class WindowLayout:
    """Static geometry of a window: how many frames, at which stride, and the action horizon."""

    context_frames: int  # Tc clean frames up to and including the current step
    future_frames: int  # Tf predicted frames after the current step
    frame_stride: int  # steps between consecutive frames
    horizon: int  # H actions, one per step from the current step on

    def context_offsets(self) -> list[int]:
        return [-(self.context_frames - 1 - i) * self.frame_stride for i in range(self.context_frames)]

    def future_offsets(self) -> list[int]:
        return [(i + 1) * self.frame_stride for i in range(self.future_frames)]


def action_tokens(actions: Tensor, terminate: Tensor) -> Tensor:
    """(B, H, 7) normalized actions + (B, H) terminate in {0, 1} -> (B, H, 8) action tokens."""
    return torch.cat([actions, (terminate.float() * 2.0 - 1.0)[..., None]], dim=-1)


def split_action_tokens(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(B, H, 8) action tokens -> ((B, H, 7) normalized actions, (B, H) terminate probability-like in [0, 1])."""
    return tokens[..., :ACTION_DIM], ((tokens[..., ACTION_DIM] + 1.0) / 2.0).clamp(0.0, 1.0)


def action_positions(horizon: int, device=None) -> Tensor:
    """(H, 3) positions of the action chunk: t = step offset, h = w = 0."""
    pos = torch.zeros(horizon, 3, device=device)
    pos[:, 0] = torch.arange(horizon, device=device, dtype=torch.float32)
    return pos


def frame_tokens(codec, frames: Tensor, offsets: list[int]) -> tuple[Tensor, Tensor]:
    """Encode (B, T, 3, h, w) frames; returns tokens (B, T*P, C) and positions (T*P, 3) with t = step offset."""
    tokens, pos = codec.encode(frames)  # (B, T*P, C), (T*P, 3) with t = frame index 0..T-1
    pos = pos.clone().float()
    offset_table = torch.tensor(offsets, dtype=torch.float32, device=pos.device)  # (T,)
    pos[:, 0] = offset_table[pos[:, 0].long()]
    return tokens, pos


def build_sequence(
    mode: str,
    codec,
    context: Tensor,
    future: Tensor | None,
    actions: Tensor,
    terminate: Tensor,
    action_valid: Tensor,
    geometry: WindowLayout,
    text: Tensor | None = None,
    text_mask: Tensor | None = None,
    state: Tensor | None = None,
) -> TokenSequence:
    """One mode's TokenSequence (x holds CLEAN values; the objective noises the loss-mask tokens).

    context: (B, Tc, 3, h, w) and future: (B, Tf, 3, h, w) frames in [-1, 1] (future ignored in policy mode);
    actions: (B, H, 7) normalized; terminate: (B, H) in {0, 1}; action_valid: (B, H) bool;
    state: optional (B, Tc, 8) normalized proprioception read with the context frames.
    Layout: video (context [+ future]), then state (if given), then the action chunk (always last).
    """
    if mode not in MODES:
        raise ValueError(f"unknown training mode {mode!r}; valid modes: {', '.join(MODES)}")
    batch, device = context.shape[0], context.device
    ctx_tokens, ctx_pos = frame_tokens(codec, context, geometry.context_offsets())
    act = action_tokens(actions, terminate)  # (B, H, 8)
    act_pos = action_positions(geometry.horizon, device)
    n_ctx, n_act = ctx_tokens.shape[1], act.shape[1]
    segments = [("action", act, act_pos)]
    if state is not None:
        segments.insert(0, ("state", *state_tokens(state, geometry)))
    if mode == "policy":
        x, pos, layout = concat_segments([("video", ctx_tokens, ctx_pos), *segments])
        n_fut = 0
    else:
        if future is None:
            raise ValueError(f"mode {mode!r} needs future frames; the reader must be built with future_frames > 0")
        fut_tokens, fut_pos = frame_tokens(codec, future, geometry.future_offsets())
        n_fut = fut_tokens.shape[1]
        # One video segment (context then future frames), then the action chunk.
        video = torch.cat([ctx_tokens, fut_tokens], dim=1)
        x, pos, layout = concat_segments([("video", video, torch.cat([ctx_pos, fut_pos])), *segments])
    tau = torch.zeros(batch, x.shape[1], device=device)  # (B, N)
    loss_mask = torch.zeros(batch, x.shape[1], dtype=torch.bool, device=device)  # (B, N)
    fut = slice(n_ctx, n_ctx + n_fut)
    acts = slice(x.shape[1] - n_act, x.shape[1])
    valid = action_valid.to(device=device, dtype=torch.bool)  # (B, H)
    if mode in ("policy", "joint"):
        loss_mask[:, acts] = valid
    if mode in ("joint", "dynamics", "video"):
        loss_mask[:, fut] = True
    if mode == "video":
        tau[:, acts] = 1.0  # absent: pure noise, carries no information
    else:
        tau[:, acts] = torch.where(valid, tau[:, acts], 1.0)  # past the episode's end: absent, as at deployment
    return TokenSequence(x=x, tau=tau, pos=pos, layout=layout, loss_mask=loss_mask, text=text, text_mask=text_mask)


def state_tokens(state: Tensor, geometry: WindowLayout) -> tuple[Tensor, Tensor]:
    """(B, Tc, 8) normalized state -> tokens (B, Tc, 8) and positions (Tc, 3): t = the context frame's offset."""
    if state.ndim != 3 or state.shape[1] != geometry.context_frames or state.shape[2] != STATE_DIM:
        raise ValueError(f"state must be (B, {geometry.context_frames}, {STATE_DIM}) (one per context frame), "
                         f"got {tuple(state.shape)}")
    pos = torch.zeros(geometry.context_frames, 3, device=state.device)
    pos[:, 0] = torch.tensor(geometry.context_offsets(), dtype=torch.float32, device=state.device)
    return state.float(), pos


def draw_mode(probabilities: dict[str, float], generator: torch.Generator) -> str:
    """Draw one mode name with the given (unnormalised) probabilities."""
    unknown = set(probabilities) - set(MODES)
    if unknown:
        raise ValueError(f"unknown training mode(s) {sorted(unknown)}; valid modes: {', '.join(MODES)}")
    names = [m for m in MODES if probabilities.get(m, 0.0) > 0]
    if not names:
        raise ValueError("all training mode probabilities are zero; give at least one mode a positive probability")
    weights = torch.tensor([float(probabilities[m]) for m in names])
    return names[int(torch.multinomial(weights, 1, generator=generator))]
