"""Fast chunk sampling for inference: bf16 weights, compiled blocks, and the whole sampling loop in one CUDA graph.

``ChunkSampler(model, steps, modality_shift, compile=True)`` on a CUDA model:
  1. casts the backbone to bfloat16 (inputs are cast inside the model; outputs come back in the caller's dtype),
  2. ``torch.compile``s each block (worldmodel.train_step.compile_blocks),
  3. on the first call for a given set of shapes, captures ``sampling.sample`` (Euler, level-factorised, no host
     sync, the text/position context computed once per chunk) into one CUDA graph over static input buffers;
     later calls copy their inputs into those buffers and replay the graph. A capture that fails (an op that
     cannot be captured) warns, records why in ``graph_error`` and leaves the sampler running without a graph.
The noise is drawn outside the graph (from the caller's generator, exactly as ``sampling.sample`` draws it), so
a seeded call gives the same chunk in every mode up to bf16 rounding.

With ``compile=False`` or on CPU it is plain ``sampling.sample`` (eager, the model's own dtype, fp32 on CPU).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import fields, replace

import torch
from torch import Tensor, nn

from worldmodel.sampling import initial_noise, sample
from worldmodel.tokens import TokenSequence

WARMUP_RUNS = 2  # eager runs on a side stream before capture (compilation, cuDNN / cuBLAS workspace setup)


class ChunkSampler:
    """Samples the loss-mask tokens of policy sequences with Euler steps; see the module docstring."""

    def __init__(self, model: nn.Module, steps: int, modality_shift: dict[str, float] | None = None,
                 compile: bool = False, graph: bool | None = None):
        from worldmodel.train_step import compile_blocks

        self.model, self.steps = model, int(steps)
        self.modality_shift = dict(modality_shift or {})
        device = next(model.parameters()).device
        self.fast = bool(compile) and device.type == "cuda"  # CPU keeps eager fp32
        self.graph = self.fast if graph is None else bool(graph) and device.type == "cuda"
        self._captured: dict[tuple, tuple[Callable[[], None], TokenSequence, Tensor, Tensor]] = {}
        self.graph_error: str | None = None  # why capture failed (the sampler then runs without a graph)
        if self.fast:
            model.to(torch.bfloat16)
            compile_blocks(model)

    @torch.no_grad()
    def __call__(self, seq: TokenSequence, generator: torch.Generator | None = None,
                 noise: Tensor | None = None) -> TokenSequence:
        """``seq`` with its loss-mask tokens sampled (their tau set to 0), as ``sampling.sample(method="euler")``.

        noise: (B, N, C) initial noise (e.g. drawn per row from per-request seeds); default drawn from ``generator``.
        """
        noise = initial_noise(seq, generator) if noise is None else noise
        if not self.graph:
            return self._run(seq, noise)
        key = _signature(seq)
        if key not in self._captured:
            try:
                self._captured[key] = self._capture(seq, noise)
            except RuntimeError as err:  # an op that cannot be captured: keep serving, without the graph
                self.graph, self.graph_error = False, f"{type(err).__name__}: {err}"
                warnings.warn(f"CUDA graph capture of the sampling loop failed; sampling continues without a graph "
                              f"(slower): {self.graph_error}", RuntimeWarning, stacklevel=2)
                return self._run(seq, noise)
        replay, static_seq, static_noise, static_out = self._captured[key]
        _copy_into(static_seq, seq)
        static_noise.copy_(noise)
        replay()
        out = static_out.clone()  # the next replay overwrites static_out
        return seq.with_values(out, torch.where(seq.loss_mask, torch.zeros_like(seq.tau), seq.tau))

    def _run(self, seq: TokenSequence, noise: Tensor) -> TokenSequence:
        # factorize=True: policy sequences hold clean (0) or absent (1) tokens outside the loss mask: no host sync
        return sample(self.model, seq, steps=self.steps, noise=noise, factorize=True,
                      modality_shift=self.modality_shift)

    def _capture(self, seq: TokenSequence, noise: Tensor):
        """(replay, static seq, static noise, static output) of one sampling call captured over static buffers."""
        static_seq = _clone(seq)
        static_noise = noise.clone()
        replay, static_out = capture_graph(lambda: self._run(static_seq, static_noise).x)
        return replay, static_seq, static_noise, static_out


def capture_graph(fn, warmup: int = WARMUP_RUNS) -> tuple[Callable[[], None], Tensor]:
    """``fn`` (no host sync, static shapes) captured in one CUDA graph after ``warmup`` eager runs on a side stream
    (compilation, cuBLAS workspaces); returns (replay, output tensor that every replay rewrites in place)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    previous = torch.cuda.current_stream()
    try:
        with torch.cuda.graph(graph):
            out = fn()
    except BaseException:
        torch.cuda.set_stream(previous)  # a failing capture_end() skips torch.cuda.graph's own stream restore
        raise
    return graph.replay, out


def _tensor_fields(seq: TokenSequence) -> dict[str, Tensor]:
    return {f.name: getattr(seq, f.name) for f in fields(seq) if isinstance(getattr(seq, f.name), Tensor)}


def _signature(seq: TokenSequence) -> tuple:
    """What a captured graph is specialised to: the layout and every tensor's presence, shape and dtype."""
    return (seq.layout, tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(_tensor_fields(seq).items())))


def _clone(seq: TokenSequence) -> TokenSequence:
    return replace(seq, **{name: t.clone() for name, t in _tensor_fields(seq).items()})


def _copy_into(static: TokenSequence, seq: TokenSequence) -> None:
    for name, t in _tensor_fields(seq).items():
        getattr(static, name).copy_(t)


__all__ = ["ChunkSampler"]
