"""One short episode in the real SimplerEnv (skipped where `simpler_env` does not import).

Run it in SimplerEnv's own environment (numpy<2, sapien 2.2.2); without a GPU, set VK_ICD_FILENAMES
to a software Vulkan driver first (see envs/simpler_backend.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("simpler_env")

from envs.evaluator import EvalConfig, run_episode  # noqa: E402
from envs.simpler_backend import SimplerBackend  # noqa: E402
from envs.tasks import simpler_episodes  # noqa: E402


class ZeroPolicy:
    def reset(self, instruction):
        self.instruction = instruction

    def step(self, image, instruction):
        assert image.dtype == np.uint8 and image.shape == (512, 640, 3)
        zero = {"world_vector": np.zeros(3), "rot_axangle": np.zeros(3), "gripper": np.zeros(1),
                "terminate_episode": np.zeros(1)}
        return zero, zero


@pytest.mark.timeout(600)
def test_one_short_move_near_episode(tmp_path):
    spec = dataclasses.replace(simpler_episodes("move_near", "visual_matching")[0], max_steps=3)
    backend = SimplerBackend(cpu_render=True)
    session = backend.make(spec)
    obs = session.reset()
    assert obs.image.shape == (512, 640, 3) and obs.image.dtype == np.uint8
    assert isinstance(obs.instruction, str) and obs.instruction.startswith("move")
    assert session.is_final_subtask
    cfg = EvalConfig(task="move_near", video=True, output_dir=str(tmp_path), progress=False)
    rec = run_episode(backend, ZeroPolicy(), spec, cfg)
    backend.close()
    assert rec.error is None, rec.error
    assert rec.steps == 3 and rec.success is False and not rec.terminated_by_policy
    assert rec.video and (tmp_path / "videos").is_dir()
