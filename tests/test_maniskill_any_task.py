"""Any ManiSkill3 task: env id, instruction, step limit and solver from the command line or a task file."""

from __future__ import annotations

import pytest

from envs.backend import get_task, resolve_episodes
from envs.maniskill_tasks import TASKS, get_maniskill_task, load_task_file


def test_registry_entries_are_defaults_the_options_override():
    t = get_maniskill_task("maniskill/push_cube", instruction="shove the cube", max_steps=40)
    assert (t.env_id, t.instruction, t.max_steps, t.solver) == ("PushCube-v1", "shove the cube", 40, "solvePushCube")
    assert TASKS["maniskill/push_cube"].max_steps == 100  # the registry itself is untouched
    assert get_maniskill_task("maniskill/push_cube", instruction=None) == TASKS["maniskill/push_cube"]


def test_a_task_outside_the_registry_from_its_options():
    t = get_maniskill_task("maniskill/lift_peg", env_id="LiftPegUpright-v1", instruction="lift the peg upright",
                           max_steps="150", solver="solveLiftPegUpright")
    assert (t.env_id, t.instruction, t.max_steps, t.solver, t.robot, t.control_mode) == (
        "LiftPegUpright-v1", "lift the peg upright", 150, "solveLiftPegUpright", "panda", "pd_ee_delta_pose")
    # a gym id after the prefix is the env id
    assert get_maniskill_task("maniskill/PokeCube-v1", instruction="poke", max_steps=9).env_id == "PokeCube-v1"
    with pytest.raises(ValueError, match=r"give its instruction, max_steps \(command line: --instruction"):
        get_maniskill_task("maniskill/PokeCube-v1")
    with pytest.raises(ValueError, match="give its env_id"):
        get_maniskill_task("maniskill/poke", instruction="poke", max_steps=9)
    with pytest.raises(ValueError, match="unknown ManiSkill3 task options.*camera"):
        get_maniskill_task("maniskill/push_cube", camera="hand")
    with pytest.raises(ValueError, match="positive step limit"):
        get_maniskill_task("maniskill/push_cube", max_steps=0)


def test_episodes_carry_the_task_options_to_the_workers():
    options = {"env_id": "PokeCube-v1", "instruction": "poke the cube", "max_steps": 70}
    assert get_task("maniskill/poke").backend == "maniskill"  # any maniskill/<name> is served by the backend
    specs = resolve_episodes("maniskill/poke", "standard", 3, options)
    assert [(s.env_id, s.max_steps, s.task_options) for s in specs] == [("PokeCube-v1", 70, options)] * 3
    assert specs[0].to_dict()["task_options"] == options  # what a spawned worker receives
    with pytest.raises(ValueError, match="takes no task options.*maniskill"):
        resolve_episodes("move_near", "visual_matching", 1, {"instruction": "x"})
    with pytest.raises(ValueError, match="unknown task 'pick_cube'.*maniskill/<name> with task options"):
        get_task("pick_cube")


def test_task_file_and_command_line(tmp_path, load_script):
    f = tmp_path / "peg.yaml"
    f.write_text("task: maniskill/lift_peg\nenv_id: LiftPegUpright-v1\ninstruction: lift the peg upright\n"
                 "max_steps: 150\nsolver: solveLiftPegUpright\n")
    assert load_task_file(f)["solver"] == "solveLiftPegUpright"
    collect_demos = load_script("collect_demos")

    args = collect_demos.parse_args(["--task-file", str(f), "--max-steps", "90", "--episodes", "1", "--out", "x"])
    t = collect_demos.task_of(args)  # the flag overrides the file
    assert (t.name, t.env_id, t.max_steps, t.solver) == ("maniskill/lift_peg", "LiftPegUpright-v1", 90,
                                                         "solveLiftPegUpright")
    (tmp_path / "bad.yaml").write_text("task: maniskill/x\nrobot: widowx\n")
    with pytest.raises(ValueError, match="unknown keys \\['robot'\\]"):
        load_task_file(tmp_path / "bad.yaml")


def test_solver_is_checked_against_mani_skill():
    pytest.importorskip("mani_skill.examples.motionplanning.panda.solutions", reason="mani_skill not installed")
    from envs.demos import solver_function

    assert callable(solver_function(get_maniskill_task("maniskill/pick_cube")))
    with pytest.raises(ValueError, match="solveNothing.*not one.*solvePickCube"):
        solver_function(get_maniskill_task("maniskill/pick_cube", solver="solveNothing"))
    with pytest.raises(ValueError, match="no scripted solver.*--solver"):
        solver_function(get_maniskill_task("maniskill/PokeCube-v1", instruction="poke", max_steps=9))
