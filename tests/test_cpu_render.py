"""Software-Vulkan setup: explicit only (`make render`), and a renderer that starts or fails within seconds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import envs.cpu_render as cpu_render
from envs.cpu_render import RenderUnavailable, ensure_cpu_rendering, probe_renderer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fresh_render_state(monkeypatch, tmp_path):
    """A process that has not chosen its renderer yet, asked for CPU rendering from an empty cache folder."""
    monkeypatch.setattr(cpu_render, "_SETUP", None)
    monkeypatch.setattr(cpu_render, "_ORIGINAL_ENV", None)
    monkeypatch.setattr(cpu_render, "_PROBED", set())
    for var in ("VK_ICD_FILENAMES", "VK_LAYER_PATH", "VK_INSTANCE_LAYERS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLDMODEL_RENDER", "cpu")
    monkeypatch.setenv("WORLDMODEL_CPU_RENDER_DIR", str(tmp_path / "empty-cache"))
    return tmp_path


def _no_subprocess(*args, **kwargs):
    raise AssertionError(f"the library started a process on its own: {args}")


def test_missing_software_driver_raises_naming_the_setup_command_and_runs_nothing(fresh_render_state, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", _no_subprocess)
    with pytest.raises(RenderUnavailable, match="make render") as e:
        ensure_cpu_rendering(probe=False)
    assert "python -m envs.cpu_render setup" in str(e.value)
    assert str(fresh_render_state / "empty-cache") in str(e.value)


def test_the_probe_child_reports_a_missing_driver_with_the_setup_command(fresh_render_state):
    with pytest.raises(RenderUnavailable, match="make render"):
        ensure_cpu_rendering()


def _fake_sapien(root: Path, body: str) -> dict[str, str]:
    """An environment whose `import sapien` runs `body`, with a user-chosen ICD (so no driver is loaded)."""
    pkg = root / "fake_site" / "sapien"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(body)
    icd = root / "user_icd.json"
    icd.write_text("{}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pkg.parent), str(REPO)]), VK_ICD_FILENAMES=str(icd),
               WORLDMODEL_RENDER="auto")
    return env


@pytest.mark.slow
def test_a_renderer_that_hangs_becomes_an_error_naming_the_fix(tmp_path):
    env = _fake_sapien(tmp_path, "import time\ntime.sleep(600)\n")  # like a vkCreateInstance that never returns
    with pytest.raises(RenderUnavailable, match="did not start within 3 s") as e:
        probe_renderer(env=env, timeout=3)
    assert "make render" in str(e.value) and "env.sh" in str(e.value)


def test_a_renderer_that_fails_becomes_an_error_with_its_reason(tmp_path):
    body = ("__version__ = '3.0.3'\nclass _Render:\n    @staticmethod\n    def RenderSystem(*a):\n"
            "        raise RuntimeError('vkCreateInstance failed: ErrorIncompatibleDriver')\n"
            "render = _Render()\ndef Device(name):\n    return name\n")
    env = _fake_sapien(tmp_path, body)
    with pytest.raises(RenderUnavailable, match="ErrorIncompatibleDriver") as e:
        probe_renderer(env=env, timeout=60)
    assert "python -m envs.cpu_render check" in str(e.value)


def test_a_renderer_that_starts_passes_the_probe_and_no_sapien_is_nothing_to_check(tmp_path):
    body = ("__version__ = '3.0.3'\nclass _Render:\n    @staticmethod\n    def RenderSystem(*a):\n"
            "        return object()\nrender = _Render()\ndef Device(name):\n    return name\n")
    probe_renderer(env=_fake_sapien(tmp_path / "ok", body), timeout=60)
    probe_renderer(env=_fake_sapien(tmp_path / "absent", "raise ImportError('no sapien here')\n"), timeout=60)


def test_sapien2_layer_missing_names_the_setup_command(fresh_render_state, monkeypatch):
    dest = fresh_render_state / "empty-cache"
    monkeypatch.setattr(cpu_render, "_SETUP", cpu_render.RenderSetup("cpu", str(dest / "lvp_icd.json"), "pci:0"))
    with pytest.raises(RenderUnavailable, match="make render") as e:
        ensure_cpu_rendering(sapien2=True, probe=False)
    assert "VK_LAYER_fake_semfd" in str(e.value)


def test_render_env_prepends_the_layer_like_env_sh(monkeypatch, tmp_path):
    monkeypatch.setenv("VK_INSTANCE_LAYERS", "VK_LAYER_other")
    monkeypatch.delenv("VK_LAYER_PATH", raising=False)
    env = cpu_render.render_env(tmp_path, layer=True)
    assert env == {"VK_ICD_FILENAMES": str(tmp_path / "lvp_icd.json"), "VK_LAYER_PATH": str(tmp_path / "layer"),
                   "VK_INSTANCE_LAYERS": os.pathsep.join(["VK_LAYER_fake_semfd", "VK_LAYER_other"])}
    assert "VK_LAYER_PATH" not in cpu_render.render_env(tmp_path, layer=False)


def test_setup_files_live_outside_the_package_and_are_found_when_installed(monkeypatch, tmp_path):
    assert not list((REPO / "envs").glob("*.sh")) and not list((REPO / "envs").glob("*.c"))
    assert cpu_render.tools_dir() == REPO / "tools" / "cpu_render"
    installed = tmp_path / "prefix"
    shutil.copytree(REPO / "tools" / "cpu_render", installed / cpu_render.INSTALLED_TOOLS)
    monkeypatch.setattr(cpu_render, "__file__", str(tmp_path / "site-packages" / "envs" / "cpu_render.py"))
    monkeypatch.setattr(cpu_render.sysconfig, "get_path", lambda name: str(installed))
    assert cpu_render.tools_dir() == installed / cpu_render.INSTALLED_TOOLS
    monkeypatch.setattr(cpu_render.sysconfig, "get_path", lambda name: str(tmp_path / "nowhere"))
    monkeypatch.setattr(cpu_render.sys, "prefix", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="reinstall"):
        cpu_render.tools_dir()


def test_a_wheel_ships_the_setup_script_and_the_layer_source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("worldmodel", "policies", "envs", "tools"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    share = "data/share/selfflow-worldmodel/cpu_render/"
    assert any(n.endswith(share + "setup_cpu_render.sh") for n in names), names
    assert any(n.endswith(share + "vk_layer_fake_semfd.c") for n in names), names
    assert "envs/cpu_render.py" in names
