"""Every shipped recipe runs: two optimizer steps on CPU against a random-weight teacher of the
family and patch size the recipe names.

The list comes from the recipes/ folder itself, so a new recipe is tested without editing this
file (a fine-tuning recipe starts from the pre-training recipe its name contains, e.g.
`finetune_vitb16_in1k` from `vitb16`). What is changed, and why:
- student: depth 1 (the shipped width, heads, patch and image size are kept); batch 2;
- teacher: random weights; EVA02-L-14 and EVA02-E-14-plus are shrunk to 2 narrow blocks of the
  same timm trunk (tests/eva_teachers.py: patch size, RoPE / post-norm, head and 224 px kept),
  as the real ones do not fit a 2-core CPU test; the demo teacher is its real architecture,
  untrained; native open_clip ViTs keep their width with 2 layers;
- data: generated images (and captions), no workers; schedule: 2 steps; class names: the
  folders' (ImageNet's 1000 names x 80 templates would dominate the run).
Everything else (optimizer, schedule shape, masking, precision, augmentation) is as shipped.
"""

from __future__ import annotations

import copy
import json
import math
import os

import open_clip
import pytest
from conftest import write_images
from eva_teachers import SHRUNK_NAMES, shrunk_teacher_folder, write_open_clip_folder

from uta_cli import checkpoint as ckpt
from uta_cli.data.demo import TEACHER_MODEL_CFG
from uta_cli.recipe import builtin_recipe_names, load_recipe

RECIPES = builtin_recipe_names()
TASKS = {name: load_recipe(name).task for name in RECIPES}
PRETRAIN = [n for n in RECIPES if TASKS[n] == "pretrain"]
FINETUNE = [n for n in RECIPES if TASKS[n] != "pretrain"]
STEPS = 2


def test_every_recipe_is_covered():
    assert set(PRETRAIN) | set(FINETUNE) == set(RECIPES)
    assert {"demo", "vitb16", "vitl14", "vitg14", "finetune_vitb16_in1k", "contrastive_vitb16"} <= \
        set(RECIPES)
    for name in FINETUNE:
        pretrain_of(name)  # each fine-tuning recipe has a pre-training recipe to start from


def pretrain_of(name: str) -> str:
    found = [p for p in PRETRAIN if p in name.split("_")]
    assert found, f"fine-tuning recipe {name}: no pre-training recipe named in it ({PRETRAIN})"
    return found[0]


def teacher_folder(root, model: str) -> str:
    """A random-weight open_clip folder standing in for the recipe's teacher."""
    path = root / model
    if os.path.isdir(path):
        return str(path)
    if model == "demo-clip":
        return write_open_clip_folder(path, TEACHER_MODEL_CFG)
    cfg = open_clip.get_model_config(model)
    assert cfg is not None, f"teacher {model} is not an open_clip model"
    timm_name = cfg["vision_cfg"].get("timm_model_name")
    if timm_name:
        assert timm_name in SHRUNK_NAMES, f"add {timm_name} to tests/eva_teachers.SHRINK"
        return shrunk_teacher_folder(path, model)
    cfg = copy.deepcopy(cfg)
    cfg["vision_cfg"]["layers"] = 2
    cfg["text_cfg"].update(layers=1)
    return write_open_clip_folder(path, cfg)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    write_images(root / "train", 8, size=40, classes=("red", "blue"))
    write_images(root / "val", 4, size=44, seed=1, classes=("red", "blue"))
    rows = ["image,caption"] + [f"train/{p.parent.name}/{p.name},a {p.parent.name} thing"
                                for p in sorted((root / "train").rglob("*.png"))]
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root


def common_sets(name: str) -> dict:
    sets = {"data.batch_size": 2, "data.num_workers": 0, "schedule.steps": STEPS,
            "train.log_every": 1, "train.checkpoint_every": STEPS}
    if load_recipe(name).data.source == "demo":
        sets.update({"demo.train_images": 16, "demo.val_images": 8, "data.val_samples": 8})
    return sets


def metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_two_steps(run_dir) -> dict:
    train = [r for r in metrics(run_dir) if "loss" in r and r.get("event") in (None, "train")]
    assert [r["step"] for r in train][-1] == STEPS, train
    assert all(math.isfinite(r["loss"]) for r in train)
    meta = ckpt.load_meta(ckpt.latest_checkpoint(str(run_dir)))
    assert meta["step"] == STEPS
    return meta


_PRETRAINED: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """Recipes differ in precision; accelerate keeps one mixed-precision setting per process
    unless its state is reset (as accelerate's own tests do between configurations)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def pretrained_run(name: str, workspace) -> str:
    """Run pre-training recipe `name` (once per module) and return its run directory."""
    if name in _PRETRAINED:
        return _PRETRAINED[name]
    from uta_cli.workflows.pretrain import run_pretrain

    shipped = load_recipe(name)
    teacher = teacher_folder(workspace / "teachers", shipped.teacher.model)
    sets = {**common_sets(name), "student.depth": 1, "teacher.model": f"local-dir:{teacher}",
            "teacher.weights": ""}
    if shipped.data.source != "demo":
        sets["data.source"] = str(workspace / "train")
    recipe = load_recipe(name, [f"{k}={v}" for k, v in sets.items()])
    run_dir = workspace / "runs" / name
    run_pretrain(recipe, output_dir=str(run_dir), resume="never")
    meta = check_two_steps(run_dir)
    for key in ("family", "width", "heads", "patch_size", "image_size", "mlp_ratio"):
        assert meta["student"][key] == getattr(shipped.student, key), key
    assert meta["student"]["depth"] == 1
    _PRETRAINED[name] = str(run_dir)
    return str(run_dir)


@pytest.mark.parametrize("name", PRETRAIN)
def test_pretrain_recipe_runs_two_steps(name, workspace):
    pretrained_run(name, workspace)


@pytest.mark.parametrize("name", FINETUNE)
def test_finetune_recipe_runs_two_steps(name, workspace):
    from uta_cli.workflows.finetune import run_finetune

    shipped = load_recipe(name)
    sets = {**common_sets(name), "init": pretrained_run(pretrain_of(name), workspace)}
    if shipped.data.source != "demo":
        sets["data.source"] = str(workspace / ("pairs.csv" if shipped.task == "contrastive"
                                               else "train"))
        sets["data.val_source"] = str(workspace / "val")
        sets["finetune.classnames"] = ""
    recipe = load_recipe(name, [f"{k}={v}" for k, v in sets.items()])
    run_dir = workspace / "runs" / name
    run_finetune(recipe, output_dir=str(run_dir), resume="never")
    meta = check_two_steps(run_dir)
    assert meta["task"] == {"classification": "classification",
                            "contrastive": "uta-contrastive"}.get(shipped.task, meta["task"])


def test_finetune_recipe_from_an_open_clip_eva_tower(workspace):
    """`init=open_clip:EVA02-*`: the EVA-CLIP image tower (a timm trunk) is the backbone."""
    from uta_cli.workflows.finetune import run_finetune

    teacher = teacher_folder(workspace / "teachers", "EVA02-L-14")
    sets = {**common_sets("finetune_vitb16_in1k"), "init": f"open_clip:local-dir:{teacher}",
            "data.source": str(workspace / "train"), "data.val_source": str(workspace / "val"),
            "finetune.classnames": "", "finetune.zeroshot_head": True}
    recipe = load_recipe("finetune_vitb16_in1k", [f"{k}={v}" for k, v in sets.items()])
    run_dir = workspace / "runs" / "finetune_open_clip_eva"
    run_finetune(recipe, output_dir=str(run_dir), resume="never")
    meta = check_two_steps(run_dir)
    assert meta["backbone"]["kind"] == "open_clip" and meta["preprocess"]["size"] == 224
