"""Rollout evaluator for any registered task, faithful to SimplerEnv's own episode loop.

Per episode (SimplerEnv `maniskill2_evaluator.run_maniskill2_eval_single_episode`): build the env
with the official settings, reset with the episode's options, take the instruction from the env,
`policy.reset(instruction)`, then until (policy terminates on the final subtask) or (step limit):
`raw, action = policy.step(image, instruction)`; a terminate before the final subtask advances the
subtask instead; the action is applied either way; success is the env's flag at the LAST step (the
episode is not cut at first success). The instruction passed to the policy follows the env.

Episodes run in worker processes (multiprocessing, spawn), each with its own env and its own policy
(in-process checkpoint, or a client of the policy server). No torch is imported here.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import queue as queue_mod
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from envs.backend import EpisodeSpec, backend_for, resolve_episodes, select_episodes
from envs.results import EpisodeRecord, aggregate, write_results


class EvaluationFailed(RuntimeError):
    """Some episodes failed; per-episode files were written, no success rate is reported."""


@dataclass
class EvalConfig:
    """What to evaluate and how.

    policy: how each worker builds its policy: {"kind": "checkpoint", "path": str, "kwargs": {...}},
        {"kind": "server", "host": str, "port": int}, or {"kind": "factory", "target": "module:callable",
        "kwargs": {...}} (any importable callable returning an object with reset/step).
    backend: None = the task's registered backend; or "module:callable" building a Backend (tests).
    backend_options: passed to `backend.make(spec, **options)` (SIMPLER: cpu_render, reuse_env).
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

        return RemotePolicy(spec["host"], int(spec["port"]))
    if kind == "factory":
        return _import_target(spec["target"])(**spec.get("kwargs", {}))
    raise ValueError(f"policy spec needs kind 'checkpoint', 'server' or 'factory', got {spec!r}")


def build_backend(cfg: EvalConfig):
    return _import_target(cfg.backend)() if cfg.backend else backend_for(cfg.task)


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
            predicted_terminated = bool(action["terminate_episode"][0] > 0)
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


def _worker(wid: int, spec_dicts: list[dict], cfg: EvalConfig, out_q) -> None:
    """Worker process: own backend, own policy; sends ("rec", dict) per episode, then ("done", wid)."""
    try:
        backend = build_backend(cfg)
        policy = build_policy(cfg.policy)
    except Exception as e:  # noqa: BLE001
        out_q.put(("fatal", wid, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"))
        return
    for d in spec_dicts:
        out_q.put(("rec", wid, run_episode(backend, policy, EpisodeSpec.from_dict(d), cfg).to_dict()))
    for obj in (policy, backend):
        if hasattr(obj, "close"):
            obj.close()
    out_q.put(("done", wid, None))


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="episodes", unit="ep", disable=not enabled, dynamic_ncols=True)


def _run_parallel(specs: list[EpisodeSpec], cfg: EvalConfig) -> list[EpisodeRecord]:
    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    shards = [[s.to_dict() for s in specs[i::cfg.workers]] for i in range(cfg.workers)]
    procs = [ctx.Process(target=_worker, args=(i, shards[i], cfg, out_q), daemon=True)
             for i in range(cfg.workers) if shards[i]]
    for p in procs:
        p.start()
    got: dict[int, EpisodeRecord] = {}
    fatal: dict[int, str] = {}
    done: set[int] = set()
    bar = _progress(len(specs), cfg.progress)
    try:
        while len(done) + len(fatal) < len(procs):
            try:
                kind, wid, payload = out_q.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [i for i, p in enumerate(procs) if not p.is_alive() and i not in done and i not in fatal]
                for i in dead:  # died without a message (segfault, OOM kill)
                    try:  # drain what it may have sent just before dying
                        while True:
                            kind, wid, payload = out_q.get(timeout=0.5)
                            _handle(kind, wid, payload, got, fatal, done, bar)
                    except queue_mod.Empty:
                        pass
                    if i not in done and i not in fatal:
                        fatal[i] = f"worker {i} died with exit code {procs[i].exitcode}"
                continue
            _handle(kind, wid, payload, got, fatal, done, bar)
    finally:
        bar.close()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    records = []
    for s in specs:
        if s.index in got:
            records.append(got[s.index])
        else:
            wid = specs.index(s) % cfg.workers
            records.append(EpisodeRecord(s.task, s.protocol, s.variant, s.index, s.seed, None,
                                         error=fatal.get(wid, "episode never reported")))
    return records


def _handle(kind, wid, payload, got, fatal, done, bar) -> None:
    if kind == "rec":
        rec = EpisodeRecord(**payload)
        got[rec.index] = rec
        bar.update(1)
        if rec.success is None:
            bar.write(f"episode {rec.index} failed: {rec.error.splitlines()[0]}")
    elif kind == "fatal":
        fatal[wid] = payload
        bar.write(f"worker {wid} could not start: {payload.splitlines()[0]}")
    else:
        done.add(wid)


def evaluate(cfg: EvalConfig, policy=None) -> EvalResult:
    """Run the episodes of `cfg`; write episodes.json/csv (+ summary.json, results.md when all completed).

    `policy`: an already built policy object, used in-process (requires workers == 1). Otherwise each
    worker builds one from `cfg.policy`. Raises EvaluationFailed (after writing the per-episode files)
    if any episode failed; a run that did not complete its episodes never reports a success rate.
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
        specs = select_episodes(backend.episodes(cfg.task, cfg.protocol), cfg.episodes)
    else:
        specs = resolve_episodes(cfg.task, cfg.protocol, cfg.episodes)
    if hasattr(backend, "check"):
        backend.check()  # e.g. SimplerEnv importable; fails before any worker starts
    t0 = time.perf_counter()
    if cfg.workers == 1:
        own = policy is None
        policy = build_policy(cfg.policy) if own else policy
        records = []
        with _progress(len(specs), cfg.progress) as bar:
            for s in specs:
                records.append(run_episode(backend, policy, s, cfg))
                bar.update(1)
                if records[-1].success is None:
                    bar.write(f"episode {s.index} failed: {records[-1].error.splitlines()[0]}")
        if own and hasattr(policy, "close"):
            policy.close()
        if hasattr(backend, "close"):
            backend.close()
    else:
        records = _run_parallel(specs, cfg)
    wall = time.perf_counter() - t0
    steps = sum(r.steps for r in records)
    timing = {
        "wall_s": wall, "episodes": len(records), "steps": steps,
        "episodes_per_min": 60 * len(records) / wall if wall > 0 else 0.0,
        "policy_s": sum(r.policy_time_s for r in records), "sim_s": sum(r.sim_time_s for r in records),
        "setup_s": sum(r.setup_time_s for r in records),
        "policy_s_per_step": sum(r.policy_time_s for r in records) / max(steps, 1),
        "sim_s_per_step": sum(r.sim_time_s for r in records) / max(steps, 1),
    }
    meta = {"task": cfg.task, "protocol": cfg.protocol, "episodes_requested": cfg.episodes,
            "workers": cfg.workers, "policy": cfg.policy, "backend_options": cfg.backend_options, "timing": timing}
    paths = write_results(records, cfg.output_dir, meta, policy_name=cfg.policy.get("name", "ours"))
    failed = [r for r in records if r.success is None]
    if failed:
        raise EvaluationFailed(f"{len(failed)}/{len(records)} episodes failed; first: episode {failed[0].index}: "
                               f"{failed[0].error}\nPer-episode errors are in {paths['episodes_json']}; "
                               "no success rate is reported for an incomplete run.")
    return EvalResult(records, aggregate(records), paths, timing)

