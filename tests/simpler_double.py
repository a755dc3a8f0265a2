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

import time

import numpy as np

from envs.backend import EpisodeSpec
from envs.simpler_backend import SimplerSession
from policies.conventions import to_simpler_action

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


def centroid(img: np.ndarray, rgb) -> np.ndarray | None:
    ys, xs = np.nonzero(np.all(img == np.array(rgb, dtype=np.uint8), axis=-1))
    if len(xs) == 0:
        return None
    return np.array([xs.mean(), ys.mean()]) / (SIZE - 1)  # (x, y) table units


def scripted_move(image: np.ndarray, instruction: str) -> tuple[np.ndarray, bool]:
    """(world_vector xy step toward the current target (2,), whether the gripper is at the target)."""
    target = centroid(image, (0, 0, 255) if "blue" in instruction else (0, 255, 0))
    pos = centroid(image, (255, 0, 0))
    diff = target - pos
    return np.clip(diff, -0.08, 0.08), bool(np.linalg.norm(diff) < 0.03)


class ScriptedPolicy:
    """Reads the red gripper and the current target dot from the image and steps toward it.

    mode "terminate": send terminate once at the target (a multi-step task then goes on to the next);
    "never": never terminate; "overshoot": reach the target, then wander away and never terminate.
    rotation_delta: a constant rotation the raw action carries (RT-1's raw form; the evaluator converts it).
    delay_s: sleep per step (a slower policy, so a test can interrupt a run midway).
    """

    def __init__(self, mode: str = "terminate", rotation_delta: list[float] | None = None, delay_s: float = 0.0):
        self.mode, self.delay_s = mode, float(delay_s)
        self.rotation_delta = None if rotation_delta is None else np.asarray(rotation_delta, dtype=np.float64)
        self.calls: list[str] = []

    def reset(self, instruction: str) -> None:
        self.calls.append(f"reset:{instruction}")
        self.t, self.reached = 0, False

    def step(self, image: np.ndarray, instruction: str):
        assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE, 3)
        if self.delay_s:
            time.sleep(self.delay_s)
        self.calls.append(instruction)
        self.t += 1
        move, at = scripted_move(image, instruction)
        self.reached |= at
        terminate = float(at and self.mode == "terminate")
        if self.mode == "overshoot" and self.reached:
            move = np.array([-0.08, -0.08])
        rot = np.zeros(3) if self.rotation_delta is None else self.rotation_delta
        a7 = np.array([move[0], move[1], 0.0, *rot, 0.0])
        raw = {"a7": a7} if self.rotation_delta is None else {"world_vector": a7[:3], "rotation_delta": rot}
        return raw, to_simpler_action(a7, terminate)


class ScriptedChunkPolicy:
    """ScriptedPolicy's "terminate" mode as a served policy: predict_action_chunk -> a one-step chunk."""

    metadata = {"model_kind": "scripted", "horizon": 1, "action_dim": 7, "execute_steps": 1}

    def predict_action_chunk(self, observation: dict) -> dict:
        image = observation["image"]
        move, at = scripted_move(image[-1] if image.ndim == 4 else image, observation["instruction"])
        actions = np.array([[move[0], move[1], 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=np.float32)  # (1, 7)
        return {"actions": actions, "terminate": np.array([float(at)], dtype=np.float32)}
