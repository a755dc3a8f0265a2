"""SIMPLER (SimplerEnv + ManiSkill2_real2sim, SAPIEN 2.2.2) behind the `Backend` protocol.

Builds each episode's environment as SimplerEnv's `main_inference.py` does for the rt1_*.sh
scripts: `build_maniskill2_env(env_id, obs_mode="rgbd", robot="google_robot_static", control_mode=...,
scene_name=..., rgb_overlay_path=..., urdf_version=..., ...)`, resets with the spec's
`robot_init_options` / `obj_init_options`, reads the policy image with SimplerEnv's
`get_image_from_maniskill2_obs_dict` and the instruction with `get_language_instruction()`.
`simpler_env` is imported only when an environment is built, so this module imports without it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from envs.backend import EpisodeSpec, Observation, StepResult, jsonable_info

INSTALL_DIR = Path(__file__).resolve().parents[1] / "install"
CONSTRAINTS = INSTALL_DIR / "simplerenv-constraints.txt"  # numpy==1.26.4, opencv-python<4.12, sapien==2.2.2, ...
EVAL_REQUIREMENTS = INSTALL_DIR / "simplerenv-requirements.txt"  # the evaluator's and the client's own needs
INSTALL_HELP = """SimplerEnv is not importable in this Python ({err}).
It is not on the package index; install it in its OWN environment (Python 3.10 or 3.11), with every pip
command constrained by the toolkit's pins (without them pip ends at numpy 2 and SAPIEN 2.2.2 segfaults):
    git clone https://github.com/simpler-env/SimplerEnv --recurse-submodules
    export PIP_CONSTRAINT={constraints}
    pip install -e SimplerEnv/ManiSkill2_real2sim && pip install -e SimplerEnv
    pip install -r {requirements}   # evaluator + client deps
then start this toolkit's policy server with your checkpoint from the toolkit's own environment:
    python -m policies.serve --checkpoint DIR --port 8000
and run the evaluator from SimplerEnv's environment against it:
    python scripts/eval_simpler.py --task move_near --policy-server localhost:8000
No GPU? SAPIEN 2.2.2 renders on the CPU with Mesa >= 23's software Vulkan driver (lavapipe) plus a small
Vulkan layer (tools/cpu_render/vk_layer_fake_semfd.c) that hides lavapipe's missing VK_KHR_external_semaphore_fd:
    make render        # once (= python -m envs.cpu_render setup): unpacks lavapipe, compiles the layer (no root)
The backend then enables both by itself when the machine has no GPU Vulkan driver (or `source <cache>/env.sh`),
and with cpu_render=auto (the default) the drawer tasks use the raster "ibl" shader instead of ray tracing
(minutes per step on a CPU); the results' meta records that those images are not the official ray-traced ones."""

RENDER_HELP = ("SAPIEN could not render ({err}). Check the Vulkan setup: VK_ICD_FILENAMES must point at a working "
               "ICD json (an NVIDIA driver's nvidia_icd.json on a GPU machine, or Mesa lavapipe's lvp_icd.*.json "
               "for CPU rendering, see `make render`), the ICD's library must load (`vulkaninfo "
               "--summary`), and on CPU the drawer tasks need cpu_render=auto|true (raster 'ibl', not ray tracing).")
SEMFD_HELP = (" 'ErrorExtensionNotPresent' on Mesa lavapipe means SAPIEN 2.2.2 asked for VK_KHR_external_semaphore_fd, "
              "which lavapipe lacks: the layer VK_LAYER_fake_semfd must be active (run `make "
              "render`, then `source <its folder>/env.sh`, or let the backend enable it: it must "
              "happen before the first SAPIEN renderer of the process).")
RT_NOTE = ("raster 'ibl' shader for the ray-traced (drawer) tasks: their images are not the official ray-traced ones, "
           "so drawer success rates are not comparable to published numbers")


def import_simpler():
    """Import SimplerEnv's env builder and observation helper, or exit with install instructions."""
    try:
        import simpler_env  # noqa: F401
        from simpler_env.utils.env.env_builder import build_maniskill2_env
        from simpler_env.utils.env.observation_utils import get_image_from_maniskill2_obs_dict
    except ImportError as e:
        raise SimplerUnavailable(INSTALL_HELP.format(err=e, constraints=CONSTRAINTS, requirements=EVAL_REQUIREMENTS)) \
            from e
    return build_maniskill2_env, get_image_from_maniskill2_obs_dict


class SimplerUnavailable(RuntimeError):
    """SimplerEnv is not installed in this interpreter (message says how to install it)."""


def simpler_root() -> Path:
    """The SimplerEnv repository root (the parent of the `simpler_env` package), where overlays live."""
    import simpler_env

    env_root = os.environ.get("SIMPLER_ENV_ROOT")
    return Path(env_root) if env_root else Path(simpler_env.__file__).resolve().parent.parent


def overlay_candidates(rel: str) -> list[Path]:
    """Where a relative overlay path ("ManiSkill2_real2sim/data/real_inpainting/x.png") may live, in order:
    under SIMPLER_ENV_ROOT / the SimplerEnv checkout (submodule layout), then under the data folder that the
    installed `mani_skill2_real2sim` itself reads its assets from (also right when the submodule was cloned
    and `pip install -e`'d somewhere else)."""
    path = Path(rel)
    cands = [simpler_root() / path]
    parts = path.parts
    if "data" in parts:
        try:
            from mani_skill2_real2sim import ASSET_DIR
        except ImportError:
            ASSET_DIR = None
        if ASSET_DIR is not None:
            cands.append(Path(ASSET_DIR).resolve() / Path(*parts[parts.index("data") + 1:]))
    return cands


def software_vulkan() -> bool:
    """True when VK_ICD_FILENAMES selects Mesa's software driver (lavapipe), i.e. SAPIEN renders on the CPU."""
    return any("lvp" in Path(f).name for f in os.environ.get("VK_ICD_FILENAMES", "").split(os.pathsep) if f)


def parse_cpu_render(value: Any) -> bool | str:
    """cpu_render setting -> True | False | "auto" (auto = raster shader exactly when rendering is software)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("auto", "true", "false"):
        return {"auto": "auto", "true": True, "false": False}[text]
    raise ValueError(f"cpu_render={value!r}; use auto (raster shader when rendering on the CPU), true or false")


def prepare_rendering():
    """Pick SAPIEN 2's Vulkan driver for this process before its first renderer (see envs/cpu_render.py).

    No GPU Vulkan driver: Mesa lavapipe from `make render` (RenderUnavailable naming it when missing)
    plus the VK_LAYER_fake_semfd layer SAPIEN 2.2 needs there. Returns the `RenderSetup`. Call it before
    `import sapien`: SAPIEN 2's import sets VK_ICD_FILENAMES to every json in /usr/share/vulkan/icd.d when
    unset; that value (recognised exactly) is dropped here so it does not pass for the user's choice."""
    from envs.cpu_render import ensure_cpu_rendering

    icd_dir = "/usr/share/vulkan/icd.d"
    if os.path.isdir(icd_dir) and os.environ.get("VK_ICD_FILENAMES") == ":".join(
            os.path.join(icd_dir, f) for f in os.listdir(icd_dir)):
        del os.environ["VK_ICD_FILENAMES"]
    return ensure_cpu_rendering(sapien2=True)


def describe_render(cpu_render: bool | str) -> dict[str, Any]:
    """What rendering an evaluation uses (for the results meta); resolves cpu_render="auto" on this machine."""
    import importlib.util

    if importlib.util.find_spec("simpler_env") is None:  # fail with install help before any driver setup
        import_simpler()
    setup = prepare_rendering()
    software = setup.software or software_vulkan()
    raster = software if cpu_render == "auto" else bool(cpu_render)
    return {"cpu_render": raster, "software_vulkan": software, "vulkan_icd": setup.icd,
            "official_images": not raster,
            "note": (("software Vulkan (Mesa lavapipe); " if software else "") + RT_NOTE) if raster
            else "official shaders (ray tracing for the drawer tasks)"}


def _as_arrays(opts: Any) -> Any:
    """JSON-friendly reset options -> the numpy arrays SimplerEnv passes (init_xy, init_rot_quat)."""
    if isinstance(opts, dict):
        return {k: _as_arrays(v) for k, v in opts.items()}
    if isinstance(opts, list) and all(isinstance(v, (int, float)) for v in opts):
        return np.asarray(opts, dtype=np.float64)
    return opts


def _quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of wxyz quaternions."""
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b
    return np.array([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                     w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2])


def simpler_state(raw_env, obs) -> np.ndarray | None:
    """(8,) proprioception in RT-1's layout from a SimplerEnv observation: the TCP pose in the robot base frame
    (``extra/tcp_pose`` relative to ``agent/base_pose``, xyz + wxyz, qx >= 0) and the gripper closedness from the
    finger joints over their limits (0 open .. 1 closed; the Google robot's finger joints grow as they close);
    None when the observation lacks them."""
    try:
        base = np.asarray(obs["agent"]["base_pose"], np.float64).reshape(7)
        tcp = np.asarray(obs["extra"]["tcp_pose"], np.float64).reshape(7)
        qpos = np.asarray(obs["agent"]["qpos"], np.float64).reshape(-1)
    except (KeyError, TypeError, ValueError):
        return None
    inv = base[3:] * np.array([1.0, -1.0, -1.0, -1.0])  # conjugate = inverse of a unit quaternion
    rel_p = _quat_mul(_quat_mul(inv, np.concatenate([[0.0], tcp[:3] - base[:3]])), base[3:])[1:]
    rel_q = _quat_mul(inv, tcp[3:])
    if rel_q[1] < 0:
        rel_q = -rel_q
    closed = 0.0
    try:
        limits = np.asarray(raw_env.agent.robot.get_qlimits(), np.float64).reshape(-1, 2)[-2:]
        closed = float(np.clip(np.mean((qpos[-2:] - limits[:, 0]) / np.maximum(limits[:, 1] - limits[:, 0], 1e-6)),
                               0.0, 1.0))
    except (AttributeError, TypeError, ValueError):
        pass  # a test double without a robot: open
    return np.concatenate([rel_p, rel_q, [closed]]).astype(np.float32)


class SimplerSession:
    """One SimplerEnv environment serving episodes of one spec (see `EnvSession`)."""

    def __init__(self, env, spec: EpisodeSpec, get_image):
        self.env, self.spec, self._get_image = env, spec, get_image

    @property
    def _raw(self):
        return self.env.unwrapped

    def reset(self) -> Observation:
        opts = _as_arrays(self.spec.reset_options)
        obs, _ = self.env.reset(seed=self.spec.seed, options=opts) if self.spec.seed is not None \
            else self.env.reset(options=opts)
        return Observation(self._image(obs), self._raw.get_language_instruction(), simpler_state(self._raw, obs))

    def _image(self, obs) -> np.ndarray:
        img = np.asarray(self._get_image(self._raw, obs))  # (512, 640, 3) uint8 overhead camera
        return img[..., :3].astype(np.uint8, copy=False)

    def step(self, action: dict[str, np.ndarray]) -> StepResult:
        vec = np.concatenate([np.asarray(action[k], dtype=np.float64).reshape(-1)
                              for k in ("world_vector", "rot_axangle", "gripper")])  # (7,)
        obs, _reward, done, truncated, info = self.env.step(vec)
        # SimplerEnv's evaluator reads success as the env's `done` (= info["success"]) at the last step.
        success = bool(done) or bool(info.get("success", False))
        return StepResult(self._image(obs), bool(done), bool(truncated), success, jsonable_info(info),
                          instruction=self._raw.get_language_instruction(), state=simpler_state(self._raw, obs))

    def advance_subtask(self) -> str:
        self._raw.advance_to_next_subtask()
        return self._raw.get_language_instruction()

    @property
    def is_final_subtask(self) -> bool:
        return bool(self._raw.is_final_subtask())

    def close(self) -> None:
        self.env.close()


class SimplerBackend:
    """Builds SimplerEnv environments for SIMPLER episode specs.

    reuse_env: keep one env per (env_id, make kwargs) and reset it per episode (SimplerEnv builds a new
        one per episode; reset with the episode's options re-places robot and objects, and saves the
        7-9 s build on CPU). False builds a fresh env for every episode, exactly as the scripts do.
    cpu_render: raster "ibl" shader instead of ray tracing for the ray-traced (drawer) tasks; "auto" (default)
        = exactly when rendering is software (Mesa lavapipe). Images then differ from the official ones.
    Before the first env is built, `prepare_rendering()` selects the Vulkan driver (lavapipe + layer without a GPU).
    """

    name = "simpler"
    default_rotation = "axis_angle"  # SimplerEnv's RT-1 wrapper for the Google robot passes rotation_delta through

    def __init__(self, reuse_env: bool = True, cpu_render: bool | str = "auto"):
        self.reuse_env, self.cpu_render = reuse_env, parse_cpu_render(cpu_render)
        self._cache: dict[str, Any] = {}

    @property
    def raster(self) -> bool:
        """Whether ray-traced tasks are switched to the raster 'ibl' shader (cpu_render resolved)."""
        return software_vulkan() if self.cpu_render == "auto" else bool(self.cpu_render)

    def check(self) -> None:
        """Fail early (before workers start) when SimplerEnv is not importable."""
        import_simpler()

    def episodes(self, task: str, protocol: str) -> list[EpisodeSpec]:
        from envs.tasks import simpler_episodes

        return simpler_episodes(task, protocol)

    def make_kwargs(self, spec: EpisodeSpec) -> dict[str, Any]:
        """The env build kwargs of `spec` with the overlay path resolved and render settings applied."""
        kw = dict(spec.make_kwargs)
        if kw.get("rgb_overlay_path"):
            path = Path(kw["rgb_overlay_path"])
            cands = [path] if path.is_absolute() else overlay_candidates(str(path))
            found = [c for c in cands if c.is_file()]
            if not found:
                raise FileNotFoundError(f"overlay image not found at {', '.join(map(str, cands))}; install SimplerEnv "
                                        "from its repository with the ManiSkill2_real2sim submodule (or set "
                                        "SIMPLER_ENV_ROOT to that repository, or MS2_REAL2SIM_ASSET_DIR to "
                                        "ManiSkill2_real2sim/data)")
            kw["rgb_overlay_path"] = str(found[0])
        if kw.get("shader_dir") == "rt" and self.raster:
            kw["render_config"] = dict(camera_shader_dir="ibl", viewer_shader_dir="ibl")
        elif kw.get("shader_dir") == "rt" and software_vulkan():
            warnings.warn(f"{spec.env_id} ray-traces (shader_dir='rt') on a software Vulkan driver "
                          f"({os.environ.get('VK_ICD_FILENAMES')}): minutes per step on a CPU; pass cpu_render=auto "
                          "to use the raster 'ibl' shader (images then differ from the official protocol's)",
                          RuntimeWarning, stacklevel=2)
        return kw

    def make(self, spec: EpisodeSpec, **options: Any) -> SimplerSession:
        """Build (or reuse) the env of `spec`; options `cpu_render` / `reuse_env` override the constructor's
        (`render`, the `describe_render` record that goes into the results meta, is informational only)."""
        unknown = set(options) - {"cpu_render", "reuse_env", "render"}
        if unknown:
            raise ValueError(f"unknown SIMPLER backend options {sorted(unknown)}; known: cpu_render, reuse_env, render")
        self.cpu_render = parse_cpu_render(options.get("cpu_render", self.cpu_render))
        self.reuse_env = bool(options.get("reuse_env", self.reuse_env))
        prepare_rendering()  # before importing SAPIEN: lavapipe + layer when there is no GPU
        build_env, get_image = import_simpler()
        kw = self.make_kwargs(spec)
        key = repr((spec.env_id, sorted(kw.items(), key=lambda kv: kv[0])))
        env = self._cache.get(key) if self.reuse_env else None
        if env is None:
            for k in list(self._cache):  # one live env per process: SAPIEN 2 holds one renderer
                self._cache.pop(k).close()
            try:
                env = build_env(spec.env_id, **kw)
            except RuntimeError as e:
                if "vulkan" in str(e).lower() or "render" in str(e).lower() or "device" in str(e).lower():
                    hint = SEMFD_HELP if "ExtensionNotPresent" in str(e) else ""
                    raise RuntimeError(RENDER_HELP.format(err=e) + hint) from e
                raise
            if self.reuse_env:
                self._cache[key] = env
        session = SimplerSession(env, spec, get_image)
        if self.reuse_env:  # the evaluator's close() must not destroy the cached env
            session.close = lambda: None  # type: ignore[method-assign]
        return session

    def close(self) -> None:
        for k in list(self._cache):
            self._cache.pop(k).close()
