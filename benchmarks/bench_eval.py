"""Evaluation throughput: episodes per minute, split into policy, simulator and setup time.

    python benchmarks/bench_eval.py                       # SIMPLER test double + scripted numpy policy
    python benchmarks/bench_eval.py --workers 2
    python benchmarks/bench_eval.py --task move_near --episodes 2 --checkpoint DIR   # real SimplerEnv
    python benchmarks/bench_eval.py --task move_near --episodes 2 --policy-server localhost:8000
Prints one line per run; numbers, not assertions.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


class ZeroPolicy:
    """A policy that costs nothing: isolates the simulator's share."""

    def reset(self, instruction):
        pass

    def step(self, image, instruction):
        import numpy as np

        a = {"world_vector": np.zeros(3), "rot_axangle": np.zeros(3), "gripper": np.zeros(1),
             "terminate_episode": np.zeros(1)}
        return a, a


def main() -> None:
    from envs.evaluator import EvalConfig, evaluate

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default=None, help="registry task (real backend); default: the test double's 'reach'")
    p.add_argument("--protocol", default="visual_matching")
    p.add_argument("--episodes", type=int, default=None)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--policy-server", default=None)
    p.add_argument("--video", action="store_true")
    p.add_argument("--cpu-render", action="store_true")
    a = p.parse_args()
    if a.checkpoint:
        policy = {"kind": "checkpoint", "path": a.checkpoint}
    elif a.policy_server:
        host, _, port = a.policy_server.rpartition(":")
        policy = {"kind": "server", "host": host, "port": int(port)}
    else:
        policy = {"kind": "factory", "target": "bench_eval:ZeroPolicy"}
        sys.path.insert(0, str(Path(__file__).parent))
    with tempfile.TemporaryDirectory() as tmp:
        if a.task is None:
            cfg = EvalConfig(task="reach", backend="simpler_double:DoubleBackend", episodes=a.episodes,
                             policy=policy, workers=a.workers, video=a.video, output_dir=tmp, progress=False)
        else:
            cfg = EvalConfig(task=a.task, protocol=a.protocol, episodes=a.episodes or 2, policy=policy,
                             workers=a.workers, video=a.video, output_dir=tmp, progress=False,
                             backend_options={"cpu_render": a.cpu_render} if "/" not in a.task else {})
        t = evaluate(cfg).timing
    print(f"task={cfg.task} workers={a.workers} episodes={t['episodes']} steps={t['steps']} "
          f"wall={t['wall_s']:.2f}s episodes/min={t['episodes_per_min']:.1f} "
          f"policy={1e3 * t['policy_s_per_step']:.2f}ms/step sim={1e3 * t['sim_s_per_step']:.2f}ms/step "
          f"setup={t['setup_s']:.2f}s")


if __name__ == "__main__":
    main()
