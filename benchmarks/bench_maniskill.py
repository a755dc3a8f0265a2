"""ManiSkill3 evaluation throughput: episodes per minute by number of workers, policy vs simulator time.

    python benchmarks/bench_maniskill.py --task maniskill/push_cube --episodes 4 --workers 1 2

Runs the real evaluator (envs.evaluator) with a cheap numpy policy (small random end-effector moves,
never terminates, so every episode runs to the task's step limit), videos off. Prints one row per
worker count: wall time, episodes/min, steps/s, and the per-step split between policy and simulator
(the simulator time includes rendering the policy camera). Setup time is env build + reset.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


class JitterPolicy:
    """Random moves of up to 1 cm and 0.02 rad per step, gripper command alternating every 20 steps."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def reset(self, instruction: str) -> None:
        self.t = 0

    def step(self, image: np.ndarray, instruction: str):
        self.t += 1
        action = {"world_vector": self.rng.uniform(-0.01, 0.01, 3), "rot_axangle": self.rng.uniform(-0.02, 0.02, 3),
                  "gripper": np.array([1.0 if (self.t // 20) % 2 else -1.0]), "terminate_episode": np.zeros(1)}
        return {}, action


def run(task: str, episodes: int, workers: int, out: Path) -> dict:
    from envs.evaluator import EvalConfig, evaluate

    cfg = EvalConfig(task=task, protocol="standard", episodes=episodes, workers=workers, video=False,
                     output_dir=str(out / f"w{workers}"), progress=False,
                     policy={"kind": "factory", "target": "bench_maniskill:JitterPolicy", "kwargs": {}})
    res = evaluate(cfg)
    t = res.timing
    return {"workers": workers, "episodes": t["episodes"], "steps": t["steps"], "wall_s": round(t["wall_s"], 1),
            "episodes_per_min": round(t["episodes_per_min"], 2), "steps_per_s": round(t["steps"] / t["wall_s"], 1),
            "policy_ms_per_step": round(1000 * t["policy_s_per_step"], 2),
            "sim_ms_per_step": round(1000 * t["sim_s_per_step"], 1),
            "setup_s_per_episode": round(t["setup_s"] / max(t["episodes"], 1), 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="maniskill/push_cube")
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in args.workers:
            rows.append(run(args.task, args.episodes, w, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.task}, {args.episodes} episodes per row")
    print("| workers | episodes/min | steps/s | policy ms/step | sim ms/step | setup s/episode | wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['episodes_per_min']} | {r['steps_per_s']} | {r['policy_ms_per_step']} | "
              f"{r['sim_ms_per_step']} | {r['setup_s_per_episode']} | {r['wall_s']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
