"""results.json and report.md of the ManiSkill3 closed loop (envs.closed_loop), from plain stage results.

Nothing here runs a stage: `write_report(out_dir, results)` turns the results dict (the content of
results.json) into report.md with a rate table (95% Wilson intervals, envs.results.wilson_interval), a bar
chart with interval whiskers (rates.png), the learning curve (learning_curve.png: success vs steps with
whiskers, plus the offline action MAE logged by the trainer when present), links to success and failure
videos, the wall time per stage and the commands that reproduce the run. No torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import time
from pathlib import Path
from typing import Any

from envs.results import EpisodeRecord, load_records, wilson_interval, write_json_atomic

LABELS = {"selfflow": "Self-Flow", "flow_matching": "flow matching", "still": "still (never moves)",
          "mean_replay": "mean-demo replay (blind)"}
RECIPE_KEYS = {"trainer": ("max_steps", "lr", "warmup_steps", "eval_every", "checkpoint_every", "ema_decay"),
               "data": ("height", "width", "context_frames", "future_frames", "frame_stride", "horizon", "batch_size",
                        "eval_fraction")}


def load_results(out_dir: str | Path) -> dict:
    """The results.json of an earlier (possibly interrupted) run in out_dir, or {}."""
    path = Path(out_dir) / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


@contextlib.contextmanager
def locked(path: str | Path, what: str = "", quiet: bool = False):
    """Hold an exclusive lock on `path` (created) so runs sharing a folder take turns (no-op without fcntl)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not quiet:
                print(f"[closed loop] waiting for another run to finish {what or path.parent}", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


SECTIONS = ("baselines", "learning_curve", "offline_curve", "stages_s")  # merged key by key


def merge_results(disk: dict, mine: dict) -> dict:
    """results.json content = what is on disk updated with what this run produced (`mine`), so two runs on one
    folder (say one per objective) both keep their entries; wall_s of each evaluation follows stages_s."""
    merged = {**disk, **{k: v for k, v in mine.items() if k not in (*SECTIONS, "recipe", "objectives")}}
    for key in SECTIONS:
        merged[key] = {**disk.get(key, {}), **mine.get(key, {})}
    old, new = disk.get("recipe", {}), mine.get("recipe", {})
    merged["recipe"] = {**old, **new, "objectives": {**old.get("objectives", {}), **new.get("objectives", {})}}
    merged["objectives"] = list(dict.fromkeys([*disk.get("objectives", []), *mine.get("objectives", [])]))
    stages = merged["stages_s"]
    for obj in merged["objectives"]:
        if obj in merged:
            merged[obj]["wall_s"] = {"finetune": stages.get(f"finetune/{obj}"), "eval": stages.get(f"eval/{obj}")}
    for name, entry in merged["baselines"].items():
        entry["wall_s"] = {"eval": stages.get(f"eval/{name}")}
    return merged


def update_results(out_dir: str | Path, mine: dict) -> dict:
    """Merge `mine` into out_dir/results.json (under a lock, written atomically), rewrite report.md; returns it."""
    out = Path(out_dir)
    with locked(out / ".results.lock", quiet=True):
        merged = merge_results(load_results(out), mine)
        write_json_atomic(out / "results.json", merged)
        write_report(out, merged)
    return merged


def rate_entry(successes: int, episodes: int) -> dict:
    """{"episodes", "successes", "rate", "ci95": [low, high]} with the 95% Wilson interval."""
    low, high = wilson_interval(int(successes), int(episodes))
    return {"episodes": int(episodes), "successes": int(successes), "rate": successes / episodes, "ci95": [low, high]}


def pick_videos(records: list[EpisodeRecord], out_dir: Path, k: int = 2) -> dict[str, list[str]]:
    """Up to k success and k failure videos (lowest episode indices), as paths relative to out_dir."""
    picked: dict[str, list[str]] = {"success": [], "failure": []}
    for r in sorted(records, key=lambda r: r.index):
        key = "success" if r.success else "failure"
        if r.video and len(picked[key]) < k:
            picked[key].append(os.path.relpath(r.video, out_dir))
    return picked


def eval_entry(records: list[EpisodeRecord], out_dir: Path, timing: dict | None = None) -> dict:
    """One evaluation's results.json entry: rate + interval, per-step times, a few videos."""
    entry = rate_entry(sum(bool(r.success) for r in records), len(records))
    t = timing or {}
    entry["timing"] = {"policy_ms_per_step": 1e3 * t.get("policy_s_per_step", 0.0),
                       "sim_ms_per_step": 1e3 * t.get("sim_s_per_step", 0.0),
                       "episodes_per_min": t.get("episodes_per_min"), "steps": t.get("steps")}
    entry["videos"] = pick_videos(records, Path(out_dir))
    if all(r.success_once is not None for r in records):  # success at any step, as ManiSkill3 also reports
        entry["success_once"] = rate_entry(sum(bool(r.success_once) for r in records), len(records))
    entry["terminated_by_policy"] = sum(bool(r.terminated_by_policy) for r in records)
    entry["mean_steps"] = sum(r.steps for r in records) / max(len(records), 1)
    return entry


def curve_point(step: int, episodes_json: str | Path, episodes: int, offline: list[dict] | None = None) -> dict:
    """A learning-curve point from the first `episodes` episodes (by index) of an evaluation, plus the
    offline action MAE logged at that step when there is one."""
    records = sorted(load_records(episodes_json), key=lambda r: r.index)[:episodes]
    point = {"step": int(step), **rate_entry(sum(bool(r.success) for r in records), len(records))}
    for o in offline or []:
        if o["step"] == step:
            point.update({k: v for k, v in o.items() if k != "step"})
    return point


def offline_curve(metrics_path: str | Path) -> list[dict]:
    """[{"step", "action_mae", "mean_baseline_mae"}] from the trainer's metrics.jsonl (eval/* records)."""
    path = Path(metrics_path)
    points: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line) if line.strip() else {}
            if rec.get("eval/action_mae") is not None:
                points[int(rec["step"])] = {"step": int(rec["step"]), "action_mae": rec["eval/action_mae"],
                                            "mean_baseline_mae": rec.get("eval/mean_baseline_mae")}
    return [points[s] for s in sorted(points)]


def offline_headline(offline: dict) -> dict:
    return {k: offline[k] for k in ("step", "action_mae", "mean_baseline_mae", "gripper_sign_accuracy",
                                    "terminate_accuracy") if k in offline}


def recipe_summary(cfg: dict, config_name: str, overrides: list[str]) -> dict:
    """The resolved settings that define a fine-tuning recipe (a subset of the composed Hydra config)."""
    out = {"config": config_name, "overrides": list(overrides), "model": (cfg.get("model") or {}).get("size"),
           "init_from": cfg.get("init_from"), "seed": cfg.get("seed"), "modes": cfg.get("modes"),
           "codec": cfg.get("codec"), "objective": cfg.get("objective"), "policy": cfg.get("policy")}
    for group, keys in RECIPE_KEYS.items():
        out[group] = {k: (cfg.get(group) or {}).get(k) for k in keys if k in (cfg.get(group) or {})}
    return out


def reproduce_commands(cfg, policy_kwargs: dict | None = None) -> dict[str, Any]:
    """The one command that reruns (resumes) this closed loop (a ClosedLoopConfig), and its stages one by one;
    policy_kwargs: the evaluated policy's options (the recipe's `policy` node + --policy-kwargs)."""
    rel = os.path.relpath(cfg.out) if cfg.out else "DIR"
    out = shlex.quote(cfg.out if rel.startswith("..") else rel)
    objective = "both" if len(cfg.objectives) == 2 else cfg.objectives[0]
    one = (f"python scripts/closed_loop.py --task {cfg.task} --objective {objective} --out {out} --episodes "
           f"{cfg.episodes} --eval-episodes {cfg.eval_episodes} --workers {cfg.workers} --config {cfg.config}")
    one += f" --curve-steps {','.join(map(str, cfg.curve_steps))}" if cfg.curve_steps else \
        f" --curve-points {cfg.curve_points}"
    one += f" --curve-episodes {cfg.curve_episodes}" if cfg.curve_episodes else ""
    one += f" --policy-kwargs {shlex.quote(json.dumps(cfg.policy_kwargs))}" if cfg.policy_kwargs else ""
    one += "" if cfg.video else " --no-video"
    one += " -- " + " ".join(shlex.quote(o) for o in cfg.overrides) if cfg.overrides else ""
    rlds = f"{out}/demos/rlds/{cfg.task.replace('/', '_')}/0.1.0"
    stages = [f"python scripts/collect_demos.py --task {cfg.task} --episodes {cfg.episodes} --workers {cfg.workers} "
              f"--out {out}/demos"]
    for obj in cfg.objectives:
        extra = "".join(" " + shlex.quote(o) for o in cfg.overrides)
        stages.append(f"python scripts/finetune_rt1.py --config-name {cfg.config} data.rt1_dir={rlds} objective={obj}"
                      f"{extra} hydra.run.dir={out}/ft_{obj}")
        kwargs = "".join(f" +policy_kwargs.{k}={json.dumps(v)}" for k, v in (policy_kwargs or {}).items())
        stages.append(f"python scripts/eval_simpler.py --task {cfg.task} --protocol standard --episodes "
                      f"{cfg.eval_episodes} --workers {cfg.workers} --checkpoint {out}/ft_{obj}/checkpoint "
                      f"--output-dir {out}/eval_{obj}{kwargs}")
    return {"closed_loop": one, "argv": " ".join(shlex.quote(a) for a in (cfg.argv or ())), "stages": stages}


# ------------------------------------------------------------------------------------------------ plots
def _rows(results: dict) -> list[tuple[str, str, dict]]:
    """(key, label, entry) of every finished evaluation: objectives first, then baselines."""
    rows = [(o, LABELS.get(o, o), results[o]) for o in results.get("objectives", []) if "rate" in results.get(o, {})]
    rows += [(b, LABELS.get(b, b), e) for b, e in results.get("baselines", {}).items() if "rate" in e]
    return rows


def _errbars(entries: list[dict]):
    """(2, n) whisker lengths in points; clipped at 0 (the Wilson bound at 0 or n successes is the rate itself, up to
    rounding, and matplotlib refuses a negative length)."""
    return [[max(0.0, 100 * (e["rate"] - e["ci95"][0])) for e in entries],
            [max(0.0, 100 * (e["ci95"][1] - e["rate"])) for e in entries]]


def plot_rates(rows: list[tuple[str, str, dict]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for _, _, e in rows]
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 3.6))
    ax.bar(range(len(rows)), [100 * e["rate"] for e in entries], yerr=_errbars(entries), capsize=6,
           color=[{"selfflow": "C0", "flow_matching": "C1"}.get(k, "0.6") for k, _, _ in rows])
    ax.set_xticks(range(len(rows)), [f"{label}\n{e['successes']}/{e['episodes']}" for _, label, e in rows],
                  fontsize=8)
    ax.set_ylabel("success rate (%), 95% Wilson")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_learning_curve(curves: dict[str, list[dict]], offline: dict[str, list[dict]], path: Path,
                        title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_offline = any(offline.get(o) for o in curves)
    fig, axes = plt.subplots(1, 2 if has_offline else 1, figsize=(10 if has_offline else 5.5, 3.6), squeeze=False)
    ax = axes[0][0]
    span = max((p["step"] for pts in curves.values() for p in pts), default=1)
    for i, (obj, pts) in enumerate(curves.items()):
        dodge = (i - (len(curves) - 1) / 2) * 0.012 * span  # side by side: whiskers at one step do not hide
        if pts:
            ax.errorbar([p["step"] + dodge for p in pts], [100 * p["rate"] for p in pts], yerr=_errbars(pts), capsize=4,
                        marker="o", color=f"C{i}", label=LABELS.get(obj, obj))
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("closed-loop success (%), 95% Wilson")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    if has_offline:
        ax = axes[0][1]
        for i, obj in enumerate(curves):
            pts = offline.get(obj) or []
            ax.plot([p["step"] for p in pts], [p["action_mae"] for p in pts], marker="o", color=f"C{i}",
                    label=f"{LABELS.get(obj, obj)}")
            base = [p for p in pts if p.get("mean_baseline_mae") is not None]
            if base:
                ax.plot([p["step"] for p in base], [p["mean_baseline_mae"] for p in base], ls="--", color=f"C{i}",
                        alpha=0.5, label=f"{LABELS.get(obj, obj)}: predict-the-mean")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("held-out action MAE (offline)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------- report
def _pct(e: dict) -> str:
    return f"{100 * e['rate']:.1f}% [{100 * e['ci95'][0]:.1f}, {100 * e['ci95'][1]:.1f}]"


def _secs(s) -> str:
    return "done by an earlier run" if s is None else f"{s:.0f} s ({s / 60:.1f} min)"


def write_report(out_dir: str | Path, results: dict) -> dict[str, Path]:
    """Write report.md (+ rates.png, learning_curve.png when there is something to draw) from `results`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task, rows = results.get("task", "?"), _rows(results)
    paths: dict[str, Path] = {"report": out / "report.md"}
    recipe = results.get("recipe", {})
    demos = results.get("demos", {})
    lines = [f"# Closed loop: {task}", "",
             f"Updated {time.strftime('%Y-%m-%d %H:%M:%S')}. {demos.get('kept', '?')} scripted demonstrations; recipe "
             f"`{recipe.get('config', '?')}` (model `{recipe.get('model', '?')}`, "
             f"{recipe.get('trainer', {}).get('max_steps', '?')} steps, init_from "
             f"{recipe.get('init_from') or 'none (from scratch)'}); {results.get('eval_episodes', '?')} evaluation "
             "episodes per policy on the same fixed seeds (ManiSkill3 EVAL_SEED_BASE + index).", "",
             "Success is read at the episode's last step (the policy's terminate or the step limit), as SimplerEnv "
             "reads it; success at any step is beside it.", "",
             "| policy | successes | success rate [95% Wilson] | at any step | offline action MAE (predict-the-mean) | "
             "policy / simulator ms per step |", "|---|---|---|---|---|---|"]
    for _, label, e in rows:
        off = e.get("offline") or {}
        mae = f"{off['action_mae']:.4f} ({off.get('mean_baseline_mae', float('nan')):.4f})" if "action_mae" in off \
            else "-"
        t = e.get("timing") or {}
        ms = f"{t.get('policy_ms_per_step', 0):.1f} / {t.get('sim_ms_per_step', 0):.1f}" if t else "-"
        once = _pct(e["success_once"]) if "success_once" in e else "-"
        lines.append(f"| {label} | {e['successes']}/{e['episodes']} | {_pct(e)} | {once} | {mae} | {ms} |")
    pending = [LABELS.get(o, o) for o in results.get("objectives", []) if "rate" not in results.get(o, {})]
    if pending:
        lines.append(f"\nNot evaluated yet: {', '.join(pending)}.")
    if rows:
        paths["rates"] = plot_rates(rows, out / "rates.png", f"{task}: closed-loop success")
        lines += ["", "![success rates with 95% Wilson intervals](rates.png)"]
    curves = {o: c for o, c in results.get("learning_curve", {}).items() if c}
    if curves:
        paths["learning_curve"] = plot_learning_curve(curves, results.get("offline_curve", {}),
                                                      out / "learning_curve.png", f"{task}: learning curve")
        lines += ["", "## Learning curve", "",
                  f"Snapshots evaluated on the first {results.get('curve_episodes', '?')} of the same seeds.", "",
                  "| objective | step | successes | success rate [95% Wilson] | offline action MAE |",
                  "|---|---|---|---|---|"]
        for obj, pts in curves.items():
            for p in pts:
                mae = f"{p['action_mae']:.4f}" if p.get("action_mae") is not None else "-"
                lines.append(f"| {LABELS.get(obj, obj)} | {p['step']} | {p['successes']}/{p['episodes']} | "
                             f"{_pct(p)} | {mae} |")
        lines += ["", "![learning curve](learning_curve.png)"]
    videos = [(label, e["videos"]) for _, label, e in rows if any((e.get("videos") or {}).values())]
    if videos:
        lines += ["", "## Videos", ""]
        for label, v in videos:
            links = [f"[{kind} {Path(p).stem.split('_')[0]}]({p})" for kind in ("success", "failure")
                     for p in v.get(kind, [])]
            lines.append(f"- {label}: " + ", ".join(links))
    stages = results.get("stages_s", {})
    if stages:
        lines += ["", "## Wall time per stage", "", "| stage | wall time |", "|---|---|"]
        lines += [f"| {name} | {_secs(s)} |" for name, s in stages.items()]
    cmds = results.get("commands") or {}
    if cmds:
        lines += ["", "## Reproduce", "", "One command (it resumes: finished stages are skipped):", "", "```",
                  cmds.get("closed_loop", ""), "```", "", "The stages one by one (without the baselines and the "
                  "learning-curve snapshots; eval_simpler.py runs at most the registered ManiSkill3 episode list):",
                  "", "```", *cmds.get("stages", []), "```"]
        if cmds.get("argv"):
            lines += ["", f"This run was started as: `{cmds['argv']}`"]
    paths["report"].write_text("\n".join(lines) + "\n")
    return paths
