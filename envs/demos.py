"""Scripted ManiSkill3 demonstrations in the toolkit's action convention, one atomic shard file per episode.

How one demonstration is made (measured as the variant that works; see the report of
benchmarks/bench_maniskill.py for speeds):
1. mani-skill's own motion-planning solution (`mani_skill.examples.motionplanning.panda.solutions`,
   called as a function) drives a NON-rendering `pd_joint_pos` env; the joint targets it sends are
   recorded. Tasks with `settle_steps` may hold the last target that many steps until success.
2. Those joint targets are converted to `pd_ee_delta_pose` by mani-skill's closed-loop converter
   (`from_pd_joint_pos`, the code behind its replay_trajectory tool), which steps a RENDERING
   `pd_ee_delta_pose` env reset with the same seed. Every frame and every end-effector action the
   policy will see at evaluation is recorded from that env at its control rate (20 Hz for Panda),
   so frames and actions are consistent by construction.
3. Kept only if the rendering env reports success at its last step; else dropped with a reason.
Actions are stored as RT-1 fields through the task's `ActionConvention` (gripper: +1 closed,
-1 open, held every step). A final step repeats the last frame with a zero motion and terminate=1.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from envs.maniskill_tasks import ManiSkillTask, get_maniskill_task

FAIL_SUFFIX = ".fail.json"


@dataclass
class DemoEpisode:
    """One successful demonstration. T = number of steps (the last one is the terminate step)."""

    task: str
    seed: int
    instruction: str
    frames: np.ndarray  # (T, H, W, 3) uint8
    world_vector: np.ndarray  # (T, 3) float32 metres
    rotation_delta: np.ndarray  # (T, 3) float32 roll/pitch/yaw
    gripper_closedness_action: np.ndarray  # (T, 1) float32, +1 closed, -1 open
    terminate: np.ndarray  # (T,) bool, True only at the last step
    env_actions: np.ndarray  # (T, 7) float32 the controller actions that were executed (zeros at the last)
    state: np.ndarray | None = None  # (T, 8) float32 TCP pose in the base frame (7) + gripper closedness (1)

    def __len__(self) -> int:
        return int(self.frames.shape[0])


def shard_name(task: str, seed: int) -> str:
    return f"{task.replace('/', '_')}_{seed:07d}"


def save_shard(ep: DemoEpisode, shard_dir: str | Path) -> Path:
    """Write `ep` to shard_dir/<task>_<seed>.npz atomically (temp file, then rename)."""
    shard_dir = Path(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    path = shard_dir / f"{shard_name(ep.task, ep.seed)}.npz"
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, task=ep.task, seed=ep.seed, instruction=ep.instruction, frames=ep.frames,
             world_vector=ep.world_vector, rotation_delta=ep.rotation_delta,
             gripper_closedness_action=ep.gripper_closedness_action, terminate=ep.terminate,
             env_actions=ep.env_actions, **({} if ep.state is None else {"state": ep.state}))
    os.replace(tmp, path)
    return path


def save_failure(task: str, seed: int, reason: str, shard_dir: str | Path) -> Path:
    """Record a dropped seed (so a restarted collection does not retry it)."""
    path = Path(shard_dir) / f"{shard_name(task, seed)}{FAIL_SUFFIX}"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"task": task, "seed": seed, "reason": reason}))
    os.replace(tmp, path)
    return path


def load_shard(path: str | Path) -> DemoEpisode:
    with np.load(path, allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    return DemoEpisode(task=str(d["task"]), seed=int(d["seed"]), instruction=str(d["instruction"]),
                       frames=d["frames"], world_vector=d["world_vector"], rotation_delta=d["rotation_delta"],
                       gripper_closedness_action=d["gripper_closedness_action"], terminate=d["terminate"],
                       env_actions=d["env_actions"], state=d.get("state"))


def done_seeds(task: str, shard_dir: str | Path) -> tuple[list[int], list[int]]:
    """(seeds with a finished shard, seeds recorded as failed) for `task` in `shard_dir`."""
    prefix = f"{task.replace('/', '_')}_"
    ok, failed = [], []
    d = Path(shard_dir)
    if d.is_dir():
        for p in d.iterdir():
            if p.name.startswith(prefix) and p.name.endswith(".npz"):
                ok.append(int(p.name[len(prefix):-4]))
            elif p.name.startswith(prefix) and p.name.endswith(FAIL_SUFFIX):
                failed.append(int(p.name[len(prefix):-len(FAIL_SUFFIX)]))
    return sorted(ok), sorted(failed)


class _ActionLog:
    """Gym wrapper that logs every action passed to step, plus the observation and info it returns."""

    def __init__(self, env, camera: str | None = None):
        self.env, self.camera = env, camera
        self.actions: list[np.ndarray] = []
        self.frames: list[np.ndarray] = []
        self.states: list[np.ndarray] = []
        self.last_info: dict[str, Any] = {}

    def __getattr__(self, name):
        return getattr(self.env, name)

    @property
    def unwrapped(self):
        return self.env.unwrapped

    def clear(self) -> None:
        self.actions, self.frames, self.states, self.last_info = [], [], [], {}

    def reset(self, **kw):
        obs, info = self.env.reset(**kw)
        self.clear()
        return obs, info

    def step(self, action):
        a = action.cpu().numpy() if hasattr(action, "cpu") else np.asarray(action)
        self.actions.append(np.asarray(a, dtype=np.float32).reshape(-1))
        obs, rew, term, trunc, info = self.env.step(action)
        self.last_info = info
        if self.camera is not None:
            from envs.maniskill_backend import camera_image, robot_state

            self.frames.append(camera_image(obs, self.camera))
            state = robot_state(self.env)
            if state is not None:
                self.states.append(state)
        return obs, rew, term, trunc, info


def _flag(info: dict, key: str = "success") -> bool:
    v = info.get(key, False)
    return bool(v.reshape(-1)[0].item() if hasattr(v, "reshape") else v)


def solver_function(task: ManiSkillTask):
    """The motion-planning function `task.solver` names in mani_skill.examples.motionplanning.panda.solutions
    (ValueError listing the available ones when it has none or names none of them)."""
    from mani_skill.examples.motionplanning.panda import solutions

    available = sorted(n for n in dir(solutions) if n.startswith("solve"))
    if task.solver is None or not callable(getattr(solutions, task.solver, None)):
        what = "has no scripted solver" if task.solver is None else f"names solver {task.solver!r}, which is not one"
        raise ValueError(f"{task.name} {what}; name one with --solver (or `solver:` in a task file): "
                         f"{', '.join(available)}")
    return getattr(solutions, task.solver)


class DemoCollector:
    """Holds the two envs of one worker and turns seeds into `DemoEpisode`s (or a failure reason)."""

    def __init__(self, task: str | ManiSkillTask, image_size: tuple[int, int] = (256, 320), max_steps: int = 500):
        from envs.maniskill_backend import make_env

        self.task = get_maniskill_task(task) if isinstance(task, str) else task
        self.solve = solver_function(self.task)
        self.plan_env = _ActionLog(make_env(self.task, None, control_mode="pd_joint_pos", obs_mode="state",
                                            max_episode_steps=max_steps))
        self.replay_env = make_env(self.task, None, control_mode="pd_joint_pos", obs_mode="state",
                                   max_episode_steps=max_steps)
        self.rgb_env = _ActionLog(make_env(self.task, image_size, max_episode_steps=max_steps), self.task.camera)

    def plan(self, seed: int) -> tuple[list[np.ndarray] | None, str]:
        """Run the scripted solver; returns (joint-target actions, "") or (None, failure reason)."""
        try:
            res = self.solve(self.plan_env, seed=seed, debug=False, vis=False)
        except Exception as e:  # noqa: BLE001 - the planner raises on unreachable poses
            return None, f"planner raised {type(e).__name__}: {e}"
        if isinstance(res, int) and res == -1 or not self.plan_env.actions:
            return None, "planner found no path"
        for _ in range(self.task.settle_steps):
            if _flag(self.plan_env.last_info):
                break
            self.plan_env.step(self.plan_env.actions[-1].copy())
        if not _flag(self.plan_env.last_info):
            return None, "solver ran but the task was not solved"
        return list(self.plan_env.actions), ""

    def convert(self, seed: int, joint_actions: list[np.ndarray]) -> tuple[DemoEpisode | None, str]:
        """Replay joint targets as pd_ee_delta_pose actions in the rendering env, recording frames."""
        from mani_skill.trajectory.utils.actions.conversion import from_pd_joint_pos

        from envs.maniskill_backend import camera_image, robot_state, show_hidden_goal

        self.replay_env.reset(seed=seed)
        obs, _ = self.rgb_env.reset(seed=seed)
        show_hidden_goal(self.rgb_env, self.task)
        if self.task.show_goal:
            obs = self.rgb_env.unwrapped.get_obs()
        first = camera_image(obs, self.task.camera)
        first_state = robot_state(self.rgb_env)
        from_pd_joint_pos("pd_ee_delta_pose", np.stack(joint_actions), self.replay_env, self.rgb_env)
        if not _flag(self.rgb_env.last_info):
            return None, "converted end-effector replay did not succeed"
        env_actions = np.stack(self.rgb_env.actions + [np.zeros(7, np.float32)])  # (T, 7)
        env_actions[-1, 6] = env_actions[-2, 6]  # the terminate step holds the gripper
        frames = np.stack([first] + self.rgb_env.frames)  # (T, H, W, 3): frame t is seen before action t
        conv = self.task.convention
        rt1 = [conv.env_to_rt1(a) for a in env_actions]
        terminate = np.zeros(len(env_actions), bool)
        terminate[-1] = True
        state = None
        if first_state is not None and len(self.rgb_env.states) == len(self.rgb_env.frames):
            state = np.stack([first_state] + self.rgb_env.states)  # (T, 8): state t is read with frame t
        ep = DemoEpisode(self.task.name, seed, self.task.instruction or "", frames,
                         np.stack([r["world_vector"] for r in rt1]), np.stack([r["rotation_delta"] for r in rt1]),
                         np.stack([r["gripper_closedness_action"] for r in rt1]), terminate, env_actions, state)
        return ep, ""

    def collect(self, seed: int) -> tuple[DemoEpisode | None, str]:
        """One demonstration for `seed`: (episode, "") or (None, why it was dropped)."""
        actions, why = self.plan(seed)
        if actions is None:
            return None, why
        return self.convert(seed, actions)

    def close(self) -> None:
        for e in (self.plan_env, self.replay_env, self.rgb_env):
            e.close()


def fit_frames(frames: np.ndarray, size: tuple[int, int] = (256, 320)) -> np.ndarray:
    """(T, h, w, 3) uint8 -> (T, H, W, 3): resized to fit inside (H, W) keeping the aspect, then zero-padded."""
    H, W = size
    T, h, w, _ = frames.shape
    if (h, w) == (H, W):
        return frames
    from PIL import Image

    s = min(H / h, W / w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    out = np.zeros((T, H, W, 3), np.uint8)
    top, left = (H - nh) // 2, (W - nw) // 2
    for t in range(T):
        out[t, top:top + nh, left:left + nw] = np.asarray(Image.fromarray(frames[t]).resize((nw, nh), Image.BILINEAR))
    return out


def _state_fields(ep: DemoEpisode) -> dict:
    """RT-1's proprioception fields of a demo: the measured TCP pose and gripper closedness when recorded
    (older shards without state fall back to the commanded gripper and a zero pose)."""
    g = ep.gripper_closedness_action.astype(np.float32)  # (T, 1)
    fields = {"gripper_closed": (g > 0).astype(np.float32), "gripper_closedness_commanded": g}
    if ep.state is not None:
        fields["base_pose_tool_reached"] = ep.state[:, :7].astype(np.float32)
        fields["gripper_closed"] = ep.state[:, 7:8].astype(np.float32)
    return fields


def to_rt1_episode(ep: DemoEpisode, size: tuple[int, int] = (256, 320)) -> dict:
    """A demo as the episode dict of `worldmodel.data.rt1_writer.write_rt1_dataset` (frames fitted to 256x320)."""
    g = ep.gripper_closedness_action.astype(np.float32)  # (T, 1)
    return {
        "frames": fit_frames(ep.frames, size),
        "instruction": ep.instruction,
        "actions": {"world_vector": ep.world_vector, "rotation_delta": ep.rotation_delta,
                    "gripper_closedness_action": g, "terminate_episode": ep.terminate},
        "observation": _state_fields(ep),
        "reward": ep.terminate.astype(np.float32),  # success is known for kept demos: reward 1 at the end
        "aspects": {"success": True, "has_aspects": True, "feasible": True},
    }


def build_rlds(task: str, shard_dir: str | Path, out_dir: str | Path, max_episodes: int | None = None,
               image_size: tuple[int, int] = (256, 320)) -> Path:
    """Write the finished shards of `task` (lowest seeds first) as an RT-1-schema RLDS dataset.

    Built in `out_dir`.partial and swapped in at the end, so an interrupted build never leaves a
    half-written dataset at `out_dir`. Returns the version directory (what `builder_from_directory` opens).
    """
    import shutil

    from worldmodel.data.rt1_writer import write_rt1_dataset

    ok, _ = done_seeds(task, shard_dir)
    if not ok:
        raise FileNotFoundError(f"no finished {task} demonstrations in {shard_dir}; run scripts/collect_demos.py first")
    seeds = ok[:max_episodes] if max_episodes else ok
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    name = task.replace("/", "_")
    episodes = (to_rt1_episode(load_shard(Path(shard_dir) / f"{shard_name(task, s)}.npz"), image_size) for s in seeds)
    version_dir = write_rt1_dataset(episodes, tmp, name=name,
                                    description=f"Scripted {task} demonstrations (mani-skill motion planning), "
                                                f"seeds {seeds[0]}..{seeds[-1]}", overwrite=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir / version_dir.relative_to(tmp)
