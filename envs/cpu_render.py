"""Make SAPIEN 3 (ManiSkill3) and SAPIEN 2.2 (SIMPLER) render with or without a GPU, with nothing to patch.

`ensure_cpu_rendering()` decides once per process how to render: a GPU Vulkan driver when the
machine has one (an NVIDIA device node plus its Vulkan ICD json), else Mesa's software driver
(lavapipe) unpacked by `bash envs/setup_cpu_render.sh` into a cache folder. For the CPU path it points
`VK_ICD_FILENAMES` at that ICD and preloads the driver's private libraries (libdrm from Debian
backports), so it must run before SAPIEN creates its first render device (before `gym.make`).

SAPIEN 2.2 (SIMPLER) additionally needs the Vulkan layer VK_LAYER_fake_semfd (envs/vk_layer_fake_semfd.c,
compiled by the setup script): it always enables VK_KHR_external_semaphore_fd, which lavapipe lacks.
`ensure_cpu_rendering(sapien2=True)` enables that layer (VK_LAYER_PATH, VK_INSTANCE_LAYERS) whenever the
chosen driver is lavapipe; SAPIEN 2 uses the system's Vulkan loader, which reads them at vkCreateInstance.

`maniskill_render_device()` is the render-device workaround: mani-skill 3.0.1 splits the
`render_backend` string on ":", so `render_backend="pci:0"` asks SAPIEN for a device named "pci"
and fails, and its "cpu" device cannot render. `patched_render_backend(device)` swaps in a
`sapien.Device("pci:0")` while an env is being constructed (scoped: the original parser is restored
on exit, in this process only).

Overrides: WORLDMODEL_RENDER=cpu|gpu|auto (default auto); WORLDMODEL_CPU_RENDER_DIR=<cache folder>.
A VK_ICD_FILENAMES that the user already set is respected.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

SETUP_SCRIPT = Path(__file__).resolve().parent / "setup_cpu_render.sh"
LAYER_NAME = "VK_LAYER_fake_semfd"
ICD_DIRS = ("/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d", "/usr/local/share/vulkan/icd.d")
SETUP_HELP = "run `bash envs/setup_cpu_render.sh` (Debian/Ubuntu; unpacks Mesa's lavapipe into {dest}, no root)"


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
    """Run envs/setup_cpu_render.sh (output goes to stderr); raise RuntimeError naming the fix when it fails."""
    dest = dest or cache_dir()
    print(f"[cpu_render] no GPU Vulkan driver and no software driver in {dest}; running {SETUP_SCRIPT}",
          file=sys.stderr)
    proc = subprocess.run(["bash", str(SETUP_SCRIPT), str(dest)], stdout=sys.stderr, stderr=sys.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"envs/setup_cpu_render.sh failed (exit {proc.returncode}); rendering without a GPU "
                           f"needs Mesa >= 23's lavapipe: {SETUP_HELP.format(dest=dest)}, or install "
                           "mesa-vulkan-drivers >= 23 and export VK_ICD_FILENAMES=<its lvp_icd json>")


_SETUP: RenderSetup | None = None
_KEEP: list = []  # handles of preloaded libraries (never unloaded)


def ensure_cpu_rendering(auto_setup: bool = True, sapien2: bool = False) -> RenderSetup:
    """Choose the renderer for this process (idempotent); for CPU rendering point VK_ICD_FILENAMES at lavapipe.

    auto_setup: run envs/setup_cpu_render.sh when the software driver is missing (else raise
    FileNotFoundError telling the user to run it). Call before the first ManiSkill env is built.
    sapien2: also enable VK_LAYER_fake_semfd when the driver is lavapipe (SIMPLER / SAPIEN 2.2; call
    before its first renderer is created, i.e. before the first SimplerEnv env is built).
    """
    global _SETUP
    if _SETUP is None:
        _SETUP = _choose(auto_setup)
    if sapien2 and _SETUP.software and _SETUP.layer is None:
        _SETUP = replace(_SETUP, layer=_enable_semfd_layer(auto_setup))
    return _SETUP


def _choose(auto_setup: bool) -> RenderSetup:
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
            raise FileNotFoundError("WORLDMODEL_RENDER=gpu but no NVIDIA device with a Vulkan ICD json was found in "
                                    f"{ICD_DIRS}; install the NVIDIA driver's Vulkan part or use WORLDMODEL_RENDER=cpu")
        return RenderSetup("gpu", gpu_icd, "gpu")
    dest = cache_dir()
    icd = dest / "lvp_icd.json"
    if not icd.is_file():
        if not auto_setup:
            raise FileNotFoundError(f"no GPU Vulkan driver and no software renderer at {icd}; "
                                    + SETUP_HELP.format(dest=dest))
        run_setup(dest)
    libs = glob.glob(str(dest / "mesa" / "usr" / "lib" / "*" / "libvulkan_lvp.so"))
    if not libs:
        raise FileNotFoundError(f"{icd} exists but the driver library under {dest}/mesa is missing; "
                                + SETUP_HELP.format(dest=dest))
    _preload_private_libs(Path(libs[0]).parent)
    # Load the driver now with RTLD_DEEPBIND: it and its libLLVM then bind to their own symbols. Without it,
    # a process that imported tensorflow before the first render (TF exports LLVM symbols) segfaults in
    # the driver. The Vulkan loader's later dlopen of the same path reuses this handle.
    _KEEP.append(ctypes.CDLL(libs[0], mode=os.RTLD_DEEPBIND | os.RTLD_LOCAL | os.RTLD_NOW))
    os.environ["VK_ICD_FILENAMES"] = str(icd)
    return RenderSetup("cpu", str(icd), "pci:0")


def _enable_semfd_layer(auto_setup: bool) -> str:
    """Point the Vulkan loader at VK_LAYER_fake_semfd (built by the setup script); returns its manifest path.

    Respects a layer the user enabled already (e.g. `source DEST/env.sh`). SAPIEN 2 links the system's
    libvulkan.so.1; where the system has none, the copy the setup script unpacked is preloaded (privately: its
    soname then satisfies SAPIEN's link without entering the global symbol scope)."""
    enabled = os.environ.get("VK_INSTANCE_LAYERS", "").split(os.pathsep)
    for d in os.environ.get("VK_LAYER_PATH", "").split(os.pathsep):
        manifest = Path(d) / "VkLayer_fake_semfd.json" if d else None
        if LAYER_NAME in enabled and manifest is not None and manifest.is_file():
            return str(manifest)
    dest = cache_dir()
    manifest = dest / "layer" / "VkLayer_fake_semfd.json"
    if not manifest.is_file():
        if not auto_setup:
            raise FileNotFoundError(f"SAPIEN 2 on lavapipe needs the Vulkan layer {LAYER_NAME} but {manifest} is "
                                    "missing; " + SETUP_HELP.format(dest=dest) + " (it compiles the layer; needs gcc)")
        run_setup(dest)
        if not manifest.is_file():
            raise FileNotFoundError(f"envs/setup_cpu_render.sh ran but did not build {manifest}; install gcc and "
                                    "libvulkan-dev (for vulkan/vk_layer.h), then run it again")
    layer_dirs = [str(manifest.parent)] + [d for d in os.environ.get("VK_LAYER_PATH", "").split(os.pathsep) if d]
    os.environ["VK_LAYER_PATH"] = os.pathsep.join(layer_dirs)
    os.environ["VK_INSTANCE_LAYERS"] = os.pathsep.join([LAYER_NAME] + [name for name in enabled if name])
    if ctypes.util.find_library("vulkan") is None:
        loaders = glob.glob(str(dest / "mesa" / "usr" / "lib" / "*" / "libvulkan.so.1"))
        if loaders:  # RTLD_LOCAL: a global loader would interpose the layer's own vkGetInstanceProcAddr, and
            # vkCreateInstance would then recurse into the loader and deadlock (tests/test_cpu_render_sapien2.py)
            _KEEP.append(ctypes.CDLL(loaders[0], mode=ctypes.RTLD_LOCAL))
    return str(manifest)


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
