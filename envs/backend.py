"""Backend protocol shared by every simulator (SIMPLER, ManiSkill3) and the evaluator.

A *backend* turns a task name and a protocol into a list of `EpisodeSpec`s, and one spec into a
live `EnvSession`. The evaluator only talks to these types, so a new simulator is one module that
implements `Backend` and registers its tasks with `register_task`. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class EpisodeSpec:
    """Everything needed to build and reset one evaluation episode (JSON-serialisable fields only).

    task: registry name, e.g. "move_near" or "maniskill/PickCube-v1".
    protocol: "visual_matching" | "variant_aggregation" | any backend-specific protocol name.
    variant: the aggregation group this episode belongs to (urdf version, scene variant...);
        results are averaged per variant first (SimplerEnv's way), then across variants.
    index: episode index inside the task/protocol (0..N-1), unique per run.
    seed: seed passed to reset (or None).
    max_steps: the task's step limit.
    env_id: the simulator environment id (gym id) to build.
    make_kwargs: keyword arguments for the env constructor (scene, robot, overlay...).
    reset_options: options passed to `env.reset(options=...)` (robot init pose, obj_init_options...).
    task_options: the user's task settings beside the registry's (ManiSkill3: env_id, instruction, max_steps,
        solver), carried so that worker processes build the same task.
    """

    task: str
    protocol: str
    variant: str
    index: int
    seed: int | None
    max_steps: int
    env_id: str
    make_kwargs: dict[str, Any] = field(default_factory=dict)
    reset_options: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (for result records and for sending specs to worker processes)."""
        return {
            "task": self.task, "protocol": self.protocol, "variant": self.variant, "index": self.index,
            "seed": self.seed, "max_steps": self.max_steps, "env_id": self.env_id,
            "make_kwargs": dict(self.make_kwargs), "reset_options": dict(self.reset_options),
            "task_options": dict(self.task_options),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpisodeSpec:
        return cls(**d)


@dataclass
class Observation:
    """What the policy sees: image (H, W, 3) uint8 and the language instruction."""

    image: np.ndarray  # (H, W, 3) uint8
    instruction: str
    state: np.ndarray | None = None  # (8,) proprioception in RT-1's layout (tool pose 7 + gripper closed 1), if known


def jsonable_info(info: dict) -> dict:
    """The JSON-serialisable part of a simulator's step info (what `StepResult.info` holds).

    Nested dicts (SimplerEnv's episode_stats) recurse; tensors (ManiSkill3) and size-1 arrays become Python
    scalars; bool / int / float / str entries are kept; anything else is dropped."""
    out: dict = {}
    for k, v in info.items():
        if isinstance(v, dict):
            out[k] = jsonable_info(v)
            continue
        if hasattr(v, "cpu"):
            v = v.cpu().numpy()
        if isinstance(v, np.ndarray) and v.size == 1:
            v = v.reshape(()).item()
        if isinstance(v, (bool, int, float, str, np.bool_, np.integer, np.floating)):
            out[k] = v.item() if isinstance(v, np.generic) else v
    return out


@dataclass
class StepResult:
    """Outcome of one control step.

    done: the environment says the episode ended (terminated) - the evaluator still follows the
        official loop (SIMPLER never cuts at first success; it ends on the policy's terminate on
        the last subtask or at the step limit).
    truncated: the simulator's own time limit fired.
    success: the task's success flag *at this step*; the evaluator keeps the value of the last step.
    """

    image: np.ndarray  # (H, W, 3) uint8
    done: bool
    truncated: bool
    success: bool
    info: dict[str, Any] = field(default_factory=dict)
    instruction: str | None = None  # set when the instruction changed (e.g. after a subtask advance)
    state: np.ndarray | None = None  # (8,) proprioception after the step, as in Observation


@runtime_checkable
class EnvSession(Protocol):
    """One live environment for one episode spec (built by `Backend.make`)."""

    def reset(self) -> Observation:
        """Reset with the spec's seed and reset options; returns the first observation."""
        ...

    def step(self, action: dict[str, np.ndarray]) -> StepResult:
        """Apply one SIMPLER-convention action dict (world_vector, rot_axangle, gripper, terminate_episode)."""
        ...

    def advance_subtask(self) -> str:
        """Move to the next subtask of a multi-step task; returns the new instruction."""
        ...

    @property
    def is_final_subtask(self) -> bool:
        """True for single-step tasks and for the last subtask of a multi-step task."""
        ...

    def close(self) -> None:
        ...


@runtime_checkable
class Backend(Protocol):
    """A simulator backend: enumerates episodes of a task and builds sessions for them."""

    name: str

    def episodes(self, task: str, protocol: str) -> list[EpisodeSpec]:
        """All episodes of the official protocol for this task, in a fixed order."""
        ...

    def make(self, spec: EpisodeSpec, **options: Any) -> EnvSession:
        """Build (or reuse) an environment for `spec`. `options` are backend settings (e.g. render_config)."""
        ...


@dataclass(frozen=True)
class TaskInfo:
    """A registry entry: which backend serves the task and which protocols it has."""

    name: str
    backend: str  # importable "module:attribute" returning a Backend instance, or a registered backend name
    protocols: tuple[str, ...]
    description: str = ""


_TASKS: dict[str, TaskInfo] = {}
_PREFIXES: dict[str, TaskInfo] = {}  # name prefix -> the backend serving any task named with it
_BACKENDS: dict[str, Any] = {}  # name -> Backend instance or zero-arg factory


def register_backend(name: str, factory: Any) -> None:
    """Register a backend under `name`: a Backend instance or a zero-arg callable building one (built lazily)."""
    _BACKENDS[name] = factory


def register_task(name: str, backend: str, protocols: tuple[str, ...] | list[str], description: str = "") -> None:
    """Register a task name served by `backend` (a name given to `register_backend`)."""
    if not protocols:
        raise ValueError(f"task {name!r}: give at least one protocol")
    _TASKS[name] = TaskInfo(name, backend, tuple(protocols), description)


def register_task_prefix(prefix: str, backend: str, protocols: tuple[str, ...] | list[str],
                         description: str = "") -> None:
    """Let `backend` serve any task named `prefix...` that is not registered by name (e.g. "maniskill/<env id>",
    defined by task options such as env_id, instruction and max_steps)."""
    _PREFIXES[prefix] = TaskInfo(prefix, backend, tuple(protocols), description)


def task_names() -> list[str]:
    """All registered task names (SIMPLER ones and any others registered so far)."""
    _load_builtin()
    return sorted(_TASKS)


def get_task(name: str) -> TaskInfo:
    """Look up a task; unknown names raise ValueError listing the valid names."""
    _load_builtin()
    if name in _TASKS:
        return _TASKS[name]
    for prefix, info in _PREFIXES.items():
        if name.startswith(prefix) and len(name) > len(prefix):
            return TaskInfo(name, info.backend, info.protocols, info.description)
    prefixes = "".join(f"; or any {p}<name> with task options" for p in sorted(_PREFIXES))
    raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(_TASKS))}{prefixes}")


def get_backend(name: str) -> Backend:
    """The backend instance registered under `name` (factories are built once, on first use)."""
    _load_builtin()
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; registered backends: {', '.join(sorted(_BACKENDS))}")
    b = _BACKENDS[name]
    if not hasattr(b, "episodes"):  # a factory
        b = b()
        _BACKENDS[name] = b
    return b


def backend_for(task: str) -> Backend:
    return get_backend(get_task(task).backend)


def resolve_episodes(task: str, protocol: str, episodes: int | None = None,
                     task_options: dict[str, Any] | None = None) -> list[EpisodeSpec]:
    """Episode specs of `task` under `protocol`, optionally only the first `episodes` of them
    (taken round-robin over variants so a short run still covers every variant). `task_options` (e.g. a
    ManiSkill3 env_id, instruction, max_steps) go to backends that take them."""
    info = get_task(task)
    if protocol not in info.protocols:
        raise ValueError(f"task {task!r} has no protocol {protocol!r}; choose one of {list(info.protocols)}")
    return select_episodes(backend_episodes(backend_for(task), task, protocol, task_options), episodes)


def backend_episodes(backend: Backend, task: str, protocol: str,
                     task_options: dict[str, Any] | None = None) -> list[EpisodeSpec]:
    """`backend.episodes(task, protocol[, **task_options])`; options given to a backend without them: ValueError."""
    options = {k: v for k, v in (task_options or {}).items() if v is not None}
    if not options:
        return backend.episodes(task, protocol)
    if not getattr(backend, "takes_task_options", False):
        raise ValueError(f"task {task!r} ({getattr(backend, 'name', backend)}) takes no task options "
                         f"{sorted(options)}; env_id / instruction / max_steps / solver are for maniskill/* tasks")
    return backend.episodes(task, protocol, **options)


def select_episodes(specs: list[EpisodeSpec], episodes: int | None) -> list[EpisodeSpec]:
    """The first `episodes` specs taken round-robin over variants (all when None), in index order."""
    if episodes is None or episodes >= len(specs):
        return specs
    if episodes <= 0:
        raise ValueError(f"--episodes must be positive, got {episodes}")
    by_variant: dict[str, list[EpisodeSpec]] = {}
    for s in specs:
        by_variant.setdefault(s.variant, []).append(s)
    picked: list[EpisodeSpec] = []
    queues = list(by_variant.values())
    i = 0
    while len(picked) < episodes:
        for q in queues:
            if i < len(q) and len(picked) < episodes:
                picked.append(q[i])
        i += 1
    return sorted(picked, key=lambda s: s.index)


_BUILTIN_MODULES = ("envs.tasks", "envs.maniskill_backend")
_loaded = False


def _load_builtin() -> None:
    """Import the modules that register tasks (SIMPLER always; ManiSkill3 when its module exists)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib

    for mod in _BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod or mod == "envs.tasks":  # only an absent optional module is skipped
                raise
