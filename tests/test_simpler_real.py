"""Short episodes in the real SimplerEnv (skipped where `simpler_env` does not import).

Run it in SimplerEnv's own environment (numpy<2, sapien 2.2.2). Rendering is set up as the evaluator does it
(`prepare_rendering`, before SAPIEN is imported): without a GPU, Mesa lavapipe and the SAPIEN 2 layer from
~/.cache/worldmodel/cpu-render, whose libvulkan.so.1 also serves machines that have none.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("simpler_env") is None:
    pytest.skip("SimplerEnv is not installed in this Python", allow_module_level=True)

from envs.simpler_backend import prepare_rendering  # noqa: E402

prepare_rendering()  # SAPIEN 2 links libvulkan.so.1 when imported: pick the driver (and loader) first

from envs.evaluator import EvalConfig, run_episode  # noqa: E402
from envs.simpler_backend import SimplerBackend  # noqa: E402
from envs.tasks import MAX_STEPS, simpler_episodes  # noqa: E402

pytestmark = [pytest.mark.needs_sim("simpler_env"), pytest.mark.slow]


class ZeroPolicy:
    """Holds still; `terminate` = 1.0 asks to end (or advance) at every step."""

    def __init__(self, terminate: float = 0.0):
        self.terminate, self.instructions = terminate, []

    def reset(self, instruction):
        self.instructions.append(instruction)

    def step(self, image, instruction):
        assert image.dtype == np.uint8 and image.shape == (512, 640, 3)
        self.instructions.append(instruction)
        zero = {"world_vector": np.zeros(3), "rot_axangle": np.zeros(3), "gripper": np.zeros(1),
                "terminate_episode": np.full(1, self.terminate)}
        return zero, zero


@pytest.fixture(scope="module")
def backend():
    b = SimplerBackend(cpu_render=True)
    yield b
    b.close()


def test_every_visual_matching_overlay_resolves(backend):
    for task in MAX_STEPS:
        for spec in simpler_episodes(task, "visual_matching"):
            path = Path(backend.make_kwargs(spec)["rgb_overlay_path"])
            assert path.is_absolute() and path.is_file(), (task, spec.index, path)


@pytest.mark.timeout(600)
def test_one_short_move_near_episode(backend, tmp_path):
    spec = dataclasses.replace(simpler_episodes("move_near", "visual_matching")[0], max_steps=3)
    session = backend.make(spec)
    obs = session.reset()
    assert obs.image.shape == (512, 640, 3) and obs.image.dtype == np.uint8
    assert isinstance(obs.instruction, str) and obs.instruction.startswith("move")
    assert session.is_final_subtask
    cfg = EvalConfig(task="move_near", video=True, output_dir=str(tmp_path), progress=False)
    rec = run_episode(backend, ZeroPolicy(), spec, cfg)
    assert rec.error is None, rec.error
    assert rec.steps == 3 and rec.success is False and not rec.terminated_by_policy
    assert rec.video and (tmp_path / "videos").is_dir()
    assert rec.final_info["elapsed_steps"] == 3 and "episode_stats" in rec.final_info


@pytest.mark.timeout(600)
def test_terminate_advances_the_subtask_then_ends(backend, tmp_path):
    spec = dataclasses.replace(simpler_episodes("place_apple_in_drawer", "visual_matching")[0], max_steps=5)
    policy = ZeroPolicy(terminate=1.0)
    cfg = EvalConfig(task="place_apple_in_drawer", video=False, output_dir=str(tmp_path), progress=False,
                     backend_options={"cpu_render": True})
    rec = run_episode(backend, policy, spec, cfg)
    assert rec.error is None, rec.error
    # step 1: terminate before the last subtask -> advance ("open" -> "place"); step 2: terminate on the last one
    assert rec.instruction == "open top drawer" and rec.final_instruction.startswith("place apple into")
    assert rec.steps == 2 and rec.terminated_by_policy and rec.success is False
    assert policy.instructions[:2] == ["open top drawer", "open top drawer"]
    assert policy.instructions[2].startswith("place")
