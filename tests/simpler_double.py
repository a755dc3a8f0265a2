"""A test double that follows SimplerEnv's observation / info contract, served through the real SimplerSession.

`FakeSimplerEnv` behaves like a ManiSkill2_real2sim env built by SimplerEnv: `reset(options=...)` with
`robot_init_options` / `obj_init_options`, `step(7-vector) -> (obs, reward, done, truncated, info)` where
`obs["image"]["overhead_camera"]["rgb"]` is the policy image, `done == info["success"]` (evaluated on the
current state, so it can turn false again), truncation at `max_episode_steps` (gym's TimeLimit),
`get_language_instruction()`, `advance_to_next_subtask()`, `is_final_subtask()`, `robot_uid`.

The world: a red gripper dot moves on a 2-D table by `world_vector[:2]`; tasks ask it to reach a green
target (single step) or a green then a blue target (two subtasks). `DoubleBackend` serves tasks
`reach` and `two_stage` (and `crash`, whose episode index 1 raises inside `step`).
"""

from __future__ import annotations

import numpy as np

from envs.backend import EpisodeSpec
from envs.simpler_backend import SimplerSession

SIZE = 48  # image side (pixels)
RADIUS = 0.06  # success radius in table units
TASKS = {"reach": 12, "two_stage": 20, "crash": 12}  # task -> max_steps


def to_px(p: np.ndarray) -> tuple[int, int]:
    return int(round(p[1] * (SIZE - 1))), int(round(p[0] * (SIZE - 1)))  # (row, col)


class FakeSimplerEnv:
    """SimplerEnv-like env (see module docstring). Only numpy."""

    robot_uid = "google_robot_static"

    def __init__(self, task: str, max_episode_steps: int, **kwargs):
        self.task, self.max_episode_steps, self.kwargs = task, max_episode_steps, kwargs
        self.closed = False

    @property
    def unwrapped(self):
        return self

    def reset(self, seed=None, options=None):
        robot = options["robot_init_options"]
        self.pos = np.asarray(robot["init_xy"], dtype=np.float64).copy()
        self.targets = [np.asarray(t, dtype=np.float64) for t in options["obj_init_options"]["targets"]]
        self.crash_at = options["obj_init_options"].get("crash_at")
        self.subtask, self.elapsed = 0, 0
        return self._obs(), {}

    def _obs(self):
        img = np.full((SIZE, SIZE, 3), 90, dtype=np.uint8)
        colors = [(0, 255, 0), (0, 0, 255)]
        for t, c in zip(self.targets, colors):
            r, col = to_px(t)
            img[max(r - 1, 0):r + 2, max(col - 1, 0):col + 2] = c
        r, col = to_px(self.pos)
        img[r, col] = (255, 0, 0)  # one pixel: the 3x3 target stays visible under it
        return {"image": {"overhead_camera": {"rgb": img, "depth": np.zeros((SIZE, SIZE, 1), np.float32)}},
                "agent": {"qpos": np.zeros(11)}}

    def evaluate(self):
        near = np.linalg.norm(self.pos - self.targets[-1]) < RADIUS
        return {"success": bool(near and self.subtask == len(self.targets) - 1),
                "episode_stats": {"dist": float(np.linalg.norm(self.pos - self.targets[self.subtask]))}}

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        assert action.shape == (7,), action.shape
        if self.crash_at is not None and self.elapsed == self.crash_at:
            raise RuntimeError("simulated physics failure")
        self.pos = np.clip(self.pos + action[:2], 0.0, 1.0)
        self.elapsed += 1
        info = self.evaluate()
        info["elapsed_steps"] = self.elapsed
        return self._obs(), 0.0, info["success"], self.elapsed >= self.max_episode_steps, info

    def get_language_instruction(self):
        names = ["green", "blue"]
        return f"move the gripper to the {names[self.subtask]} dot"

    def advance_to_next_subtask(self):
        if self.subtask + 1 >= len(self.targets):
            raise RuntimeError("no next subtask")
        self.subtask += 1

    def is_final_subtask(self):
        return self.subtask == len(self.targets) - 1

    def close(self):
        self.closed = True


def get_image(env, obs, camera_name=None):
    """Mirror of SimplerEnv's get_image_from_maniskill2_obs_dict."""
    camera_name = camera_name or ("overhead_camera" if "google_robot" in env.robot_uid else "3rd_view_camera")
    return obs["image"][camera_name]["rgb"]


class DoubleBackend:
    """Backend over FakeSimplerEnv with two variants per task, 3 episodes each."""

    name = "simpler_double"

    def episodes(self, task: str, protocol: str) -> list[EpisodeSpec]:
        if task not in TASKS:
            raise ValueError(f"unknown double task {task!r}; valid: {sorted(TASKS)}")
        rng = np.random.default_rng(0)
        specs = []
        for variant in ("a", "b"):
            for _ in range(3):
                i = len(specs)
                targets = [rng.uniform(0.55, 0.9, 2).round(3).tolist()]
                if task == "two_stage":
                    targets.append(rng.uniform(0.1, 0.45, 2).round(3).tolist())
                obj = {"targets": targets, "crash_at": 2 if (task == "crash" and i == 1) else None}
                specs.append(EpisodeSpec(task, protocol, variant, i, seed=i, max_steps=TASKS[task],
                                         env_id=f"Fake{task}-v0", make_kwargs={"max_episode_steps": TASKS[task]},
                                         reset_options={"robot_init_options": {"init_xy": [0.2, 0.2]},
                                                        "obj_init_options": obj}))
        return specs

    def make(self, spec: EpisodeSpec, **options) -> SimplerSession:
        return SimplerSession(FakeSimplerEnv(spec.task, **spec.make_kwargs), spec, get_image)
