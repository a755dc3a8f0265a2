"""Make SAPIEN 3 (ManiSkill3) and SAPIEN 2.2 (SIMPLER) render with or without a GPU, with nothing to patch.

`ensure_cpu_rendering()` decides once per process how to render: a GPU Vulkan driver when the
machine has one (an NVIDIA device node plus its Vulkan ICD json), else Mesa's software driver
(lavapipe) that `make render` (= `python -m envs.cpu_render setup`) unpacked into a cache folder.
The library never installs, downloads or compiles anything by itself: when the software driver is
missing it raises `RenderUnavailable` naming that command. For the CPU path it sets the variables
the cache's env.sh sets (VK_ICD_FILENAMES; VK_LAYER_PATH and
VK_INSTANCE_LAYERS for SAPIEN 2.2; not LD_LIBRARY_PATH) and preloads the driver's private libraries
(libdrm from Debian backports), so it must run before SAPIEN creates its first render device (before `gym.make`).

Rendering starts or fails within seconds: before the first use in a process, a child process does the
same setup and creates a SAPIEN renderer under a timeout (`probe_renderer`), so a Vulkan stack that
hangs inside vkCreateInstance becomes an error with the fix instead of a silent hang.

SAPIEN 2.2 (SIMPLER) additionally needs the Vulkan layer VK_LAYER_fake_semfd
(tools/cpu_render/vk_layer_fake_semfd.c, compiled by the setup): it always enables
VK_KHR_external_semaphore_fd, which lavapipe lacks. `ensure_cpu_rendering(sapien2=True)` enables that
layer whenever the chosen driver is lavapipe; SAPIEN 2 uses the system's Vulkan loader, which reads the
variables at vkCreateInstance.

`maniskill_render_device()` is the render-device workaround: mani-skill 3.0.1 splits the
`render_backend` string on ":", so `render_backend="pci:0"` asks SAPIEN for a device named "pci"
and fails, and its "cpu" device cannot render. `patched_render_backend(device)` swaps in a
`sapien.Device("pci:0")` while an env is being constructed (scoped: the original parser is restored
on exit, in this process only).

Overrides: WORLDMODEL_RENDER=cpu|gpu|auto (default auto); WORLDMODEL_CPU_RENDER_DIR=<cache folder>;
WORLDMODEL_RENDER_PROBE_TIMEOUT=<seconds> (default 60; 0 skips the probe).
A VK_ICD_FILENAMES that the user already set is respected.

Command line: `python -m envs.cpu_render setup [DEST]` (unpack lavapipe, compile the layer),
`python -m envs.cpu_render check [--sapien2]` (start a renderer, print how this machine renders).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import glob
import os
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, replace
from pathlib import Path

LAYER_NAME = "VK_LAYER_fake_semfd"
ICD_DIRS = ("/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d", "/usr/local/share/vulkan/icd.d")
SETUP_HELP = ("run `make render` (or `python -m envs.cpu_render setup`; Debian/Ubuntu: unpacks Mesa's lavapipe "
              "into {dest}, no root)")
# Where a non-editable install puts the setup files (pyproject [tool.setuptools.data-files]).
INSTALLED_TOOLS = Path("share") / "selfflow-worldmodel" / "cpu_render"
PROBE_EXIT_NO_SAPIEN = 3  # the probe child's exit status when SAPIEN is not importable (nothing to check)


class RenderUnavailable(RuntimeError):
    """The simulator cannot render on this machine; the message names the command that fixes it."""


def tools_dir() -> Path:
    """Folder holding setup_cpu_render.sh and vk_layer_fake_semfd.c (source tree, else the installed copy)."""
    candidates = [Path(__file__).resolve().parent.parent / "tools" / "cpu_render",
                  Path(sysconfig.get_path("data")) / INSTALLED_TOOLS, Path(sys.prefix) / INSTALLED_TOOLS]
    for d in candidates:
        if (d / "setup_cpu_render.sh").is_file() and (d / "vk_layer_fake_semfd.c").is_file():
            return d
    raise FileNotFoundError("the CPU-render setup files (setup_cpu_render.sh, vk_layer_fake_semfd.c) are in none of "
                            f"{[str(d) for d in candidates]}; reinstall the package or run from a clone of the repo")


@dataclass(frozen=True)
class RenderSetup:
    """How this process renders: mode "gpu" | "cpu" | "user"; `render_backend` is what to give ManiSkill.

    `layer`: the manifest json of VK_LAYER_fake_semfd once enabled for SAPIEN 2 (else None)."""

    mode: str
    icd: str | None
    render_backend: str  # "gpu" (mani-skill picks the CUDA device) or "pci:0" (the Vulkan device, via the patch)
    layer: str | None = None

    @property
    def software(self) -> bool:
        """True when rendering runs on the CPU (Mesa lavapipe)."""
        return self.mode == "cpu" or (self.mode == "user" and "lvp" in (self.icd or ""))


def cache_dir() -> Path:
    """Folder the setup script unpacks into (WORLDMODEL_CPU_RENDER_DIR or ~/.cache/worldmodel/cpu-render)."""
    env = os.environ.get("WORLDMODEL_CPU_RENDER_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "worldmodel" / "cpu-render"


def gpu_vulkan_icd() -> str | None:
    """Path of an NVIDIA Vulkan ICD json when an NVIDIA device is present, else None."""
    if not glob.glob("/dev/nvidia[0-9]*"):
        return None
    for d in ICD_DIRS:
        for f in sorted(glob.glob(os.path.join(d, "nvidia*.json"))):
            return f
    return None


def _preload_private_libs(libdir: Path) -> None:
    """Load the driver's own dependencies (e.g. backports' libdrm) so the ICD resolves them by soname.

    LD_LIBRARY_PATH is read only when a process starts, so it cannot be set from here; libraries already
    loaded under a soname satisfy later lookups. Vulkan drivers, layers and loaders are skipped."""
    pending = [p for p in sorted(libdir.glob("*.so.*"))
               if not p.name.startswith(("libvulkan", "libVkLayer")) and p.name.count(".") == 2]
    for _ in range(len(pending) + 1):  # retry until no progress (dependencies among the libraries)
        failed = []
        for p in pending:
            try:
                ctypes.CDLL(str(p), mode=ctypes.RTLD_GLOBAL)
            except OSError:
                failed.append(p)
        if not failed or len(failed) == len(pending):
            break
        pending = failed


def run_setup(dest: Path | None = None) -> None:
    """The explicit setup command: run tools/cpu_render/setup_cpu_render.sh into `dest` (apt download, gcc).

    Only `make render` / `python -m envs.cpu_render setup` call this. Raises RuntimeError naming the fix."""
    dest = dest or cache_dir()
    script = tools_dir() / "setup_cpu_render.sh"
    proc = subprocess.run(["bash", str(script), str(dest)])
    if proc.returncode != 0:
        raise RuntimeError(f"{script} failed (exit {proc.returncode}); rendering without a GPU needs Mesa >= 23's "
                           "lavapipe: fix the error above and run it again, or install mesa-vulkan-drivers >= 23 "
                           "and export VK_ICD_FILENAMES=<its lvp_icd json>")


def render_env(dest: Path, layer: bool) -> dict[str, str]:
    """The Vulkan variables DEST/env.sh exports, computed from the current environment (prepended, not replaced).

    env.sh also prepends the driver's folder to LD_LIBRARY_PATH; a running process cannot use that (the
    dynamic linker reads it at start) and SAPIEN 3 would then look for libvulkan.so.1 there and fail, so the
    Python side preloads those libraries instead (`_preload_private_libs`)."""
    env = {"VK_ICD_FILENAMES": str(dest / "lvp_icd.json")}
    if layer:
        env["VK_LAYER_PATH"] = _prepend(str(dest / "layer"), "VK_LAYER_PATH")
        env["VK_INSTANCE_LAYERS"] = _prepend(LAYER_NAME, "VK_INSTANCE_LAYERS")
    return env


def _prepend(value: str, var: str) -> str:
    """`value` followed by the entries of $var that differ from it (os.pathsep-separated)."""
    rest = [v for v in os.environ.get(var, "").split(os.pathsep) if v and v != value]
    return os.pathsep.join([value] + rest)


_SETUP: RenderSetup | None = None
_KEEP: list = []  # handles of preloaded libraries (never unloaded)
_ORIGINAL_ENV: dict[str, str] | None = None  # the environment before the first call (what the probe child gets)
_PROBED: set[bool] = set()  # sapien2 flags already probed in this process


def ensure_cpu_rendering(sapien2: bool = False, probe: bool = True) -> RenderSetup:
    """Choose the renderer for this process (idempotent); for CPU rendering point VK_ICD_FILENAMES at lavapipe.

    Call before the first ManiSkill env is built. Raises RenderUnavailable (naming `make render`) when the
    software driver is missing or a renderer does not start within the probe timeout.
    sapien2: also enable VK_LAYER_fake_semfd when the driver is lavapipe (SIMPLER / SAPIEN 2.2; call
    before its first renderer is created, i.e. before the first SimplerEnv env is built).
    probe: first start a renderer in a child process with a timeout (see `probe_renderer`).
    """
    global _SETUP, _ORIGINAL_ENV
    if _ORIGINAL_ENV is None:
        _ORIGINAL_ENV = dict(os.environ)
    if probe and sapien2 not in _PROBED:
        probe_renderer(sapien2, env=_ORIGINAL_ENV)
        _PROBED.add(sapien2)
    if _SETUP is None:
        _SETUP = _choose()
    if sapien2 and _SETUP.software and _SETUP.layer is None:
        _SETUP = replace(_SETUP, layer=_enable_semfd_layer())
    return _SETUP


def _choose() -> RenderSetup:
    """The renderer decision of `ensure_cpu_rendering` (loads the driver for the CPU path)."""
    want = os.environ.get("WORLDMODEL_RENDER", "auto").lower()
    if want not in ("auto", "cpu", "gpu"):
        raise ValueError(f"WORLDMODEL_RENDER={want!r}; use auto, cpu or gpu")
    user_icd = os.environ.get("VK_ICD_FILENAMES")
    if want != "cpu" and user_icd and all(os.path.isfile(f) for f in user_icd.split(os.pathsep)):
        is_gpu = "lvp" not in user_icd and bool(gpu_vulkan_icd())
        return RenderSetup("user", user_icd, "gpu" if is_gpu else "pci:0")
    gpu_icd = gpu_vulkan_icd()
    if want == "gpu" or (want == "auto" and gpu_icd):
        if not gpu_icd:
            raise RenderUnavailable("WORLDMODEL_RENDER=gpu but no NVIDIA device with a Vulkan ICD json was found in "
                                    f"{ICD_DIRS}; install the NVIDIA driver's Vulkan part or use WORLDMODEL_RENDER=cpu")
        return RenderSetup("gpu", gpu_icd, "gpu")
    dest = cache_dir()
    icd = dest / "lvp_icd.json"
    if not icd.is_file():
        raise RenderUnavailable(f"no GPU Vulkan driver and no software renderer at {icd}; "
                                + SETUP_HELP.format(dest=dest))
    libs = glob.glob(str(dest / "mesa" / "usr" / "lib" / "*" / "libvulkan_lvp.so"))
    if not libs:
        raise RenderUnavailable(f"{icd} exists but the driver library under {dest}/mesa is missing; "
                                + SETUP_HELP.format(dest=dest))
    _preload_private_libs(Path(libs[0]).parent)
    # Load the driver now with RTLD_DEEPBIND: it and its libLLVM then bind to their own symbols. Without it,
    # a process that imported tensorflow before the first render (TF exports LLVM symbols) segfaults in
    # the driver. The Vulkan loader's later dlopen of the same path reuses this handle.
    _KEEP.append(ctypes.CDLL(libs[0], mode=os.RTLD_DEEPBIND | os.RTLD_LOCAL | os.RTLD_NOW))
    os.environ.update(render_env(dest, layer=False))
    return RenderSetup("cpu", str(icd), "pci:0")


def _enable_semfd_layer() -> str:
    """Point the Vulkan loader at VK_LAYER_fake_semfd (built by `make render`); returns its manifest path.

    Respects a layer the user enabled already (e.g. `source DEST/env.sh`). SAPIEN 2 links the system's
    libvulkan.so.1; where the system has none, the copy the setup unpacked is preloaded, privately (its soname then
    satisfies SAPIEN's link without entering the global symbol scope), and only under SAPIEN 2: SAPIEN 3 brings its
    own loader."""
    enabled = os.environ.get("VK_INSTANCE_LAYERS", "").split(os.pathsep)
    for d in os.environ.get("VK_LAYER_PATH", "").split(os.pathsep):
        manifest = Path(d) / "VkLayer_fake_semfd.json" if d else None
        if LAYER_NAME in enabled and manifest is not None and manifest.is_file():
            return str(manifest)
    dest = cache_dir()
    manifest = dest / "layer" / "VkLayer_fake_semfd.json"
    if not manifest.is_file():
        raise RenderUnavailable(f"SAPIEN 2 on lavapipe needs the Vulkan layer {LAYER_NAME} but {manifest} is "
                                "missing; " + SETUP_HELP.format(dest=dest) + " (it compiles the layer: needs gcc "
                                "and libvulkan-dev's headers)")
    os.environ.update({k: v for k, v in render_env(dest, layer=True).items() if k != "VK_ICD_FILENAMES"})
    if ctypes.util.find_library("vulkan") is None and _sapien_major() == 2:  # SAPIEN 3 hangs with this preload
        loaders = glob.glob(str(dest / "mesa" / "usr" / "lib" / "*" / "libvulkan.so.1"))
        if loaders:  # RTLD_LOCAL: a global loader would interpose the layer's own vkGetInstanceProcAddr, and
            # vkCreateInstance would then recurse into the loader and deadlock (tests/test_cpu_render_sapien2.py)
            _KEEP.append(ctypes.CDLL(loaders[0], mode=ctypes.RTLD_LOCAL))
    return str(manifest)


def _sapien_major() -> int | None:
    """Major version of the installed SAPIEN (read without importing it), None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return int(version("sapien").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return None


def probe_timeout() -> float:
    """Seconds the probe child may take (WORLDMODEL_RENDER_PROBE_TIMEOUT, default 60; 0 = no probe)."""
    text = os.environ.get("WORLDMODEL_RENDER_PROBE_TIMEOUT", "60")
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"WORLDMODEL_RENDER_PROBE_TIMEOUT={text!r}; give seconds, e.g. 60 (0 skips the "
                         "probe)") from None


def probe_renderer(sapien2: bool = False, env: dict[str, str] | None = None, timeout: float | None = None) -> None:
    """Start a SAPIEN renderer in a child process that does this module's setup; raise RenderUnavailable on failure.

    The child runs this file (`probe` command) with `env` (default: this process's environment), so it
    reproduces what the caller is about to do; a Vulkan stack that hangs (e.g. inside vkCreateInstance)
    is killed after `timeout` seconds. Nothing is checked when SAPIEN is not importable."""
    timeout = probe_timeout() if timeout is None else timeout
    if timeout <= 0:
        return
    cmd = [sys.executable, str(Path(__file__).resolve()), "probe"] + (["--sapien2"] if sapien2 else [])
    try:
        proc = subprocess.run(cmd, env=dict(os.environ if env is None else env), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RenderUnavailable(
            f"a SAPIEN renderer did not start within {timeout:g} s (it hangs, e.g. inside vkCreateInstance); "
            f"{SETUP_HELP.format(dest=cache_dir())}, then `source {cache_dir()}/env.sh` before starting Python "
            "(WORLDMODEL_RENDER_PROBE_TIMEOUT sets the limit)") from None
    if proc.returncode in (0, PROBE_EXIT_NO_SAPIEN):
        return
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
    raise RenderUnavailable(f"a SAPIEN renderer could not start (exit {proc.returncode}): {tail}\n"
                            f"Fix: {SETUP_HELP.format(dest=cache_dir())}; check with `python -m envs.cpu_render check`")


def _start_renderer(setup: RenderSetup) -> str:
    """Create one SAPIEN renderer (SAPIEN 2.2 or 3) the way the simulators do; returns a description."""
    import sapien

    if sapien.__version__.startswith("2."):
        core = sapien.core
        renderer = getattr(core, "SapienRenderer", None) or core.VulkanRenderer
        renderer(offscreen_only=True)
    else:
        device = maniskill_render_device(setup)
        sapien.render.RenderSystem(device) if device is not None else sapien.render.RenderSystem()
    return f"SAPIEN {sapien.__version__} renders ({setup.mode}: {setup.icd})"


def maniskill_render_device(setup: RenderSetup):
    """The `sapien.Device` to render with, or None to let mani-skill parse `setup.render_backend` itself."""
    if setup.render_backend == "gpu":
        return None
    import sapien

    return sapien.Device(setup.render_backend)


@contextlib.contextmanager
def patched_render_backend(device):
    """While active, ManiSkill envs built in this process render on `device` (a sapien.Device; None = no-op)."""
    if device is None:
        yield
        return
    import mani_skill.envs.sapien_env as sapien_env

    original = sapien_env.parse_sim_and_render_backend

    def parse(sim_backend, render_backend):
        info = original(sim_backend, "none")
        info.render_device, info.render_backend = device, "sapien_pci"
        return info

    sapien_env.parse_sim_and_render_backend = parse
    try:
        yield
    finally:
        sapien_env.parse_sim_and_render_backend = original


def main(argv: list[str] | None = None) -> int:
    """`setup [DEST]`: unpack lavapipe and build the layer; `check`: start a renderer; `probe`: the child's side."""
    p = argparse.ArgumentParser(prog="python -m envs.cpu_render", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("setup", help="unpack Mesa's lavapipe (and compile the SAPIEN 2.2 layer) into DEST")
    s.add_argument("dest", nargs="?", type=Path, help="cache folder (default: WORLDMODEL_CPU_RENDER_DIR or "
                   "~/.cache/worldmodel/cpu-render)")
    for name in ("check", "probe"):
        c = sub.add_parser(name, help="start a SAPIEN renderer and print how this machine renders" if name == "check"
                           else "internal: the probe child (no timeout of its own)")
        c.add_argument("--sapien2", action="store_true", help="also enable the SAPIEN 2.2 layer (SIMPLER)")
    a = p.parse_args(argv)
    if a.command == "setup":
        run_setup(a.dest)
        return 0
    try:
        setup = ensure_cpu_rendering(sapien2=a.sapien2, probe=a.command == "check")
        import sapien  # noqa: F401
    except ImportError:
        print("SAPIEN is not installed: nothing to render with", file=sys.stderr)
        return PROBE_EXIT_NO_SAPIEN
    except RenderUnavailable as e:
        print(e, file=sys.stderr)
        return 1
    print(_start_renderer(setup))
    return 0


if __name__ == "__main__":
    sys.exit(main())
