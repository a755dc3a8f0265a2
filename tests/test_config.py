"""Structured configs: the composed configs stay what they were, bad values fail at load naming the key,
every schema field is commented, and presets list only what they change."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from worldmodel import config as wcfg

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOTS = ROOT / "tests" / "config_snapshots"
# The composed configs of the default commands and the presets, as they were before the structured configs
# (commit 2936108). A deliberate change of a value updates its snapshot: regenerate the file with
# OmegaConf.to_yaml(compose(...), sort_keys=True) and review the diff.
CASES = {
    "pretrain": [], "pretrain--trainer=gpu": ["trainer=gpu"], "pretrain--data=folders": ["data=folders"],
    "pretrain--data=tfds": ["data=tfds"],
    "pretrain--objective=flow_matching--model=small": ["objective=flow_matching", "model=small"],
    "pretrain--model=base": ["model=base"], "finetune_rt1": [], "finetune_rt1--trainer=gpu": ["trainer=gpu"],
    "finetune_rt1--objective=flow_matching": ["objective=flow_matching"], "finetune_maniskill": [],
    "finetune_maniskill--objective=flow_matching": ["objective=flow_matching"], "probe": [],
}


def _compose(name, overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(wcfg.CONFIG_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.mark.parametrize("case", sorted(CASES))
def test_composed_config_is_unchanged(case):
    cfg = _compose(case.split("--")[0], CASES[case])
    assert OmegaConf.to_yaml(cfg, sort_keys=True) == (SNAPSHOTS / f"{case}.yaml").read_text()


def test_composed_configs_validate_and_keep_their_types():
    for name in ("pretrain", "finetune_rt1", "finetune_maniskill", "probe"):
        wcfg.validate(_compose(name, []))
    cfg = wcfg.compose("finetune_rt1", ["trainer.max_steps=7", "codec=conv_ae", "codec.frames_path=/ae"])
    assert cfg.trainer.max_steps == 7 and cfg.codec.frames == "conv_ae" and cfg.codec.patch == 8


@pytest.mark.parametrize("name,override,message", [
    ("pretrain", "trainer.max_steps=abc", r"trainer\.max_steps.*could not be converted to Integer"),
    ("pretrain", "seed=abc", r"seed.*could not be converted to Integer"),
    ("pretrain", "trainer.max_steps=5.5", r"trainer\.max_steps.*'5\.5'.*could not be converted to Integer"),
    ("pretrain", "max_steps=5.5", r"Could not override 'max_steps'"),
    ("pretrain", "modalities.image.prob=-1", r"modalities\.image\.prob=-1\.0 is not allowed: use a number >= 0"),
    ("finetune_rt1", "trainer.max_steps=0", r"trainer: max_steps must be >= 1, got 0"),
    ("finetune_rt1", "codec.frames=vae", r"codec\.frames='vae' is not allowed: use one of \['patch', 'conv_ae'"),
    ("finetune_rt1", "data.eval_fraction=1.0", r"data\.eval_fraction=1\.0 is not allowed: use a number >= 0\.0 and < 1"
     ),
    ("pretrain", "objective.timesteps.std=0", r"objective\.timesteps: logit-normal std must be > 0"),
    ("pretrain", "model.size=huge", r"model\.size='huge' is not allowed: use one of \['tiny', 'small', 'base'\]"),
    ("pretrain", "data=tfds", r"data\.dataset_dir is required"),
    ("pretrain", "trainer.typo=1", r"Could not override 'trainer\.typo'"),
    ("probe", "text=foo", r"Could not override 'text'"),
])
def test_bad_values_fail_at_load_naming_the_key(name, override, message):
    with pytest.raises(ValueError, match=message):
        wcfg.compose(name, [override])


def test_script_reports_the_key_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/pretrain.py", "trainer.max_steps=abc", f"hydra.run.dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "full_key: trainer.max_steps" in proc.stderr and "could not be converted to Integer" in proc.stderr


def _commented_fields(path: Path, classes: set[str]) -> dict[str, list[str]]:
    """Fields of the named dataclasses in ``path`` without a comment on their line or the line above."""
    lines = path.read_text().splitlines()
    missing = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef) and node.name in classes:
            for item in node.body:
                if isinstance(item, ast.AnnAssign):
                    line, above = lines[item.lineno - 1], lines[item.lineno - 2].strip()
                    end = lines[item.end_lineno - 1]
                    if "#" not in line and "#" not in end and not above.startswith("#"):
                        missing.setdefault(node.name, []).append(item.target.id)
    return missing


def test_every_schema_field_is_commented():
    schemas = {n.name for n in ast.walk(ast.parse((ROOT / "worldmodel" / "config.py").read_text()))
               if isinstance(n, ast.ClassDef)}
    assert len(schemas) >= 15
    assert _commented_fields(ROOT / "worldmodel" / "config.py", schemas) == {}
    # the groups derived from existing dataclasses keep their comments in those dataclasses
    assert _commented_fields(ROOT / "worldmodel" / "trainer.py", {"TrainerConfig"}) == {}
    assert _commented_fields(ROOT / "worldmodel" / "timesteps.py", {"TimestepDistribution"}) == {}


def test_trainer_presets_list_only_what_they_change():
    defaults = OmegaConf.to_container(OmegaConf.structured(wcfg.TrainerGroup))
    presets = {p.stem: yaml.safe_load(p.read_text()) for p in sorted((ROOT / "configs" / "trainer").glob("*.yaml"))}
    for name, preset in presets.items():
        inherited = dict(defaults)
        for parent in [d for d in preset.get("defaults", []) if d != "_self_"]:
            inherited.update({k: v for k, v in presets[parent].items() if k != "defaults"})
        restated = {k: v for k, v in preset.items() if k != "defaults" and inherited.get(k) == v}
        assert restated == {}, f"configs/trainer/{name}.yaml restates inherited values {restated}"


def test_closed_loop_checks_the_recipe_before_collecting_demos():
    from envs.closed_loop import ClosedLoopConfig
    from envs.closed_loop import validate as validate_closed_loop

    validate_closed_loop(ClosedLoopConfig(task="maniskill/push_cube", overrides=("trainer.max_steps=30",)))
    with pytest.raises(ValueError, match=r"trainer\.max_steps"):
        validate_closed_loop(ClosedLoopConfig(task="maniskill/push_cube", overrides=("trainer.max_steps=abc",)))
    with pytest.raises(ValueError, match=r"modalities|Could not override"):
        validate_closed_loop(ClosedLoopConfig(task="maniskill/push_cube", overrides=("modalities.image.prob=1",)))


def test_a_missing_recipe_names_the_recipes_there_are():
    from envs.closed_loop import ClosedLoopConfig
    from envs.closed_loop import validate as validate_closed_loop

    with pytest.raises(FileNotFoundError, match=r"(?s)recipe 'finetune_typo' not found.*one of .*finetune_maniskill"):
        validate_closed_loop(ClosedLoopConfig(task="maniskill/push_cube", config="finetune_typo"))
