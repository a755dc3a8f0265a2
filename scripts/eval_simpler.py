"""Evaluate a policy by rollouts in SIMPLER: `python scripts/eval_simpler.py --task move_near`.

One config path: configs/eval_simpler.yaml composed by Hydra with key=value overrides. A flag is a thin
alias of the override of the same key (dashes read as underscores): `--task move_near` is `task=move_near`,
`--policy-server h:p` is `policy_server=h:p`, `--no-video` is `video=false`; `--help` prints the config.
The same command with the same --output-dir resumes an interrupted evaluation (finished episodes are kept).
Exit status: 0 all episodes ran, 1 some episode failed (no success rate reported), 2 bad setup.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs" / "eval_simpler.yaml"


class UsageError(ValueError):
    """The command line cannot be read as overrides of configs/eval_simpler.yaml."""


def _value(v: str) -> str:
    """A flag's value as an override value: empty -> null; quoted when Hydra's grammar would split it."""
    if not v.strip():
        return "null"
    if re.search(r"[,\[\]{}()'\"\\=]", v) or v != v.strip():
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return v


def flags_to_overrides(argv: list[str]) -> list[str]:
    """`--key value`, `--key=value`, `--flag` (true) and `--no-flag` (false) -> Hydra `key=value` overrides;
    key=value arguments pass through in order."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            key = name.replace("-", "_")
            if eq:
                out.append(f"{key}={_value(value)}")
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--") and "=" not in argv[i + 1]:
                out.append(f"{key}={_value(argv[i + 1])}")
                i += 1
            elif key.startswith("no_"):
                out.append(f"{key[3:]}=false")
            else:
                out.append(f"{key}=true")
        elif "=" in arg and not arg.startswith("-"):
            out.append(arg)
        else:
            raise UsageError(f"unexpected argument {arg!r}: give --key value or key=value overrides of {CONFIG}")
        i += 1
    return out


def parse(argv: list[str]):
    """The command line -> configs/eval_simpler.yaml composed with its overrides (UsageError naming a bad key)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = flags_to_overrides(argv)
    try:
        with initialize_config_dir(config_dir=str(CONFIG.parent), version_base=None):
            return compose(config_name=CONFIG.stem, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        first = str(e).splitlines()[0]  # (Hydra's next line suggests +key=..., which would only add an unused key)
        raise UsageError(f"{first} The keys you can set are those of {CONFIG} (python scripts/eval_simpler.py "
                         "--help)") from e


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


def task_options(cfg) -> dict:
    """ManiSkill3 task settings from the config (and its task_file); the command line wins over the file."""
    from envs.maniskill_tasks import TASK_OPTIONS, load_task_file

    options = {k: cfg.get(k) for k in TASK_OPTIONS if k != "solver"}
    if cfg.task_file:
        from_file = load_task_file(cfg.task_file)
        options = {k: options[k] if options[k] is not None else from_file.get(k) for k in options}
    return {k: v for k, v in options.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__ + f"\n{CONFIG}:\n" + CONFIG.read_text())
        return 0
    from omegaconf import OmegaConf

    from envs.evaluator import EvalConfig, EvaluationFailed, evaluate
    from envs.results import markdown_table
    from envs.simpler_backend import SimplerUnavailable

    try:
        cfg = parse(argv)
        if cfg.task_file and not any(o.startswith("task=") for o in flags_to_overrides(argv)):
            from envs.maniskill_tasks import load_task_file

            cfg.task = load_task_file(cfg.task_file).get("task", cfg.task)
        out = cfg.output_dir or f"outputs/eval_simpler/{cfg.task.replace('/', '_')}_{cfg.protocol}_" \
                                f"{time.strftime('%Y%m%d_%H%M%S')}"
        ecfg = EvalConfig(task=cfg.task, protocol=cfg.protocol, episodes=cfg.episodes, policy=policy_spec(cfg),
                          workers=cfg.workers, video=cfg.video, video_fps=cfg.video_fps, output_dir=out,
                          backend_options=_backend_options(cfg), progress=cfg.progress, rotation=cfg.rotation,
                          ignore_terminate=cfg.ignore_terminate, task_options=task_options(cfg), resume=cfg.resume)
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
    print(f"\n{t['episodes']} episodes ({t['episodes_run']} run now), {t['steps']} steps; {t['wall_s']:.1f} s "
          f"({t['episodes_per_min']:.2f} episodes/min); policy {1e3 * t['policy_s_per_step']:.1f} ms/step, simulator "
          f"{1e3 * t['sim_s_per_step']:.1f} ms/step, setup {t['setup_s']:.1f} s in all; rotation convention "
          f"{res.records[0].rotation}, terminate {'ignored' if ecfg.ignore_terminate else 'followed'}")
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
