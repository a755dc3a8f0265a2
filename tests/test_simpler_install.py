"""The SimplerEnv install pins what SAPIEN 2.2.2 needs (numpy 1.26.4, opencv-python < 4.12), and says so."""

from __future__ import annotations

import pytest
from packaging.requirements import Requirement

from envs.simpler_backend import CONSTRAINTS, EVAL_REQUIREMENTS, INSTALL_HELP, SimplerUnavailable, import_simpler


def _requirements(path) -> dict[str, Requirement]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    reqs = [Requirement(line) for line in lines if line]
    return {r.name.lower(): r for r in reqs}


def test_constraints_pin_what_sapien_2_needs():
    pins = _requirements(CONSTRAINTS)
    assert list(pins["numpy"].specifier) and pins["numpy"].specifier.contains("1.26.4")
    assert not pins["numpy"].specifier.contains("2.4.0") and not pins["numpy"].specifier.contains("1.24.4")
    for cv in ("opencv-python", "opencv-python-headless"):
        assert pins[cv].specifier.contains("4.11.0.86") and not pins[cv].specifier.contains("4.12.0.88")
    assert str(pins["sapien"].specifier) == "==2.2.2"
    assert pins["gymnasium"].specifier.contains("0.29.1") and not pins["gymnasium"].specifier.contains("1.0.0")


def test_evaluator_requirements_are_torch_free_and_help_points_at_both_files():
    reqs = _requirements(EVAL_REQUIREMENTS)
    assert {"hydra-core", "msgpack", "websockets", "imageio", "tqdm"} <= set(reqs) and "torch" not in reqs
    assert "{constraints}" in INSTALL_HELP and "{requirements}" in INSTALL_HELP
    try:
        import_simpler()
    except SimplerUnavailable as e:  # this environment has no SimplerEnv: the message is the install
        assert f"PIP_CONSTRAINT={CONSTRAINTS}" in str(e) and f"pip install -r {EVAL_REQUIREMENTS}" in str(e)
    else:
        pytest.skip("SimplerEnv is installed here; its install help is not shown")
