"""Exponential moving average of a module: the Self-Flow teacher and the weights written for inference.

Kept by the Trainer (one per EMA-tracked module); the Self-Flow objective only reads ``EMA.model``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Exponential moving average of a model: the Self-Flow teacher.

    ``update`` after each optimiser step: theta_T <- d theta_T + (1 - d) theta_S, with
    d = min(decay, (1 + n) / (10 + n)) when ``warmup`` (n = updates so far), else d = decay.
    Buffers are copied. ``.model`` is a frozen eval-mode copy.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay, self.warmup, self.step = float(decay), bool(warmup), 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1.0 + self.step) / (10.0 + self.step))
        return self.decay

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        d = self.current_decay()
        ema_params = dict(self.model.named_parameters())
        src_params = dict(student.named_parameters())
        if ema_params.keys() != src_params.keys():
            raise ValueError("EMA.update: student parameters differ from the teacher's; build EMA from this model")
        names = list(ema_params)
        torch._foreach_lerp_([ema_params[n] for n in names], [src_params[n].detach() for n in names], 1.0 - d)
        src_buffers = dict(student.named_buffers())
        for name, buf in self.model.named_buffers():
            buf.copy_(src_buffers[name])
        self.step += 1

    def state_dict(self) -> dict:
        """{"step", "decay", "warmup", "model": teacher state dict} (tensors only under "model")."""
        return {"step": self.step, "decay": self.decay, "warmup": self.warmup, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        missing = {"step", "model"} - set(state)
        if missing:
            raise ValueError(f"EMA state is missing {sorted(missing)}; pass the dict from EMA.state_dict()")
        self.model.load_state_dict(state["model"], strict=True)
        self.step = int(state["step"])
        self.decay = float(state.get("decay", self.decay))
        self.warmup = bool(state.get("warmup", self.warmup))


__all__ = ["EMA"]
