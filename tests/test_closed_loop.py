"""The ManiSkill3 closed loop without a simulator: baselines, stage resume, results.json / report.md, the CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from envs import closed_loop as cl
from envs import closed_loop_report as rep
from envs.demos import DemoEpisode, save_shard
from envs.results import EpisodeRecord, write_results
from policies.baselines import MeanReplayPolicy, StillPolicy, mean_trajectory
from policies.conventions import SIMPLER_KEYS, to_simpler_action

ROOT = Path(__file__).resolve().parents[1]
TASK = "maniskill/push_cube"
RAW_KEYS = {"world_vector", "rotation_delta", "gripper", "terminate_episode"}  # policies.stepper.ChunkedPolicy
IMAGE = np.zeros((8, 8, 3), np.uint8)


def _demo(seed: int, motion: int, gripper: float, rng) -> DemoEpisode:
    T = motion + 1  # + the terminate step (zero motion, as the collector writes it)
    term = np.zeros(T, bool)
    term[-1] = True
    wv, rot = rng.normal(size=(T, 3)).astype(np.float32), rng.normal(size=(T, 3)).astype(np.float32) * 0.1
    wv[-1] = rot[-1] = 0
    g = np.full((T, 1), gripper, np.float32)
    return DemoEpisode(TASK, seed, "push", np.zeros((T, 4, 4, 3), np.uint8), wv, rot, g, term, np.zeros((T, 7)))


def test_still_policy_never_moves_and_never_terminates():
    p = StillPolicy()
    p.reset("push the cube")
    for _ in range(3):
        raw, action = p.step(IMAGE, "push the cube")
        assert set(raw) == RAW_KEYS and set(action) == set(SIMPLER_KEYS)
        assert not np.any(action["world_vector"]) and not np.any(action["rot_axangle"])
        assert action["gripper"].tolist() == [-1.0] and action["terminate_episode"].tolist() == [0.0]


def test_mean_replay_is_the_mean_of_the_shards(tmp_path):
    rng = np.random.default_rng(0)
    demos = [_demo(0, 4, 1.0, rng), _demo(1, 6, 1.0, rng), _demo(2, 5, -1.0, rng)]
    for d in demos:
        save_shard(d, tmp_path)
    (tmp_path / "maniskill_push_cube_0000009.fail.json").write_text("{}")  # a failed seed is ignored
    p = MeanReplayPolicy(shard_dir=str(tmp_path), task=TASK)
    p.reset("push")
    L = 5  # median of 4, 6, 5 motion steps
    for t in range(L):
        rows = [np.concatenate([d.world_vector[t], d.rotation_delta[t]]) for d in demos if t < len(d) - 1]
        raw, action = p.step(IMAGE, "push")
        np.testing.assert_allclose(np.concatenate([raw["world_vector"], raw["rotation_delta"]]),
                                   np.mean(rows, axis=0), rtol=1e-6, atol=1e-7)
        assert raw["gripper"].tolist() == [1.0] and raw["terminate_episode"].tolist() == [0.0]  # 2 of 3 closed
        a7 = np.concatenate([raw["world_vector"], raw["rotation_delta"], raw["gripper"]])
        for k, v in to_simpler_action(a7, 0.0).items():
            np.testing.assert_allclose(action[k], v)
    raw, action = p.step(IMAGE, "push")
    assert action["terminate_episode"].tolist() == [1.0] and not np.any(action["world_vector"])
    p.reset("push")  # a new episode replays from the start
    assert p.step(IMAGE, "push")[1]["terminate_episode"].tolist() == [0.0]
    assert len(MeanReplayPolicy(shard_dir=str(tmp_path), task=TASK, max_demos=1).trajectory) == 4


def test_mean_trajectory_gripper_majority_and_ties():
    a = np.zeros((3, 7))
    a[:, 6] = [1, 1, -1]
    b = np.zeros((3, 7))
    b[:, 6] = [-1, 1, 1]
    traj = mean_trajectory([a, b])
    assert traj[:, 6].tolist() == [-1.0, 1.0, 1.0]  # tie at 0 starts open, tie at 2 keeps the previous sign
    with pytest.raises(ValueError):
        MeanReplayPolicy()


def _fake_results(out: Path) -> dict:
    def entry(k, n, video=True):
        e = rep.rate_entry(k, n)
        e["timing"] = {"policy_ms_per_step": 12.0, "sim_ms_per_step": 40.0}
        e["videos"] = {"success": ["eval_x/videos/0001_default_success.mp4"] if video else [],
                       "failure": ["eval_x/videos/0000_default_failure.mp4"] if video else []}
        return e

    curve = [{"step": s, **rep.rate_entry(k, 20), "action_mae": m} for s, k, m in ((5, 1, 0.02), (10, 4, 0.01))]
    return {
        "task": TASK, "objectives": ["selfflow", "flow_matching"], "eval_episodes": 40, "curve_episodes": 20,
        "recipe": {"config": "finetune_maniskill", "model": "tiny", "trainer": {"max_steps": 10}},
        "demos": {"kept": 8},
        "selfflow": {**entry(7, 40), "offline": {"action_mae": 0.01, "mean_baseline_mae": 0.02}},
        "flow_matching": {**entry(5, 40)},
        "baselines": {"still": entry(0, 40, video=False), "mean_replay": entry(2, 40)},
        "learning_curve": {"selfflow": curve, "flow_matching": []},
        "offline_curve": {"selfflow": [{"step": 5, "action_mae": 0.02, "mean_baseline_mae": 0.03},
                                       {"step": 10, "action_mae": 0.01, "mean_baseline_mae": 0.03}]},
        "stages_s": {"demos": 12.0, "finetune/selfflow": None, "eval/selfflow": 30.5},
        "commands": {"closed_loop": "python scripts/closed_loop.py --task maniskill/push_cube", "stages": ["a", "b"]},
    }


def test_report_from_fake_stage_results(tmp_path):
    results = _fake_results(tmp_path)
    rep.write_json_atomic(tmp_path / "results.json", results)
    assert rep.load_results(tmp_path)["selfflow"]["successes"] == 7
    paths = rep.write_report(tmp_path, results)
    md = paths["report"].read_text()
    lo, hi = results["selfflow"]["ci95"]
    assert f"| Self-Flow | 7/40 | 17.5% [{100 * lo:.1f}, {100 * hi:.1f}] | - | 0.0100 (0.0200) | 12.0 / 40.0 |" in md
    assert "still (never moves) | 0/40 | 0.0% [0.0, " in md and "mean-demo replay" in md
    assert "(rates.png)" in md and "(learning_curve.png)" in md and "| Self-Flow | 10 | 4/20 |" in md
    assert "[success 0001](eval_x/videos/0001_default_success.mp4)" in md
    assert "done by an earlier run" in md and "python scripts/closed_loop.py --task maniskill/push_cube" in md
    assert paths["rates"].stat().st_size > 1000 and paths["learning_curve"].stat().st_size > 1000
    partial = {"task": TASK, "objectives": ["selfflow"], "demos": {"kept": 3}}  # after the demos stage only
    assert "Not evaluated yet: Self-Flow" in rep.write_report(tmp_path / "early", partial)["report"].read_text()


def _records(n: int, wins: set[int], video_dir: Path | None = None) -> list[EpisodeRecord]:
    recs = []
    for i in range(n):
        r = EpisodeRecord(TASK, "standard", "default", i, 1_000_000 + i, i in wins, steps=3)
        if video_dir is not None:
            r.video = str(video_dir / f"{i:04d}_default_{'success' if i in wins else 'failure'}.mp4")
        recs.append(r)
    return recs


@pytest.mark.slow
def test_pipeline_assembles_results_and_updates_them_per_stage(tmp_path, monkeypatch):
    out = tmp_path / "run"
    seen = []

    def fake_demos(cfg):
        return {"kept": 4, "rlds_dir": str(out / "rlds"), "shard_dir": str(out / "demos" / "shards")}, True

    def fake_finetune(cfg, obj, rlds):
        ft = out / f"ft_{obj}"
        (ft / "checkpoint").mkdir(parents=True, exist_ok=True)
        (ft / "checkpoint" / "config.json").write_text(json.dumps({"train_step": 10}))
        (ft / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "eval/action_mae": 0.1 / s}) for s in
                                                    (5, 10)))
        return {"checkpoint": str(ft / "checkpoint"), "final_step": 10, "max_steps": 10, "curve_steps": [5, 10],
                "snapshots": {5: str(cl.snapshot_path(ft, 5))}, "offline": {"action_mae": 0.01, "step": 10},
                "policy_kwargs": {"execute_steps": 4},
                "recipe": {"config": cfg.config, "model": "tiny", "objective": {"name": obj}}}, True

    def fake_eval(cfg, name, policy, episodes, video, newer_than=None):
        seen.append((name, episodes, policy["kind"], json.loads((out / "results.json").read_text())["stages_s"]))
        assert policy["kind"] == "factory" or policy["kwargs"] == {"execute_steps": 4, "sampling_steps": 5}
        d = out / f"eval_{name}"
        write_results(_records(episodes, {0, 2}, d / "videos"), d, {"policy": policy})
        return rep.eval_entry(_records(episodes, {0, 2}, d / "videos"), out), True

    monkeypatch.setattr(cl, "run_demos", fake_demos)
    monkeypatch.setattr(cl, "run_finetune", fake_finetune)
    monkeypatch.setattr(cl, "run_eval", fake_eval)
    res = cl.run_closed_loop(cl.ClosedLoopConfig(TASK, out=str(out), eval_episodes=6, curve_episodes=4,
                                                 policy_kwargs={"sampling_steps": 5}))
    assert [s[:3] for s in seen] == [("selfflow", 6, "checkpoint"), ("flow_matching", 6, "checkpoint"),
                                     ("still", 6, "factory"), ("mean_replay", 6, "factory"),
                                     ("selfflow_step0000005", 4, "checkpoint"),
                                     ("flow_matching_step0000005", 4, "checkpoint")]
    assert "finetune/selfflow" in seen[0][3]  # results.json was written before the evaluation started
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(res, default=str))
    sf = on_disk["selfflow"]
    assert (sf["episodes"], sf["successes"], sf["rate"]) == (6, 2, 2 / 6) and len(sf["ci95"]) == 2
    assert set(sf["wall_s"]) == {"finetune", "eval"} and sf["videos"]["success"][0].startswith("eval_selfflow/")
    assert set(on_disk["baselines"]) == {"still", "mean_replay"}
    curve = on_disk["learning_curve"]["selfflow"]
    assert [(p["step"], p["episodes"], p["successes"]) for p in curve] == [(5, 4, 2), (10, 4, 2)]
    assert curve[0]["action_mae"] == pytest.approx(0.02)
    assert on_disk["recipe"]["objectives"] == {"selfflow": {"name": "selfflow"},
                                               "flow_matching": {"name": "flow_matching"}}
    assert {"demos", "finetune/selfflow", "eval/mean_replay", "eval/selfflow@5"} <= set(on_disk["stages_s"])
    assert "Self-Flow" in (out / "report.md").read_text()
    # a second run on the same folder (here: one objective again) keeps the other run's entries
    seen.clear()
    res2 = cl.run_closed_loop(cl.ClosedLoopConfig(TASK, out=str(out), objectives=("flow_matching",), eval_episodes=6,
                                                  curve_episodes=4, baselines=False,
                                                  policy_kwargs={"sampling_steps": 5}))
    assert [s[0] for s in seen] == ["flow_matching", "flow_matching_step0000005"]
    assert res2["objectives"] == ["selfflow", "flow_matching"] and res2["selfflow"] == on_disk["selfflow"]
    assert set(res2["baselines"]) == {"still", "mean_replay"} and set(res2["learning_curve"]) == {"selfflow",
                                                                                                "flow_matching"}


def test_finetune_stage_resumes_and_skips_when_finished(tmp_path, monkeypatch):
    from worldmodel import finetune

    calls = []

    def fake_run(cfg, output_dir, callbacks=()):
        calls.append((int(cfg.trainer.max_steps), int(cfg.trainer.eval_every), cfg.objective.name,
                      cfg.data.rt1_dir, len(callbacks)))

    monkeypatch.setattr(finetune, "run_finetuning", fake_run)
    config = "finetune_maniskill" if (ROOT / "configs" / "finetune_maniskill.yaml").exists() else "finetune_rt1"
    cfg = cl.validate(cl.ClosedLoopConfig(TASK, objectives=("flow_matching",), out=str(tmp_path), config=config,
                                          curve_points=4, overrides=("trainer.max_steps=8",), threads=1))
    ckpt = tmp_path / "ft_flow_matching" / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps({"train_step": 4}))  # interrupted halfway
    info, ran = cl.run_finetune(cfg, "flow_matching", "/data/rlds/0.1.0")
    assert ran and calls == [(8, 2, "flow_matching", "/data/rlds/0.1.0", 1)]
    assert info["curve_steps"] == [2, 4, 6, 8] and info["recipe"]["trainer"]["max_steps"] == 8
    (ckpt / "config.json").write_text(json.dumps({"train_step": 8}))  # finished
    info, ran = cl.run_finetune(cfg, "flow_matching", "/data/rlds/0.1.0")
    assert not ran and len(calls) == 1 and info["final_step"] == 8
    run = {"model": {"size": "small"}, "objective": {"name": "flow_matching"}, "data": {"rt1_dir": "/elsewhere"}}
    (ckpt / "config.json").write_text(json.dumps({"train_step": 8, "run": run}))  # trained with another recipe
    with pytest.raises(ValueError, match="model.size: 'small' -> 'tiny'") as err:
        cl.run_finetune(cfg, "flow_matching", "/data/rlds/0.1.0")
    assert "rt1_dir" not in str(err.value) and len(calls) == 1


def test_snapshot_callback_writes_a_policy_checkpoint_once(tmp_path):
    from types import SimpleNamespace

    import torch

    from worldmodel.checkpoint import load_checkpoint

    trainer = SimpleNamespace(cfg=SimpleNamespace(max_steps=10, fsdp=False), dist=SimpleNamespace(is_main=True),
                              inference_modules=lambda: {"model": torch.nn.Linear(2, 2)},
                              checkpoint_config={"kind": "worldmodel.finetune_rt1"},
                              extra_json={"action_stats": {"mean": [0.0] * 7}})
    cb = cl.snapshot_callback(tmp_path, [5, 10])
    cb(trainer, 3)
    cb(trainer, 10)  # the final step is the trainer's own checkpoint
    assert not (tmp_path / "snapshots").exists()
    cb(trainer, 5)
    snap = cl.snapshot_path(tmp_path, 5)
    assert cl.checkpoint_step(snap) == 5 and "action_stats" in load_checkpoint(snap).extra_json
    before = (snap / "config.json").stat().st_mtime_ns
    cb(trainer, 5)  # a resumed run passing the step again keeps the snapshot
    assert (snap / "config.json").stat().st_mtime_ns == before


def test_eval_stage_runs_then_skips(tmp_path, monkeypatch):
    import simpler_double

    import envs.evaluator as ev

    cfg = cl.ClosedLoopConfig("reach", out=str(tmp_path), backend=f"{simpler_double.__name__}:DoubleBackend",
                              progress=False)
    policy = {"kind": "factory", "target": "policies.baselines:StillPolicy", "kwargs": {}, "name": "still"}
    entry, ran = cl.run_eval(cfg, "still", policy, 6, False, protocol="visual_matching")
    assert ran and (entry["episodes"], entry["successes"]) == (6, 0) and entry["ci95"][0] == pytest.approx(0, abs=1e-9)

    def boom(*a, **k):
        raise AssertionError("a finished evaluation must not run again")

    monkeypatch.setattr(ev, "evaluate", boom)
    entry2, ran = cl.run_eval(cfg, "still", policy, 6, False, protocol="visual_matching")
    assert not ran and entry2["rate"] == entry["rate"]
    with pytest.raises(AssertionError):  # other episode count, or a policy newer than the results: rerun
        cl.run_eval(cfg, "still", policy, 4, False, protocol="visual_matching")
    with pytest.raises(AssertionError):
        cl.run_eval(cfg, "still", policy, 6, False, newer_than=time.time() + 60, protocol="visual_matching")


def test_demos_stage_builds_once(tmp_path, monkeypatch):
    import envs.demos as demos

    rng = np.random.default_rng(1)
    for s in (0, 1, 2):
        save_shard(_demo(s, 3, 1.0, rng), tmp_path / "demos" / "shards")
    builds = []

    def fake_build(task, shard_dir, out_dir, max_episodes=None, image_size=None):
        builds.append(max_episodes)
        v = Path(out_dir) / "maniskill_push_cube" / "0.1.0"
        v.mkdir(parents=True, exist_ok=True)
        info = {"splits": [{"name": "train", "shardLengths": [str(max_episodes)]}]}
        (v / "dataset_info.json").write_text(json.dumps(info))
        return v

    monkeypatch.setattr(demos, "build_rlds", fake_build)
    monkeypatch.setattr(cl, "_collector", lambda: (_ for _ in ()).throw(AssertionError("nothing to collect")))
    cfg = cl.ClosedLoopConfig(TASK, out=str(tmp_path), episodes=2)
    summary, ran = cl.run_demos(cfg)
    assert ran and builds == [2] and summary["kept"] == 2 and summary["rlds_dir"].endswith("0.1.0")
    summary, ran = cl.run_demos(cfg)
    assert not ran and builds == [2]
    shard = tmp_path / "demos" / "shards" / "maniskill_push_cube_0000001.npz"
    os.utime(shard, (time.time() + 60, time.time() + 60))  # a shard rewritten after the build
    assert cl.run_demos(cfg)[1] and builds == [2, 2]


def test_curve_steps_and_settings():
    assert cl.learning_curve_steps(600, 4) == [150, 300, 450, 600]
    assert cl.learning_curve_steps(600, 1) == [600]
    assert cl.learning_curve_steps(600, 4, [100, 250]) == [100, 250, 600]
    assert cl.callback_every([150, 300, 450, 600], 0) == 150 and cl.callback_every([150, 300, 600], 100) == 50
    with pytest.raises(ValueError, match="outside"):
        cl.learning_curve_steps(600, 4, [700])
    with pytest.raises(ValueError, match="--objective"):
        cl.validate(cl.ClosedLoopConfig(TASK, overrides=("objective=flow_matching",)))
    backend = cl.ExtendedManiSkillBackend()
    specs = backend.episodes(TASK, "standard")
    base = cl.ManiSkillBackend().episodes(TASK, "standard")
    assert specs[: len(base)] == base and len(specs) == cl.MAX_EVAL_EPISODES
    assert specs[120].seed == cl.EVAL_SEED_BASE + 120 and specs[120].index == 120


def _script():
    spec = importlib.util.spec_from_file_location("closed_loop_script", ROOT / "scripts" / "closed_loop.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_names_the_valid_tasks(tmp_path, capsys):
    script = _script()
    assert script.main(["--task", "maniskill/no_such_task", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "maniskill/push_cube" in err and "maniskill/pick_cube" in err and "bridge" not in err
    assert script.main(["--task", "maniskill/bridge_carrot_on_plate", "--out", str(tmp_path)]) == 2
    assert "no scripted demonstration solver" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing ran


def test_rate_plot_with_zero_and_all_successes(tmp_path):
    from envs.closed_loop_report import plot_rates, rate_entry

    rows = [("still", "never moves", rate_entry(0, 100)), ("all", "always", rate_entry(100, 100))]
    assert plot_rates(rows, tmp_path / "rates.png", "zero and all").is_file()
