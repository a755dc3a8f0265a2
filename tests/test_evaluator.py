"""The whole evaluator loop on the SimplerEnv test double, with scripted numpy policies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import simpler_double  # tests/simpler_double.py: the SimplerEnv test double

from envs.evaluator import EvalConfig, EvaluationFailed, evaluate
from policies.conventions import to_simpler_action

BACKEND = f"{simpler_double.__name__}:DoubleBackend"


def _centroid(img: np.ndarray, rgb) -> np.ndarray | None:
    ys, xs = np.nonzero(np.all(img == np.array(rgb, dtype=np.uint8), axis=-1))
    if len(xs) == 0:
        return None
    return np.array([xs.mean(), ys.mean()]) / (simpler_double.SIZE - 1)  # (x, y) table units


class ScriptedPolicy:
    """Reads the red gripper and the current target dot from the image and steps toward it.

    mode "terminate": send terminate once at the target (a multi-step task then goes on to the next);
    "never": never terminate; "overshoot": reach the target, then wander away and never terminate.
    """

    def __init__(self, mode: str = "terminate"):
        self.mode = mode
        self.calls: list[str] = []

    def reset(self, instruction: str) -> None:
        self.calls.append(f"reset:{instruction}")
        self.t, self.reached = 0, False

    def step(self, image: np.ndarray, instruction: str):
        assert image.dtype == np.uint8 and image.shape == (simpler_double.SIZE, simpler_double.SIZE, 3)
        self.calls.append(instruction)
        self.t += 1
        target = _centroid(image, (0, 0, 255) if "blue" in instruction else (0, 255, 0))
        pos = _centroid(image, (255, 0, 0))
        diff = target - pos
        at = np.linalg.norm(diff) < 0.03
        self.reached |= bool(at)
        terminate = float(at and self.mode == "terminate")
        move = np.clip(diff, -0.08, 0.08)
        if self.mode == "overshoot" and self.reached:
            move = np.array([-0.08, -0.08])
        a7 = np.array([move[0], move[1], 0.0, 0.0, 0.0, 0.0, 0.0])
        return {"a7": a7}, to_simpler_action(a7, terminate)


def _cfg(tmp_path, task, **kw) -> EvalConfig:
    base = dict(task=task, protocol="visual_matching", backend=BACKEND, workers=1, video=False,
                output_dir=str(tmp_path / "out"), progress=False,
                policy={"kind": "factory", "target": f"{__name__}:ScriptedPolicy", "kwargs": {}})
    base.update(kw)
    return EvalConfig(**base)


def test_terminate_ends_single_step_task_early_with_success(tmp_path):
    pol = ScriptedPolicy("terminate")
    res = evaluate(_cfg(tmp_path, "reach"), policy=pol)
    assert len(res.records) == 6
    for r in res.records:
        assert r.success is True and r.terminated_by_policy
        assert r.steps < simpler_double.TASKS["reach"]
    assert res.summary["reach/visual_matching"]["success_rate"] == 1.0


def test_step_limit_when_policy_never_terminates(tmp_path):
    res = evaluate(_cfg(tmp_path, "reach"), policy=ScriptedPolicy("never"))
    assert all(r.steps == simpler_double.TASKS["reach"] and not r.terminated_by_policy for r in res.records)
    assert all(r.success for r in res.records)  # sits on the target at the last step


def test_success_is_read_at_last_step_not_first(tmp_path):
    res = evaluate(_cfg(tmp_path, "reach"), policy=ScriptedPolicy("overshoot"))
    assert all(r.steps == simpler_double.TASKS["reach"] for r in res.records)
    assert not any(r.success for r in res.records)  # reached the target mid-episode, left it before the end
    assert res.summary["reach/visual_matching"]["success_rate"] == 0.0


def test_terminate_advances_subtask_in_multistep_task(tmp_path):
    pol = ScriptedPolicy("terminate")
    res = evaluate(_cfg(tmp_path, "two_stage", episodes=2), policy=pol)
    for r in res.records:
        assert r.success and r.terminated_by_policy
        assert "green" in r.instruction and "blue" in r.final_instruction
    # the policy was reset once per episode with the first instruction, then saw the new one
    assert [c for c in pol.calls if c.startswith("reset:")] == ["reset:move the gripper to the green dot"] * 2
    assert any("blue" in c for c in pol.calls if not c.startswith("reset:"))
    # without terminate the subtask never advances, so the multi-step task fails at the step limit
    res = evaluate(_cfg(tmp_path, "two_stage", episodes=2), policy=ScriptedPolicy("never"))
    assert all(not r.success and r.steps == simpler_double.TASKS["two_stage"] for r in res.records)


def test_videos_and_result_files(tmp_path):
    res = evaluate(_cfg(tmp_path, "reach", episodes=2, video=True), policy=ScriptedPolicy())
    out = tmp_path / "out"
    for name in ("episodes.json", "episodes.csv", "summary.json", "results.md"):
        assert (out / name).is_file(), name
    for r in res.records:
        assert r.video and Path(r.video).stat().st_size > 1000
        import imageio.v2 as imageio

        frames = imageio.mimread(r.video)
        assert len(frames) == r.steps + 1  # first observation + one per step
    data = json.loads((out / "summary.json").read_text())
    assert data["results"]["reach/visual_matching"]["pooled"]["n"] == 2
    assert res.timing["policy_s"] > 0 and res.timing["sim_s"] > 0


def test_failing_episode_fails_the_run_loudly(tmp_path):
    with pytest.raises(EvaluationFailed, match="simulated physics failure"):
        evaluate(_cfg(tmp_path, "crash"), policy=ScriptedPolicy())
    out = tmp_path / "out"
    eps = json.loads((out / "episodes.json").read_text())["episodes"]
    assert [e["success"] is None for e in eps] == [i == 1 for i in range(6)]
    assert not (out / "summary.json").exists() and not (out / "results.md").exists()


def test_bad_action_is_an_error(tmp_path):
    class Bad(ScriptedPolicy):
        def step(self, image, instruction):
            raw, action = super().step(image, instruction)
            action.pop("rot_axangle")
            return raw, action

    with pytest.raises(EvaluationFailed, match="rot_axangle"):
        evaluate(_cfg(tmp_path, "reach", episodes=1), policy=Bad())


def test_parallel_workers_match_in_process(tmp_path):
    serial = evaluate(_cfg(tmp_path / "s", "two_stage"), policy=ScriptedPolicy())
    par = evaluate(_cfg(tmp_path / "p", "two_stage", workers=2))
    key = [(r.index, r.success, r.steps) for r in serial.records]
    assert [(r.index, r.success, r.steps) for r in par.records] == key


def test_entry_script_flags_overrides_and_default_checkpoint(tmp_path, load_script):
    eval_simpler = load_script("eval_simpler")

    cfg = eval_simpler.parse(["--task", "pick_coke_can", "--no-video", "--episodes", "3", "workers=2",
                              "protocol=variant_aggregation", "--policy-server", "gpu1:9000"])
    assert (cfg.task, cfg.video, cfg.episodes, cfg.workers, cfg.protocol) == ("pick_coke_can", False, 3, 2,
                                                                            "variant_aggregation")
    assert eval_simpler.policy_spec(cfg)["port"] == 9000
    with pytest.raises(FileNotFoundError, match="finetune_rt1.py first or pass --checkpoint"):
        eval_simpler.newest_checkpoint(str(tmp_path / "none"))
    import os
    import time

    for i, name in enumerate(["old", "new"]):
        d = tmp_path / "ft" / name / "checkpoint"
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        os.utime(d / "config.json", (time.time() + i * 10, time.time() + i * 10))
    assert eval_simpler.newest_checkpoint(str(tmp_path / "ft")).parent.name == "new"
    assert eval_simpler.main(["--task", "move_far", "--policy-server", "h:1"]) == 2
