"""The whole evaluator loop on the SimplerEnv test double, with scripted numpy policies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import simpler_double  # tests/simpler_double.py: the SimplerEnv test double
from simpler_double import ScriptedPolicy

from envs.evaluator import EvalConfig, EvaluationFailed, evaluate

BACKEND = f"{simpler_double.__name__}:DoubleBackend"


def _cfg(tmp_path, task, **kw) -> EvalConfig:
    base = dict(task=task, protocol="visual_matching", backend=BACKEND, workers=1, video=False,
                output_dir=str(tmp_path / "out"), progress=False,
                policy={"kind": "factory", "target": "simpler_double:ScriptedPolicy", "kwargs": {}})
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


class RecordingBackend(simpler_double.DoubleBackend):
    """The double, keeping every action dict its sessions receive (in-process runs only)."""

    actions: list[dict] = []

    def make(self, spec, **options):
        session = super().make(spec, **options)
        step = session.step

        def recording_step(action):
            RecordingBackend.actions.append({k: np.array(v) for k, v in action.items()})
            return step(action)

        session.step = recording_step
        return session


@pytest.mark.parametrize("rotation, expected", [
    (None, [0.1, 0.2, 0.3]),  # the Google robot's default: RT-1's rotation_delta passed through as rot_axangle
    ("axis_angle", [0.1, 0.2, 0.3]),
    ("rpy", [0.06892461, 0.21322593, 0.28874894]),  # Rz(.3) Ry(.2) Rx(.1) as axis * angle (tests/test_conventions)
])
def test_rotation_convention_reaches_the_simulator_and_the_results(tmp_path, rotation, expected):
    RecordingBackend.actions = []
    cfg = _cfg(tmp_path, "reach", episodes=1, backend=f"{__name__}:RecordingBackend", rotation=rotation)
    res = evaluate(cfg, policy=ScriptedPolicy("never", rotation_delta=[0.1, 0.2, 0.3]))
    assert len(RecordingBackend.actions) == res.records[0].steps > 0
    for a in RecordingBackend.actions:
        np.testing.assert_allclose(a["rot_axangle"], expected, atol=1e-8)
    ran = rotation or "axis_angle"
    assert res.records[0].rotation == ran
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["meta"]["rotation"] == ran
    assert f"Rotation convention: {ran}" in (tmp_path / "out" / "results.md").read_text()


def test_unknown_rotation_convention_is_refused(tmp_path):
    with pytest.raises(ValueError, match="axis_angle.*rpy"):
        evaluate(_cfg(tmp_path, "reach", rotation="quaternion"), policy=ScriptedPolicy())


def test_ignore_terminate_runs_to_the_step_limit(tmp_path):
    res = evaluate(_cfg(tmp_path, "reach", ignore_terminate=True), policy=ScriptedPolicy("terminate"))
    assert all(r.steps == simpler_double.TASKS["reach"] and not r.terminated_by_policy for r in res.records)
    assert all(r.success for r in res.records)  # it stays on the target
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["meta"]["ignore_terminate"] is True


def test_entry_script_is_one_hydra_config_path_with_flag_aliases(tmp_path, capsys, load_script):
    eval_simpler = load_script("eval_simpler")

    argv = ["--task", "maniskill/poke", "--env-id", "PokeCube-v1", "--instruction", "poke the cube, gently",
            "--max-steps=70", "--rotation", "rpy", "--ignore-terminate", "--no-resume", "workers=2"]
    assert eval_simpler.flags_to_overrides(argv) == [
        "task=maniskill/poke", "env_id=PokeCube-v1", "instruction='poke the cube, gently'", "max_steps=70",
        "rotation=rpy", "ignore_terminate=true", "resume=false", "workers=2"]
    cfg = eval_simpler.parse(argv)
    assert (cfg.rotation, cfg.ignore_terminate, cfg.resume, cfg.workers) == ("rpy", True, False, 2)
    assert eval_simpler.task_options(cfg) == {"env_id": "PokeCube-v1", "instruction": "poke the cube, gently",
                                              "max_steps": 70}
    f = tmp_path / "poke.yaml"
    f.write_text("task: maniskill/poke\nenv_id: PokeCube-v1\ninstruction: poke it\nmax_steps: 30\n")
    cfg = eval_simpler.parse(["--task-file", str(f), "--max-steps", "40"])
    assert eval_simpler.task_options(cfg) == {"env_id": "PokeCube-v1", "instruction": "poke it", "max_steps": 40}
    with pytest.raises(eval_simpler.UsageError, match="Could not override 'rotation_mode'.*eval_simpler.yaml"):
        eval_simpler.parse(["--rotation-mode", "rpy"])
    with pytest.raises(eval_simpler.UsageError, match="unexpected argument 'move_near'"):
        eval_simpler.parse(["move_near"])
    assert eval_simpler.main(["--help"]) == 0
    assert "rotation:" in capsys.readouterr().out  # the help shows the config's keys with their comments
    assert eval_simpler.main(["--task", "maniskill/push_cube", "--rotation", "quaternion", "--policy-server", "h:1",
                              "--output-dir", str(tmp_path / "o")]) == 2
