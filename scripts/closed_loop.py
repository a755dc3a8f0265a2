"""The ManiSkill3 closed loop in one command: demos -> fine-tuning per objective -> rollouts -> report.

    python scripts/closed_loop.py --task maniskill/push_cube [--objective selfflow|flow_matching|both] [--out DIR]
    python scripts/closed_loop.py --task maniskill/pick_cube -- trainer.max_steps=300 model=small

Key=value arguments (after `--` or mixed with the flags) override the fine-tuning recipe (configs/<--config>.yaml).
Rerunning the same command resumes: finished stages are skipped. Writes DIR/results.json and DIR/report.md.
Exit status: 0 done, 1 an evaluation had failed episodes, 2 bad setup.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, help="a maniskill/* task with a demonstration solver")
    p.add_argument("--objective", choices=("selfflow", "flow_matching", "both"), default="both")
    p.add_argument("--out", help="run folder (default outputs/closed_loop/<task>)")
    p.add_argument("--episodes", type=int, default=200, help="demonstrations to collect and train on")
    p.add_argument("--eval-episodes", type=int, default=100, help="evaluation episodes per policy (fixed seeds)")
    p.add_argument("--workers", type=int, default=1, help="simulator processes (collection and evaluation)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in this process")
    p.add_argument("--config", default="finetune_maniskill", help="fine-tuning recipe in configs/")
    p.add_argument("--curve-points", type=int, default=2, help="learning-curve snapshots evenly spaced to max_steps")
    p.add_argument("--curve-steps", help="explicit learning-curve steps, comma-separated (e.g. 150,300,600)")
    p.add_argument("--curve-episodes", type=int, help="episodes per curve snapshot (default min(eval-episodes, 30))")
    p.add_argument("--policy-kwargs", default="{}", help="JSON options of SelfFlowPolicy.from_pretrained")
    p.add_argument("--no-video", dest="video", action="store_false", help="no per-episode MP4s")
    p.add_argument("--no-baselines", dest="baselines", action="store_false", help="skip the two baselines")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the fine-tuning recipe")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    from envs.closed_loop import OBJECTIVES, ClosedLoopConfig, run_closed_loop
    from envs.evaluator import EvaluationFailed

    try:
        steps = tuple(int(s) for s in args.curve_steps.split(",")) if args.curve_steps else None
        cfg = ClosedLoopConfig(
            task=args.task, objectives=OBJECTIVES if args.objective == "both" else (args.objective,), out=args.out,
            episodes=args.episodes, eval_episodes=args.eval_episodes, curve_points=args.curve_points,
            curve_steps=steps, curve_episodes=args.curve_episodes, workers=args.workers, threads=args.threads,
            config=args.config, overrides=tuple(args.overrides), policy_kwargs=json.loads(args.policy_kwargs),
            video=args.video, baselines=args.baselines, progress=args.progress,
            argv=("python", "scripts/closed_loop.py", *argv))
        results = run_closed_loop(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except EvaluationFailed as e:
        print(f"EVALUATION FAILED: {e}", file=sys.stderr)
        return 1
    for key in (*results["objectives"], *results.get("baselines", {})):
        e = results.get(key) or results.get("baselines", {}).get(key)
        if e and "rate" in e:
            lo, hi = e["ci95"]
            print(f"{key:>14}: {e['successes']}/{e['episodes']} = {100 * e['rate']:.1f}% [{100 * lo:.1f}, "
                  f"{100 * hi:.1f}]")
    print(f"report: {Path(results['out_dir']) / 'report.md'} (numbers in results.json beside it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
