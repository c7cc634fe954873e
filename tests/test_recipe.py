"""Typed recipes, overrides and the command line's exit codes for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import cli

from uta_cli.errors import UtaUsageError
from uta_cli.recipe import builtin_recipe_names, load_recipe, recipe_to_dict


def uta(*args, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "uta_cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout)


def test_builtin_recipes_resolve_by_name():
    assert {"demo", "vitb16", "vitl14"} <= set(builtin_recipe_names())
    b16 = load_recipe("vitb16")
    assert (b16.student.family, b16.student.patch_size, b16.student.image_size) == ("eva", 16, 224)
    assert b16.teacher.model.startswith("EVA02")
    # docs/method.md §8 (EVA-02 template)
    assert (b16.optim.lr, b16.optim.betas, b16.optim.eps, b16.optim.grad_clip) == \
        (1.5e-3, [0.9, 0.98], 1e-6, 3.0)
    assert load_recipe("vitl14").student.patch_size == 14
    assert load_recipe(None).name == "demo"


def test_overrides_are_typed(tmp_path):
    r = load_recipe("demo", ["optim.lr=1e-3", "schedule.steps=7", "data.hflip=false",
                             "data.crop_scale=[0.5, 1]", "student.timm_kwargs={qk_norm: true}"])
    assert r.optim.lr == 1e-3 and isinstance(r.optim.lr, float)
    assert r.schedule.steps == 7 and r.data.hflip is False
    assert r.data.crop_scale == [0.5, 1.0]
    assert r.student.timm_kwargs == {"qk_norm": True}


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  min_lr: 5e-6\n")  # PyYAML reads these as strings
    r = load_recipe(str(path))
    assert r.optim.lr == 1e-3 and r.optim.min_lr == 5e-6 and r.name == "r"


def test_unknown_key_names_the_nearest_valid_key():
    with pytest.raises(UtaUsageError, match="optim.lr"):
        load_recipe("demo", ["optim.lrr=1"])
    with pytest.raises(UtaUsageError, match="mask.ratio"):
        load_recipe("demo", ["optim.ratio=0.5"])  # a right name in the wrong section


def test_wrong_type_names_key_and_type():
    with pytest.raises(UtaUsageError, match=r"schedule.steps.*an integer"):
        load_recipe("demo", ["schedule.steps=many"])
    with pytest.raises(UtaUsageError, match=r"mask.strategy.*reversed-block"):
        load_recipe("demo", ["mask.strategy=reversed"])


def test_resolved_recipe_round_trips(tmp_path):
    r = load_recipe("vitb16", ["optim.lr=2e-4"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(recipe_to_dict(r)))
    assert load_recipe(str(path)) == r


@pytest.mark.parametrize("args, needle", [
    (["pretrain", "demo", "--set", "optim.lrr=1"], "Did you mean 'optim.lr'"),
    (["pretrain", "demo", "--set", "schedule.steps=x"], "schedule.steps"),
    (["pretrain", "/no/such/recipe.yaml"], "Recipe file not found"),
    (["pretrain", "nosuchrecipe"], "Built-in recipes"),
    (["pretrain", "vitb16", "--set", "data.source=/tmp"], "--set teacher.weights="),
    (["pretrain", "vitb16"], "data.source is not set"),
    (["pretrain", "demo", "--set", "mask.ratio=1.5"], "mask.ratio"),
])
def test_bad_input_is_exit_2_without_traceback(args, needle, tmp_path):
    # in-process (a torch import per case would cost 5 s); the next test takes the real
    # `python -m uta_cli` path once
    out = cli(*args, "--output-dir", tmp_path / "run")
    assert out.exit_code == 2, out.output
    text = out.output
    assert needle in " ".join(text.split())  # rich may wrap lines
    assert "Traceback" not in text


def test_bad_input_through_python_m_is_exit_2_without_traceback(tmp_path):
    out = uta("pretrain", "demo", "--set", "mask.ratio=1.5", "--output-dir", tmp_path / "run")
    assert out.returncode == 2, out.stderr + out.stdout
    assert "mask.ratio" in out.stderr + out.stdout
    assert "Traceback" not in out.stderr + out.stdout
