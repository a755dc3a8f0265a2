"""Proprioception: the robot's own state as a conditioning modality, and its normalization.

A state vector is RT-1's two observation fields side by side: ``base_pose_tool_reached`` (7: the tool's
xyz in metres and its orientation quaternion, in the robot base frame) and ``gripper_closed`` (1: 0 open
.. 1 closed). ManiSkill3 demonstrations write the TCP pose and finger opening into the same fields
(envs.demos), and the evaluators read them from both simulators, so one layout serves all sources.

Each dimension is mapped by its 1st/99th percentiles of the training split to [-1, 1] (values beyond
are kept, softly bounded to [-3, 3]); a dimension whose spread is below ``min_half_span`` (a quaternion
component that barely moves, a constant field) is centred and scaled by that floor instead, so noise in
an almost-constant input is not blown up. Statistics are JSON, stored in every checkpoint that uses them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

STATE_DIM = 8
STATE_NAMES = ("x", "y", "z", "qw", "qx", "qy", "qz", "gripper_closed")
STATS_KIND = "rt1_state_quantiles"
LIMIT = 3.0  # normalized values are clipped to [-LIMIT, LIMIT]


def rt1_state(observation: dict) -> np.ndarray:
    """RT-1 ``steps/observation`` fields (each (..., k)) -> (..., 8) float32 [tool pose 7, gripper_closed 1]."""
    pose = np.asarray(observation["base_pose_tool_reached"], np.float32)
    closed = np.asarray(observation["gripper_closed"], np.float32).reshape(*pose.shape[:-1], 1)
    return np.concatenate([pose, closed], -1)


class StateNormalizer:
    """Per-dimension quantile normalization of (..., 8) states (numpy or torch)."""

    def __init__(self, q01, q99, min_half_span: float = 0.02, num_steps: int = 0):
        self.q01 = np.asarray(q01, np.float64).reshape(-1)
        self.q99 = np.asarray(q99, np.float64).reshape(-1)
        if self.q01.shape != (STATE_DIM,) or self.q99.shape != (STATE_DIM,):
            raise ValueError(f"state stats need {STATE_DIM} values ({', '.join(STATE_NAMES)}), got "
                             f"{self.q01.shape} and {self.q99.shape}")
        if not (np.all(np.isfinite(self.q01)) and np.all(np.isfinite(self.q99)) and np.all(self.q99 >= self.q01)):
            raise ValueError(f"state stats must be finite with q99 >= q01, got q01={self.q01}, q99={self.q99}")
        if not min_half_span > 0:
            raise ValueError(f"min_half_span must be > 0, got {min_half_span}")
        self.min_half_span, self.num_steps = float(min_half_span), int(num_steps)
        self.center = (self.q01 + self.q99) / 2.0  # (8,)
        self.half_span = np.maximum((self.q99 - self.q01) / 2.0, self.min_half_span)  # (8,)

    def normalize(self, state):
        """(..., 8) raw -> (..., 8) normalized (about [-1, 1], clipped to [-3, 3])."""
        x = state if torch.is_tensor(state) else np.asarray(state, np.float32)
        if x.shape[-1] != STATE_DIM:
            raise ValueError(f"state must be (..., {STATE_DIM}) [{', '.join(STATE_NAMES)}], got shape "
                             f"{tuple(x.shape)}")
        if torch.is_tensor(x):
            c = torch.as_tensor(self.center, dtype=x.dtype, device=x.device)
            s = torch.as_tensor(self.half_span, dtype=x.dtype, device=x.device)
            return ((x - c) / s).clamp(-LIMIT, LIMIT)
        return np.clip((x - self.center) / self.half_span, -LIMIT, LIMIT).astype(np.float32)

    def to_dict(self) -> dict:
        return {"kind": STATS_KIND, "dims": list(STATE_NAMES), "q01": self.q01.tolist(), "q99": self.q99.tolist(),
                "min_half_span": self.min_half_span, "num_steps": self.num_steps}

    @classmethod
    def from_dict(cls, d: dict) -> StateNormalizer:
        """Strict: every key must be present."""
        missing = [k for k in ("kind", "q01", "q99", "min_half_span") if k not in d]
        if missing or d.get("kind") != STATS_KIND:
            raise ValueError(f"not state stats (kind {STATS_KIND!r}); missing {missing} in keys {sorted(d)}. "
                             "Recompute them with worldmodel.state.compute_state_stats")
        return cls(d["q01"], d["q99"], d["min_half_span"], d.get("num_steps", 0))

    def __repr__(self) -> str:
        return f"StateNormalizer(q01={np.round(self.q01, 4).tolist()}, q99={np.round(self.q99, 4).tolist()})"


def stats_from_states(states: np.ndarray) -> StateNormalizer:
    """Exact quantiles of (N, 8) raw states."""
    states = np.asarray(states, np.float64)
    if states.ndim != 2 or states.shape[1] != STATE_DIM or len(states) == 0:
        raise ValueError(f"need a non-empty (N, {STATE_DIM}) array of states, got shape {states.shape}")
    q01, q99 = np.quantile(states, [0.01, 0.99], axis=0)
    return StateNormalizer(q01, q99, num_steps=len(states))


def compute_state_stats(dataset_dir: str | Path, eval_fraction: float = 0.1, threads: int = 2) -> StateNormalizer:
    """One pass over the training split's state fields (images never decoded)."""
    from worldmodel.actions import read_train_steps

    def fields(steps, tf):
        obs = steps["observation"]
        return tf.concat([obs["base_pose_tool_reached"], obs["gripper_closed"]], -1)

    return stats_from_states(read_train_steps(dataset_dir, fields, eval_fraction, None, threads, "states"))


def load_or_compute_state_stats(dataset_dir: str | Path, eval_fraction: float = 0.1,
                                cache_dir: str | Path | None = None) -> StateNormalizer:
    """State stats cached beside the data (``state_stats_train_ef<fraction>.json``), computed once."""
    from worldmodel.actions import cached_stats

    return cached_stats(dataset_dir, f"state_stats_train_ef{eval_fraction:g}.json",
                        lambda: compute_state_stats(dataset_dir, eval_fraction=eval_fraction),
                        StateNormalizer.from_dict, cache_dir)
