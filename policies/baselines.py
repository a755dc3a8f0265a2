"""Two reference policies for closed-loop comparisons: one that never moves, one that replays the mean demo.

Both follow SIMPLER's contract like `SelfFlowPolicy`: `reset(instruction)`, then
`step(image, instruction) -> (raw_action, action)`, where `raw_action` holds RT-1 units
(world_vector m, rotation_delta roll/pitch/yaw, gripper +1 close / -1 open, terminate_episode) and
`action` is `policies.conventions.to_simpler_action` of it. Neither looks at the image. The evaluator
builds them with {"kind": "factory", "target": "policies.baselines:StillPolicy", "kwargs": {...}}.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from policies.conventions import GRIPPER_DEADZONE, to_simpler_action

ACTION_FIELDS = ("world_vector", "rotation_delta", "gripper_closedness_action")  # demo shard keys, RT-1 units


def _raw_and_action(a7: np.ndarray, terminate: float, gripper_deadzone: float) -> tuple[dict, dict]:
    """RT-1 action (7,) + terminate -> (raw_action, SIMPLER action), as `policies.stepper.ChunkedPolicy.step`."""
    a7 = np.asarray(a7, dtype=np.float64).reshape(7)
    raw = {"world_vector": a7[:3].copy(), "rotation_delta": a7[3:6].copy(), "gripper": a7[6:7].copy(),
           "terminate_episode": np.array([float(terminate)])}
    return raw, to_simpler_action(a7, terminate, gripper_deadzone=gripper_deadzone)


class StillPolicy:
    """Zero motion, the gripper held at `gripper` (-1 = open), never terminates: the floor of any task."""

    def __init__(self, gripper: float = -1.0, gripper_deadzone: float = GRIPPER_DEADZONE):
        self.a7 = np.zeros(7)
        self.a7[6] = float(gripper)
        self.gripper_deadzone = gripper_deadzone
        self.instruction: str | None = None

    def reset(self, instruction: str | None = None) -> None:
        self.instruction = instruction

    def step(self, image=None, instruction: str | None = None) -> tuple[dict, dict]:
        return _raw_and_action(self.a7, 0.0, self.gripper_deadzone)


def motion_steps(terminate: np.ndarray) -> int:
    """Steps before a demo's terminate step (the whole demo when it never terminates)."""
    terminate = np.asarray(terminate).reshape(-1).astype(bool)
    return int(np.argmax(terminate)) if terminate.any() else len(terminate)


def mean_trajectory(demos: list[np.ndarray]) -> np.ndarray:
    """Demos [(T_i, 7) RT-1 actions of their motion steps] -> (L, 7) blind-replay trajectory.

    L is the median demo length (rounded). Step t is the mean of step t over the demos that reach it
    (aligned from the start); its gripper is the majority sign at t (+1 closed, -1 open; a tie keeps the
    previous step's sign, starting open).
    """
    demos = [np.asarray(d, dtype=np.float64).reshape(-1, 7) for d in demos]
    demos = [d for d in demos if len(d)]
    if not demos:
        raise ValueError("mean_trajectory needs at least one demonstration with a motion step")
    length = max(1, int(round(float(np.median([len(d) for d in demos])))))
    out = np.zeros((length, 7))
    sign = -1.0
    for t in range(length):
        rows = np.stack([d[t] for d in demos if len(d) > t])  # (n_t, 7); n_t >= half the demos since t < median
        out[t, :6] = rows[:, :6].mean(axis=0)
        closed, opened = int((rows[:, 6] > 0).sum()), int((rows[:, 6] < 0).sum())
        sign = 1.0 if closed > opened else -1.0 if opened > closed else sign
        out[t, 6] = sign
    return out


def load_demo_actions(shard_dir: str | Path, task: str | None = None, max_demos: int | None = None) -> list[np.ndarray]:
    """(T_i, 7) RT-1 actions of the motion steps of each finished demo shard in `shard_dir` (lowest seeds
    first, as `envs.demos.build_rlds` picks them); frames are not read. `task` None = every task found."""
    from envs.demos import done_seeds, shard_name

    shard_dir = Path(shard_dir)
    if task is None:
        paths = sorted(p for p in shard_dir.glob("*.npz") if not p.name.startswith("."))
    else:
        paths = [shard_dir / f"{shard_name(task, s)}.npz" for s in done_seeds(task, shard_dir)[0]]
    paths = paths[:max_demos] if max_demos else paths
    if not paths:
        raise FileNotFoundError(f"no demonstration shards{'' if task is None else ' of ' + task} in {shard_dir}; "
                                "collect them first (scripts/collect_demos.py)")
    demos = []
    for p in paths:
        with np.load(p, allow_pickle=False) as z:  # members load lazily: the frames stay on disk
            a = np.concatenate([z[k].reshape(len(z[k]), -1) for k in ACTION_FIELDS], axis=1)  # (T, 7)
            demos.append(a[: motion_steps(z["terminate"])])
    return demos


class MeanReplayPolicy:
    """Blind replay of the mean demonstration (`mean_trajectory` of the shards), then terminate.

    shard_dir / task / max_demos: which demos to average (`load_demo_actions`); or `trajectory` (L, 7) given
    directly. After the L steps it sends terminate with zero motion and the last gripper command.
    """

    def __init__(self, shard_dir: str | Path | None = None, task: str | None = None, max_demos: int | None = None,
                 trajectory=None, gripper_deadzone: float = GRIPPER_DEADZONE):
        if (shard_dir is None) == (trajectory is None):
            raise ValueError("MeanReplayPolicy needs exactly one of shard_dir (demo shards) or trajectory (L, 7)")
        if trajectory is None:
            trajectory = mean_trajectory(load_demo_actions(shard_dir, task, max_demos))
        self.trajectory = np.asarray(trajectory, dtype=np.float64).reshape(-1, 7)  # (L, 7)
        if not len(self.trajectory) or not np.all(np.isfinite(self.trajectory)):
            raise ValueError("the replay trajectory must hold at least one finite (7,) action")
        self.gripper_deadzone = gripper_deadzone
        self.instruction: str | None = None
        self.t = 0

    def reset(self, instruction: str | None = None) -> None:
        self.instruction, self.t = instruction, 0

    def step(self, image=None, instruction: str | None = None) -> tuple[dict, dict]:
        if self.t < len(self.trajectory):
            a7, terminate = self.trajectory[self.t], 0.0
        else:
            a7, terminate = np.zeros(7), 1.0
            a7[6] = self.trajectory[-1, 6]
        self.t += 1
        return _raw_and_action(a7, terminate, self.gripper_deadzone)
