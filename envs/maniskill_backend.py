"""ManiSkill3 (mani-skill 3.0.1, SAPIEN 3) behind the `Backend` protocol; registers the `maniskill/*` tasks.

Each episode is a fixed seed (`EVAL_SEED_BASE + index`); the policy image is the task's camera
(`base_camera` for the Panda tasks, rendered at `image_size`, default 256x320 = RT-1's frame size), the
instruction is the task's (or the env's, for SIMPLER's Bridge tasks), the action dict of the evaluator is
mapped through the task's `ActionConvention`, and success is the env's `info["success"]` at the step
(the evaluator keeps the last step's value). Rendering without a GPU goes through `envs.cpu_render`.
mani_skill is imported only when an env is built, so the registry imports without it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from envs.backend import (
    EpisodeSpec,
    Observation,
    StepResult,
    jsonable_info,
    register_backend,
    register_task,
    register_task_prefix,
)
from envs.maniskill_tasks import (
    EVAL_EPISODES,
    EVAL_SEED_BASE,
    PROTOCOLS,
    TASK_PREFIX,
    TASKS,
    ManiSkillTask,
    get_maniskill_task,
)
from policies.conventions import GRIPPER_DEADZONE, axangle_to_matrix

DEFAULT_IMAGE_SIZE = (256, 320)  # (H, W): RT-1's frame size, so demos need no resizing


def check_assets(task: ManiSkillTask) -> None:
    """Raise FileNotFoundError naming the download command when a task's mani-skill assets are absent/empty."""
    if not task.assets:
        return
    from mani_skill.utils.assets.data import DATA_SOURCES

    missing = []
    for uid in task.assets:
        src = DATA_SOURCES[uid]
        path = Path(src.output_dir) / src.target_path
        if not path.is_dir() or not any(path.iterdir()):  # an interrupted download leaves an empty folder
            missing.append((uid, path))
    if missing:
        cmds = " && ".join(f"python -m mani_skill.utils.download_asset {uid} -y" for uid, _ in missing)
        where = ", ".join(f"{uid} ({p}{', empty' if p.is_dir() else ''})" for uid, p in missing)
        raise FileNotFoundError(f"{task.name} ({task.env_id}) needs ManiSkill assets that are missing: {where}. "
                                f"Download them once with network access (bridge_v2_real2sim is about 82 MB): {cmds}  "
                                "(they go to $MS_ASSET_DIR, default ~/.maniskill/data; remove an empty folder first).")


def make_env(task: ManiSkillTask, image_size: tuple[int, int] | None = DEFAULT_IMAGE_SIZE,
             control_mode: str | None = None, obs_mode: str = "rgb", max_episode_steps: int | None = None):
    """Build the gym env of `task` (rendering set up, render-device workaround applied, no downloads).

    image_size: (H, W) of the policy camera for Panda tasks (None = the env's default; Bridge tasks keep
    theirs, the real-photo overlay fixes it). obs_mode "state" builds a non-rendering env.
    """
    os.environ["MS_SKIP_ASSET_DOWNLOAD_PROMPT"] = "1"  # never a prompt; check_assets prevents any download
    check_assets(task)
    from envs.cpu_render import ensure_cpu_rendering, maniskill_render_device, patched_render_backend

    warnings.filterwarnings("ignore", message=".*Failed to find system libvulkan.*")
    render = obs_mode not in ("state", "state_dict", "none")
    setup = ensure_cpu_rendering()  # even state-only envs build render materials, which need a Vulkan device
    device = maniskill_render_device(setup) if render else None
    import gymnasium as gym
    import mani_skill.envs  # noqa: F401  (registers the envs)

    kw: dict[str, Any] = dict(obs_mode=obs_mode, control_mode=control_mode or task.control_mode,
                              render_mode=None, **task.make_kwargs)
    if not render:
        kw["render_backend"] = "none"
    if image_size is not None and task.robot == "panda" and render:
        kw["sensor_configs"] = {task.camera: dict(height=int(image_size[0]), width=int(image_size[1])),
                                **{c: dict(height=16, width=16) for c in task.aux_cameras}}
    if max_episode_steps is not None:
        kw["max_episode_steps"] = max_episode_steps
    with patched_render_backend(device):
        return gym.make(task.env_id, **kw)


def show_hidden_goal(env, task: ManiSkillTask) -> None:
    """Let the cameras see the goal marker the env hides (PickCube's goal_site) when the task asks for it."""
    raw = env.unwrapped
    if task.show_goal and hasattr(raw, "goal_site"):
        raw._hidden_objects = [o for o in raw._hidden_objects if o is not raw.goal_site]
        raw.goal_site.show_visual()  # hidden once at the first capture; stays hidden until shown


def camera_image(obs: dict, camera: str) -> np.ndarray:
    """The camera's rgb (H, W, 3) uint8 from a ManiSkill observation (batched torch or numpy)."""
    img = obs["sensor_data"][camera]["rgb"]
    img = img.cpu().numpy() if hasattr(img, "cpu") else np.asarray(img)
    return np.ascontiguousarray(img[0] if img.ndim == 4 else img)[..., :3].astype(np.uint8, copy=False)


STATE_DIM = 8  # tool pose (x, y, z, qw, qx, qy, qz) + gripper closedness in [0, 1] (RT-1's two state fields)


def robot_state(env) -> np.ndarray | None:
    """(8,) float32 proprioception in RT-1's layout: the TCP pose in the robot base frame (xyz metres + wxyz
    quaternion, RT-1's ``base_pose_tool_reached``) and the gripper closedness (0 open .. 1 closed, RT-1's
    ``gripper_closed``), read from the simulator; None for a robot without a TCP link."""
    agent = getattr(env.unwrapped, "agent", None)
    tcp = getattr(agent, "tcp", None)
    if tcp is None:
        return None

    def arr(x):
        return (x.cpu().numpy() if hasattr(x, "cpu") else np.asarray(x)).reshape(-1).astype(np.float64)

    base = agent.robot.pose
    rel = base.inv() * tcp.pose  # the TCP in the robot base frame, as RT-1 records it
    pos, quat = arr(rel.p)[:3], arr(rel.q)[:4]
    if quat[1] < 0:  # q and -q are one rotation: keep qx >= 0 (a tool pointing down has |qx| near 1, w near 0)
        quat = -quat
    qpos = arr(agent.robot.get_qpos())
    fingers = qpos[-2:]  # Panda: two finger joints, 0 (closed) .. 0.04 m (open) each
    limits = arr(agent.robot.get_qlimits().reshape(-1, 2)[-2:, 1]) if hasattr(agent.robot, "get_qlimits") else None
    full = float(limits.sum()) if limits is not None else 0.08
    opening = float(fingers.sum() / max(full, 1e-6))
    closed = float(np.clip(1.0 - opening, 0.0, 1.0))
    return np.concatenate([pos, quat, [closed]]).astype(np.float32)


class ManiSkillSession:
    """One ManiSkill3 env serving one episode spec (see `envs.backend.EnvSession`)."""

    def __init__(self, env, task: ManiSkillTask, spec: EpisodeSpec):
        self.env, self.task, self.spec = env, task, spec
        self.conv = task.convention
        self.gripper_closed = False
        self.instruction = task.instruction or ""

    def reset(self) -> Observation:
        obs, _ = self.env.reset(seed=self.spec.seed, options=dict(self.spec.reset_options) or None)
        show_hidden_goal(self.env, self.task)
        if self.task.show_goal:  # the first frame was captured with the marker hidden: capture again
            obs = self.env.unwrapped.get_obs()
        self.gripper_closed = False
        if self.task.instruction is None:
            self.instruction = str(self.env.unwrapped.get_language_instruction()[0])
        return Observation(camera_image(obs, self.task.camera), self.instruction, robot_state(self.env))

    def env_action(self, action: dict[str, np.ndarray]) -> np.ndarray:
        """SIMPLER-convention dict (world_vector m, rot_axangle, gripper +1 close) -> controller action (7,)."""
        g = float(np.asarray(action["gripper"]).reshape(-1)[0])
        if g > GRIPPER_DEADZONE:
            self.gripper_closed = True
        elif g < -GRIPPER_DEADZONE:
            self.gripper_closed = False
        return self.conv.metric_to_env(action["world_vector"], axangle_to_matrix(action["rot_axangle"]),
                                       1.0 if self.gripper_closed else -1.0)

    def step(self, action: dict[str, np.ndarray]) -> StepResult:
        obs, _rew, terminated, truncated, info = self.env.step(self.env_action(action))
        info = jsonable_info(info)
        return StepResult(camera_image(obs, self.task.camera), bool(terminated), bool(truncated),
                          bool(info.get("success", False)), info, state=robot_state(self.env))

    def advance_subtask(self) -> str:
        return self.instruction  # single-step tasks

    @property
    def is_final_subtask(self) -> bool:
        return True

    def close(self) -> None:
        self.env.close()


class ManiSkillBackend:
    """Builds ManiSkill3 envs for `maniskill/*` specs; keeps one env per process (one CPU-simulated env each).

    image_size: (H, W) of the Panda tasks' camera. reuse_env: reset the cached env per episode (a fresh
    build costs 4-14 s on CPU; the seed fixes the episode either way).
    """

    name = "maniskill"
    # The demos record rotation_delta as roll/pitch/yaw (ActionConvention.env_to_rt1) and the session reads
    # rot_axangle as axis-angle, so a policy trained on them is converted rpy -> axis-angle.
    default_rotation = "rpy"
    takes_task_options = True  # env_id, instruction, max_steps, solver (envs.maniskill_tasks.get_maniskill_task)

    def __init__(self, image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE, reuse_env: bool = True):
        self.image_size, self.reuse_env = tuple(image_size), reuse_env
        self._key: tuple | None = None
        self._env = None

    def check(self) -> None:
        """Fail early when mani_skill is missing or rendering cannot be set up."""
        try:
            import mani_skill  # noqa: F401
        except ImportError as e:
            raise ImportError(f"mani_skill is not importable ({e}); pip install 'mani-skill==3.0.1' 'numpy<2'") from e
        from envs.cpu_render import ensure_cpu_rendering

        ensure_cpu_rendering()

    def episodes(self, task: str, protocol: str, **task_options: Any) -> list[EpisodeSpec]:
        """The fixed-seed episodes of `task` (task_options: env_id, instruction, max_steps, solver)."""
        t = get_maniskill_task(task, **task_options)
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r} for {task}; choose one of {PROTOCOLS}")
        return [EpisodeSpec(task=task, protocol=protocol, variant="default", index=i, seed=EVAL_SEED_BASE + i,
                            max_steps=t.max_steps, env_id=t.env_id, task_options=dict(task_options))
                for i in range(EVAL_EPISODES)]

    def make(self, spec: EpisodeSpec, **options: Any) -> ManiSkillSession:
        """Build (or reuse) the env of `spec`; options: image_size (H, W), reuse_env."""
        unknown = set(options) - {"image_size", "reuse_env"}
        if unknown:
            raise ValueError(f"unknown ManiSkill backend options {sorted(unknown)}; known: image_size, reuse_env")
        size = tuple(options.get("image_size", self.image_size))
        reuse = bool(options.get("reuse_env", self.reuse_env))
        task = get_maniskill_task(spec.task, **spec.task_options)
        key = (task, size, repr(sorted(spec.make_kwargs.items())))
        if self._env is not None and (key != self._key or not reuse):
            self.close()
        if self._env is None:
            env = make_env(task, size, max_episode_steps=max(spec.max_steps, task.max_steps) + 10)
            self._env, self._key = env, key
        session = ManiSkillSession(self._env, task, spec)
        if reuse:
            session.close = lambda: None  # type: ignore[method-assign]  # the backend owns the cached env
        else:
            self._env = None
        return session

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
        self._env, self._key = None, None


register_backend("maniskill", lambda: ManiSkillBackend())  # a factory (a class would pass as an instance)
for _t in TASKS.values():
    register_task(_t.name, "maniskill", PROTOCOLS,
                  description=f"ManiSkill3 {_t.env_id} ({_t.robot}): {_t.instruction or 'instruction from the env'}")
register_task_prefix(TASK_PREFIX, "maniskill", PROTOCOLS, description="ManiSkill3 env given by task options")
