"""Shared test setup: markers, skips for optional dependencies, and fixtures several test files use.

Markers (registered in pyproject.toml, [tool.pytest.ini_options]):
    slow       more than a few seconds (training loops, simulator episodes, a wheel build);
               `pytest -m "not slow"` leaves them out, `make test` runs everything.
    needs_tf   needs TensorFlow and tensorflow_datasets (the [rt1] extra: RLDS reading and writing).
    needs_sim  needs a simulator: ManiSkill3 by default, `needs_sim("simpler_env")` for SimplerEnv; tests that
               render take the `renderer` fixture too, which skips when no Vulkan renderer starts.
A test with a needs_* marker is skipped, naming what to install, where that package does not import.
"""

from __future__ import annotations

import importlib
import sys
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TF_PACKAGES = ("tensorflow", "tensorflow_datasets")
INSTALL_HINT = {"tensorflow": "pip install -e '.[rt1]'", "tensorflow_datasets": "pip install -e '.[rt1]'",
                "mani_skill": "pip install -e '.[maniskill]'",
                "simpler_env": "SimplerEnv's own environment (see envs/simpler_backend.py)"}


@cache
def import_error(module: str) -> str | None:
    """Why `module` does not import (None when it does); imported once per session."""
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 (a broken install is as good as a missing one here)
        return f"{type(e).__name__}: {e}"
    return None


def _skip_unless_importable(item: pytest.Item, modules: tuple[str, ...]) -> None:
    for module in modules:
        error = import_error(module)
        if error is not None:
            pytest.skip(f"{module} does not import ({error}); {INSTALL_HINT.get(module, 'install it')}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("needs_tf") is not None:
        _skip_unless_importable(item, TF_PACKAGES)
    sim = item.get_closest_marker("needs_sim")
    if sim is not None:
        _skip_unless_importable(item, tuple(sim.args) or ("mani_skill",))


@pytest.fixture
def renderer():
    """The process's `RenderSetup` (envs.cpu_render); skips the test when no Vulkan renderer starts."""
    from envs.cpu_render import RenderUnavailable, ensure_cpu_rendering

    try:
        return ensure_cpu_rendering()
    except RenderUnavailable as e:
        pytest.skip(f"no Vulkan renderer: {e}")


@pytest.fixture
def load_script(monkeypatch):
    """`load_script("collect_demos")` imports scripts/collect_demos.py as the module `collect_demos`
    (`load_script("gpu_suite", "benchmarks")` a benchmark).

    The folder is on sys.path only for the test (monkeypatch restores it), so the worker processes a script
    spawns can import its functions by name, as they do when the script runs."""

    def load(name: str, folder: str = "scripts"):
        monkeypatch.syspath_prepend(str(REPO / folder))
        monkeypatch.delitem(sys.modules, name, raising=False)
        return importlib.import_module(name)

    return load
