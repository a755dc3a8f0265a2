"""Action conventions between RT-1 data and SIMPLER's Google-robot controller (numpy only).

RT-1 predicts `[dx, dy, dz, r0, r1, r2, gripper]`; its data names the rotation `rotation_delta`
(roll/pitch/yaw). SIMPLER's controller takes the rotation as an axis-angle vector (axis * angle).
How the model's three rotation numbers become that vector is the *rotation convention*, an explicit
choice (`ROTATION_CONVENTIONS`):
- "axis_angle" (default, the Google robot): pass `rotation_delta` through unchanged as `rot_axangle`.
  This is what SimplerEnv's RT-1 wrapper does for the Google robot (`action_rotation_mode =
  "axis_angle"` in `simpler_env/policies/rt1/rt1_model.py`), so published RT-1 numbers ran this way.
- "rpy": read the three numbers as static x-y-z Euler angles (R = Rz(yaw) @ Ry(pitch) @ Rx(roll), the
  transforms3d "sxyz" default) and convert rpy -> rotation matrix -> axis-angle, as SimplerEnv's Octo
  wrapper does for both robots and its RT-1 wrapper does for WidowX.
For small angles the two differ by a few percent (up to about 15% at 0.3 rad).
The RT-1 wrapper also zeroes tiny gripper commands (|g| < 0.01) and passes the terminate flag through;
`action["terminate_episode"][0] > 0` means "terminate" (or "advance to the next subtask" in multi-step
tasks). Gripper: relative, +1 closes, -1 opens.
"""

from __future__ import annotations

import numpy as np

SIMPLER_KEYS = ("world_vector", "rot_axangle", "gripper", "terminate_episode")
GRIPPER_DEADZONE = 1e-2  # RT-1 wrapper: |g| below this is sent as 0
ROTATION_CONVENTIONS = {
    "axis_angle": "rotation_delta passed through as rot_axangle (SimplerEnv's RT-1 wrapper, Google robot)",
    "rpy": "rotation_delta read as roll/pitch/yaw, converted to axis-angle (SimplerEnv's Octo wrapper; RT-1 WidowX)",
}
DEFAULT_ROTATION = "axis_angle"  # the Google robot's RT-1 convention


def rpy_to_matrix(rpy: np.ndarray) -> np.ndarray:
    """Roll/pitch/yaw (static x, y, z axes) -> rotation matrix (3, 3): Rz(yaw) @ Ry(pitch) @ Rx(roll)."""
    r, p, y = (float(v) for v in np.asarray(rpy, dtype=np.float64).reshape(3))
    cr, sr, cp, sp, cy, sy = np.cos(r), np.sin(r), np.cos(p), np.sin(p), np.cos(y), np.sin(y)
    return np.array([
        [cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
        [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
        [-sp, cp * sr, cp * cr],
    ])


def matrix_to_rpy(m: np.ndarray) -> np.ndarray:
    """Rotation matrix (3, 3) -> roll/pitch/yaw (3,), the inverse of `rpy_to_matrix` (pitch in [-pi/2, pi/2])."""
    m = np.asarray(m, dtype=np.float64)
    pitch = np.arcsin(np.clip(-m[2, 0], -1.0, 1.0))
    if abs(m[2, 0]) < 1.0 - 1e-9:
        roll = np.arctan2(m[2, 1], m[2, 2])
        yaw = np.arctan2(m[1, 0], m[0, 0])
    else:  # gimbal lock: only roll -/+ yaw is defined; put it all in roll
        yaw = 0.0
        roll = np.arctan2(-m[1, 2], m[1, 1])
    return np.array([roll, pitch, yaw])


def matrix_to_axangle(m: np.ndarray) -> np.ndarray:
    """Rotation matrix (3, 3) -> axis-angle vector (3,) = unit axis * angle, angle in [0, pi]."""
    m = np.asarray(m, dtype=np.float64)
    cos_a = np.clip((np.trace(m) - 1.0) / 2.0, -1.0, 1.0)
    angle = float(np.arccos(cos_a))
    if angle < 1e-12:
        return np.zeros(3)
    skew = np.array([m[2, 1] - m[1, 2], m[0, 2] - m[2, 0], m[1, 0] - m[0, 1]])  # = 2 sin(a) * axis
    if np.pi - angle > 1e-6:
        axis = skew / (2.0 * np.sin(angle))
    else:  # angle ~ pi: axis from the symmetric part, R = 2 a a^T - I
        aa = (m + np.eye(3)) / 2.0
        i = int(np.argmax(np.diag(aa)))
        axis = aa[:, i] / np.sqrt(max(aa[i, i], 1e-12))
        if np.dot(axis, skew) < 0:  # keep the sign consistent with the (tiny) skew part when it has one
            axis = -axis
    return axis / np.linalg.norm(axis) * angle


def axangle_to_matrix(v: np.ndarray) -> np.ndarray:
    """Axis-angle vector (3,) -> rotation matrix (3, 3) (Rodrigues)."""
    v = np.asarray(v, dtype=np.float64).reshape(3)
    angle = float(np.linalg.norm(v))
    if angle < 1e-12:
        return np.eye(3)
    k = v / angle
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * kx + (1 - np.cos(angle)) * kx @ kx


def rpy_to_axangle(rpy: np.ndarray) -> np.ndarray:
    """RT-1 rotation_delta (roll, pitch, yaw) -> SIMPLER rot_axangle (3,), as SimplerEnv's RT-1 wrapper does."""
    return matrix_to_axangle(rpy_to_matrix(rpy))


def axangle_to_rpy(v: np.ndarray) -> np.ndarray:
    """SIMPLER rot_axangle (3,) -> roll/pitch/yaw (3,) (inverse of `rpy_to_axangle`)."""
    return matrix_to_rpy(axangle_to_matrix(v))


def check_rotation(convention: str) -> str:
    """`convention` if it names a rotation convention, else ValueError listing them."""
    if convention not in ROTATION_CONVENTIONS:
        choices = "; ".join(f"{k}: {v}" for k, v in ROTATION_CONVENTIONS.items())
        raise ValueError(f"unknown rotation convention {convention!r}; choose one of: {choices}")
    return convention


def rotation_to_axangle(rotation_delta: np.ndarray, convention: str = DEFAULT_ROTATION) -> np.ndarray:
    """The model's rotation_delta (3,) -> SIMPLER rot_axangle (3,) float64 under `convention`."""
    rot = np.asarray(rotation_delta, dtype=np.float64).reshape(3)
    return rot.copy() if check_rotation(convention) == "axis_angle" else rpy_to_axangle(rot)


def axangle_to_rotation(rot_axangle: np.ndarray, convention: str = DEFAULT_ROTATION) -> np.ndarray:
    """SIMPLER rot_axangle (3,) -> the model's rotation_delta (3,) under `convention` (inverse of the above)."""
    v = np.asarray(rot_axangle, dtype=np.float64).reshape(3)
    return v.copy() if check_rotation(convention) == "axis_angle" else axangle_to_rpy(v)


def filter_gripper(g: float, deadzone: float = GRIPPER_DEADZONE) -> float:
    """RT-1 wrapper's small-command filter: |g| < deadzone becomes 0."""
    return 0.0 if abs(g) < deadzone else float(g)


class StickyGripper:
    """Hold a gripper command for `repeat` steps once it exceeds `threshold` (Octo-style wrappers use 15).

    `repeat=1` is a pass-through. Call `reset()` at each episode start.
    """

    def __init__(self, repeat: int = 1, threshold: float = 0.5):
        if repeat < 1:
            raise ValueError(f"sticky gripper repeat must be >= 1, got {repeat}")
        self.repeat, self.threshold = repeat, threshold
        self.reset()

    def reset(self) -> None:
        self._value, self._left = 0.0, 0

    def __call__(self, g: float) -> float:
        if self.repeat == 1:
            return float(g)
        if self._left == 0 and abs(g) > self.threshold:
            self._value, self._left = float(g), self.repeat
        if self._left > 0:
            self._left -= 1
            return self._value
        return float(g)


def terminate_from_onehot(onehot: np.ndarray) -> float:
    """RT-1 data's terminate_episode (3,) one-hot -> 1.0 if it says terminate (index 0), else 0.0."""
    onehot = np.asarray(onehot).reshape(-1)
    if onehot.shape[0] != 3:
        raise ValueError(f"terminate_episode must be a 3-way one-hot, got shape {onehot.shape}")
    return float(int(np.argmax(onehot)) == 0 and onehot[0] > 0)


def to_simpler_action(a7: np.ndarray, terminate: float = 0.0, gripper_deadzone: float = GRIPPER_DEADZONE,
                      sticky: StickyGripper | None = None, rotation: str = DEFAULT_ROTATION) -> dict[str, np.ndarray]:
    """RT-1 action (7,) [xyz, rotation_delta, gripper] -> SIMPLER action dict (rotation: a ROTATION_CONVENTIONS key).

    Returns {world_vector (3,), rot_axangle (3,), gripper (1,), terminate_episode (1,)} float64.
    """
    a7 = np.asarray(a7, dtype=np.float64).reshape(-1)
    if a7.shape[0] != 7 or not np.all(np.isfinite(a7)):
        raise ValueError(f"expected a finite 7-D RT-1 action [xyz, rpy, gripper], got {a7!r}")
    g = filter_gripper(a7[6], gripper_deadzone)
    if sticky is not None:
        g = sticky(g)
    return {
        "world_vector": a7[:3].copy(),
        "rot_axangle": rotation_to_axangle(a7[3:6], rotation),
        "gripper": np.array([g]),
        "terminate_episode": np.array([float(terminate)]),
    }


def from_simpler_action(action: dict[str, np.ndarray], rotation: str = DEFAULT_ROTATION) -> tuple[np.ndarray, float]:
    """SIMPLER action dict -> (RT-1 action (7,) [xyz, rotation_delta, gripper], terminate float)."""
    missing = [k for k in SIMPLER_KEYS if k not in action]
    if missing:
        raise ValueError(f"SIMPLER action lacks keys {missing}; it needs {list(SIMPLER_KEYS)}")
    a7 = np.concatenate([
        np.asarray(action["world_vector"], dtype=np.float64).reshape(3),
        axangle_to_rotation(action["rot_axangle"], rotation),
        np.asarray(action["gripper"], dtype=np.float64).reshape(1),
    ])
    return a7, float(np.asarray(action["terminate_episode"]).reshape(-1)[0])

