"""RT-1 <-> SIMPLER action conventions against hand-computed and independently computed rotations."""

from __future__ import annotations

import numpy as np
import pytest

from policies.conventions import (
    ROTATION_CONVENTIONS,
    StickyGripper,
    axangle_to_rotation,
    axangle_to_rpy,
    filter_gripper,
    from_simpler_action,
    rotation_to_axangle,
    rpy_to_axangle,
    terminate_from_onehot,
    to_simpler_action,
)


def _rx(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _ry(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rz(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _rodrigues(v):
    th = np.linalg.norm(v)
    k = v / th
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(th) * K + (1 - np.cos(th)) * K @ K


def test_pure_axes_by_hand():
    np.testing.assert_allclose(rpy_to_axangle([0, 0, 0.3]), [0, 0, 0.3], atol=1e-12)  # yaw: axis z, angle 0.3
    np.testing.assert_allclose(rpy_to_axangle([0.2, 0, 0]), [0.2, 0, 0], atol=1e-12)
    np.testing.assert_allclose(rpy_to_axangle([0, -0.4, 0]), [0, -0.4, 0], atol=1e-12)
    np.testing.assert_allclose(rpy_to_axangle([0, 0, 0]), [0, 0, 0])


@pytest.mark.parametrize("rpy", [(0.1, -0.2, 0.3), (-0.35, 0.42, -0.44), (1.0, 0.5, -2.0), (0.0, 1.2, 0.7)])
def test_combined_rpy_matches_independent_matrix(rpy):
    r, p, y = rpy
    expected = _rz(y) @ _ry(p) @ _rx(r)  # static x-y-z (transforms3d "sxyz", SimplerEnv's euler2axangle)
    v = rpy_to_axangle(rpy)
    np.testing.assert_allclose(_rodrigues(v), expected, atol=1e-10)
    assert 0 <= np.linalg.norm(v) <= np.pi
    np.testing.assert_allclose(axangle_to_rpy(v), rpy, atol=1e-10)  # inverse


def test_known_combined_value():
    # rpy (0.1, 0.2, 0.3): R = Rz(.3) Ry(.2) Rx(.1); angle = arccos((trace - 1) / 2), axis from the skew part
    R = _rz(0.3) @ _ry(0.2) @ _rx(0.1)
    angle = np.arccos((np.trace(R) - 1) / 2)
    axis = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]]) / (2 * np.sin(angle))
    np.testing.assert_allclose(rpy_to_axangle([0.1, 0.2, 0.3]), axis * angle, atol=1e-12)
    # scipy's extrinsic "xyz" Euler angles are the same static-axes convention
    from scipy.spatial.transform import Rotation

    ref = Rotation.from_euler("xyz", [0.1, 0.2, 0.3]).as_rotvec()
    np.testing.assert_allclose(rpy_to_axangle([0.1, 0.2, 0.3]), ref, atol=1e-12)
    np.testing.assert_allclose(ref, [0.06892461, 0.21322593, 0.28874894], atol=1e-8)


def test_near_pi_rotation():
    v = np.array([0.0, 0.0, np.pi - 1e-9])
    np.testing.assert_allclose(_rodrigues(rpy_to_axangle(axangle_to_rpy(v))), _rodrigues(v), atol=1e-6)


def test_gripper_deadzone_and_sticky():
    assert filter_gripper(0.009) == 0.0 and filter_gripper(-0.009) == 0.0
    assert filter_gripper(0.01) == 0.01 and filter_gripper(-0.7) == -0.7
    s = StickyGripper(repeat=3)
    assert [s(g) for g in (0.0, 1.0, 0.0, 0.0, 0.0, -0.2)] == [0.0, 1.0, 1.0, 1.0, 0.0, -0.2]
    s.reset()
    assert s(0.0) == 0.0
    assert StickyGripper(1)(0.3) == 0.3
    with pytest.raises(ValueError):
        StickyGripper(0)


# rotation_delta (0.1, 0.2, 0.3) under each convention, by hand: "axis_angle" passes it through (SimplerEnv's
# RT-1 wrapper on the Google robot); "rpy" is R = Rz(.3) Ry(.2) Rx(.1) as axis * angle (test_known_combined_value).
HAND = {"axis_angle": [0.1, 0.2, 0.3], "rpy": [0.06892461, 0.21322593, 0.28874894]}


@pytest.mark.parametrize("convention", sorted(ROTATION_CONVENTIONS))
def test_rotation_convention_against_hand_computed_values(convention):
    assert set(HAND) == set(ROTATION_CONVENTIONS)
    np.testing.assert_allclose(rotation_to_axangle([0.1, 0.2, 0.3], convention), HAND[convention], atol=1e-8)
    a7 = np.array([0.01, -0.02, 0.03, 0.1, 0.2, 0.3, 0.5])
    np.testing.assert_allclose(to_simpler_action(a7, rotation=convention)["rot_axangle"], HAND[convention], atol=1e-8)
    np.testing.assert_allclose(axangle_to_rotation(HAND[convention], convention), [0.1, 0.2, 0.3], atol=1e-8)
    # a single-axis rotation is the same vector under both
    np.testing.assert_allclose(rotation_to_axangle([0.0, 0.0, 0.3], convention), [0.0, 0.0, 0.3], atol=1e-12)


def test_default_is_the_rt1_google_robot_pass_through():
    a7 = np.array([0.01, -0.02, 0.03, 0.1, 0.2, 0.3, 0.5])
    assert to_simpler_action(a7)["rot_axangle"].tolist() == [0.1, 0.2, 0.3]
    with pytest.raises(ValueError, match="unknown rotation convention 'euler'.*axis_angle.*rpy"):
        rotation_to_axangle([0.1, 0.2, 0.3], "euler")


@pytest.mark.parametrize("convention", sorted(ROTATION_CONVENTIONS))
def test_to_from_simpler_action_round_trip(convention):
    a7 = np.array([0.01, -0.02, 0.03, 0.1, -0.2, 0.3, 0.005])
    act = to_simpler_action(a7, terminate=1.0, rotation=convention)
    assert set(act) == {"world_vector", "rot_axangle", "gripper", "terminate_episode"}
    assert act["gripper"].shape == (1,) and act["gripper"][0] == 0.0  # tiny command zeroed
    assert act["terminate_episode"][0] == 1.0
    back, term = from_simpler_action(act, rotation=convention)
    np.testing.assert_allclose(back[:6], a7[:6], atol=1e-12)
    assert term == 1.0
    with pytest.raises(ValueError, match="7-D"):
        to_simpler_action(np.zeros(6))
    with pytest.raises(ValueError, match="lacks"):
        from_simpler_action({"world_vector": np.zeros(3)})


def test_terminate_onehot():
    assert terminate_from_onehot([1, 0, 0]) == 1.0
    assert terminate_from_onehot([0, 1, 0]) == 0.0
    assert terminate_from_onehot([0, 0, 1]) == 0.0
    with pytest.raises(ValueError):
        terminate_from_onehot([1, 0])
