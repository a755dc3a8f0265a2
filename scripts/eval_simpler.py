"""Evaluate a policy by rollouts in SIMPLER: `python scripts/eval_simpler.py --task move_near`.

Flags (--task, --protocol, --episodes, --checkpoint, --policy-server host:port, --workers, --video/--no-video,
--output-dir) and Hydra-style key=value overrides of configs/eval_simpler.yaml can be mixed.
Exit status: 0 all episodes ran, 1 some episode failed (no success rate reported), 2 bad setup.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLAGS = {"task": "task", "protocol": "protocol", "episodes": "episodes", "checkpoint": "checkpoint",
         "policy_server": "policy_server", "workers": "workers", "output_dir": "output_dir"}


def parse(argv: list[str]):
    """argparse flags -> Hydra overrides, composed with configs/eval_simpler.yaml."""
    from hydra import compose, initialize_config_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task")
    p.add_argument("--protocol", help="visual_matching | variant_aggregation (SIMPLER); standard (ManiSkill3); "
                   "an unknown name is refused with the valid ones")
    p.add_argument("--episodes", type=int)
    p.add_argument("--checkpoint")
    p.add_argument("--policy-server", dest="policy_server", metavar="HOST:PORT")
    p.add_argument("--workers", type=int)
    p.add_argument("--video", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--output-dir", dest="output_dir")
    p.add_argument("overrides", nargs="*", help="Hydra-style key=value overrides of configs/eval_simpler.yaml")
    args = p.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"unexpected arguments {bad}; overrides are key=value (e.g. cpu_render=true)")
    overrides = list(args.overrides)
    for flag, key in FLAGS.items():
        v = getattr(args, flag)
        if v is not None:
            overrides.append(f"{key}={v}" if not isinstance(v, str) or v.strip() else f"{key}=null")
    if args.video is not None:
        overrides.append(f"video={str(args.video).lower()}")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="eval_simpler", overrides=overrides)


def newest_checkpoint(finetune_dir: str) -> Path:
    """The newest <finetune_dir>/*/checkpoint/ holding config.json, by modification time."""
    cands = [c.parent for c in Path(finetune_dir).glob("*/checkpoint/config.json")]
    if not cands:
        raise FileNotFoundError(f"no fine-tuned checkpoint under {finetune_dir}/*/checkpoint/: run "
                                "python scripts/finetune_rt1.py first or pass --checkpoint")
    return max(cands, key=lambda c: (c / "config.json").stat().st_mtime)


def policy_spec(cfg) -> dict:
    if cfg.policy_server:
        host, _, port = str(cfg.policy_server).rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--policy-server must be host:port, got {cfg.policy_server!r}")
        return {"kind": "server", "host": host, "port": int(port), "name": cfg.policy_name}
    ckpt = Path(cfg.checkpoint) if cfg.checkpoint else newest_checkpoint(cfg.finetune_dir)
    if not (ckpt / "config.json").is_file():
        raise FileNotFoundError(f"{ckpt} is not a checkpoint dir (no config.json); pass a dir written by "
                                "scripts/finetune_rt1.py")
    return {"kind": "checkpoint", "path": str(ckpt), "kwargs": dict(cfg.policy_kwargs), "name": cfg.policy_name}


def main(argv: list[str] | None = None) -> int:
    from omegaconf import OmegaConf

    from envs.evaluator import EvalConfig, EvaluationFailed, evaluate
    from envs.results import markdown_table
    from envs.simpler_backend import SimplerUnavailable

    cfg = parse(sys.argv[1:] if argv is None else argv)
    try:
        out = cfg.output_dir or f"outputs/eval_simpler/{cfg.task.replace('/', '_')}_{cfg.protocol}_" \
                                f"{time.strftime('%Y%m%d_%H%M%S')}"
        ecfg = EvalConfig(task=cfg.task, protocol=cfg.protocol, episodes=cfg.episodes, policy=policy_spec(cfg),
                          workers=cfg.workers, video=cfg.video, video_fps=cfg.video_fps, output_dir=out,
                          backend_options=_backend_options(cfg), progress=cfg.progress)
        print(OmegaConf.to_yaml(cfg), flush=True)
        res = evaluate(ecfg)
    except SimplerUnavailable as e:
        print(str(e), file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except EvaluationFailed as e:
        print(f"EVALUATION FAILED: {e}", file=sys.stderr)
        return 1
    print(markdown_table(res.summary, cfg.policy_name))
    t = res.timing
    print(f"\n{t['episodes']} episodes, {t['steps']} steps in {t['wall_s']:.1f} s ({t['episodes_per_min']:.2f} "
          f"episodes/min); policy {1e3 * t['policy_s_per_step']:.1f} ms/step, simulator "
          f"{1e3 * t['sim_s_per_step']:.1f} ms/step, setup {t['setup_s']:.1f} s in all")
    print(f"results: {res.paths['results_md'].parent}")
    return 0


def _backend_options(cfg) -> dict:
    from envs.backend import get_task

    if get_task(cfg.task).backend == "simpler":
        from envs.simpler_backend import describe_render, parse_cpu_render

        # cpu_render=auto is resolved here, once, and what the images are is recorded in the results meta.
        render = describe_render(parse_cpu_render(cfg.cpu_render))
        return {"cpu_render": render["cpu_render"], "reuse_env": bool(cfg.reuse_env), "render": render}
    return {}


if __name__ == "__main__":
    sys.exit(main())
