"""Rollout evaluator for any registered task, faithful to SimplerEnv's own episode loop.

Per episode (SimplerEnv `maniskill2_evaluator.run_maniskill2_eval_single_episode`): build the env
with the official settings, reset with the episode's options, take the instruction from the env,
`policy.reset(instruction)`, then until (policy terminates on the final subtask) or (step limit):
`raw, action = policy.step(image, instruction)`; a terminate before the final subtask advances the
subtask instead; the action is applied either way; success is the env's flag at the LAST step (the
episode is not cut at first success). The instruction passed to the policy follows the env.

The policy's SIMPLER action gets its rotation from the raw `rotation_delta` under the rotation convention
of the run (policies.conventions: "axis_angle" pass-through, SimplerEnv's RT-1 Google-robot default, or
"rpy"); `ignore_terminate` runs every episode to its step limit (SimplerEnv's Octo and OpenVLA wrappers).

Episodes run in worker processes (envs.eval_workers), each with its own env; with a checkpoint they share
one policy server process (envs.policy_server_pool) instead of loading N models. Every finished episode
is saved atomically (envs.resume), so a killed run started again with the same command and output dir
runs only the missing episodes. No torch is imported here.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from envs.backend import EpisodeSpec, backend_episodes, backend_for, resolve_episodes, select_episodes
from envs.eval_workers import run_parallel
from envs.policy_server_pool import PolicyServerProcess, shared_server_spec
from envs.results import EpisodeRecord, aggregate, write_results
from envs.resume import EpisodeStore
from policies.conventions import DEFAULT_ROTATION, check_rotation, rotation_to_axangle


class EvaluationFailed(RuntimeError):
    """Some episodes failed; per-episode files were written, no success rate is reported."""


@dataclass
class EvalConfig:
    """What to evaluate and how.

    policy: how the policy is built: {"kind": "checkpoint", "path": str, "kwargs": {...}} (in-process with one
        worker; with several, one shared `policies.serve` process and a client per worker),
        {"kind": "server", "host": str, "port": int, "kwargs": {...}} (a running server; kwargs go to RemotePolicy),
        {"kind": "serve", "command": [..."{port}"...], "client_kwargs": {...}} (a server command started once and
        shared), or {"kind": "factory", "target": "module:callable", "kwargs": {...}} (any importable callable
        returning an object with reset/step; one per worker).
    backend: None = the task's registered backend; or "module:callable" building a Backend (tests).
    backend_options: passed to `backend.make(spec, **options)` (SIMPLER: cpu_render, reuse_env).
    task_options: the task's settings beside the registry's (ManiSkill3: env_id, instruction, max_steps; a
        maniskill/<name> outside the registry is defined by them).
    rotation: rotation convention (policies.conventions.ROTATION_CONVENTIONS) turning the policy's raw
        rotation_delta into rot_axangle; None = the backend's default (SIMPLER Google robot: "axis_angle").
    ignore_terminate: never end an episode (or advance a subtask) on the policy's terminate signal.
    resume: keep the episodes an interrupted run with the same settings recorded in output_dir (False, or a
        policy object passed to `evaluate`, whose settings cannot be compared: start afresh).
    """

    task: str
    protocol: str = "visual_matching"
    episodes: int | None = None  # None = the whole official protocol
    policy: dict[str, Any] = field(default_factory=dict)
    workers: int = 1
    video: bool = True
    video_fps: int = 5
    output_dir: str = "outputs/eval_simpler/run"
    backend: str | None = None
    backend_options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    rotation: str | None = None
    ignore_terminate: bool = False
    task_options: dict[str, Any] = field(default_factory=dict)
    resume: bool = True  # keep episodes recorded in output_dir by an interrupted run with the same settings


@dataclass
class EvalResult:
    records: list[EpisodeRecord]
    summary: dict[str, Any]
    paths: dict[str, Path]
    timing: dict[str, float]


def _import_target(target: str):
    if ":" not in target:
        raise ValueError(f"expected 'module:attribute', got {target!r}")
    mod, attr = target.split(":", 1)
    return getattr(importlib.import_module(mod), attr)


def build_policy(spec: dict[str, Any]):
    """Build a policy from its spec (imports lazily: torch only for in-process checkpoints)."""
    kind = spec.get("kind")
    if kind == "checkpoint":
        from policies import SelfFlowPolicy  # torch lives on the policy side only

        return SelfFlowPolicy.from_pretrained(spec["path"], **spec.get("kwargs", {}))
    if kind == "server":
        from policies.client import RemotePolicy

        return RemotePolicy(spec["host"], int(spec["port"]), **spec.get("kwargs", {}))
    if kind == "factory":
        return _import_target(spec["target"])(**spec.get("kwargs", {}))
    raise ValueError(f"policy spec needs kind 'checkpoint', 'server', 'serve' or 'factory', got {spec!r}")


def build_backend(cfg: EvalConfig):
    return _import_target(cfg.backend)() if cfg.backend else backend_for(cfg.task)


def resolve_rotation(cfg: EvalConfig, backend) -> str:
    """The run's rotation convention: cfg.rotation, else the backend's `default_rotation`, else the Google robot's."""
    return check_rotation(cfg.rotation or getattr(backend, "default_rotation", DEFAULT_ROTATION))


def apply_rotation(raw: Any, action: dict[str, np.ndarray], rotation: str) -> str:
    """Set action["rot_axangle"] from the raw action's rotation_delta under `rotation`; returns what was used
    ("policy" when the raw action has no rotation_delta and the policy's own rot_axangle stands)."""
    if isinstance(raw, dict) and "rotation_delta" in raw:
        action["rot_axangle"] = rotation_to_axangle(raw["rotation_delta"], rotation)
        return rotation
    return "policy"


def _check_action(action: Any) -> dict[str, np.ndarray]:
    """The policy's processed action must be SIMPLER's dict: world_vector 3, rot_axangle 3, gripper 1, terminate 1."""
    sizes = {"world_vector": 3, "rot_axangle": 3, "gripper": 1, "terminate_episode": 1}
    if not isinstance(action, dict):
        raise ValueError(f"policy.step must return (raw_action, action) with a dict action, got {type(action)}")
    out = {}
    for k, n in sizes.items():
        if k not in action:
            raise ValueError(f"policy action lacks {k!r}; SIMPLER needs {list(sizes)} (policies/conventions.py)")
        v = np.asarray(action[k], dtype=np.float64).reshape(-1)
        if v.shape[0] != n or not np.all(np.isfinite(v)):
            raise ValueError(f"policy action {k!r} must be {n} finite floats, got {v!r}")
        out[k] = v
    return out


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", s).strip("_")[:80]


def _accepts_state(policy) -> bool:
    """True if ``policy.step`` takes a ``state`` keyword (proprioception); other policies get image + text only."""
    import inspect

    try:
        params = inspect.signature(policy.step).parameters
    except (TypeError, ValueError):
        return False
    return "state" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def run_episode(backend, policy, spec: EpisodeSpec, cfg: EvalConfig) -> EpisodeRecord:
    """One episode following SimplerEnv's loop; exceptions become a record with `error` (success None)."""
    rec = EpisodeRecord(spec.task, spec.protocol, spec.variant, spec.index, spec.seed, None)
    session = None
    try:
        t0 = time.perf_counter()
        session = backend.make(spec, **cfg.backend_options)
        obs = session.reset()
        instruction = rec.instruction = obs.instruction
        is_final = session.is_final_subtask
        policy.reset(instruction)
        if spec.seed is not None and hasattr(policy, "reseed"):  # reproducible sampling noise per episode
            policy.reseed(int(spec.seed))
        rec.setup_time_s = time.perf_counter() - t0
        image, state = obs.image, obs.state
        takes_state = _accepts_state(policy)
        rotation = resolve_rotation(cfg, backend)
        frames, instrs = [image], [instruction]
        predicted_terminated, truncated, success, info = False, False, False, {}
        while not (predicted_terminated or truncated):
            t = time.perf_counter()
            if takes_state and state is not None:
                _raw, action = policy.step(image, instruction, state=state)
            else:
                _raw, action = policy.step(image, instruction)
            rec.policy_time_s += time.perf_counter() - t
            action = _check_action(action)
            rec.rotation = apply_rotation(_raw, action, rotation)
            predicted_terminated = bool(action["terminate_episode"][0] > 0) and not cfg.ignore_terminate
            if predicted_terminated and not is_final:  # multi-step task: move on, keep going
                predicted_terminated = False
                session.advance_subtask()
            t = time.perf_counter()
            res = session.step(action)
            rec.sim_time_s += time.perf_counter() - t
            rec.steps += 1
            success, info, image, state = bool(res.success), res.info, res.image, res.state
            rec.success_once = bool(rec.success_once) or success
            if res.instruction is not None:
                instruction = res.instruction
            is_final = session.is_final_subtask
            truncated = bool(res.truncated) or rec.steps >= spec.max_steps
            frames.append(image)
            instrs.append(instruction)
        rec.terminated_by_policy = predicted_terminated
        rec.final_instruction, rec.final_info = instruction, info
        if cfg.video:
            from envs.video import write_video

            name = f"{spec.index:04d}_{_slug(spec.variant)}_{'success' if success else 'failure'}.mp4"
            path = Path(cfg.output_dir) / "videos" / f"{_slug(spec.task)}_{spec.protocol}" / name
            rec.video = str(write_video(path, frames, instrs, fps=cfg.video_fps))
        rec.success = success
    except Exception as e:  # noqa: BLE001 - every failure is recorded and fails the run
        rec.success = rec.success_once = None
        rec.error = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
    finally:
        if session is not None:
            try:
                session.close()
            except Exception as e:  # noqa: BLE001
                rec.error = (rec.error or "") + f"\nclose failed: {e}"
                rec.success = None
    return rec


def run_and_save(backend, policy, spec: EpisodeSpec, cfg: EvalConfig) -> EpisodeRecord:
    """`run_episode`, then its record saved atomically in the output dir (what a resumed run keeps)."""
    rec = run_episode(backend, policy, spec, cfg)
    EpisodeStore(cfg.output_dir).save(rec)
    return rec


def run_settings(cfg: EvalConfig, rotation: str) -> dict[str, Any]:
    """What decides the episodes' outcomes (a resumed run must match it; workers, progress and the number of
    episodes may differ: records are matched episode by episode)."""
    options = {k: v for k, v in cfg.backend_options.items() if k != "render"}  # render: informational
    return {"task": cfg.task, "task_options": cfg.task_options, "protocol": cfg.protocol, "policy": cfg.policy,
            "policy_files": _checkpoint_files(cfg.policy),
            "backend": cfg.backend, "backend_options": options, "rotation": rotation,
            "ignore_terminate": cfg.ignore_terminate, "video": cfg.video, "video_fps": cfg.video_fps}


def _checkpoint_files(spec: dict[str, Any]) -> dict[str, list[int]]:
    """{file name: [size, mtime_ns]} of a checkpoint dir, so a checkpoint rewritten in place is not resumed."""
    if spec.get("kind") != "checkpoint" or not Path(spec["path"]).is_dir():
        return {}
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(Path(spec["path"]).iterdir())
            if p.is_file()}


@contextlib.contextmanager
def shared_policy(cfg: EvalConfig):
    """The policy spec workers build from: a checkpoint with several workers (or a "serve" command) becomes one
    server process started here and a client spec for each worker; other specs pass through."""
    spec = dict(cfg.policy)
    if spec.get("kind") == "checkpoint" and cfg.workers > 1:
        spec = shared_server_spec(spec)
    if spec.get("kind") != "serve":
        yield spec
        return
    log = Path(cfg.output_dir) / "policy_server.log"
    with PolicyServerProcess(spec["command"], log_path=log) as server:
        yield server.client_spec(spec.get("client_kwargs"), spec.get("name", "ours"))


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="episodes", unit="ep", disable=not enabled, dynamic_ncols=True)


def evaluate(cfg: EvalConfig, policy=None) -> EvalResult:
    """Run the episodes of `cfg`; write episodes.json/csv (+ summary.json, results.md when all completed).

    `policy`: an already built policy object, used in-process (requires workers == 1). Otherwise the policy
    is built from `cfg.policy` (shared by the workers, see `shared_policy`). Episodes already recorded in
    `cfg.output_dir` by an interrupted run with the same settings are kept and not run again. Raises
    EvaluationFailed (after writing the per-episode files) if any episode failed; a run that did not complete
    its episodes never reports a success rate.
    """
    if cfg.workers < 1:
        raise ValueError(f"workers must be >= 1, got {cfg.workers}")
    if policy is not None and cfg.workers != 1:
        raise ValueError("a policy object runs in-process: use workers=1, or give cfg.policy so each worker "
                         "builds its own")
    if policy is None and not cfg.policy:
        raise ValueError("no policy: give --checkpoint, --policy-server host:port, or a policy object")
    backend = build_backend(cfg)
    if cfg.backend:  # an explicit backend (tests, custom simulators) serves the task name itself
        specs = select_episodes(backend_episodes(backend, cfg.task, cfg.protocol, cfg.task_options), cfg.episodes)
    else:
        specs = resolve_episodes(cfg.task, cfg.protocol, cfg.episodes, cfg.task_options)
    rotation = resolve_rotation(cfg, backend)
    store = EpisodeStore(cfg.output_dir)
    if policy is not None or not cfg.resume:
        store.clear()
    changed = store.claim(run_settings(cfg, rotation))
    if changed:
        warnings.warn(f"{cfg.output_dir} held an evaluation with other settings ({', '.join(changed)}): its "
                      "per-episode records are discarded and every episode runs again", RuntimeWarning, stacklevel=2)
    kept = store.finished(specs)
    todo = [s for s in specs if s.index not in kept]
    if hasattr(backend, "check") and todo:
        backend.check()  # e.g. SimplerEnv importable; fails before any worker starts
    t0 = time.perf_counter()
    startup = 0.0
    new: list[EpisodeRecord] = []
    with _progress(len(specs), cfg.progress) as bar:
        bar.update(len(kept))
        if kept:
            bar.write(f"resuming {cfg.output_dir}: {len(kept)} episode(s) already recorded, {len(todo)} to run")
        if todo and cfg.workers == 1 and policy is not None:
            new = _run_serial(backend, policy, todo, cfg, bar)
        elif todo:
            with shared_policy(cfg) as spec:
                startup = time.perf_counter() - t0  # a shared server's start (import, load, warm-up)
                if cfg.workers == 1:
                    own = build_policy(spec)
                    new = _run_serial(backend, own, todo, cfg, bar)
                    if hasattr(own, "close"):
                        own.close()
                else:
                    new = run_parallel(todo, cfg, spec, bar)
    if hasattr(backend, "close"):
        backend.close()
    wall = time.perf_counter() - t0
    by_index = {**kept, **{r.index: r for r in new}}
    records = [by_index[s.index] for s in specs]
    timing = {**_timing(records, new, wall), "policy_startup_s": startup}
    meta = {"task": cfg.task, "task_options": cfg.task_options, "protocol": cfg.protocol,
            "episodes_requested": cfg.episodes, "workers": cfg.workers, "policy": cfg.policy,
            "backend_options": cfg.backend_options, "rotation": rotation, "ignore_terminate": cfg.ignore_terminate,
            "timing": timing}
    notes = [f"Rotation convention: {rotation} (policies/conventions.py); policy terminate signal "
             f"{'ignored' if cfg.ignore_terminate else 'followed'}."]
    paths = write_results(records, cfg.output_dir, meta, policy_name=cfg.policy.get("name", "ours"), notes=notes)
    failed = [r for r in records if r.success is None]
    if failed:
        raise EvaluationFailed(f"{len(failed)}/{len(records)} episodes failed; first: episode {failed[0].index}: "
                               f"{failed[0].error}\nPer-episode errors are in {paths['episodes_json']}; "
                               "no success rate is reported for an incomplete run.")
    return EvalResult(records, aggregate(records), paths, timing)


def _run_serial(backend, policy, specs: list[EpisodeSpec], cfg: EvalConfig, bar) -> list[EpisodeRecord]:
    records = []
    for s in specs:
        records.append(run_and_save(backend, policy, s, cfg))
        bar.update(1)
        if records[-1].success is None:
            bar.write(f"episode {s.index} failed: {records[-1].error.splitlines()[0]}")
    return records


def _timing(records: list[EpisodeRecord], new: list[EpisodeRecord], wall: float) -> dict[str, float]:
    """Throughput of the episodes run now (wall time, a policy server's start included: see policy_startup_s)
    and the policy / simulator split over all episodes."""
    steps = sum(r.steps for r in records)
    return {
        "wall_s": wall, "episodes": len(records), "episodes_run": len(new), "steps": steps,
        "episodes_per_min": 60 * len(new) / wall if wall > 0 else 0.0,
        "policy_s": sum(r.policy_time_s for r in records), "sim_s": sum(r.sim_time_s for r in records),
        "setup_s": sum(r.setup_time_s for r in records),
        "policy_s_per_step": sum(r.policy_time_s for r in records) / max(steps, 1),
        "sim_s_per_step": sum(r.sim_time_s for r in records) / max(steps, 1),
    }
