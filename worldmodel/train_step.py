"""Pieces of the Trainer's optimizer step that keep the hot loop free of host synchronisation.

* ``DeviceMeans``: metrics summed on the device, read once at logging time (one transfer for all keys).
* ``clip_gradients``: the global gradient norm and the clipping scale computed on the device.
* ``GradientSync``: data-parallel gradients. The EMA-tracked backbone (almost every parameter) is either
  sharded with FSDP2 (its reduce-scatter hooks run during backward) or replicated with DDP hooks
  (``torch.distributed._composable.replicate``: the module is hooked in place, so tasks keep calling
  their own references), and its all-reduce overlaps the backward pass. The remaining small modules
  (projector, text encoder), whose ``forward`` a task may never call directly, are averaged after backward.
* ``compile_blocks``: ``torch.compile`` of every block of a module in place.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from worldmodel import distributed as wdist


class DeviceMeans:
    """Running means of named metrics kept as device tensors; NaN values count as "not reported".

    ``add`` never synchronises with the host; ``means()`` reads every key in one transfer and leaves out keys
    never reported (``flow/video`` in a window without video loss tokens).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, Tensor] = {}

    def add(self, metrics: Mapping[str, Tensor | float]) -> None:
        for key, value in metrics.items():
            if isinstance(value, Tensor):
                value = value.detach().float().to(self.device, non_blocking=True)
            else:  # a Python number: a fill on the device, no host-to-device copy
                value = torch.full((), float(value), device=self.device)
            reported = ~torch.isnan(value)
            value = torch.where(reported, value, torch.zeros_like(value))
            if key in self.sums:
                self.sums[key] = self.sums[key] + value
                self.counts[key] = self.counts[key] + reported
            else:
                self.sums[key], self.counts[key] = value, reported.float()

    def means(self) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = list(self.sums)
        sums = torch.stack([self.sums[k] for k in keys])  # (K,)
        counts = torch.stack([self.counts[k] for k in keys])  # (K,)
        values = torch.stack([sums / counts.clamp_min(1.0), counts]).cpu().tolist()  # the one host sync
        return {k: mean for k, mean, count in zip(keys, values[0], values[1]) if count > 0}

    def clear(self) -> None:
        self.sums, self.counts = {}, {}


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """Global gradient L2 norm (over FSDP shards too) as a device tensor; scales gradients to ``max_norm`` when > 0.

    No host sync: the scale min(1, max_norm / norm) is applied on the device (a multiply by exactly 1 when the
    norm is below ``max_norm``).
    """
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    sharded = [p.grad for p in params if wdist._is_dtensor(p)]
    plain = [p.grad for p in params if not wdist._is_dtensor(p)]
    square = torch.zeros((), dtype=torch.float32, device=params[0].grad.device)
    for grads in (sharded, plain):
        if grads:
            n = torch.nn.utils.get_total_norm(grads)
            n = n.full_tensor() if hasattr(n, "full_tensor") else n
            square = square + n.float().square()
    total = square.sqrt()
    if max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        if plain:
            torch._foreach_mul_(plain, coef.to(plain[0].device))
        if sharded:
            torch._foreach_mul_(sharded, coef.to(sharded[0].device))
    return total


class GradientSync:
    """Averages gradients over data-parallel ranks; a no-op in a single process.

    ``micro_step(last)`` before each micro-batch's forward (only the last one of an optimizer step syncs the
    hooked backbone), ``finish()`` after the last backward (averages the parameters outside the backbone).
    """

    def __init__(self, modules: dict[str, nn.Module], params: list[nn.Parameter], backbone: str | None,
                 dist_info: wdist.DistInfo, fsdp: bool):
        self.world_size = dist_info.world_size
        self.hooked: nn.Module | None = None
        self.rest = list(params)
        self.flag_group = None
        if self.world_size <= 1 or not dist.is_initialized():
            return
        if backbone is not None:
            module = modules[backbone]
            if not fsdp:
                self.hooked = wdist.replicate_module(module, dist_info.device)
            covered = {id(p) for p in module.parameters()}
            self.rest = [p for p in params if id(p) not in covered]
        if dist.get_backend() != "gloo":  # which parameters have gradients is host knowledge: exchange it on CPU
            self.flag_group = dist.new_group(backend="gloo")

    def micro_step(self, last: bool) -> None:
        if self.hooked is not None:
            self.hooked.set_requires_gradient_sync(last)

    def finish(self) -> None:
        wdist.average_gradients(self.rest, self.world_size, flag_group=self.flag_group)


def compile_blocks(module: nn.Module) -> nn.Module:
    """``torch.compile`` each block of every ``nn.ModuleList`` in ``module`` in place (the module itself when it
    has none). Identical blocks share one compiled graph, hooks on the root (DDP, FSDP2) stay eager."""
    lists = [child for child in module.modules() if isinstance(child, nn.ModuleList)]
    if not lists:
        module.compile()
        return module
    for blocks in lists:
        for block in blocks:
            block.compile()
    return module


__all__ = ["DeviceMeans", "clip_gradients", "GradientSync", "compile_blocks"]
