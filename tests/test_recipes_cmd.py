"""`uta recipes` (the catalogue, one recipe resolved as YAML) and `--dry-run` on pretrain and
finetune: the same YAML plus a checked summary, exit 0, nothing trained or written."""

from __future__ import annotations

import os

import yaml
from conftest import cli as conftest_cli
from conftest import tiny_overrides, write_images

from uta_cli.recipe import builtin_recipe_names, load_recipe, recipe_from_dict, recipe_to_dict

WIDE = {"COLUMNS": "300"}


def cli(*args):
    return conftest_cli(*args, env=WIDE)


def sets(pairs):
    out = []
    for s in pairs:
        out += ["--set", s]
    return out


def test_recipes_lists_every_builtin_with_its_command():
    result = cli("recipes")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for name in builtin_recipe_names():
        row = next(line for line in lines if f" {name} " in line)
        task = load_recipe(name).task
        assert ("uta pretrain" if task == "pretrain" else "uta finetune") in row
        assert len(row.split("│")[3].strip()) > 20  # a description, from the file's comment


def test_recipes_name_prints_the_resolved_yaml(tmp_path):
    result = cli("recipes", "vitb16", "--set", "optim.lr=1e-4", "--set", "data.source=/in21k")
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(result.output)
    want = load_recipe("vitb16", ["optim.lr=1e-4", "data.source=/in21k"])
    assert recipe_from_dict(data) == want
    # every key is there, defaults filled (not only what the file sets)
    assert data.keys() == recipe_to_dict(want).keys()
    assert data["finetune"]["label_smoothing"] == 0.0 and data["optim"]["lr"] == 1e-4
    saved = tmp_path / "mine.yaml"
    saved.write_text(result.output)
    assert load_recipe(str(saved)) == want  # ready to save, edit and run
    for args in (["recipes", "vitb61"], ["recipes", "--set", "optim.lr=1"],
                 ["recipes", "demo", "--set", "optim.lrr=1"]):
        bad = cli(*args)
        assert bad.exit_code == 2 and "Traceback" not in bad.output, (args, bad.output)


def test_pretrain_dry_run_checks_and_trains_nothing(tmp_path, tiny_clip_dir, monkeypatch):
    images = tmp_path / "images"
    write_images(images, 16, size=36, classes=("cat", "dog", "eel"))
    run_dir = tmp_path / "run"
    base = tiny_overrides(tiny_clip_dir, **{"data.source": images})
    result = cli("pretrain", "demo", "--dry-run", "--output-dir", run_dir, *sets(base))
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"source: {images}" in out and "16 images, 3 class folders" in out
    assert f"local-dir:{tiny_clip_dir}" in out
    assert "4x4 patches, 8 kept + CLS" in out and "M parameters with the head to 32-d" in out
    assert "a fresh run" in out and not run_dir.exists()
    assert "metrics.jsonl" in out
    # what cannot be reached is exit 2, named
    for change, needle in ((f"data.source={tmp_path / 'nothere'}", "nothere"),
                           ("data.val_source=memory://nobucket/val-{0..3}.tar", "not reachable"),
                           ("teacher.model=ViT-B-16", "teacher.weights is not set"),
                           (f"student.init={tmp_path / 'gone'}", "gone"),
                           ("train.report_to=[tensorbord]", "Did you mean 'tensorboard'?")):
        bad = cli("pretrain", "demo", "--dry-run", "--output-dir", run_dir,
                  *sets(base + [change]))
        assert bad.exit_code == 2, (change, bad.output)
        assert "".join(needle.split()) in "".join(bad.output.split()), (change, bad.output)
    from uta_cli.train import tracking as tracking

    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name, *a: None)
    no_extra = cli("pretrain", "demo", "--dry-run", *sets(base + ["train.report_to=[wandb]"]))
    assert no_extra.exit_code == 2 and "uta-cli[wandb]" in no_extra.output
    monkeypatch.undo()
    # after a run, the dry run says where it would resume
    assert cli("pretrain", "demo", "--output-dir", run_dir,
               *sets(base + ["schedule.steps=2", "train.checkpoint_every=2"])).exit_code == 0
    again = cli("pretrain", "demo", "--dry-run", "--output-dir", run_dir, *sets(base))
    assert again.exit_code == 0 and "resuming from" in again.output and "(step 2)" in again.output
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["latest", "step_00000002"]


def test_finetune_dry_run(tmp_path):
    missing = cli("finetune", "finetune_demo", "--dry-run", "--set", f"init={tmp_path / 'no'}")
    assert missing.exit_code == 2 and "does not exist" in missing.output
    ok = cli("finetune", "finetune_demo", "--dry-run", "--set", "init=",
             "--output-dir", tmp_path / "ft")
    assert ok.exit_code == 0, ok.output
    assert "task: classification" in ok.output and "random (the student section)" in ok.output
    assert not (tmp_path / "ft").exists()
