"""Turning predicted action chunks into one action per control step (numpy only).

Two strategies, shared by the in-process policy and the remote one:

- `ActionQueue(execute_steps=k)`: predict a chunk of H actions, execute its first k, predict again
  when the queue is empty (LeRobot's `select_action`; openpi's action chunk broker). k = H is open
  loop over the whole chunk; k = 1 replans every step.
- `TemporalEnsembler(horizon=H, coeff=c)`: predict a chunk every step; the action for the current
  step is the weighted mean of every stored chunk's prediction for this step (ACT). Weights are
  w_i = exp(-c * i) with i = 0 the OLDEST prediction still covering the step (ACT's and LeRobot's
  convention): c > 0 favours old predictions (smoother), c < 0 favours new ones (more reactive),
  c = 0 is a plain mean.

Both work on any per-step vector of D values, so callers may append extra channels (e.g. the
terminate flag) as columns and read them back averaged/queued alongside the action.
"""

from __future__ import annotations

from collections import deque

import numpy as np


def _as_chunk(chunk: np.ndarray, what: str) -> np.ndarray:
    chunk = np.asarray(chunk, dtype=np.float64)
    if chunk.ndim == 1:
        chunk = chunk[:, None]
    if chunk.ndim != 2 or chunk.shape[0] < 1:
        raise ValueError(f"{what} must be an (H, D) action chunk with H >= 1, got shape {chunk.shape}")
    return chunk


class ActionQueue:
    """Execute the first `execute_steps` actions of each predicted chunk, then ask for a new one.

    Usage per control step: `if queue.empty: queue.push(predict())`, then `action = queue.pop()`.
    `execute_steps=None` executes the whole chunk.
    """

    def __init__(self, execute_steps: int | None = None):
        if execute_steps is not None and execute_steps < 1:
            raise ValueError(f"execute_steps must be >= 1 (or None for the whole chunk), got {execute_steps}")
        self.execute_steps = execute_steps
        self._queue: deque[np.ndarray] = deque()

    def reset(self) -> None:
        """Drop queued actions (call at each episode start or when the instruction changes)."""
        self._queue.clear()

    @property
    def empty(self) -> bool:
        return not self._queue

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, chunk: np.ndarray) -> None:
        """Queue the first k rows of `chunk` (H, D); refuses to push while actions are still queued."""
        chunk = _as_chunk(chunk, "ActionQueue.push chunk")  # (H, D)
        if self._queue:
            raise ValueError(f"ActionQueue still holds {len(self._queue)} actions; pop them (or reset()) before "
                             "pushing a new chunk")
        k = chunk.shape[0] if self.execute_steps is None else self.execute_steps
        if k > chunk.shape[0]:
            raise ValueError(f"execute_steps={k} exceeds the chunk horizon {chunk.shape[0]}; use execute_steps <= H")
        self._queue.extend(chunk[:k])

    def pop(self) -> np.ndarray:
        """The next action (D,) to execute."""
        if not self._queue:
            raise ValueError("ActionQueue is empty: push a freshly predicted chunk first")
        return self._queue.popleft()


class TemporalEnsembler:
    """ACT-style temporal ensembling: one chunk per step, averaged over the chunks covering the step.

    `update(chunk)` takes the chunk (H, D) predicted at the current step and returns the action (D,)
    to execute now. A chunk predicted `a` steps ago contributes its row `a` while a < H.
    """

    def __init__(self, horizon: int, coeff: float = 0.01):
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self.horizon, self.coeff = int(horizon), float(coeff)
        self._chunks: deque[np.ndarray] = deque()  # oldest first; the i-th from the right was predicted i steps ago

    def reset(self) -> None:
        """Forget stored chunks (call at each episode start or when the instruction changes)."""
        self._chunks.clear()

    def update(self, chunk: np.ndarray) -> np.ndarray:
        """Add this step's chunk (H, D) and return the ensembled action (D,) for this step."""
        chunk = _as_chunk(chunk, "TemporalEnsembler.update chunk")  # (H, D)
        if chunk.shape[0] != self.horizon:
            raise ValueError(f"chunk horizon {chunk.shape[0]} != ensembler horizon {self.horizon}; "
                             "build the ensembler with the policy's horizon")
        if self._chunks and self._chunks[0].shape[1] != chunk.shape[1]:
            raise ValueError(f"chunk width changed from {self._chunks[0].shape[1]} to {chunk.shape[1]}; reset() first")
        self._chunks.append(chunk)
        while len(self._chunks) > self.horizon:  # the oldest no longer covers the current step
            self._chunks.popleft()
        n = len(self._chunks)
        preds = np.stack([c[n - 1 - j] for j, c in enumerate(self._chunks)])  # (n, D), oldest first
        w = np.exp(-self.coeff * np.arange(n))  # (n,), w[0] for the oldest
        return (w[:, None] * preds).sum(0) / w.sum()
