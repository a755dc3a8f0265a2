"""The ManiSkill3 closed loop in one call: demonstrations -> fine-tuning per objective -> rollouts -> report.

    python scripts/closed_loop.py --task maniskill/push_cube [--objective selfflow|flow_matching|both] [--out DIR]

Stages, each resumable (a finished stage is skipped; DIR/results.json and DIR/report.md are rewritten after
every stage, so an interrupted run keeps what it finished):
1. demos: `collect()` of scripts/collect_demos.py into DIR/demos/shards (it skips finished seeds), then
   `envs.demos.build_rlds` into DIR/demos/rlds (skipped when that dataset holds the wanted episodes and is
   newer than every shard).
2. finetune: Hydra config `finetune_maniskill` + data.rt1_dir + objective + the user's overrides, run by
   `worldmodel.finetune.run_finetuning` in DIR/ft_<objective> (the trainer resumes from its checkpoint; a run
   whose checkpoint reached max_steps is skipped). Inference snapshots at the learning-curve steps go to
   DIR/ft_<objective>/snapshots/step_<k> (needs `run_finetuning(..., callbacks=...)`).
3. eval: `envs.evaluator.evaluate` on the backend's fixed seeds (EVAL_SEED_BASE + i) into DIR/eval_<name>:
   each objective's final checkpoint, the baselines of policies.baselines, then the curve snapshots
   (skipped when DIR/eval_<name>/summary.json has the same episodes and policy and is newer than it).
4. report: envs.closed_loop_report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envs import closed_loop_report as report
from envs.maniskill_backend import ManiSkillBackend
from envs.maniskill_tasks import EVAL_SEED_BASE, TASKS, get_maniskill_task

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = ("selfflow", "flow_matching")
PROTOCOL = "standard"
MAX_EVAL_EPISODES = 5_000  # seeds EVAL_SEED_BASE .. + 4999 (the registered protocol stops at EVAL_EPISODES)
RESERVED = ("objective", "data.rt1_dir")  # set by the loop itself: --objective and the collected demos
RECIPE_CHECKED = ("model", "objective", "data", "modes", "seed")  # a checkpoint must match these to resume
RECIPE_IGNORED = {"data.rt1_dir", "data.resolved_dir", "data.workers", "data.num_parallel_calls"}


@dataclass
class ClosedLoopConfig:
    """One closed-loop run (the flags of scripts/closed_loop.py)."""

    task: str  # a maniskill/* task with a scripted solver
    objectives: tuple[str, ...] = OBJECTIVES  # fine-tuning objectives compared
    out: str | None = None  # run folder; None = outputs/closed_loop/<task without "maniskill/">
    episodes: int = 200  # demonstrations kept
    eval_episodes: int = 100  # rollouts per final policy and per baseline (same seeds for all)
    curve_points: int = 2  # learning-curve steps evenly spaced up to max_steps (1 = the final one only)
    curve_steps: tuple[int, ...] | None = None  # explicit learning-curve steps (instead of curve_points)
    curve_episodes: int | None = None  # rollouts per curve snapshot; None = min(eval_episodes, 30)
    workers: int = 1  # simulator processes for collection and evaluation
    threads: int | None = None  # torch threads in this process; None = all cores
    config: str = "finetune_maniskill"  # fine-tuning recipe in configs/
    overrides: tuple[str, ...] = ()  # Hydra key=value overrides of the recipe (e.g. trainer.max_steps=300)
    policy_kwargs: dict[str, Any] = field(default_factory=dict)  # from_pretrained options over the recipe's `policy`
    video: bool = True  # MP4 per episode for the final policies and the baselines (not the curve snapshots)
    baselines: bool = True  # evaluate StillPolicy and MeanReplayPolicy too
    progress: bool = True  # tqdm bars
    backend: str | None = None  # "module:callable" Backend for the evaluator (tests); None = ManiSkill3
    argv: tuple[str, ...] | None = None  # the command line, recorded in the report


def solvable_tasks() -> list[str]:
    """Registered ManiSkill3 tasks that have a scripted demonstration solver."""
    return [name for name, t in TASKS.items() if t.solver is not None]


def check_task(name: str):
    """The ManiSkillTask of `name`; ValueError naming the valid tasks when unknown or without a solver."""
    valid = ", ".join(solvable_tasks())
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; the closed loop runs the ManiSkill3 tasks with a demonstration "
                         f"solver: {valid}")
    task = get_maniskill_task(name)
    if task.solver is None:
        raise ValueError(f"{name} has no scripted demonstration solver, so no demos can be collected; valid: {valid}")
    return task


def default_out(task: str) -> Path:
    return Path("outputs/closed_loop") / task.split("/", 1)[-1]


def validate(cfg: ClosedLoopConfig) -> ClosedLoopConfig:
    """Check every setting before anything runs; returns cfg with out, curve_episodes and threads filled in."""
    check_task(cfg.task)
    bad = [o for o in cfg.objectives if o not in OBJECTIVES]
    if bad or not cfg.objectives:
        raise ValueError(f"unknown objective(s) {bad}; choose from {list(OBJECTIVES)}")
    for name in ("episodes", "eval_episodes", "workers", "curve_points"):
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.eval_episodes > MAX_EVAL_EPISODES:
        raise ValueError(f"eval_episodes must be <= {MAX_EVAL_EPISODES}, got {cfg.eval_episodes}")
    for o in cfg.overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if "=" not in o or key in RESERVED:
            raise ValueError(f"bad override {o!r}: overrides are key=value and may not set {list(RESERVED)} "
                             "(use --objective; the data is the collected demos)")
    for objective in cfg.objectives:  # the fine-tuning recipe with the user's overrides: types and ranges at load
        compose_recipe(cfg, objective, None)
    curve = cfg.curve_episodes or min(cfg.eval_episodes, 30)
    return dataclasses.replace(cfg, out=str(Path(cfg.out or default_out(cfg.task)).resolve()),
                               curve_episodes=min(curve, cfg.eval_episodes), threads=cfg.threads or os.cpu_count())


# ------------------------------------------------------------------------------------------------ demos
def rlds_is_current(rlds_root: Path, task: str, shard_paths: list[Path]) -> Path | None:
    """The version dir under rlds_root when it is complete, holds exactly these shards' episode count and is
    newer than every one of them; else None."""
    infos = sorted(Path(rlds_root).glob(f"{task.replace('/', '_')}/*/dataset_info.json"))
    if len(infos) != 1 or not shard_paths:
        return None
    info = json.loads(infos[0].read_text())
    count = sum(int(n) for s in info.get("splits", []) for n in s.get("shardLengths", []))
    newest = max(p.stat().st_mtime for p in shard_paths)
    return infos[0].parent if count == len(shard_paths) and infos[0].stat().st_mtime > newest else None


def _collector():
    """scripts/collect_demos.py as a module (its collect() and parse_args() are reused, not copied)."""
    import importlib

    scripts = str(ROOT / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    return importlib.import_module("collect_demos")


def run_demos(cfg: ClosedLoopConfig) -> tuple[dict, bool]:
    """Collect (resuming) and build the RLDS dataset; returns ({kept, rlds_dir, ...}, whether work was done)."""
    import envs.demos as demos

    out = Path(cfg.out) / "demos"
    shard_dir = out / "shards"
    with report.locked(out / ".lock", f"collecting demonstrations in {out}"):
        ok, _ = demos.done_seeds(cfg.task, shard_dir)
        ran = len(ok) < cfg.episodes
        previous = out / "summary.json"  # the collection counts of an earlier run
        counts: dict[str, Any] = json.loads(previous.read_text()) if previous.is_file() else {}
        if ran:
            print(f"[closed loop] demos: collecting {cfg.episodes - len(ok)} more {cfg.task} demonstrations "
                  f"into {shard_dir} ({len(ok)} done)", flush=True)
            collector = _collector()
            argv = ["--task", cfg.task, "--episodes", str(cfg.episodes), "--workers", str(cfg.workers),
                    "--out", str(out), *([] if cfg.progress else ["--no-progress"])]
            counts.update(collector.collect(collector.parse_args(argv)))
            ok, _ = demos.done_seeds(cfg.task, shard_dir)
        else:
            print(f"[closed loop] demos: {len(ok)} demonstrations already in {shard_dir}", flush=True)
        used = [shard_dir / f"{demos.shard_name(cfg.task, s)}.npz" for s in ok[: cfg.episodes]]
        rlds = rlds_is_current(out / "rlds", cfg.task, used)
        if rlds is None:
            print(f"[closed loop] demos: building the RLDS dataset from {len(used)} shards", flush=True)
            rlds = demos.build_rlds(cfg.task, shard_dir, out / "rlds", max_episodes=cfg.episodes, image_size=(256, 320))
            ran = True
        else:
            print(f"[closed loop] demos: RLDS dataset {rlds} is up to date", flush=True)
    summary = {**counts, "kept": len(used), "requested": cfg.episodes, "rlds_dir": str(rlds),
               "shard_dir": str(shard_dir)}
    report.write_json_atomic(out / "summary.json", summary)
    return summary, ran


# --------------------------------------------------------------------------------------------- finetune
def compose_recipe(cfg: ClosedLoopConfig, objective: str, rlds_dir: str | None, config_dir: Path = ROOT / "configs"):
    """The fine-tuning config: configs/<cfg.config>.yaml + data.rt1_dir + objective + the user's overrides."""
    from hydra.errors import MissingConfigException

    from worldmodel.config import compose

    overrides = [f"objective={objective}", *([f"data.rt1_dir={rlds_dir}"] if rlds_dir else []), *cfg.overrides]
    try:
        return compose(cfg.config, overrides, config_dir)
    except MissingConfigException as e:
        have = sorted(p.stem for p in Path(config_dir).glob("finetune*.yaml"))
        raise FileNotFoundError(f"fine-tuning recipe {cfg.config!r} not found in {config_dir} ({e}); "
                                f"choose one of {have} with --config") from e


def learning_curve_steps(max_steps: int, points: int = 4, explicit=None) -> list[int]:
    """Sorted snapshot steps in 1..max_steps: `explicit`, or `points` evenly spaced ones ending at max_steps."""
    steps = explicit if explicit else [round(max_steps * i / points) for i in range(1, points + 1)]
    bad = [s for s in steps if not 1 <= int(s) <= max_steps]
    if bad:
        raise ValueError(f"learning-curve steps {bad} lie outside 1..max_steps={max_steps}")
    return sorted({int(s) for s in steps} | {int(max_steps)})


def callback_every(steps: list[int], eval_every: int) -> int:
    """trainer.eval_every that makes the trainer's callbacks (offline eval, snapshots) land on every curve step."""
    return math.gcd(*steps, *([int(eval_every)] if eval_every else []))


def checkpoint_step(path: Path) -> int | None:
    """The train_step a checkpoint dir's config.json records (None when there is no finished checkpoint)."""
    cfg = Path(path) / "config.json"
    return int(json.loads(cfg.read_text()).get("train_step", -1)) if cfg.is_file() else None


def recipe_differences(trained: dict, recipe: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between a checkpoint's recorded run config and the composed recipe,
    over what defines the model and its training data (the schedule may change: a longer run resumes)."""
    diffs = []
    for key in (RECIPE_CHECKED if not prefix else sorted(set(trained) | set(recipe))):
        a, b = trained.get(key), recipe.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += recipe_differences(a, b, f"{prefix}{key}.")
        elif a != b and f"{prefix}{key}" not in RECIPE_IGNORED:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


def snapshot_path(ft_dir: Path, step: int) -> Path:
    return Path(ft_dir) / "snapshots" / f"step_{step:07d}"


def snapshot_callback(ft_dir: Path, steps: list[int]):
    """A Trainer callback saving inference-only checkpoints (what SelfFlowPolicy loads) at `steps` < max_steps."""
    wanted = set(steps)

    def snapshot(trainer, step: int) -> None:
        if step not in wanted or step >= trainer.cfg.max_steps or checkpoint_step(snapshot_path(ft_dir, step)) == step:
            return
        from worldmodel import distributed as wdist
        from worldmodel.checkpoint import save_checkpoint

        if trainer.cfg.fsdp:
            for m in (trainer.ema.model, trainer.modules[trainer.ema_name]):
                wdist.reshard_fsdp2(m)
        weights = {n: wdist.full_state_dict(m) for n, m in trainer.inference_modules().items()}
        if trainer.dist.is_main:
            save_checkpoint(snapshot_path(ft_dir, step), weights, {**trainer.checkpoint_config, "train_step": step},
                            extra_json=trainer.extra_json)
        wdist.barrier()

    return snapshot


def run_finetune(cfg: ClosedLoopConfig, objective: str, rlds_dir: str | None) -> tuple[dict, bool]:
    """Fine-tune one objective (resuming; skipped when finished); returns (info, whether training ran)."""
    from omegaconf import OmegaConf, open_dict

    recipe = compose_recipe(cfg, objective, rlds_dir)
    ft_dir = Path(cfg.out) / f"ft_{objective}"
    max_steps = int(recipe.trainer.max_steps)
    steps = learning_curve_steps(max_steps, cfg.curve_points, cfg.curve_steps)
    every = callback_every(steps, int(recipe.trainer.get("eval_every", 0) or 0))
    with open_dict(recipe):
        if len(steps) > 1:  # the trainer calls its callbacks every eval_every steps (and at the end)
            recipe.trainer.eval_every = every
        if not cfg.progress:
            recipe.trainer.progress = False
    with report.locked(ft_dir / ".lock", f"fine-tuning {objective} in {ft_dir}"):  # runs sharing DIR take turns
        done = checkpoint_step(ft_dir / "checkpoint")
        if done is not None:
            trained = json.loads((ft_dir / "checkpoint" / "config.json").read_text()).get("run", {})
            diffs = recipe_differences(trained, OmegaConf.to_container(recipe, resolve=True)) if trained else []
            if diffs:
                raise ValueError(f"{ft_dir / 'checkpoint'} was trained with another recipe ({'; '.join(diffs)}); "
                                 "use another --out, or delete that folder to train afresh")
        ran = done is None or done < max_steps
        if ran:
            from worldmodel import finetune

            start = "from scratch" if done is None else f"resuming at step {done}"
            print(f"[closed loop] finetune {objective}: {cfg.config} for {max_steps} steps ({start}) into {ft_dir}",
                  flush=True)
            finetune.run_finetuning(recipe, ft_dir, callbacks=[snapshot_callback(ft_dir, steps)])
        else:
            print(f"[closed loop] finetune {objective}: {ft_dir / 'checkpoint'} is at step {done}: done", flush=True)
    offline = ft_dir / "offline_eval.json"
    snaps = {s: str(snapshot_path(ft_dir, s)) for s in steps if checkpoint_step(snapshot_path(ft_dir, s)) == s}
    policy_kwargs = OmegaConf.to_container(recipe.policy, resolve=True) if "policy" in recipe else {}
    info = {"checkpoint": str(ft_dir / "checkpoint"), "final_step": checkpoint_step(ft_dir / "checkpoint"),
            "policy_kwargs": policy_kwargs,
            "max_steps": max_steps, "curve_steps": steps, "snapshots": snaps,
            "offline": json.loads(offline.read_text()) if offline.is_file() else {},
            "recipe": report.recipe_summary(OmegaConf.to_container(recipe, resolve=True), cfg.config,
                                            list(cfg.overrides))}
    return info, ran


# ------------------------------------------------------------------------------------------------- eval
class ExtendedManiSkillBackend(ManiSkillBackend):
    """The registered ManiSkill3 backend with the seed list continued past EVAL_EPISODES (seed = base + index)."""

    def episodes(self, task: str, protocol: str):
        base = super().episodes(task, protocol)
        if any(s.seed != EVAL_SEED_BASE + s.index for s in base):
            raise ValueError("the ManiSkill3 backend no longer seeds episodes as EVAL_SEED_BASE + index")
        more = range(len(base), MAX_EVAL_EPISODES)
        return base + [dataclasses.replace(base[-1], index=i, seed=EVAL_SEED_BASE + i) for i in more]


def finished_eval(out_dir: Path, episodes: int, policy: dict, newer_than: float | None = None) -> bool:
    """True when out_dir holds a completed evaluation of `policy` over `episodes` episodes, newer than newer_than."""
    summary = Path(out_dir) / "summary.json"
    if not summary.is_file() or (newer_than is not None and summary.stat().st_mtime < newer_than):
        return False
    data = json.loads(summary.read_text())
    same_policy = data.get("meta", {}).get("policy") == json.loads(json.dumps(policy, default=str))
    return same_policy and [e.get("episodes") for e in data.get("results", {}).values()] == [episodes]


def run_eval(cfg: ClosedLoopConfig, name: str, policy: dict, episodes: int, video: bool,
             newer_than: float | None = None, protocol: str = PROTOCOL) -> tuple[dict, bool]:
    """Evaluate `policy` into DIR/eval_<name> unless already done; returns (report.eval_entry, whether it ran)."""
    from envs.evaluator import EvalConfig, evaluate
    from envs.results import load_records

    out_dir = Path(cfg.out) / f"eval_{name}"
    with report.locked(out_dir / ".lock", f"evaluating {name} in {out_dir}"):
        ran = not finished_eval(out_dir, episodes, policy, newer_than)
        if ran:
            print(f"[closed loop] eval {name}: {episodes} episodes of {cfg.task} into {out_dir}", flush=True)
            backend = cfg.backend or f"{__name__}:ExtendedManiSkillBackend"
            evaluate(EvalConfig(task=cfg.task, protocol=protocol, episodes=episodes, policy=policy, workers=cfg.workers,
                                video=video, output_dir=str(out_dir), backend=backend, progress=cfg.progress))
        else:
            print(f"[closed loop] eval {name}: {out_dir} already holds {episodes} episodes", flush=True)
    meta = json.loads((out_dir / "summary.json").read_text())["meta"]
    return report.eval_entry(load_records(out_dir / "episodes.json"), Path(cfg.out), meta.get("timing")), ran


def checkpoint_policy(path: str, name: str, kwargs: dict) -> dict:
    return {"kind": "checkpoint", "path": str(path), "kwargs": dict(kwargs), "name": name}


def baseline_policies(cfg: ClosedLoopConfig, shard_dir: str) -> dict[str, dict]:
    return {
        "still": {"kind": "factory", "target": "policies.baselines:StillPolicy", "kwargs": {}, "name": "still"},
        "mean_replay": {"kind": "factory", "target": "policies.baselines:MeanReplayPolicy", "name": "mean_replay",
                        "kwargs": {"shard_dir": shard_dir, "task": cfg.task, "max_demos": cfg.episodes}},
    }


# --------------------------------------------------------------------------------------------- pipeline
def _mtime(path) -> float | None:
    p = Path(path)
    return p.stat().st_mtime if p.exists() else None


def run_closed_loop(cfg: ClosedLoopConfig) -> dict:
    """Run (or resume) every stage; returns the results dict also written to DIR/results.json."""
    cfg = validate(cfg)
    import torch  # fine-tuning and in-process policies run in this process

    torch.set_num_threads(int(cfg.threads))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {  # what this run produces; merged into results.json (another run may share it)
        "task": cfg.task, "out_dir": str(out), "objectives": list(cfg.objectives), "eval_episodes": cfg.eval_episodes,
        "curve_episodes": cfg.curve_episodes, "demos_requested": cfg.episodes,
        "commands": report.reproduce_commands(cfg), "stages_s": {}}
    stages = results["stages_s"]

    def stage(name: str, fn, *args, **kw):
        t0 = time.perf_counter()
        value, ran = fn(*args, **kw)
        if ran:
            stages[name] = round(time.perf_counter() - t0, 1)
        elif name not in report.load_results(out).get("stages_s", {}):
            stages[name] = None  # done by an earlier run that did not record its time
        return value

    def save() -> dict:
        return report.update_results(out, results)

    demos = results["demos"] = stage("demos", run_demos, cfg)
    save()
    fts = {}
    for obj in cfg.objectives:
        ft = fts[obj] = stage(f"finetune/{obj}", run_finetune, cfg, obj, demos["rlds_dir"])
        results.setdefault("recipe", {}).update({k: v for k, v in ft["recipe"].items() if k != "objective"})
        results["recipe"].setdefault("objectives", {})[obj] = ft["recipe"]["objective"]
        results[obj] = {"checkpoint": ft["checkpoint"], "final_step": ft["final_step"],
                        "offline": report.offline_headline(ft["offline"])}
        save()
        kwargs = {**ft["policy_kwargs"], **cfg.policy_kwargs}
        results["commands"] = report.reproduce_commands(cfg, kwargs)
        policy = checkpoint_policy(ft["checkpoint"], obj, kwargs)
        entry = stage(f"eval/{obj}", run_eval, cfg, obj, policy, cfg.eval_episodes, cfg.video,
                      _mtime(Path(ft["checkpoint"]) / "config.json"))
        results[obj].update(entry)
        save()
    if cfg.baselines:
        newest_shard = max((p.stat().st_mtime for p in Path(demos["shard_dir"]).glob("*.npz")), default=None)
        for name, policy in baseline_policies(cfg, demos["shard_dir"]).items():
            entry = stage(f"eval/{name}", run_eval, cfg, name, policy, cfg.eval_episodes, cfg.video,
                          newest_shard if name == "mean_replay" else None)
            results.setdefault("baselines", {})[name] = entry
            save()
    for obj, ft in fts.items():
        ft_dir = out / f"ft_{obj}"
        results.setdefault("offline_curve", {})[obj] = report.offline_curve(ft_dir / "metrics.jsonl")
        curve = results.setdefault("learning_curve", {})[obj] = []
        for step in ft["curve_steps"]:
            if step == ft["max_steps"]:  # the final checkpoint: its main evaluation's first curve_episodes
                eval_dir = out / f"eval_{obj}"
            elif step in ft["snapshots"]:
                policy = checkpoint_policy(snapshot_path(ft_dir, step), obj,
                                           {**ft["policy_kwargs"], **cfg.policy_kwargs})
                stage(f"eval/{obj}@{step}", run_eval, cfg, f"{obj}_step{step:07d}", policy, cfg.curve_episodes,
                      False, _mtime(snapshot_path(ft_dir, step) / "config.json"))
                eval_dir = out / f"eval_{obj}_step{step:07d}"
            else:
                print(f"[closed loop] curve {obj}: no snapshot at step {step}; point left out", file=sys.stderr)
                continue
            curve.append(report.curve_point(step, eval_dir / "episodes.json", cfg.curve_episodes,
                                            results["offline_curve"][obj]))
            save()
    return save()
