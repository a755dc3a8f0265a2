"""ManiSkill3 backend: action mapping by hand-computed cases, registry, asset errors, and one real episode."""

from __future__ import annotations

import numpy as np
import pytest

from envs.maniskill_tasks import (
    PANDA_EE_DELTA,
    TASKS,
    WIDOWX_BRIDGE,
    euler_xyz_to_matrix,
    matrix_to_euler_xyz,
)
from policies.conventions import rpy_to_axangle


def test_panda_hand_computed_cases():
    # full +x push, half -y, yaw +0.5 unit (the controller multiplies by rot_lower = -0.1), gripper open
    rt1 = PANDA_EE_DELTA.env_to_rt1(np.array([1.0, -0.5, 0.0, 0.0, 0.0, 0.5, 1.0]))
    np.testing.assert_allclose(rt1["world_vector"], [0.1, -0.05, 0.0], atol=1e-7)
    np.testing.assert_allclose(rt1["rotation_delta"], [0.0, 0.0, -0.05], atol=1e-7)
    assert rt1["gripper_closedness_action"][0] == -1.0  # Panda +1 = open = RT-1 -1
    # roll only: a[3] = -1 -> +0.1 rad about x; gripper closed
    rt1 = PANDA_EE_DELTA.env_to_rt1(np.array([0, 0, 0.2, -1.0, 0, 0, -1.0]))
    np.testing.assert_allclose(rt1["world_vector"], [0, 0, 0.02], atol=1e-7)
    np.testing.assert_allclose(rt1["rotation_delta"], [0.1, 0, 0], atol=1e-7)
    assert rt1["gripper_closedness_action"][0] == 1.0
    # back: 5 cm down, pitch -0.03 rad, close -> [0, 0, -0.5, 0, 0.3, 0, -1]
    a = PANDA_EE_DELTA.rt1_to_env([0, 0, -0.05], [0, -0.03, 0], [1.0])
    np.testing.assert_allclose(a, [0, 0, -0.5, 0, 0.3, 0, -1], atol=1e-6)
    # beyond the bounds: positions clip per axis, rotations by norm (as the controller does)
    a = PANDA_EE_DELTA.rt1_to_env([0.5, 0, 0], [0, 0, 0.2], [-1.0])
    np.testing.assert_allclose(a, [1, 0, 0, 0, 0, -1, 1], atol=1e-6)


def test_round_trip_env_rt1_env():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = rng.uniform(-1, 1, 7)
        a[3:6] *= rng.uniform(0, 1) / max(np.linalg.norm(a[3:6]), 1e-9)  # inside the controller's norm ball
        a[6] = rng.choice([-1.0, 1.0])
        rt1 = PANDA_EE_DELTA.env_to_rt1(a)
        back = PANDA_EE_DELTA.rt1_to_env(rt1["world_vector"], rt1["rotation_delta"], rt1["gripper_closedness_action"])
        np.testing.assert_allclose(back, a, atol=2e-6)
        w = WIDOWX_BRIDGE.env_to_rt1(a * 0.05)
        np.testing.assert_allclose(w["world_vector"], a[:3] * 0.05, atol=1e-7)  # WidowX: raw metres
        back = WIDOWX_BRIDGE.rt1_to_env(w["world_vector"], w["rotation_delta"], w["gripper_closedness_action"])
        np.testing.assert_allclose(back, a * 0.05, atol=1e-6)


@pytest.mark.needs_sim
def test_euler_xyz_matches_maniskill():
    import torch
    from mani_skill.utils.geometry import rotation_conversions as rc  # (the dotted import is circular in 3.0.1)

    e = np.array([0.3, -0.7, 1.1])
    theirs = rc.euler_angles_to_matrix(torch.tensor(e), "XYZ").numpy()
    np.testing.assert_allclose(euler_xyz_to_matrix(e), theirs, atol=1e-9)
    np.testing.assert_allclose(matrix_to_euler_xyz(theirs), e, atol=1e-9)


def test_session_gripper_is_held_and_axangle_is_mapped():
    from envs.backend import EpisodeSpec
    from envs.maniskill_backend import ManiSkillSession

    spec = EpisodeSpec("maniskill/pick_cube", "standard", "default", 0, 1, 10, "PickCube-v1")
    s = ManiSkillSession(env=None, task=TASKS["maniskill/pick_cube"], spec=spec)
    act = {"world_vector": np.array([0.01, 0, 0]), "rot_axangle": rpy_to_axangle([0, 0, 0.05]),
           "terminate_episode": np.zeros(1)}
    assert s.env_action({**act, "gripper": np.array([0.0])})[6] == 1.0  # starts open
    a = s.env_action({**act, "gripper": np.array([0.8])})
    np.testing.assert_allclose(a, [0.1, 0, 0, 0, 0, -0.5, -1.0], atol=1e-6)  # closes; yaw sign flipped
    assert s.env_action({**act, "gripper": np.array([0.0])})[6] == -1.0  # 0 = keep closed
    assert s.env_action({**act, "gripper": np.array([-1.0])})[6] == 1.0  # opens


def test_registry_and_seeds():
    from envs.backend import backend_for, get_task, resolve_episodes, task_names

    names = task_names()
    for n in ("maniskill/pick_cube", "maniskill/push_cube", "maniskill/pull_cube", "maniskill/stack_cube",
              "maniskill/place_sphere", "maniskill/bridge_carrot_on_plate", "maniskill/bridge_eggplant_in_basket"):
        assert n in names and get_task(n).backend == "maniskill"
    specs = resolve_episodes("maniskill/push_cube", "standard", 5)
    assert [s.seed for s in specs] == [1_000_000 + i for i in range(5)] and specs[0].max_steps == 100
    with pytest.raises(ValueError, match="protocol"):
        backend_for("maniskill/push_cube").episodes("maniskill/push_cube", "variant_aggregation")
    for t in TASKS.values():
        assert t.instruction is None or len(t.instruction.split()) >= 4


@pytest.mark.needs_sim
def test_bridge_missing_or_empty_assets_name_the_download(tmp_path, monkeypatch):
    from mani_skill.utils.assets.data import DATA_SOURCES

    from envs.maniskill_backend import check_assets

    for uid in ("bridge_v2_real2sim", "widowx250s"):
        monkeypatch.setattr(DATA_SOURCES[uid], "output_dir", tmp_path)
    (tmp_path / DATA_SOURCES["bridge_v2_real2sim"].target_path).mkdir(parents=True)  # interrupted download
    with pytest.raises(FileNotFoundError, match="download_asset bridge_v2_real2sim") as e:
        check_assets(TASKS["maniskill/bridge_carrot_on_plate"])
    assert "empty" in str(e.value) and "download_asset widowx250s" in str(e.value)


class ReplayPolicy:
    """Replays recorded RT-1 actions through the SIMPLER action dict (terminates on the recorded terminate)."""

    def __init__(self, world_vector, rotation_delta, gripper, terminate):
        self.rows = list(zip(world_vector, rotation_delta, gripper, terminate))

    def reset(self, instruction):
        self.t = 0

    def step(self, image, instruction):
        assert image.shape == (256, 320, 3) and image.dtype == np.uint8
        wv, rpy, g, term = self.rows[min(self.t, len(self.rows) - 1)]
        self.t += 1
        action = {"world_vector": wv, "rot_axangle": rpy_to_axangle(rpy), "gripper": g,
                  "terminate_episode": np.array([float(term)])}
        return {}, action


@pytest.mark.slow
@pytest.mark.needs_sim
@pytest.mark.timeout(120)
def test_real_episode_through_evaluator_replays_a_demo(tmp_path, renderer):
    """A scripted demo recorded in RT-1 fields, replayed by the evaluator on the same seed, succeeds."""
    import torch

    torch.set_num_threads(1)
    from envs.demos import DemoCollector
    from envs.evaluator import EvalConfig, evaluate
    from envs.maniskill_tasks import EVAL_SEED_BASE

    col = DemoCollector("maniskill/push_cube")
    ep, why = col.collect(EVAL_SEED_BASE)  # the seed of evaluation episode 0
    col.close()
    assert ep is not None, why
    pol = ReplayPolicy(ep.world_vector, ep.rotation_delta, ep.gripper_closedness_action, ep.terminate)
    cfg = EvalConfig(task="maniskill/push_cube", protocol="standard", episodes=1, workers=1, video=False,
                     output_dir=str(tmp_path / "eval"), progress=False, policy={"kind": "object"})
    res = evaluate(cfg, policy=pol)
    rec = res.records[0]
    assert rec.error is None and rec.instruction == TASKS["maniskill/push_cube"].instruction
    assert rec.terminated_by_policy and rec.steps == len(ep)
    assert rec.success is True
