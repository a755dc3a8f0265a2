"""Multi-process training under ``torchrun``: process group setup, DDP hooks, gradient averaging, FSDP2 sharding.

``torchrun --nproc_per_node=N scripts/pretrain.py`` sets RANK / WORLD_SIZE / LOCAL_RANK; without them
this is a single process and every helper is a no-op. Backend: nccl on CUDA, gloo on CPU.

The backbone's gradients are reduced while backward runs: FSDP2 hooks (``shard_fsdp2``) or DDP hooks
attached in place (``replicate_module``), so tasks keep calling their own module references
(``objective.loss(self.model, ...)``, ``student.token_dim``), which a DDP wrapper object would bypass.
Other parameters are averaged after backward (``average_gradients``: bucketed all-reduce in a fixed
parameter order). Either way, parameters that got no gradient on ANY rank keep ``grad=None`` (as in a
single process), so AdamW skips them exactly as a single process would.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

BUCKET_BYTES = 64 * 2**20  # gradient all-reduce bucket size


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank among world_size, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as err:
        raise ValueError(f"environment variable {name}={value!r} must be an integer (set by torchrun)") from err


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Read RANK / WORLD_SIZE / LOCAL_RANK and join the process group when WORLD_SIZE > 1.

    device: "auto" (cuda:LOCAL_RANK when CUDA is available, else cpu), "cpu" or "cuda".
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must lie in 0..WORLD_SIZE-1={world - 1}; launch with torchrun")
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available: use device='cpu' or 'auto'")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise ValueError("WORLD_SIZE > 1 but MASTER_ADDR / MASTER_PORT are unset: launch with torchrun")
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s), device_id=dev if use_cuda else None,
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[DistInfo]:
    """``init_distributed`` for one run; leaves the process group at the end (also on error) if it joined it here."""
    joined_here = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(device)
    try:
        yield info
    finally:
        if joined_here:
            cleanup()


def cleanup() -> None:
    """Leave the process group (call once at the end of a torchrun script)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: Tensor) -> Tensor:
    """Mean of ``value`` over ranks (a copy; the input is unchanged). Identity in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (replicas start identical)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if _is_dtensor(t):
                continue  # FSDP2-sharded: already consistent by construction
            dist.broadcast(t.data, src=src)


def average_gradients(params: list[nn.Parameter], world_size: int, flag_group=None) -> None:
    """Average ``p.grad`` over ranks in place (bucketed), in the given fixed order.

    A parameter without a gradient on this rank contributes zeros; one without a gradient on every
    rank keeps ``grad=None``. DTensor (FSDP2-sharded) parameters are skipped: FSDP reduces them.
    Which parameters have gradients is exchanged on the CPU (``flag_group``: a gloo group, or the default
    group when it is gloo), so the device is never synchronised with the host.
    """
    if world_size <= 1 or not dist.is_initialized():
        return
    params = [p for p in params if not _is_dtensor(p)]
    if not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)  # (P,) host-side flags
    dist.all_reduce(has, op=dist.ReduceOp.MAX, group=flag_group)
    used = [p for p, h in zip(params, has.tolist()) if h]
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[Tensor] = []
    size = 0
    for p in used:
        bucket.append(p.grad)
        size += p.grad.numel() * p.grad.element_size()
        if size >= BUCKET_BYTES:
            _reduce_bucket(bucket, world_size)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket, world_size)


def replicate_module(module: nn.Module, device: torch.device) -> nn.Module:
    """DDP gradient hooks on ``module`` in place (``torch.distributed._composable.replicate``).

    Its gradients are all-reduced in buckets while backward runs; parameters unused in a forward (another
    modality's projection) are allowed, and ones unused on every rank keep ``grad=None``. Gradient
    accumulation: ``module.set_requires_gradient_sync(False)`` before the forwards that must not sync.
    No collective runs in a no-grad forward, so one rank may evaluate the module alone.
    """
    from torch.distributed._composable import replicate

    if not dist.is_initialized():
        raise ValueError("replicate_module needs a process group: launch with torchrun (WORLD_SIZE > 1)")
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    replicate(module, find_unused_parameters=True, broadcast_buffers=False, **kwargs)
    replicate.state(module).lazy_init()  # now, on every rank (DDP's constructor is a collective)
    return module


def _reduce_bucket(grads: list[Tensor], world_size: int) -> None:
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in group])  # (sum numel,)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world_size
        offset = 0
        for g in group:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()


def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor" or type(getattr(t, "data", None)).__name__ == "DTensor"


def shard_fsdp2(module: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2 (``fully_shard``) in place: each block of every ``nn.ModuleList`` child, then the root.

    Sharding happens in place, so the task's references stay valid; only ``forward`` calls gather
    parameters, so shard only modules whose ``forward`` is what the task calls (the backbone).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise ValueError("fsdp=True needs a process group: launch with torchrun (WORLD_SIZE > 1) or set fsdp=false")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else None
    kwargs = {"mp_policy": mp} if mp is not None else {}
    for child in module.modules():
        if isinstance(child, nn.ModuleList):
            for block in child:
                fully_shard(block, **kwargs)
    fully_shard(module, **kwargs)
    return module


def reshard_fsdp2(module: nn.Module) -> None:
    """Return every FSDP2 parameter group of ``module`` to its sharded form (no-op for plain modules)."""
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """A full (unsharded) CPU state dict on every rank, for FSDP2 modules as for plain ones."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, t in module.state_dict().items():
        if isinstance(t, DTensor):
            t = t.full_tensor()
        out[name] = t.detach().cpu()
    return out


__all__ = [
    "DistInfo", "init_distributed", "process_group", "cleanup", "barrier", "all_reduce_mean", "broadcast_module",
    "average_gradients", "replicate_module", "shard_fsdp2", "reshard_fsdp2", "full_state_dict",
]
