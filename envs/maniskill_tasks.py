"""ManiSkill3 tasks of the toolkit and the ONE place where their action scaling lives (numpy only).

Action conventions (see `ActionConvention`):
- The toolkit's policy action is RT-1 style: world_vector (3, metres), a rotation delta (RT-1 data:
  roll/pitch/yaw; the evaluator's SIMPLER dict: axis-angle), both in the robot base's axes about the end
  effector, and a gripper command with +1 = close, -1 = open.
- Panda `pd_ee_delta_pose` (mani-skill 3.0.1): Box(-1, 1, (7,)). Position: metres = 0.1 * a[:3]
  (clipped to [-1, 1]). Rotation: a[3:6] is clipped to norm <= 1 and multiplied by the controller's
  `rot_lower` (= -0.1, so the sign flips), then read as intrinsic "XYZ" Euler angles
  (R = Rx @ Ry @ Rz) applied on the base-aligned side of the end-effector pose. Gripper a[6]:
  an absolute finger target, +1 open, -1 closed.
- WidowX on SIMPLER's Bridge tasks (`arm_pd_ee_target_delta_pose_align2_gripper_pd_joint_pos`): the arm is
  not normalized (metres and "XYZ" Euler radians as given); gripper a[6] normalized, +1 open, -1 closed.
The evaluator's session keeps the gripper target: a command above the dead zone closes, below opens,
near 0 keeps the previous target (so RT-1's relative commands and absolute +/-1 both work).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from policies.conventions import matrix_to_rpy, rpy_to_matrix


def euler_xyz_to_matrix(e: np.ndarray) -> np.ndarray:
    """Intrinsic "XYZ" Euler angles (3,) -> rotation (3, 3) = Rx(e0) @ Ry(e1) @ Rz(e2) (mani-skill's convention)."""
    a, b, c = (float(v) for v in np.asarray(e, dtype=np.float64).reshape(3))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


def matrix_to_euler_xyz(m: np.ndarray) -> np.ndarray:
    """Rotation (3, 3) -> intrinsic "XYZ" Euler angles (3,); inverse of `euler_xyz_to_matrix` (e1 in [-pi/2, pi/2])."""
    m = np.asarray(m, dtype=np.float64)
    b = np.arcsin(np.clip(m[0, 2], -1.0, 1.0))
    if abs(m[0, 2]) < 1.0 - 1e-9:
        return np.array([np.arctan2(-m[1, 2], m[2, 2]), b, np.arctan2(-m[0, 1], m[0, 0])])
    return np.array([np.arctan2(m[2, 1], m[1, 1]), b, 0.0])  # gimbal lock: all of it in e0


@dataclass(frozen=True)
class ActionConvention:
    """Controller action (7,) <-> metric end-effector delta + gripper; every scale and sign is here.

    pos_scale: metres per unit of a[:3]. rot_scale / rot_sign: Euler radians = rot_sign * rot_scale * a[3:6].
    normalized: the controller clips a[:3] to [-1, 1] and a[3:6] to norm <= 1 (mapped the same way here).
    gripper_sign: controller a[6] = gripper_sign * toolkit gripper (toolkit: +1 close, -1 open).
    """

    name: str
    pos_scale: float
    rot_scale: float
    rot_sign: float
    normalized: bool
    gripper_sign: float = -1.0

    def _clip(self, a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, dtype=np.float64).reshape(7).copy()
        if self.normalized:
            a[:3] = np.clip(a[:3], -1.0, 1.0)
            n = np.linalg.norm(a[3:6])
            if n > 1.0:
                a[3:6] /= n
        return a

    def env_to_metric(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Controller action -> (world_vector metres (3,), rotation matrix (3, 3), toolkit gripper in [-1, 1])."""
        a = self._clip(a)
        rot = euler_xyz_to_matrix(self.rot_sign * self.rot_scale * a[3:6])
        return a[:3] * self.pos_scale, rot, float(self.gripper_sign * a[6])

    def metric_to_env(self, world_vector: np.ndarray, rot: np.ndarray, gripper: float) -> np.ndarray:
        """(metres (3,), rotation matrix (3, 3), toolkit gripper) -> controller action (7,) float32 (clipped)."""
        a = np.zeros(7)
        a[:3] = np.asarray(world_vector, dtype=np.float64).reshape(3) / self.pos_scale
        a[3:6] = matrix_to_euler_xyz(rot) / (self.rot_sign * self.rot_scale)
        a[6] = self.gripper_sign * float(gripper)
        return self._clip(a).astype(np.float32)

    def env_to_rt1(self, a: np.ndarray) -> dict[str, np.ndarray]:
        """Controller action -> RT-1 fields: world_vector (3,), rotation_delta (3, roll/pitch/yaw), gripper (1,)."""
        wv, rot, g = self.env_to_metric(a)
        return {"world_vector": wv.astype(np.float32), "rotation_delta": matrix_to_rpy(rot).astype(np.float32),
                "gripper_closedness_action": np.array([g], dtype=np.float32)}

    def rt1_to_env(self, world_vector, rotation_delta, gripper) -> np.ndarray:
        """RT-1 fields (metres, roll/pitch/yaw, +1 close) -> controller action (7,)."""
        g = float(np.asarray(gripper).reshape(-1)[0])
        return self.metric_to_env(world_vector, rpy_to_matrix(rotation_delta), g)


PANDA_EE_DELTA = ActionConvention("panda/pd_ee_delta_pose", pos_scale=0.1, rot_scale=0.1, rot_sign=-1.0,
                                  normalized=True)
WIDOWX_BRIDGE = ActionConvention("widowx/pd_ee_target_delta_pose_align2", pos_scale=1.0, rot_scale=1.0,
                                 rot_sign=1.0, normalized=False)
PANDA_CONTROL = "pd_ee_delta_pose"
BRIDGE_CONTROL = "arm_pd_ee_target_delta_pose_align2_gripper_pd_joint_pos"
EVAL_SEED_BASE = 1_000_000  # evaluation seeds = base + episode index; demos use seeds from 0: disjoint
EVAL_EPISODES = 100
PROTOCOLS = ("standard", "visual_matching")  # the same seeded episodes; "visual_matching" for the SIMPLER CLI


@dataclass(frozen=True)
class ManiSkillTask:
    """One registered task: the gym id, what the camera shows in words, limits and how demos are made.

    instruction: None = ask the env (`get_language_instruction`, the Bridge tasks).
    max_steps: evaluation step limit (longer than the env's own 50 for Panda: the scripted demos take 50-110).
    solver: name of the motion-planning function in mani_skill.examples.motionplanning.panda.solutions.
    settle_steps: extra hold steps allowed after the solver finishes (PlaceSphere needs the ball to settle).
    show_goal: draw the goal marker the env hides from its cameras (PickCube), so the picture defines the task.
    aux_cameras: cameras besides the policy's that the env renders anyway (shrunk to save time).
    assets: mani-skill data-source ids the env needs (downloaded by the user; never here).
    """

    name: str
    env_id: str
    instruction: str | None
    max_steps: int
    robot: str = "panda"
    control_mode: str = PANDA_CONTROL
    camera: str = "base_camera"
    solver: str | None = None
    settle_steps: int = 0
    show_goal: bool = False
    aux_cameras: tuple[str, ...] = ()  # other cameras of the env: rendered at 16x16 (unused, and they cost time)
    assets: tuple[str, ...] = ()
    make_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def convention(self) -> ActionConvention:
        return PANDA_EE_DELTA if self.robot == "panda" else WIDOWX_BRIDGE


BRIDGE_ASSETS = ("bridge_v2_real2sim", "widowx250s")
TASKS: dict[str, ManiSkillTask] = {t.name: t for t in (
    ManiSkillTask("maniskill/pick_cube", "PickCube-v1", "pick up the red cube and move it to the green ball",
                  max_steps=120, solver="solvePickCube", show_goal=True),
    ManiSkillTask("maniskill/push_cube", "PushCube-v1", "push the blue cube onto the red and white target",
                  max_steps=100, solver="solvePushCube"),
    ManiSkillTask("maniskill/pull_cube", "PullCube-v1", "pull the blue cube back onto the red and white target",
                  max_steps=100, solver="solvePullCube"),
    ManiSkillTask("maniskill/stack_cube", "StackCube-v1", "stack the red cube on top of the green cube",
                  max_steps=150, solver="solveStackCube",
                  aux_cameras=("hand_camera",)),
    ManiSkillTask("maniskill/place_sphere", "PlaceSphere-v1", "place the blue ball into the bin",
                  max_steps=180, solver="solvePlaceSphere", settle_steps=20),
    *(ManiSkillTask(f"maniskill/bridge_{short}", env_id, None, max_steps=steps, robot="widowx",
                    control_mode=BRIDGE_CONTROL, camera="3rd_view_camera", assets=BRIDGE_ASSETS)
      for short, env_id, steps in (("carrot_on_plate", "PutCarrotOnPlateInScene-v1", 60),
                                   ("spoon_on_towel", "PutSpoonOnTableClothInScene-v1", 60),
                                   ("stack_green_on_yellow", "StackGreenCubeOnYellowCubeBakedTexInScene-v1", 60),
                                   ("eggplant_in_basket", "PutEggplantInBasketScene-v1", 120))),
)}


TASK_PREFIX = "maniskill/"
TASK_OPTIONS = ("env_id", "instruction", "max_steps", "solver")  # a user sets them beside / instead of the registry


def get_maniskill_task(name: str, **options: Any) -> ManiSkillTask:
    """The task for `name`: the registry entry with any of `TASK_OPTIONS` given overriding it, or, for a name
    outside the registry ("maniskill/<anything>"), a Panda `pd_ee_delta_pose` task built from the options
    (env_id, instruction and max_steps needed; env_id defaults to a gym id after the prefix, e.g.
    "maniskill/PokeCube-v1"). solver names a function of mani_skill.examples.motionplanning.panda.solutions."""
    unknown = sorted(set(options) - set(TASK_OPTIONS))
    if unknown:
        raise ValueError(f"unknown ManiSkill3 task options {unknown}; known: {', '.join(TASK_OPTIONS)}")
    given = {k: v for k, v in options.items() if v is not None}
    if "max_steps" in given:
        given["max_steps"] = int(given["max_steps"])
        if given["max_steps"] < 1:
            raise ValueError(f"max_steps must be a positive step limit, got {given['max_steps']}")
    if name in TASKS:
        return replace(TASKS[name], **given)
    if not name.startswith(TASK_PREFIX) or len(name) == len(TASK_PREFIX):
        raise ValueError(f"unknown ManiSkill3 task {name!r}; valid: {', '.join(TASKS)}, or any {TASK_PREFIX}<name> "
                         "with env_id, instruction and max_steps given")
    tail = name[len(TASK_PREFIX):]
    given.setdefault("env_id", tail if re.fullmatch(r"[A-Za-z0-9_]+-v\d+", tail) else None)
    missing = [k for k in ("env_id", "instruction", "max_steps") if given.get(k) is None]
    if missing:
        flags = " ".join(f"--{k.replace('_', '-')} ..." for k in missing)
        raise ValueError(f"{name} is not in the registry ({', '.join(TASKS)}): give its {', '.join(missing)} "
                         f"(command line: {flags}; or a task file, see envs.maniskill_tasks.load_task_file)")
    return ManiSkillTask(name, given["env_id"], given["instruction"], given["max_steps"], solver=given.get("solver"))


def load_task_file(path: str | Path) -> dict[str, Any]:
    """A task file (YAML): {task: maniskill/<name>, env_id, instruction, max_steps, solver} (task and any
    subset of the rest). Returns its entries; unknown keys raise ValueError naming them."""
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} not found")
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(data, dict):
        raise ValueError(f"task file {path} must hold a mapping of task, {', '.join(TASK_OPTIONS)}")
    unknown = sorted(set(data) - {"task", *TASK_OPTIONS})
    if unknown:
        raise ValueError(f"task file {path}: unknown keys {unknown}; known: task, {', '.join(TASK_OPTIONS)}")
    return data
