"""Simulators behind one task registry, and the rollout evaluator (no torch on this side).

Backends register tasks with `envs.backend.register_task`; `envs.evaluator.evaluate` runs any of
them against a policy with `reset(instruction)` and `step(image, instruction) -> (raw, action)`.
"""

from envs.backend import (
    Backend,
    EnvSession,
    EpisodeSpec,
    Observation,
    StepResult,
    get_task,
    register_backend,
    register_task,
    resolve_episodes,
    task_names,
)

__all__ = [
    "Backend", "EnvSession", "EpisodeSpec", "Observation", "StepResult", "get_task", "register_backend",
    "register_task", "resolve_episodes", "task_names",
]
