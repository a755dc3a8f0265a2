"""Evaluation throughput: episodes per minute with 1, 2, 4 simulator workers against ONE policy server,
split into policy time (a worker waiting on the server: request, queueing, inference) and simulator time.

    python benchmarks/bench_eval.py --task maniskill/push_cube --tiny-checkpoint --workers 1 2 4 --episodes 4
    python benchmarks/bench_eval.py --task maniskill/push_cube --checkpoint DIR --workers 1 2 4 --episodes 8
    python benchmarks/bench_eval.py --task move_near --episodes 2 --checkpoint DIR     # real SimplerEnv
    python benchmarks/bench_eval.py --task move_near --episodes 2 --policy-server localhost:8000
    python benchmarks/bench_eval.py                       # SIMPLER test double + a zero-cost policy (harness only)
With a checkpoint, every worker count runs against one `python -m policies.serve` process started here (also
for one worker), so the numbers compare. --tiny-checkpoint writes a random-weight `tiny` checkpoint (the
fine-tuning recipe's settings) to a temporary folder: the policy's cost without training anything.
Episodes run to the step limit (--max-steps, terminate ignored) so every run does the same work.
Prints one line per worker count; numbers, not assertions.
"""

from __future__ import annotations

import argparse
import os
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


def write_tiny_checkpoint(path: Path, sampling_steps: int = 10) -> Path:
    """A random-weight `tiny` SelfFlowPolicy with the fine-tuning recipe's data settings, saved at `path`."""
    import torch
    from omegaconf import OmegaConf

    from policies.selfflow_policy import SelfFlowPolicy
    from worldmodel.action_modes import ACTION_TOKEN_DIM
    from worldmodel.actions import ActionNormalizer
    from worldmodel.builders import build_frames_codec, build_text
    from worldmodel.config import compose
    from worldmodel.sizes import build_model

    torch.manual_seed(0)
    run = OmegaConf.to_container(compose("finetune_rt1"), resolve=True)
    run["model"] = {"size": "tiny", "overrides": {}}
    codec = build_frames_codec(OmegaConf.create(run["codec"]))
    text = build_text(OmegaConf.create(run["text"])).eval()
    model = build_model("tiny", token_dim={"video": codec.token_dim, "action": ACTION_TOKEN_DIM},
                        text_dim=text.feature_dim).eval()
    normalizer = ActionNormalizer(q01=[-0.05] * 3 + [-0.2] * 3, q99=[0.05] * 3 + [0.2] * 3)
    policy = SelfFlowPolicy(model, text, codec, normalizer, run, device="cpu", sampling_steps=sampling_steps)
    return Path(policy.save_pretrained(path))


def main() -> None:
    from envs.evaluator import EvalConfig, evaluate
    from envs.policy_server_pool import shared_server_spec

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default=None, help="registry task (real backend); default: the test double's 'reach'")
    p.add_argument("--protocol", default=None, help="default: standard (ManiSkill3), visual_matching (SIMPLER)")
    p.add_argument("--episodes", type=int, default=None, help="episodes per worker count (default 4 on real tasks)")
    p.add_argument("--workers", type=int, nargs="+", default=[1], help="simulator worker counts to measure")
    p.add_argument("--max-steps", type=int, default=None, help="ManiSkill3: step limit per episode (task option)")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--tiny-checkpoint", action="store_true", help="a random-weight tiny checkpoint (see above)")
    p.add_argument("--policy-server", default=None, help="host:port of a server already running")
    p.add_argument("--video", action="store_true")
    p.add_argument("--cpu-render", action="store_true")
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # server and workers side by side: one thread each
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(write_tiny_checkpoint(Path(tmp) / "tiny")) if a.tiny_checkpoint else a.checkpoint
        if checkpoint:  # one served policy for every worker count, one worker included
            policy = shared_server_spec({"kind": "checkpoint", "path": checkpoint, "name": "ours"})
        elif a.policy_server:
            host, _, port = a.policy_server.rpartition(":")
            policy = {"kind": "server", "host": host, "port": int(port)}
        else:
            policy = {"kind": "factory", "target": "bench_eval:ZeroPolicy"}
            sys.path.insert(0, str(Path(__file__).parent))
        print(f"# {a.task or 'reach (double)'}; policy: {'server ' + checkpoint if checkpoint else policy['kind']}; "
              f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, {os.cpu_count()} CPUs", flush=True)
        for workers in a.workers:
            out = str(Path(tmp) / f"w{workers}")
            if a.task is None:
                cfg = EvalConfig(task="reach", backend="simpler_double:DoubleBackend", episodes=a.episodes,
                                 policy=policy, workers=workers, video=a.video, output_dir=out, progress=False)
            else:
                maniskill = a.task.startswith("maniskill/")
                cfg = EvalConfig(task=a.task, protocol=a.protocol or ("standard" if maniskill else "visual_matching"),
                                 episodes=a.episodes or 4, policy=policy, workers=workers, video=a.video,
                                 output_dir=out, progress=False, ignore_terminate=True,
                                 task_options={"max_steps": a.max_steps} if maniskill and a.max_steps else {},
                                 backend_options={} if maniskill else {"cpu_render": a.cpu_render})
            t = evaluate(cfg).timing
            print(f"task={cfg.task} workers={workers} episodes={t['episodes']} steps={t['steps']} "
                  f"wall={t['wall_s']:.1f}s episodes/min={t['episodes_per_min']:.2f} "
                  f"policy={1e3 * t['policy_s_per_step']:.1f}ms/step sim={1e3 * t['sim_s_per_step']:.1f}ms/step "
                  f"setup={t['setup_s']:.1f}s server_start={t['policy_startup_s']:.1f}s", flush=True)


if __name__ == "__main__":
    main()
