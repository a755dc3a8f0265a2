"""The SIMPLER-style `reset` / `step` loop shared by the in-process and the remote policy (numpy only).

A subclass provides `_query(frames, instruction, states) -> (H, 8)` (7 RT-1 action columns in
physical units plus terminate) given the recent frames (and proprioception, when the caller passes
it); this class keeps the frame and state history the model conditions on, executes k actions of
each chunk (ActionQueue) or ensembles overlapping chunks (TemporalEnsembler), and converts to
SIMPLER's action dict (policies.conventions).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from policies.chunking import ActionQueue, TemporalEnsembler
from policies.conventions import GRIPPER_DEADZONE, StickyGripper, to_simpler_action


def context_indices(num_frames: int, context_frames: int, frame_stride: int) -> list[int]:
    """Indices into a history of ``num_frames`` frames (oldest first, one per control step) of the context the
    model trained on: offsets -(Tc-1)*stride .. 0 from the newest, clamped to the first frame (the reader
    repeats an episode's first frame the same way)."""
    if num_frames < 1:
        raise ValueError("the frame history is empty: pass at least the current frame")
    return [max(num_frames - 1 - k * frame_stride, 0) for k in reversed(range(context_frames))]


class ChunkedPolicy:
    """Base of SelfFlowPolicy and RemotePolicy: frame history + chunk execution + action conventions.

    execute_steps: k actions executed per predicted chunk (None = the whole chunk).
    ensemble: query every step and average overlapping chunks, weights exp(-ensemble_coeff * i).
    context_frames / frame_stride: the model sees frames at offsets -(Tc-1)*stride .. 0 of the history;
        before an episode has that many frames the first frame is repeated (as in training).
    """

    def __init__(self, execute_steps: int | None = None, ensemble: bool = False, ensemble_coeff: float = 0.01,
                 sticky_gripper: int = 1, gripper_deadzone: float = GRIPPER_DEADZONE, context_frames: int = 1,
                 frame_stride: int = 1):
        if ensemble and execute_steps is not None:
            raise ValueError("choose either execute_steps (action queue) or ensemble=True (query every step)")
        if context_frames < 1 or frame_stride < 1:
            raise ValueError(f"context_frames and frame_stride must be >= 1, got {context_frames}, {frame_stride}")
        self.ensemble, self.ensemble_coeff = bool(ensemble), float(ensemble_coeff)
        self.queue = ActionQueue(execute_steps)
        self.ensembler: TemporalEnsembler | None = None  # built from the first chunk's horizon
        self.sticky = StickyGripper(sticky_gripper)
        self.gripper_deadzone = gripper_deadzone
        self.context_frames, self.frame_stride = int(context_frames), int(frame_stride)
        span = (self.context_frames - 1) * self.frame_stride + 1
        self.history: deque[np.ndarray] = deque(maxlen=span)
        self.state_history: deque[np.ndarray | None] = deque(maxlen=span)
        self.instruction: str | None = None

    def _query(self, frames: np.ndarray, instruction: str, states: np.ndarray | None = None) -> np.ndarray:
        """(T, H, W, 3) uint8 recent frames at the control rate (oldest first, up to the context span) and
        optional (T, 8) states read with them -> chunk (H, 8): 7 action columns + terminate. The model side
        picks its context from them (``context_indices``), the same way for every entry point."""
        raise NotImplementedError

    def reset(self, instruction: str | None = None) -> None:
        """Start an episode: forget frames and queued / ensembled actions."""
        self._flush()
        self.history.clear()
        self.state_history.clear()
        self.sticky.reset()
        self.instruction = instruction

    def _flush(self) -> None:
        self.queue.reset()
        if self.ensembler is not None:
            self.ensembler.reset()

    def recent_frames(self) -> np.ndarray:
        """(T, H, W, 3) the frames kept (oldest first): the last (Tc - 1) * stride + 1 control steps at most."""
        return np.stack(list(self.history))

    def recent_states(self) -> np.ndarray | None:
        """(T, 8) the states read with ``recent_frames``, or None when the caller passes no state."""
        states = list(self.state_history)
        if not states or any(s is None for s in states):
            return None
        return np.stack(states)

    def _checked(self, image) -> np.ndarray:
        """The frame as a uint8 (H, W, 3) array the same size as this episode's earlier frames (else ValueError)."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            nan = " holding NaNs" if image.dtype.kind == "f" and bool(np.isnan(image).any()) else ""
            raise ValueError(f"step() needs an (H, W, 3) uint8 RGB numpy array, got dtype {image.dtype}, shape "
                             f"{image.shape}{nan}; convert floats in [0, 1] with (img * 255).astype(np.uint8) and "
                             "drop alpha with img[..., :3]")
        if self.history and self.history[-1].shape != image.shape:
            raise ValueError(f"image size changed mid-episode from {self.history[-1].shape} to {image.shape}; "
                             "keep one camera resolution per episode or call reset() first")
        return image

    def step(self, image: np.ndarray, instruction: str | None = None,
             state: np.ndarray | None = None) -> tuple[dict, dict]:
        """(image (H, W, 3) uint8, instruction, optional state (8,)) -> (raw_action, SIMPLER action dict).

        state: the robot's proprioception in RT-1's layout (tool pose xyz + quaternion wxyz in the base frame,
        gripper closedness 0..1), read with this image; pass it every step (or never) within an episode.
        """
        instruction = self.instruction if instruction is None else instruction
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError("step() needs an instruction: pass it to reset(instruction) or step(image, instruction)")
        if instruction != self.instruction:  # a new subtask: replan now
            self._flush()
            self.instruction = instruction
        self.history.append(self._checked(image))
        self.state_history.append(check_state(state))
        if self.ensemble:
            chunk = self._query(self.recent_frames(), instruction, self.recent_states())
            if self.ensembler is None or self.ensembler.horizon != len(chunk):
                self.ensembler = TemporalEnsembler(len(chunk), self.ensemble_coeff)
            vec = self.ensembler.update(chunk)  # (8,)
            terminate = float(vec[7] > 0.5)
        else:
            if self.queue.empty:
                self.queue.push(self._query(self.recent_frames(), instruction, self.recent_states()))
            vec = self.queue.pop()  # (8,)
            terminate = float(vec[7] > 0.5)
        a7 = np.asarray(vec[:7], dtype=np.float64)
        raw = {"world_vector": a7[:3].copy(), "rotation_delta": a7[3:6].copy(), "gripper": a7[6:7].copy(),
               "terminate_episode": np.array([terminate])}
        action = to_simpler_action(a7, terminate, gripper_deadzone=self.gripper_deadzone, sticky=self.sticky)
        return raw, action


def check_state(state) -> np.ndarray | None:
    """A state as a finite float32 (8,) array (None passes through), else a ValueError naming the layout."""
    if state is None:
        return None
    arr = np.asarray(state)
    if arr.shape != (8,) or arr.dtype.kind not in "fiu" or not np.all(np.isfinite(arr)):
        raise ValueError(f"state must be 8 finite floats (tool x y z, quaternion w x y z in the robot base frame, "
                         f"gripper closedness 0..1), got shape {np.shape(state)}")
    return arr.astype(np.float32)

