"""SIMPLER Google-robot task registry: the official episode grids of SimplerEnv's rt1_*.sh scripts.

Facts (robot init poses, object grids, scenes, overlays, urdf versions, step limits) are taken from
SimplerEnv's `scripts/rt1_{pick_coke_can,move_near,drawer,put_in_drawer}_{visual_matching,variant_agg}.sh`
and the variant lists of `tools/calc_metrics_evaluation_videos.py` (camera-pose variants are run by the
scripts but left out of the published aggregate, so they are left out here too).

Every episode becomes an `EpisodeSpec` whose `make_kwargs` are the env build kwargs (scene_name,
rgb_overlay_path relative to the SimplerEnv repository root, urdf_version, ...) and whose
`reset_options` are `{"robot_init_options": {"init_xy", "init_rot_quat"}, "obj_init_options": {...}}`
exactly as SimplerEnv's evaluator builds them. `variant` names the aggregation cell.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from envs.backend import EpisodeSpec, register_backend, register_task

PROTOCOLS = ("visual_matching", "variant_aggregation")
OVERLAY_DIR = "ManiSkill2_real2sim/data/real_inpainting"  # relative to the SimplerEnv repository root
URDF_VERSIONS = (None, "recolor_tabletop_visual_matching_1", "recolor_tabletop_visual_matching_2",
                 "recolor_cabinet_visual_matching_1")
COKE_CAN_OPTIONS = ("lr_switch", "upright", "laid_vertically")  # horizontal, standing, vertical
MAX_STEPS = {"pick_coke_can": 80, "move_near": 80, "open_drawer": 113, "close_drawer": 113,
             "place_apple_in_drawer": 200}
# Shared build settings of every rt1_*.sh script (robot, control mode, rates, obs mode).
COMMON_MAKE = {
    "obs_mode": "rgbd",
    "robot": "google_robot_static",
    "control_mode": ("arm_pd_ee_delta_pose_align_interpolate_by_planner"
                     "_gripper_pd_joint_target_delta_pos_interpolate_by_planner"),
    "control_freq": 3,
    "sim_freq": 513,
    "camera_cfgs": {"add_segmentation": True},
}
DRAWER_VM_KWARGS = {"shader_dir": "rt", "station_name": "mk_station_recolor", "light_mode": "simple",
                    "disable_bad_material": True}
# Drawer / apple variant-aggregation cells: (label, scene_name, extra build kwargs). All ray-traced.
DRAWER_VA_VARIANTS = (
    ("base", "frl_apartment_stage_simple", {}),
    ("background=modern_bedroom", "modern_bedroom_no_roof", {}),
    ("background=modern_office", "modern_office_no_roof", {}),
    ("lighting=brighter", "frl_apartment_stage_simple", {"light_mode": "brighter"}),
    ("lighting=darker", "frl_apartment_stage_simple", {"light_mode": "darker"}),
    ("cabinet=mk_station2", "frl_apartment_stage_simple", {"station_name": "mk_station2"}),
    ("cabinet=mk_station3", "frl_apartment_stage_simple", {"station_name": "mk_station3"}),
)
# Tabletop variant-aggregation cells: (label, env suffix kind, scene_name, extra kwargs).
MOVE_NEAR_VA_VARIANTS = (
    ("base", "google_pick_coke_can_1_v4", {}),
    ("distractor=none", "google_pick_coke_can_1_v4", {"no_distractor": True}),
    ("background=alt_1", "google_pick_coke_can_1_v4_alt_background", {}),
    ("background=alt_2", "google_pick_coke_can_1_v4_alt_background_2", {}),
    ("lighting=darker", "google_pick_coke_can_1_v4", {"slightly_darker_lighting": True}),
    ("lighting=brighter", "google_pick_coke_can_1_v4", {"slightly_brighter_lighting": True}),
    ("table=cabinet1", "Baked_sc1_staging_objaverse_cabinet1_h870", {}),
    ("table=cabinet2", "Baked_sc1_staging_objaverse_cabinet2_h870", {}),
)
COKE_VA_VARIANTS = (  # (label, env id, scene, extra kwargs)
    ("base", "GraspSingleOpenedCokeCanInScene-v0", "google_pick_coke_can_1_v4", {}),
    ("table=cabinet1", "GraspSingleOpenedCokeCanInScene-v0", "Baked_sc1_staging_objaverse_cabinet1_h870", {}),
    ("table=cabinet2", "GraspSingleOpenedCokeCanInScene-v0", "Baked_sc1_staging_objaverse_cabinet2_h870", {}),
    ("distractor=default", "GraspSingleOpenedCokeCanDistractorInScene-v0", "google_pick_coke_can_1_v4", {}),
    ("distractor=more", "GraspSingleOpenedCokeCanDistractorInScene-v0", "google_pick_coke_can_1_v4",
     {"distractor_config": "more"}),
    ("background=alt_1", "GraspSingleOpenedCokeCanInScene-v0", "google_pick_coke_can_1_v4_alt_background", {}),
    ("background=alt_2", "GraspSingleOpenedCokeCanInScene-v0", "google_pick_coke_can_1_v4_alt_background_2", {}),
    ("lighting=darker", "GraspSingleOpenedCokeCanInScene-v0", "google_pick_coke_can_1_v4",
     {"slightly_darker_lighting": True}),
    ("lighting=brighter", "GraspSingleOpenedCokeCanInScene-v0", "google_pick_coke_can_1_v4",
     {"slightly_brighter_lighting": True}),
)
# Drawer visual-matching overlays: name -> (robot x, robot y, yaw), from rt1_drawer_visual_matching.sh.
DRAWER_OVERLAYS = {
    "a0": (0.644, -0.179, -0.03), "a1": (0.765, -0.182, -0.02), "a2": (0.889, -0.203, -0.06),
    "b0": (0.652, 0.009, 0.0), "b1": (0.752, 0.009, 0.0), "b2": (0.851, 0.035, 0.0),
    "c0": (0.665, 0.224, -0.025), "c1": (0.765, 0.222, -0.025), "c2": (0.865, 0.222, -0.025),
}
OPEN_ENVS = ("OpenTopDrawerCustomInScene-v0", "OpenMiddleDrawerCustomInScene-v0", "OpenBottomDrawerCustomInScene-v0")
CLOSE_ENVS = ("CloseTopDrawerCustomInScene-v0", "CloseMiddleDrawerCustomInScene-v0",
              "CloseBottomDrawerCustomInScene-v0")
APPLE_ENV = "PlaceIntoClosedTopDrawerCustomInScene-v0"


def _qmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of quaternions in (w, x, y, z) order."""
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b
    return np.array([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                     w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2])


def robot_init_quat(roll: float, pitch: float, yaw: float, center=(0.0, 0.0, 0.0, 1.0)) -> list[float]:
    """The scripts' robot orientation: quat(static-xyz euler r, p, y) * center, (w, x, y, z) as SAPIEN's Pose.

    The scripts pass `--robot-init-rot-quat-center 0 0 0 1`, which SAPIEN reads as w=0, z=1 (a half
    turn about z); that is kept as is.
    """
    def axis_q(angle, i):
        q = np.zeros(4)
        q[0], q[1 + i] = np.cos(angle / 2), np.sin(angle / 2)
        return q
    q = _qmul(_qmul(axis_q(yaw, 2), axis_q(pitch, 1)), axis_q(roll, 0))
    return [float(v) for v in _qmul(q, np.asarray(center, dtype=np.float64))]


def _grid(lo: float, hi: float, n: int) -> list[float]:
    return [float(v) for v in np.linspace(lo, hi, n)]


@dataclass
class _Setup:
    """One `main_inference.py` invocation of a script: env, scene, robot pose grid, object grid."""

    variant: str
    env_id: str
    scene_name: str
    robot_xy: list[tuple[float, float]]
    yaw: float
    obj: list[dict[str, Any]]  # obj_init_options per episode
    extra: dict[str, Any] = field(default_factory=dict)
    overlay: str | None = None


def _xy(xs, ys):
    return [(x, y) for x in xs for y in ys]


def _obj_xy(xs, ys):
    return [{"init_xy": [x, y]} for x in xs for y in ys]


def _setups(task: str, protocol: str) -> list[_Setup]:
    vm = protocol == "visual_matching"
    out: list[_Setup] = []
    if task == "move_near":
        obj = [{"episode_id": i} for i in range(60)]
        if vm:
            for u in URDF_VERSIONS:
                out.append(_Setup(f"urdf={u}", "MoveNearGoogleBakedTexInScene-v0", "google_pick_coke_can_1_v4",
                                  [(0.35, 0.21)], -0.09, obj, {"urdf_version": u},
                                  f"{OVERLAY_DIR}/google_move_near_real_eval_1.png"))
        else:
            for label, scene, extra in MOVE_NEAR_VA_VARIANTS:
                out.append(_Setup(label, "MoveNearGoogleInScene-v0", scene, [(0.35, 0.21)], -0.09, obj, dict(extra)))
    elif task == "pick_coke_can":
        obj = _obj_xy(_grid(-0.35, -0.12, 5), _grid(-0.02, 0.42, 5))
        for can in COKE_CAN_OPTIONS:
            if vm:
                for u in URDF_VERSIONS:
                    out.append(_Setup(f"can={can}/urdf={u}", "GraspSingleOpenedCokeCanInScene-v0",
                                      "google_pick_coke_can_1_v4", [(0.35, 0.20)], 0.0, obj,
                                      {can: True, "urdf_version": u}, f"{OVERLAY_DIR}/google_coke_can_real_eval_1.png"))
            else:
                for label, env_id, scene, extra in COKE_VA_VARIANTS:
                    out.append(_Setup(f"can={can}/{label}", env_id, scene, [(0.35, 0.20)], 0.0, obj,
                                      {can: True, **extra}))
    elif task in ("open_drawer", "close_drawer"):
        envs = OPEN_ENVS if task == "open_drawer" else CLOSE_ENVS
        obj = [{"init_xy": [0.0, 0.0]}]
        for env_id in envs:
            short = env_id.replace("CustomInScene-v0", "")
            if vm:
                for u in URDF_VERSIONS:
                    for name, (x, y, yaw) in DRAWER_OVERLAYS.items():
                        out.append(_Setup(f"{short}/urdf={u}", env_id, "dummy_drawer", [(x, y)], yaw, obj,
                                          {**DRAWER_VM_KWARGS, "urdf_version": u},
                                          f"{OVERLAY_DIR}/open_drawer_{name}.png"))
            else:
                for label, scene, extra in DRAWER_VA_VARIANTS:
                    out.append(_Setup(f"{short}/{label}", env_id, scene, _xy(_grid(0.65, 0.85, 3), _grid(-0.2, 0.2, 3)),
                                      0.0, obj, {"shader_dir": "rt", **extra}))
    elif task == "place_apple_in_drawer":
        obj = _obj_xy(_grid(-0.08, -0.02, 3), _grid(-0.02, 0.08, 3))
        if vm:
            for u in URDF_VERSIONS:
                for name in ("a0", "b0", "c0"):
                    x, y, yaw = DRAWER_OVERLAYS[name]
                    out.append(_Setup(f"urdf={u}", APPLE_ENV, "dummy_drawer", [(x, y)], yaw, obj,
                                      {**DRAWER_VM_KWARGS, "urdf_version": u, "model_ids": "baked_apple_v2"},
                                      f"{OVERLAY_DIR}/open_drawer_{name}.png"))
        else:
            for label, scene, extra in DRAWER_VA_VARIANTS:
                out.append(_Setup(label, APPLE_ENV, scene, _xy([0.65], _grid(-0.2, 0.2, 3)), 0.0, obj,
                                  {"shader_dir": "rt", **extra, "model_ids": "apple"}))
    else:
        raise ValueError(f"unknown SIMPLER task {task!r}; valid: {sorted(MAX_STEPS)}")
    return out


def simpler_episodes(task: str, protocol: str) -> list[EpisodeSpec]:
    """All episodes of `task` under `protocol`, in the scripts' loop order (setup, robot pose, object)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    specs: list[EpisodeSpec] = []
    for s in _setups(task, protocol):
        make = {**COMMON_MAKE, "max_episode_steps": MAX_STEPS[task], "scene_name": s.scene_name,
                "rgb_overlay_path": s.overlay, **s.extra}
        for (x, y), obj in itertools.product(s.robot_xy, s.obj):
            reset = {"robot_init_options": {"init_xy": [float(x), float(y)],
                                            "init_rot_quat": robot_init_quat(0.0, 0.0, s.yaw)},
                     "obj_init_options": dict(obj)}
            specs.append(EpisodeSpec(task=task, protocol=protocol, variant=s.variant, index=len(specs), seed=None,
                                     max_steps=MAX_STEPS[task], env_id=s.env_id, make_kwargs=dict(make),
                                     reset_options=reset))
    return specs


def _simpler_backend():
    from envs.simpler_backend import SimplerBackend

    return SimplerBackend()


register_backend("simpler", _simpler_backend)
for _name in MAX_STEPS:
    register_task(_name, "simpler", PROTOCOLS, description=f"SIMPLER Google robot: {_name}")
