"""SAPIEN 2 (SIMPLER) on lavapipe: the Vulkan setup of `ensure_cpu_rendering(sapien2=True)` creates an instance.

Regression: where the system has no libvulkan.so.1, the unpacked Vulkan loader used to be preloaded with
RTLD_GLOBAL. Its exported `vkGetInstanceProcAddr` then interposed the one VK_LAYER_fake_semfd exports, so the
layer handed the loader the loader's own entry point and the first vkCreateInstance (SAPIEN's first renderer,
i.e. the first SimplerEnv episode of `scripts/eval_simpler.py`) recursed into the loader and deadlocked.
Skipped where the software renderer and the layer are not set up (`make render`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from envs.cpu_render import cache_dir

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh process: the loader, the driver and the layer are loaded once per process.
CREATE_INSTANCE = """
import ctypes, sys
sys.path.insert(0, sys.argv[1])
import envs.cpu_render as cpu_render

cpu_render._sapien_major = lambda: 2  # as in SimplerEnv's environment (this one may have SAPIEN 3, or none)
setup = cpu_render.ensure_cpu_rendering(sapien2=True)
assert setup.software and setup.layer, setup


class InstanceCreateInfo(ctypes.Structure):  # VkInstanceCreateInfo
    _fields_ = [("sType", ctypes.c_int), ("pNext", ctypes.c_void_p), ("flags", ctypes.c_uint32),
                ("pApplicationInfo", ctypes.c_void_p), ("enabledLayerCount", ctypes.c_uint32),
                ("ppEnabledLayerNames", ctypes.c_void_p), ("enabledExtensionCount", ctypes.c_uint32),
                ("ppEnabledExtensionNames", ctypes.c_void_p)]


vulkan = ctypes.CDLL("libvulkan.so.1")  # as SAPIEN 2 links it: the copy already loaded, else the system's
info, instance = InstanceCreateInfo(sType=1), ctypes.c_void_p()  # 1 = VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO
result = vulkan.vkCreateInstance(ctypes.byref(info), None, ctypes.byref(instance))
print("vkCreateInstance", result, flush=True)
vulkan.vkDestroyInstance(instance, None)
"""


def test_vulkan_instance_with_the_semfd_layer_does_not_deadlock():
    dest = cache_dir()
    if not (dest / "lvp_icd.json").is_file() or not (dest / "layer" / "VkLayer_fake_semfd.json").is_file():
        pytest.skip(f"no software renderer with the SAPIEN 2 layer in {dest} (make render)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VK_") and k != "LD_LIBRARY_PATH"}
    env["WORLDMODEL_RENDER"] = "cpu"  # the lavapipe path even on a GPU machine
    try:
        proc = subprocess.run([sys.executable, "-c", CREATE_INSTANCE, str(ROOT)], env=env, capture_output=True,
                              text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("vkCreateInstance through VK_LAYER_fake_semfd never returned (the loader deadlocked on itself)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "vkCreateInstance 0" in proc.stdout, proc.stdout + proc.stderr[-2000:]  # 0 = VK_SUCCESS
