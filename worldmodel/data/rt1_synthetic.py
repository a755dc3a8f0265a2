"""An embedded synthetic sample with RT-1's schema, whose actions follow from what the frames show.

NOT RT-1. It lets ``scripts/finetune_rt1.py`` run end to end with no data; point ``data.rt1_dir`` at a local
copy of ``fractal20220817_data/0.1.0`` for the real thing.

Each episode is a rendered table top (256x320) with three coloured blocks and a black square gripper
(hollow = open, filled = closed). The instruction names one block ("move the gripper to the red block").
Per step the gripper moves toward the target at a constant speed (the last move lands on it), so the
action depends only on the current frame and the instruction; then it lowers and closes, then terminates:

    move steps   world_vector = min(SPEED_PX, distance) * unit(target - gripper) in metres (+ small noise),
                 gripper action 0
    close step   world_vector = (0, 0, -LOWER_M), gripper_closedness_action = +1 (close)
    last step    terminate_episode = 1, world_vector = 0, gripper +1 (held closed)

Image axes to robot axes: world x = up in the image (-row), world y = left in the image (-col), z = height;
1 px = ``METRES_PER_PX`` metres. rotation_delta is zero throughout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from worldmodel.data.rt1_schema import IMAGE_SHAPE, NAME, VERSION

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # bump when the rendering or the action rule changes (changes the cache key)
METRES_PER_PX = 0.002  # 2 mm per pixel
SPEED_PX = 24.0  # distance moved per step (px); short episodes move faster (see make_synthetic_episodes)
REACHED_PX = 4.0  # the gripper counts as at the target within this distance
MIN_START_PX = 110.0  # the gripper starts at least this far from the target (px)
LOWER_M = 0.05  # z displacement of the closing step
NOISE_PX = 1.0  # std of the action noise (pixels), applied to the executed motion too
BLOCK = 44  # block side (px)
GRIPPER = 40  # gripper side (px)
WALL = 10  # wall of the open (hollow) gripper (px)
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (235, 205, 40)}

WARNING = (
    "\n" + "!" * 100 + "\n"
    "!! Using the EMBEDDED SYNTHETIC sample (rendered blocks and a square gripper). This is NOT RT-1.\n"
    "!! For real robot data copy gs://gresearch/robotics/fractal20220817_data/0.1.0 locally and run\n"
    "!!   python scripts/finetune_rt1.py data.rt1_dir=/path/to/fractal20220817_data/0.1.0\n"
    + "!" * 100 + "\n"
)


def pixel_to_world(rc: np.ndarray) -> np.ndarray:
    """(..., 2) pixel (row, col) -> (..., 2) world (x, y) metres: x = -row, y = -col, about the image centre."""
    H, W = IMAGE_SHAPE[:2]
    rc = np.asarray(rc, np.float64)
    return np.stack([-(rc[..., 0] - H / 2), -(rc[..., 1] - W / 2)], -1) * METRES_PER_PX


def world_delta_to_pixels(world_vector: np.ndarray) -> np.ndarray:
    """(..., 3) world displacement -> (..., 2) pixel (row, col) displacement (z dropped)."""
    wv = np.asarray(world_vector, np.float64)
    return np.stack([-wv[..., 0], -wv[..., 1]], -1) / METRES_PER_PX


def render(blocks: list[tuple[str, np.ndarray]], gripper_rc: np.ndarray, closed: bool, shade: int) -> np.ndarray:
    """One (256, 320, 3) uint8 frame: table, blocks (name, centre (row, col)), gripper on top."""
    H, W = IMAGE_SHAPE[:2]
    img = np.empty(IMAGE_SHAPE, np.uint8)
    img[:] = (np.array([200, 180, 150]) + shade).clip(0, 255).astype(np.uint8)

    def box(centre, side):
        r, c = int(round(centre[0])), int(round(centre[1]))
        h = side // 2
        return max(r - h, 0), min(r + h, H), max(c - h, 0), min(c + h, W)

    for color, centre in blocks:
        r0, r1, c0, c1 = box(centre, BLOCK)
        img[r0:r1, c0:c1] = COLORS[color]
    r0, r1, c0, c1 = box(gripper_rc, GRIPPER)
    img[r0:r1, c0:c1] = 15
    if not closed:  # open: hollow, with a white centre
        i0, i1, j0, j1 = box(gripper_rc, GRIPPER - 2 * WALL)
        img[i0:i1, j0:j1] = 245
    return img


def _place(rng: np.random.Generator, n: int, margin: int) -> list[np.ndarray]:
    """n block centres (row, col), well apart."""
    H, W = IMAGE_SHAPE[:2]
    while True:
        pts = [rng.uniform([margin, margin], [H - margin, W - margin]) for _ in range(n)]
        if all(np.linalg.norm(a - b) > BLOCK * 1.8 for i, a in enumerate(pts) for b in pts[i + 1:]):
            return pts


def make_episode(rng: np.random.Generator, max_steps: int = 24, speed: float = SPEED_PX, blocks: int = 3) -> dict:
    """One episode dict in the rt1_writer format (frames, instruction, actions, observation).

    ``blocks`` coloured blocks (1 to 4) lie on the table; the instruction names one of them.
    The start is placed so the gripper reaches the target within ``max_steps`` (move steps + close + terminate).
    """
    if not 1 <= blocks <= len(COLORS):
        raise ValueError(f"blocks must be between 1 and {len(COLORS)} (one per colour), got {blocks}")
    H, W = IMAGE_SHAPE[:2]
    names = list(rng.choice(list(COLORS), size=blocks, replace=False))
    centres = _place(rng, blocks, BLOCK)
    target_i = int(rng.integers(blocks))
    target = centres[target_i]
    reach = speed * (max_steps - 3) - 3 * NOISE_PX  # farthest start reached in time (move steps + close + terminate)
    while True:  # start the gripper far from the target, but reachable
        grip = rng.uniform([GRIPPER, GRIPPER], [H - GRIPPER, W - GRIPPER])
        if min(MIN_START_PX, reach / 2) < np.linalg.norm(grip - target) < reach:
            break
    shade = int(rng.integers(-15, 16))
    blocks = list(zip(names, centres))
    frames, wv, grip_act, terminate, pose, to_go, closed_obs = [], [], [], [], [], [], []
    closed, phase = False, "move"
    for t in range(max_steps):
        frames.append(render(blocks, grip, closed, shade))
        pose.append(np.r_[pixel_to_world(grip), 0.0 if not closed else -LOWER_M])
        to_go.append(np.r_[pixel_to_world(target) - pixel_to_world(grip), 0.0])
        closed_obs.append(float(closed))
        last = t == max_steps - 1
        if phase == "move" and (np.linalg.norm(target - grip) <= REACHED_PX or t == max_steps - 2):
            phase = "close"
        if last or phase == "done":
            wv.append(np.zeros(3))
            grip_act.append(1.0 if closed else 0.0)
            terminate.append(True)
            break
        if phase == "close":
            wv.append(np.array([0.0, 0.0, -LOWER_M]))
            grip_act.append(1.0)
            closed, phase = True, "done"
        else:
            offset = target - grip  # (row, col)
            distance = np.linalg.norm(offset)
            step_px = offset * min(1.0, speed / distance) + rng.normal(0, NOISE_PX, 2)
            new = np.clip(grip + step_px, GRIPPER / 2, [H - GRIPPER / 2, W - GRIPPER / 2])
            moved = new - grip  # the executed motion (row, col), equal to step_px unless clipped
            grip = new
            wv.append(np.r_[-moved[0] * METRES_PER_PX, -moved[1] * METRES_PER_PX, 0.0])
            grip_act.append(0.0)
        terminate.append(False)
    T = len(frames)
    return {
        "frames": np.stack(frames),  # (T, 256, 320, 3)
        "instruction": f"move the gripper to the {names[target_i]} block",
        "actions": {
            "world_vector": np.stack(wv).astype(np.float32),  # (T, 3)
            "rotation_delta": np.zeros((T, 3), np.float32),
            "gripper_closedness_action": np.array(grip_act, np.float32)[:, None],  # (T, 1)
            "terminate_episode": np.array(terminate),  # (T,) bool
        },
        "observation": {
            "base_pose_tool_reached": np.c_[np.stack(pose), np.tile([0.0, 0.0, 0.0, 1.0], (T, 1))],  # (T, 7)
            "vector_to_go": np.stack(to_go),  # (T, 3)
            "gripper_closed": np.array(closed_obs)[:, None],  # (T, 1)
        },
        "target_rc": target,  # (2,) pixel centre of the named block (not written; for tests)
    }


def make_synthetic_episodes(num_episodes: int = 48, steps: int = 24, seed: int = 0, blocks: int = 3) -> list[dict]:
    """``num_episodes`` episodes of at most ``steps`` steps (about 12-18 each) with ``blocks`` blocks each,
    reproducible from ``seed``."""
    if num_episodes < 1 or steps < 3:
        raise ValueError(f"need num_episodes >= 1 and steps >= 3, got {num_episodes}, {steps}")
    rng = np.random.default_rng(seed)
    speed = max(SPEED_PX, 2 * MIN_START_PX / (steps - 3))  # short episodes need a faster approach
    return [make_episode(rng, steps, speed, blocks) for _ in range(num_episodes)]


def default_cache_dir() -> Path:
    """$WORLDMODEL_CACHE or ~/.cache/worldmodel, + rt1_synthetic."""
    root = os.environ.get("WORLDMODEL_CACHE") or Path.home() / ".cache" / "worldmodel"
    return Path(root).expanduser() / "rt1_synthetic"


def ensure_embedded_sample(cache_dir: str | Path | None = None, num_episodes: int = 48, steps: int = 24,
                           seed: int = 0, quiet: bool = False, blocks: int = 3) -> Path:
    """The synthetic sample's version directory (for RT1Windows), generated once per settings and reused.

    Written to a temporary directory beside the cache entry and renamed into place, so a crash or a
    concurrent run never leaves a half-written sample behind.
    """
    from worldmodel.data.rt1_writer import write_rt1_dataset

    if not quiet:
        print(WARNING, file=sys.stderr, flush=True)
    settings = {"generator": GENERATOR_VERSION, "episodes": num_episodes, "steps": steps, "seed": seed}
    if blocks != 3:  # the original three-block scene keeps its cache key
        settings["blocks"] = blocks
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / key
    version_dir = final / NAME / VERSION
    if (version_dir / "dataset_info.json").exists():
        return version_dir
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp", dir=root))
    try:
        episodes = make_synthetic_episodes(num_episodes, steps, seed, blocks)
        for ep in episodes:
            ep.pop("target_rc")
        write_rt1_dataset(episodes, tmp, description="Embedded synthetic sample (NOT RT-1): " + json.dumps(settings))
        (tmp / "settings.json").write_text(json.dumps(settings))
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: use its copy
            if not (version_dir / "dataset_info.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("embedded synthetic RT-1-schema sample at %s", version_dir)
    return version_dir
