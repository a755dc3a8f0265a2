"""Collect scripted ManiSkill3 demonstrations and write them as an RT-1-schema RLDS dataset.

    python scripts/collect_demos.py --task maniskill/pick_cube --episodes 200 --workers 2 --out DIR
    python scripts/finetune_rt1.py data.rt1_dir=DIR/rlds/<dataset>/<version>     # trains on it unchanged
    python scripts/collect_demos.py --task maniskill/lift_peg --env-id LiftPegUpright-v1 --max-steps 150 \
        --instruction "lift the peg upright" --solver solveLiftPegUpright --episodes 20 --out DIR
    python scripts/collect_demos.py --task-file my_task.yaml --episodes 20 --out DIR   # the same, from a file

Any ManiSkill3 environment works: --env-id, --instruction, --max-steps and --solver (a function of
mani_skill.examples.motionplanning.panda.solutions) define it or override the registry entry of --task.

--episodes counts KEPT demonstrations: failed seeds are dropped, counted (by reason) and replaced by the
next seeds, up to --max-attempts in all. Each episode is written as its own shard file (atomic rename) in
DIR/shards, so an interrupted run restarts where it stopped (finished and failed seeds are skipped); the
RLDS dataset is built from the completed shards at the end (or alone with --build-only). Workers are
separate processes started with spawn; each holds its own simulator.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

_COLLECTOR = None


def _init_worker(task, image_size: tuple[int, int]) -> None:
    import torch

    torch.set_num_threads(1)
    global _COLLECTOR
    from envs.demos import DemoCollector

    _COLLECTOR = DemoCollector(task, image_size=image_size)


def _collect(seed: int, shard_dir: str) -> tuple[int, bool, str, int, float]:
    """Worker: one seed -> shard file or failure record; returns (seed, kept, reason, steps, seconds)."""
    from envs.demos import save_failure, save_shard

    t0 = time.perf_counter()
    ep, why = _COLLECTOR.collect(seed)
    if ep is None:
        save_failure(_COLLECTOR.task.name, seed, why, shard_dir)
        return seed, False, why, 0, time.perf_counter() - t0
    save_shard(ep, shard_dir)
    return seed, True, "", len(ep), time.perf_counter() - t0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", help="a maniskill/* task: a registry entry (e.g. maniskill/pick_cube) or a new name "
                   "defined by the four options below")
    p.add_argument("--env-id", help="ManiSkill3 environment id (gym id), e.g. LiftPegUpright-v1")
    p.add_argument("--instruction", help="the language instruction stored with each demonstration")
    p.add_argument("--max-steps", type=int, help="the task's step limit (evaluation)")
    p.add_argument("--solver", help="motion-planning function in mani_skill.examples.motionplanning.panda.solutions")
    p.add_argument("--task-file", help="YAML with task, env_id, instruction, max_steps, solver (flags override it)")
    p.add_argument("--episodes", type=int, required=True, help="number of successful demonstrations to keep")
    p.add_argument("--workers", type=int, default=1, help="simulator processes (spawn)")
    p.add_argument("--out", required=True, help="output folder (shards/ and rlds/ go inside)")
    p.add_argument("--image-size", type=int, nargs=2, default=(256, 320), metavar=("H", "W"),
                   help="camera size; RT-1's 256x320 needs no resizing (other sizes are resized/padded)")
    p.add_argument("--seed-start", type=int, default=0, help="first seed (seeds run upward)")
    p.add_argument("--max-attempts", type=int, default=None, help="give up after this many seeds (default 3x)")
    p.add_argument("--build-only", action="store_true", help="only build the RLDS dataset from existing shards")
    p.add_argument("--no-build", action="store_true", help="only collect shards")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.task_file:
        from envs.maniskill_tasks import load_task_file

        for key, value in load_task_file(args.task_file).items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    if not args.task:
        p.error("give --task (or a task file with `task:`)")
    return args


def task_of(args: argparse.Namespace):
    """The ManiSkillTask the arguments define (registry entry with overrides, or a new one)."""
    from envs.maniskill_tasks import get_maniskill_task

    return get_maniskill_task(args.task, env_id=args.env_id, instruction=args.instruction, max_steps=args.max_steps,
                              solver=args.solver)


def collect(args: argparse.Namespace) -> dict:
    """Run the collection (resuming from existing shards); returns the counts written to summary.json."""
    from tqdm import tqdm

    from envs.demos import done_seeds, solver_function

    task = task_of(args)
    solver_function(task)  # a clear error before any worker starts
    if args.episodes <= 0 or args.workers <= 0:
        raise ValueError("--episodes and --workers must be positive")
    shard_dir = Path(args.out) / "shards"
    ok, failed = done_seeds(task.name, shard_dir)
    ok = [s for s in ok if s >= args.seed_start]
    max_attempts = args.max_attempts or 3 * args.episodes
    tried = set(ok) | set(failed)
    counts = {"kept": len(ok), "failed": 0, "reasons": {}, "resumed_kept": len(ok), "resumed_failed": len(failed)}
    seeds = (s for s in range(args.seed_start, args.seed_start + 10 * max_attempts) if s not in tried)
    attempts = len(tried)
    t0, steps, secs = time.perf_counter(), 0, 0.0
    bar = tqdm(total=args.episodes, initial=min(len(ok), args.episodes), desc=f"demos {task.name}", unit="ep",
               disable=args.no_progress, dynamic_ncols=True)
    if len(ok) < args.episodes:
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(task, tuple(args.image_size))) as pool:
            pending = set()
            while True:
                while (len(pending) < 2 * args.workers and counts["kept"] + len(pending) < args.episodes
                       and attempts < max_attempts):
                    pending.add(pool.submit(_collect, next(seeds), str(shard_dir)))
                    attempts += 1
                if not pending:
                    break
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    seed, kept, why, n, dt = f.result()
                    secs += dt
                    if kept:
                        counts["kept"] += 1
                        steps += n
                        bar.update(1)
                    else:
                        counts["failed"] += 1
                        counts["reasons"][why] = counts["reasons"].get(why, 0) + 1
                    bar.set_postfix(failed=counts["failed"])
    bar.close()
    wall = time.perf_counter() - t0
    counts.update(task=task.name, episodes_requested=args.episodes, attempts=attempts, wall_s=round(wall, 1),
                  new_steps=steps, worker_s_per_episode=round(secs / max(counts["kept"] + counts["failed"]
                                                                           - counts["resumed_kept"], 1), 2))
    if counts["kept"] < args.episodes:
        print(f"warning: only {counts['kept']} of {args.episodes} demonstrations after {attempts} seeds "
              f"(failures: {counts['reasons']}); raise --max-attempts to try more seeds", file=sys.stderr)
    return counts


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    if not args.build_only:
        summary = collect(args)
        print(json.dumps(summary, indent=1))
    if not args.no_build:
        from envs.demos import build_rlds

        path = build_rlds(args.task, out / "shards", out / "rlds", max_episodes=args.episodes,
                          image_size=(256, 320))
        summary["rlds_dir"] = str(path)
        print(f"RLDS dataset: {path}\ntrain on it: python scripts/finetune_rt1.py data.rt1_dir={path}")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
