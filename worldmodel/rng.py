"""Random state of a training run: per-rank seeding, per-draw generators, and RNG states as plain tensors.

Every random draw of a training micro-step (noise, times, masks, caption dropout) comes from a generator
seeded by ``draw_seed(seed, purpose, micro_step, rank)``: reproducible (a resumed run redraws the same
values), different per rank (data-parallel ranks do not share noise), and independent across purposes.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

# Purposes of the per-micro-step draws; each gets its own stream (the values are arbitrary but fixed).
DRAW_PURPOSES = {"objective": 1, "caption_dropout": 2, "mode": 3}


def draw_seed(seed: int, purpose: str, micro_step: int, rank: int = 0) -> int:
    """A 63-bit seed for one purpose's draws at one micro-step on one rank (rank=0 for draws shared by all ranks)."""
    if purpose not in DRAW_PURPOSES:
        raise ValueError(f"unknown draw purpose {purpose!r}; use one of {sorted(DRAW_PURPOSES)}")
    words = [int(seed) & 0xFFFFFFFF, DRAW_PURPOSES[purpose], int(micro_step), int(rank)]
    return int(np.random.SeedSequence(words).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def draw_generator(seed: int, purpose: str, micro_step: int, rank: int = 0, device=None) -> torch.Generator:
    """A torch.Generator on ``device`` seeded by ``draw_seed``."""
    return torch.Generator(device=device or "cpu").manual_seed(draw_seed(seed, purpose, micro_step, rank))


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch (CPU + CUDA) from (seed, rank): different per rank, reproducible."""
    value = int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def rng_state_tensors() -> dict[str, Tensor]:
    """This process's RNG states (torch CPU/CUDA, numpy, python) as plain tensors (no pickle)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    out = {
        "torch_cpu": torch.get_rng_state(),  # uint8
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),  # (624,)
        "numpy_ints": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([gauss], dtype=torch.float64),
        "python_state": torch.tensor([version, *py_state], dtype=torch.int64),  # (626,)
        "python_gauss": torch.tensor([math.nan if py_gauss is None else py_gauss], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        out["torch_cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state_tensors(state: dict[str, Tensor]) -> None:
    """Inverse of rng_state_tensors."""
    torch.set_rng_state(state["torch_cpu"])
    ints = state["numpy_ints"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), ints[0], ints[1],
                         float(state["numpy_gauss"][0])))
    py = state["python_state"].tolist()
    gauss = float(state["python_gauss"][0])
    random.setstate((py[0], tuple(py[1:]), None if math.isnan(gauss) else gauss))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])


def gather_rng_states(world_size: int, device: torch.device) -> list[dict[str, Tensor]]:
    """Every rank's ``rng_state_tensors()`` (collective under torchrun; index = rank)."""
    mine = rng_state_tensors()
    if world_size == 1 or not dist.is_initialized():
        return [mine]
    ranks: list[dict[str, Tensor]] = [{} for _ in range(world_size)]
    for key in sorted(mine):
        local = mine[key].to(device)
        parts = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(parts, local)
        for r, part in enumerate(parts):
            ranks[r][key] = part.cpu()
    return ranks


__all__ = ["DRAW_PURPOSES", "draw_seed", "draw_generator", "seed_everything", "rng_state_tensors",
           "set_rng_state_tensors", "gather_rng_states"]
