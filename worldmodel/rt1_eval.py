"""Offline evaluation of a video-action model on held-out RT-1 windows.

Actions are sampled in the policy layout (clean context frames, noised action chunk, no future
frames), exactly as the policy runs, and compared with the recorded actions: error per dimension in
the data's own units, gripper sign accuracy and terminate accuracy, beside the predict-the-mean
baseline (the training mean of each dimension). A side-by-side video shows predicted against true
future frames.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from worldmodel.action_modes import ACTION_DIM, split_action_tokens
from worldmodel.actions import DIM_NAMES
from worldmodel.sampling import sample


def trained_shifts(task) -> dict[str, float]:
    """The per-modality time shifts the task's objective trains with (the sampler must integrate on them)."""
    return dict(task.objective.config.modality_shift)


@torch.no_grad()
def predict_actions(model: nn.Module, task, batch: dict, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled (B, H, 7) normalized actions and (B, H) terminate probabilities for a window batch."""
    device = next(model.parameters()).device
    # Exactly what the policy builds: every action slot is sampled (a deployed policy never knows where the
    # episode ends); only the valid steps are scored by the caller.
    policy_batch = {**batch, "action_valid": torch.ones_like(batch["action_valid"], dtype=torch.bool)}
    seq = task.sequence(policy_batch, "policy", device, drop_instructions=False, model=model)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = sample(model, seq, steps=steps, generator=generator, modality_shift=trained_shifts(task))
    n_act = task.geometry.horizon
    tokens = out.x[:, -n_act:, : model.token_dim["action"]]  # (B, H, 8)
    return split_action_tokens(tokens)


@torch.no_grad()
def evaluate_offline(
    model: nn.Module, task, batches, normalizer, mean_action: np.ndarray, steps: int = 10, seed: int = 0,
    max_batches: int | None = None,
) -> dict:
    """Metrics over held-out window batches (only valid action steps count).

    mean_action: (7,) training mean in raw units, the predict-the-mean baseline.
    """
    abs_err, base_err, grip_ok, term_ok, count = [], [], [], [], 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        actions, terminate = predict_actions(model, task, batch, steps, seed + i)
        valid = batch["action_valid"].numpy().astype(bool)  # (B, H)
        pred_raw = normalizer.unnormalize(actions.float().cpu().numpy())  # (B, H, 7)
        true_raw = batch["actions_raw"].numpy()  # (B, H, 7)
        abs_err.append(np.abs(pred_raw - true_raw)[valid])
        base_err.append(np.abs(mean_action[None, None] - true_raw)[valid])
        true_grip = np.sign(true_raw[..., ACTION_DIM - 1])[valid]
        pred_grip = np.sign(pred_raw[..., ACTION_DIM - 1])[valid]
        grip_ok.append((pred_grip == true_grip)[true_grip != 0])
        term_ok.append(((terminate.cpu().numpy() > 0.5) == (batch["terminate"].numpy() > 0.5))[valid])
        count += int(valid.sum())
    if count == 0:
        raise ValueError("offline evaluation saw no valid action steps: is the held-out split empty?")
    err, base = np.concatenate(abs_err), np.concatenate(base_err)
    grip = np.concatenate(grip_ok)
    metrics = {
        "steps_evaluated": count,
        "action_mae": float(err[:, : ACTION_DIM - 1].mean()),
        "mean_baseline_mae": float(base[:, : ACTION_DIM - 1].mean()),
        "gripper_sign_accuracy": float(grip.mean()) if grip.size else float("nan"),
        "terminate_accuracy": float(np.concatenate(term_ok).mean()),
    }
    for d, name in enumerate(DIM_NAMES):
        metrics[f"mae/{name}"] = float(err[:, d].mean())
        metrics[f"baseline_mae/{name}"] = float(base[:, d].mean())
    return metrics


@torch.no_grad()
def write_prediction_video(model: nn.Module, task, batch: dict, path: Path, steps: int = 20, seed: int = 0,
                           rows: int = 4) -> Path:
    """GIF: per row, the last context frame, then predicted | true future frames (joint mode)."""
    from worldmodel import media_io

    device = next(model.parameters()).device
    seq = task.sequence(batch, "joint", device, drop_instructions=False, model=model)
    out = sample(model, seq, steps=steps, generator=torch.Generator(device=device).manual_seed(seed),
                 modality_shift=trained_shifts(task))
    context, future = batch["context"][:rows], batch["future"][:rows]  # (R, Tc/Tf, 3, h, w)
    n_video = dict(seq.layout)["video"]  # context then future frames, encoded once (same tokens per frame)
    n_ctx = n_video * context.shape[1] // (context.shape[1] + future.shape[1])
    n_fut = n_video - n_ctx
    video_dim = model.token_dim["video"]
    pred = task.codec.decode(out.x[:rows, n_ctx: n_ctx + n_fut, :video_dim], future.shape).clamp(-1, 1).cpu()
    frames = []
    for t in range(future.shape[1]):
        panels = torch.stack([context[:, -1], pred[:, t], future[:, t]], dim=1)  # (R, 3 panels, 3, h, w)
        grid = media_io.image_grid(panels.reshape(-1, *panels.shape[2:]).numpy(), columns=3)
        frames.append(media_io.upscale(grid, 4))
    return media_io.write_frames(Path(path), frames, fps=2)
