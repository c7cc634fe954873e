"""`uta finetune`: classification fine-tuning and contrastive tuning on tiny models and the
generated demo data. Runs are in-process (a few seconds each) except the two-process check."""

from __future__ import annotations

import io
import json
import math
import os
import random
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from conftest import TINY_CLIP_CFG, free_port, tiny_overrides, write_clip_folder, write_images
from PIL import Image
from safetensors.torch import load_file

from uta_cli import checkpoint as ckpt
from uta_cli.errors import UtaUsageError
from uta_cli.recipe import load_recipe
from uta_cli.workflows.finetune import run_finetune

BASE = {"data.source": "demo", "data.batch_size": 8, "data.num_workers": 0,
        "demo.train_images": 64, "demo.val_images": 32, "data.val_samples": 0,
        "schedule.steps": 6, "schedule.warmup_steps": 2, "train.precision": "fp32",
        "train.log_every": 1, "train.checkpoint_every": 3, "train.val_every": 3,
        "student.drop_path": 0.0}
# Everything the classification recipe offers, switched on.
FULL = {"finetune.zeroshot_head": True, "finetune.ema_decay": 0.9, "finetune.layer_decay": 0.5,
        "finetune.label_smoothing": 0.1, "finetune.mixup": 0.8, "finetune.cutmix": 1.0,
        "finetune.randaugment": "rand-m9-mstd0.5-inc1", "student.drop_path": 0.1}


def recipe_for(which: str, init: str, **sets):
    name = "finetune_demo" if which == "classification" else "contrastive_demo"
    merged = {**BASE, "init": init, **sets}
    return load_recipe(name, [f"{k}={'' if v is None else v}" for k, v in merged.items()])


def finetune(which: str, init: str, run_dir, resume: str = "auto", **sets) -> dict:
    """`uta finetune` in-process on a built-in demo recipe shrunk to seconds (BASE)."""
    return run_finetune(recipe_for(which, init, **sets), output_dir=str(run_dir), resume=resume)


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def weights(folder, name="model.safetensors"):
    return load_file(os.path.join(folder, name))


def zeroshot_top1(encode_image, clip, tokenizer, meta, n: int) -> dict:
    """The zero-shot core (zeroshot.py) on the first n held-out demo images, student's view."""
    from uta_cli.data.demo import CLASSNAMES, TEMPLATES, demo_splits
    from uta_cli.data.pipeline import EvalTransform, View, normalize
    from uta_cli.evaluate.zeroshot import build_classifier, evaluate

    sp = meta["student_preprocess"]
    view = View("student", sp["size"], tuple(sp["mean"]), tuple(sp["std"]))
    _, split = demo_splits(0, n, 0)
    tf = EvalTransform([view])
    images = torch.stack([tf(Image.fromarray(im), i)["student"]
                          for i, im in enumerate(split.images)])
    classifier = build_classifier(clip.encode_text, tokenizer, CLASSNAMES, TEMPLATES)
    with torch.no_grad():
        return evaluate(encode_image, [(normalize(images, view), torch.from_numpy(split.labels))],
                        classifier)


@pytest.fixture(scope="module")
def uta_ckpt(tmp_path_factory) -> str:
    """A seconds-long UTA pre-training run against a tiny CLIP (logit scale 50, as the demo
    teacher: contrastive tuning then learns within a few dozen steps)."""
    from uta_cli.workflows.pretrain import run_pretrain

    root = tmp_path_factory.mktemp("uta")
    teacher = write_clip_folder(root / "clip", {**TINY_CLIP_CFG,
                                                "init_logit_scale": math.log(50)})
    run_pretrain(load_recipe("demo", tiny_overrides(teacher, steps=6)),
                 output_dir=str(root / "pre"), resume="never")
    return str(root / "pre")


@pytest.fixture(scope="module")
def full_run(uta_ckpt, tmp_path_factory):
    """Classification with every option on: zero-shot head, EMA, layer decay, mixup/cutmix,
    RandAugment, drop path, label smoothing."""
    run_dir = tmp_path_factory.mktemp("full")
    summary = finetune("classification", uta_ckpt, run_dir, **FULL)
    return run_dir, summary


@pytest.fixture(scope="module")
def tuned(uta_ckpt, tmp_path_factory):
    """Contrastive tuning long enough to learn something (text tower unlocked)."""
    run_dir = tmp_path_factory.mktemp("tuned")
    summary = finetune("contrastive", uta_ckpt, run_dir, **{
        "schedule.steps": 30, "optim.lr": 1e-3, "data.batch_size": 16,
        "demo.train_images": 32, "train.checkpoint_every": 0, "train.val_every": 0})
    return run_dir, summary


# ------------------------------------------------------------------------------ classification


def test_layer_decay_lrs_follow_decay_power_of_depth_minus_layer(full_run):
    from uta_cli.tasks.classification import layer_decay_groups

    run_dir, _ = full_run
    state = torch.load(os.path.join(ckpt.latest_checkpoint(str(run_dir)), "training_state.pt"),
                       weights_only=True)
    groups = state["optimizer"]["param_groups"]
    scales = sorted({g["lr_scale"] for g in groups})
    depth = 2  # the tiny student: stem (layer 0), blocks 1..2, then norm + head (layer 3)
    assert scales == pytest.approx([0.5 ** (depth + 1 - layer) for layer in range(depth + 2)])
    # the engine applied them: every group's lr is the scheduled lr times its scale
    base = {g["lr"] / g["lr_scale"] for g in groups}
    assert max(base) == pytest.approx(min(base), rel=1e-9)

    # and per parameter: block i is at decay^(depth - i), the head at full lr
    from uta_cli.models.student import UTAStudent
    from uta_cli.recipe import StudentConfig
    from uta_cli.tasks.classification import ClassificationModel

    student = UTAStudent(StudentConfig(image_size=32, patch_size=8, width=32, depth=3, heads=2),
                         16)
    model = ClassificationModel(student.trunk, torch.nn.Linear(32, 5))
    scale_of = {id(p): g["lr_scale"] for g in layer_decay_groups(model, 0.05, 0.7)
                for p in g["params"]}
    named = dict(model.named_parameters())
    for i in range(3):
        assert scale_of[id(named[f"trunk.blocks.{i}.attn.q_proj.weight"])] == \
            pytest.approx(0.7 ** (3 - i))
    assert scale_of[id(named["trunk.patch_embed.proj.weight"])] == pytest.approx(0.7 ** 4)
    assert scale_of[id(named["head.weight"])] == 1.0
    assert scale_of[id(named["trunk.norm.weight"])] == pytest.approx(0.7)  # timm: last block


def test_zeroshot_head_step_zero_equals_zeroshot_top1(full_run, uta_ckpt):
    from uta_cli.loading.model import student_from_checkpoint, teacher_from_meta

    run_dir, _ = full_run
    first = [r for r in metrics(run_dir) if r.get("event") == "val"][0]
    assert first["step"] == 0
    student, meta = student_from_checkpoint(uta_ckpt)
    teacher = teacher_from_meta(meta)
    zs = zeroshot_top1(student.encode_image, teacher.clip, teacher.tokenizer, meta, 32)
    assert zs["num_samples"] == 32
    assert first["val_acc1"] == zs["acc1"] and first["val_acc5"] == zs["acc5"]
    assert first["val_ema_acc1"] == zs["acc1"]  # the EMA starts as a copy


def test_ema_weights_differ_from_live_and_are_evaluated(full_run, uta_ckpt):
    from uta_cli.loading.starts import resolve_init
    from uta_cli.tasks.classification import EMA_FILE
    from uta_cli.workflows.finetune import build_classification

    run_dir, summary = full_run
    latest = ckpt.latest_checkpoint(str(run_dir))
    live, ema = weights(latest), weights(latest, EMA_FILE)
    assert live.keys() == ema.keys()
    assert max((live[k] - ema[k]).abs().max().item() for k in live) > 1e-4
    # the logged EMA metrics are those of the saved EMA weights
    recipe = recipe_for("classification", uta_ckpt, **FULL)
    from uta_cli.train.setup import make_accelerator

    task = build_classification(recipe, resolve_init(recipe.init), make_accelerator("fp32"),
                                lambda *a, **k: None)
    task.model.load_state_dict(ema)
    again = task.evaluate(task.model)
    assert again["acc1"] == summary["val"]["val_ema_acc1"]
    assert again["loss"] == pytest.approx(summary["val"]["val_ema_loss"], rel=1e-5)
    assert summary["val"]["val_loss"] != summary["val"]["val_ema_loss"]
    # the best checkpoint holds the EMA too, and `latest` still names the newest step
    best = ckpt.load_meta(os.path.join(run_dir, "checkpoints", "best"))["best"]
    assert best["metric"] == "val_ema_acc1"
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "best", EMA_FILE))
    assert latest.endswith(ckpt.step_dirname(6))


def test_crash_then_resume_gives_equal_weights(full_run, uta_ckpt, tmp_path, monkeypatch):
    from uta_cli.tasks.classification import EMA_FILE, ClassificationTask

    full_dir, _ = full_run
    original = ClassificationTask.after_optimizer_step

    def crash_at_4(self, model, step):
        original(self, model, step)
        if step == 4:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(ClassificationTask, "after_optimizer_step", crash_at_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune("classification", uta_ckpt, tmp_path, **FULL)
    monkeypatch.setattr(ClassificationTask, "after_optimizer_step", original)
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith(ckpt.step_dirname(3))
    finetune("classification", uta_ckpt, tmp_path, **FULL)
    for name in ("model.safetensors", EMA_FILE):
        expected = weights(ckpt.latest_checkpoint(str(full_dir)), name)
        got = weights(ckpt.latest_checkpoint(str(tmp_path)), name)
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0)
    steps = [r["step"] for r in metrics(tmp_path) if "loss" in r and "event" not in r]
    assert steps == list(range(1, 7))


def test_mixup_cutmix_targets_sum_to_one_and_are_keyed():
    from uta_cli.tasks.classification import KeyedMixup

    mix = KeyedMixup(0.8, 1.0, 1.0, 0.5, 0.1, num_classes=10, seed=0)
    images, labels = torch.rand(9, 3, 16, 16), torch.arange(9) % 10
    state = (random.getstate(), np.random.get_state()[1].copy())
    for first in range(0, 40, 9):
        ids = torch.arange(first, first + 9)
        x, target = mix(images, labels, ids)
        assert x.shape[0] == 8 and target.shape == (8, 10)  # odd batch: last sample dropped
        torch.testing.assert_close(target.sum(dim=1), torch.ones(8))
        assert (target >= 0).all() and (target.max(dim=1).values < 1).all()
        x2, target2 = mix(images, labels, ids)
        assert torch.equal(x, x2) and torch.equal(target, target2)  # keyed, not drawn
    assert random.getstate() == state[0] and np.array_equal(np.random.get_state()[1], state[1])


def test_randaugment_is_a_function_of_seed_epoch_and_sample():
    from uta_cli.data.pipeline import View
    from uta_cli.tasks.classification import RandAugmentTrainTransform

    view = View("image", 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    tf = RandAugmentTrainTransform(view, (0.5, 1.0), True, 0, "rand-m9-mstd0.5-inc1")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8))
    a, b = tf(img, 7)["image"], tf(img, 7)["image"]
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == (3, 32, 32)
    tf.set_epoch(1)
    assert not torch.equal(a, tf(img, 7)["image"])
    with pytest.raises(UtaUsageError, match="RandAugment"):
        RandAugmentTrainTransform(view, (0.5, 1.0), True, 0, "m9-mstd0.5")


# --------------------------------------------------------------------------------- contrastive


def test_contrastive_loss_is_lower_for_matched_than_shuffled_pairs(tuned):
    from open_clip.loss import ClipLoss

    from uta_cli.data.demo import demo_splits
    from uta_cli.data.pipeline import View, normalize
    from uta_cli.loading.model import tuned_clip_from_checkpoint
    from uta_cli.tasks.contrastive import uta_clip

    run_dir, summary = tuned
    losses = [r["loss"] for r in metrics(run_dir) if "loss" in r and "event" not in r]
    assert losses[-1] < losses[0]
    student, teacher, meta = tuned_clip_from_checkpoint(str(run_dir))
    model = uta_clip(teacher.clip, student, text_locked=True).eval()
    split, _ = demo_splits(32, 0, 0)  # the pairs it was tuned on
    images = torch.from_numpy(split.images).permute(0, 3, 1, 2)[:16]
    sp = meta["student_preprocess"]
    x = normalize(images, View("image", sp["size"], tuple(sp["mean"]), tuple(sp["std"])))
    loss_fn = ClipLoss()
    with torch.no_grad():
        def loss_of(captions):
            img, txt, scale = model(x, teacher.tokenizer(captions))[:3]
            return float(loss_fn(img, txt, scale))
        matched = loss_of(split.captions[:16])
        order = torch.randperm(16, generator=torch.Generator().manual_seed(0)).tolist()
        shuffled = loss_of([split.captions[i] for i in order])
    assert matched < shuffled - 0.1, (matched, shuffled)


def test_tuned_checkpoint_keeps_text_tower_for_zeroshot(tuned, uta_ckpt, tmp_path):
    from uta_cli.loading.model import tuned_clip_from_checkpoint
    from uta_cli.tasks.contrastive import uta_clip

    run_dir, summary = tuned
    student, teacher, meta = tuned_clip_from_checkpoint(str(run_dir))
    assert meta["task"] == "uta-contrastive" and meta["text_tower"]["tuned"]
    assert meta["weights_layout"]["student"] == "visual.student."
    zs = zeroshot_top1(student.encode_image, teacher.clip, teacher.tokenizer, meta, 32)
    assert zs["acc1"] == summary["val"]["val_zeroshot_acc1"]
    # `uta zeroshot` on the run directory scores the student with the TUNED text tower
    report = tmp_path / "zs.json"
    out = subprocess.run([sys.executable, "-m", "uta_cli", "zeroshot", "--ckpt", str(run_dir),
                          "--dataset", "demo", "--precision", "fp32", "--output-json",
                          str(report)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(report.read_text())["metrics"]["acc1"] == pytest.approx(zs["acc1"])
    first = [r for r in metrics(run_dir) if r.get("event") == "val"][0]
    assert first["step"] == 0 and summary["val"]["val_zeroshot_acc1"] > first["val_zeroshot_acc1"]
    # the text tower moved; a locked run keeps it bit-identical and still tunes the student
    original = load_file(os.path.join(meta["teacher"]["model"][len("local-dir:"):],
                                      "open_clip_model.safetensors"))
    tuned_text = weights(ckpt.latest_checkpoint(str(run_dir)))
    assert not torch.equal(tuned_text["text_projection"], original["text_projection"])
    finetune("contrastive", uta_ckpt, tmp_path, **{"finetune.text_locked": True,
                                                   "schedule.steps": 2})
    locked = weights(ckpt.latest_checkpoint(str(tmp_path)))
    for k, v in locked.items():
        if not k.startswith("visual."):
            assert torch.equal(v, original[k]) or k == "logit_scale", k
    model = uta_clip(teacher.clip, student, text_locked=True)
    assert not any(p.requires_grad for n, p in model.named_parameters()
                   if n.startswith(("transformer.", "token_embedding")))


def test_tuned_text_tower_gets_its_own_cached_class_weights(tuned, uta_ckpt, tmp_path):
    """The classifier cache keys on the teacher; a tuned text tower has the same teacher
    identity, so it must not be served the class weights of the original text tower."""
    from typer.testing import CliRunner

    from uta_cli.app import app
    from uta_cli.data.demo import CLASSNAMES, TEMPLATES
    from uta_cli.evaluate.zeroshot import build_classifier
    from uta_cli.loading.model import tuned_clip_from_checkpoint

    run_dir, _ = tuned
    cache = tmp_path / "cache"

    def zeroshot(ckpt_dir, name):
        result = CliRunner().invoke(app, [
            "zeroshot", "--ckpt", str(ckpt_dir), "--dataset", "demo", "--precision", "fp32",
            "--workers", "0", "--cache-dir", str(cache), "--output-json", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        return json.loads((tmp_path / name).read_text())

    assert zeroshot(uta_ckpt, "original.json")["classifier"]["cache"] == "built"
    first = zeroshot(run_dir, "tuned.json")
    assert first["classifier"]["cache"] == "built"  # not the original tower's weights
    assert zeroshot(run_dir, "again.json")["classifier"]["cache"] == "hit"
    _, teacher, _ = tuned_clip_from_checkpoint(str(run_dir))
    with torch.no_grad():
        expected = build_classifier(teacher.clip.encode_text, teacher.tokenizer, CLASSNAMES,
                                    TEMPLATES)
    cached = load_file(first["classifier"]["path"])["classifier"]
    assert torch.allclose(cached, expected, atol=1e-6)
    assert len(list(cache.glob("*.safetensors"))) == 2


def test_teacher_row_of_a_tuned_checkpoint_uses_the_teacher_own_text(tuned, uta_ckpt,
                                                                      tmp_path):
    """`uta zeroshot --teacher` on a contrastive checkpoint: the student is scored with the
    tuned text tower, the teacher row with the teacher's own, so it equals the teacher row of
    the checkpoint the tuning started from (classification and retrieval)."""
    from typer.testing import CliRunner

    from uta_cli.app import app

    run_dir, _ = tuned
    paths = write_images(tmp_path / "set", 30, seed=3, classes=("red", "green", "blue"))
    rows = [{"image": os.path.relpath(p, tmp_path / "set"),
             "captions": [f"a photo of {os.path.basename(os.path.dirname(p))}",
                          f"something {i % 4}"]} for i, p in enumerate(paths)]
    (tmp_path / "set" / "captions.json").write_text(json.dumps(rows))

    def zeroshot(ckpt_dir, name, *extra):
        result = CliRunner().invoke(app, [
            "zeroshot", "--ckpt", str(ckpt_dir), "--teacher", "--precision", "fp32",
            "--workers", "0", "--cache-dir", "none", "--output-json", str(tmp_path / name),
            *extra])
        assert result.exit_code == 0, result.output
        return json.loads((tmp_path / name).read_text())

    for task, extra in (("cls", ["--dataset", str(tmp_path / "set")]),
                        ("ret", ["--task", "retrieval", "--dataset",
                                 str(tmp_path / "set" / "captions.json"), "--data-dir",
                                 str(tmp_path / "set")])):
        start = zeroshot(uta_ckpt, f"start_{task}.json", *extra)
        tuned_report = zeroshot(run_dir, f"tuned_{task}.json", *extra)
        assert tuned_report["teacher_result"]["metrics"] == start["teacher_result"]["metrics"]
        assert tuned_report["metrics"] != start["metrics"]  # the student was tuned


def test_pretrain_student_init_from_uta_checkpoints(full_run, tuned, uta_ckpt, tmp_path):
    """student.init takes a pre-training or contrastive-tuning checkpoint (the student part);
    a fine-tuning checkpoint or a student of another shape is a clear error, not a
    load_state_dict traceback."""
    from uta_cli.workflows.pretrain import run_pretrain

    teacher_dir = ckpt.load_meta(ckpt.resolve_checkpoint(uta_ckpt))["teacher"]["model"][
        len("local-dir:"):]

    def pretrain(init, name, **extra):
        sets = tiny_overrides(teacher_dir, steps=1, **{"student.init": init, "optim.lr": 0.0,
                                                       "train.checkpoint_every": 1, **extra})
        return run_pretrain(load_recipe("demo", sets), output_dir=str(tmp_path / name),
                            resume="never")

    pretrain(str(tuned[0]), "from_tuned")  # lr 0: the checkpoint holds the initial student
    tuned_student = {k[len("visual.student."):]: v
                     for k, v in weights(ckpt.latest_checkpoint(str(tuned[0]))).items()
                     if k.startswith("visual.student.")}
    got = weights(ckpt.latest_checkpoint(str(tmp_path / "from_tuned")))
    assert got.keys() == tuned_student.keys()
    assert all(torch.equal(got[k], v) for k, v in tuned_student.items())
    with pytest.raises(UtaUsageError, match="'classification' checkpoint"):
        pretrain(str(full_run[0]), "from_cls")
    with pytest.raises(UtaUsageError, match=r"student.width=48 \(checkpoint: 32\)"):
        pretrain(uta_ckpt, "wider", **{"student.width": 48})


# ------------------------------------------------------------------------------ distribution

_TWO_PROC = """
import sys
from uta_cli.workflows.finetune import run_finetune
from uta_cli.workflows.pretrain import run_pretrain
from uta_cli.recipe import load_recipe
init, out = sys.argv[1], sys.argv[2]
for name, sets in ({sets!r}).items():
    run, extra = (run_pretrain, []) if name == "demo" else (run_finetune, ["init=" + init])
    run(load_recipe(name, sets + extra), output_dir=out + "/" + name, resume="never")
"""


def test_two_processes_equal_one_process_with_the_same_global_batch(uta_ckpt, tmp_path):
    """One torchrun launch for three checks: fine-tuning (classification, contrastive) on 2
    processes ends with the weights of 1 process; their validation (top-1 / top-5 / loss, and
    contrastive tuning's zero-shot), sharded across the processes, gives the figures of 1; and
    pre-training's validation on tar shards limited
    to data.val_samples is one set (the first N samples) for 1 or 2 processes (lr 0: the same
    weights either way, so only the validation set can differ)."""
    from test_scale import write_shards

    common = {**BASE, "schedule.steps": 4, "train.val_every": 0, "finetune.val_at_start": False}
    cls = {**common, "finetune.ema_decay": 0.9, "finetune.layer_decay": 0.6,
           "finetune.label_smoothing": 0.1, "finetune.zeroshot_head": True}
    write_shards(tmp_path / "val", 3, 3, size=20, uneven=True)  # 3, 4, 5 samples
    write_shards(tmp_path / "train", 4, 4, size=20, seed=1)
    teacher = os.path.join(os.path.dirname(uta_ckpt), "clip")
    pre = dict(s.split("=", 1) for s in tiny_overrides(teacher, steps=1))
    pre.update({"optim.lr": 0, "train.val_every": 0, "data.num_workers": 2,
                "data.source": str(tmp_path / "train" / "shard-{00..03}.tar"),
                "data.samples_per_epoch": 16,
                "data.val_source": str(tmp_path / "val" / "shard-{00..02}.tar"),
                "data.val_samples": 5})  # the first shard and 2 of the second
    runs = {"finetune_demo": cls, "contrastive_demo": dict(common), "demo": pre}

    def sets(d, batch):
        return [f"{k}={v}" for k, v in {**d, "data.batch_size": batch}.items()]

    script = tmp_path / "two.py"
    script.write_text(_TWO_PROC.format(sets={n: sets(d, 4) for n, d in runs.items()}))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(free_port()), str(script), uta_ckpt,
                          str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    from uta_cli.workflows.pretrain import run_pretrain

    for name, d in runs.items():
        if name == "demo":
            run_pretrain(load_recipe(name, sets(d, 8)), output_dir=str(tmp_path / "one" / name),
                         resume="never")
        else:
            run_finetune(load_recipe(name, sets(d, 8) + [f"init={uta_ckpt}"]),
                         output_dir=str(tmp_path / "one" / name), resume="never")
        val = {n: [r for r in metrics(tmp_path / n / name) if r.get("event") == "val"][-1]
               for n in ("one", "two")}
        keys = sorted(k for k in val["one"] if k.startswith("val_"))
        assert keys == sorted(k for k in val["two"] if k.startswith("val_")) and keys
        for k in keys:
            assert val["two"][k] == pytest.approx(val["one"][k], rel=1e-4, abs=1e-5), (name, k)
        one = weights(ckpt.latest_checkpoint(str(tmp_path / "one" / name)))
        two = weights(ckpt.latest_checkpoint(str(tmp_path / "two" / name)))
        assert one.keys() == two.keys()
        for k in one:
            torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=f"{name} {k}")
        end = [r for r in metrics(tmp_path / "two" / name) if r.get("event") == "end"][-1]
        assert end["rank_weights"][0] == end["rank_weights"][1]


# ------------------------------------------------------------------------------------- data


def _png(rng, size=36) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_class_folders_tar_shards_and_caption_files(uta_ckpt, tmp_path):
    rng = np.random.default_rng(0)
    write_images(tmp_path / "train", 24, classes=("red_thing", "blue_thing", "green_thing"))
    write_images(tmp_path / "val", 9, seed=1, classes=("red_thing", "blue_thing", "green_thing"))
    s = finetune("classification", uta_ckpt, tmp_path / "folder", **{
        "data.source": str(tmp_path / "train"), "data.val_source": str(tmp_path / "val"),
        "finetune.zeroshot_head": True, "finetune.templates": "simple", "schedule.steps": 2})
    assert s["val"]["val_acc1"] >= 0 and s["first_val"]["step"] == 0
    meta = ckpt.load_meta(ckpt.latest_checkpoint(str(tmp_path / "folder")))
    assert meta["classnames"] == ["blue thing", "green thing", "red thing"]

    # webdataset shards with labels (.cls) and captions (.txt): both tasks read them
    for shard in range(2):
        with tarfile.open(tmp_path / f"shard-{shard}.tar", "w") as tar:
            for i in range(8):
                _add(tar, f"s{shard}_{i:03d}.png", _png(rng))
                _add(tar, f"s{shard}_{i:03d}.cls", str(i % 3).encode())
                _add(tar, f"s{shard}_{i:03d}.txt", f"a photo of thing {i % 3}".encode())
    shards = str(tmp_path / "shard-{0..1}.tar")
    with pytest.raises(UtaUsageError, match="num_classes"):
        finetune("classification", uta_ckpt, tmp_path / "tar", **{"data.source": shards})
    finetune("classification", uta_ckpt, tmp_path / "tar", **{
        "data.source": shards, "finetune.num_classes": 3, "data.samples_per_epoch": 16,
        "data.val_source": shards, "finetune.zeroshot_head": False, "schedule.steps": 2})
    vals = [r for r in metrics(tmp_path / "tar") if r.get("event") == "val"]
    assert len(vals) == 2 and "val_acc5" in vals[0]
    finetune("contrastive", uta_ckpt, tmp_path / "tarc", **{
        "data.source": shards, "data.samples_per_epoch": 16, "schedule.steps": 2})
    assert metrics(tmp_path / "tarc")[-1]["event"] == "end"

    # a CSV of (image path, caption), paths relative to the file
    rows = ["image,caption"] + [f"train/{p.parent.name}/{p.name},a {p.parent.name}"
                                for p in sorted((tmp_path / "train").rglob("*.png"))]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    finetune("contrastive", uta_ckpt, tmp_path / "csv", **{
        "data.source": str(tmp_path / "pairs.csv"), "data.val_source": str(tmp_path / "val"),
        "finetune.templates": "simple", "schedule.steps": 2})
    assert [r["step"] for r in metrics(tmp_path / "csv") if r.get("event") == "val"] == [0, 2]
    (tmp_path / "bad.csv").write_text("image,caption\nnope.png,a thing\n")
    with pytest.raises(UtaUsageError, match="do not exist"):
        finetune("contrastive", uta_ckpt, tmp_path / "bad", **{
            "data.source": str(tmp_path / "bad.csv")})


def test_timm_and_open_clip_starts(uta_ckpt, tmp_path):
    import open_clip
    import timm

    # timm: a local weights file, the model's own normalisation, timm's layer groups
    s = finetune("classification", "timm:test_vit", tmp_path / "timm", **{
        "finetune.init_weights": _timm_file(tmp_path), "finetune.zeroshot_head": False,
        "student.timm_kwargs": "{img_size: 32}", "finetune.layer_decay": 0.5,
        "schedule.steps": 1, "train.val_every": 0})
    meta = ckpt.load_meta(s["checkpoint"])
    assert meta["backbone"]["kind"] == "timm" and meta["preprocess"]["size"] == 32
    state = torch.load(os.path.join(s["checkpoint"], "training_state.pt"), weights_only=True)
    depth = len(timm.create_model("test_vit").blocks)
    assert sorted({g["lr_scale"] for g in state["optimizer"]["param_groups"]}) == \
        pytest.approx([0.5 ** (depth + 1 - layer) for layer in range(depth + 2)])

    # open_clip: its image tower, and a zero-shot head from its own text tower that starts
    # exactly at the CLIP's zero-shot top-1
    folder = os.path.join(os.path.dirname(uta_ckpt), "clip")
    s = finetune("classification", f"open_clip:local-dir:{folder}", tmp_path / "oc", **{
        "finetune.zeroshot_head": True, "schedule.steps": 1})
    clip = open_clip.create_model(f"local-dir:{folder}").eval()
    zs = zeroshot_top1(clip.encode_image, clip, open_clip.get_tokenizer(f"local-dir:{folder}"),
                       {"student_preprocess": ckpt.load_meta(s["checkpoint"])["preprocess"]}, 32)
    assert s["first_val"]["val_acc1"] == zs["acc1"] and s["first_val"]["val_acc5"] == zs["acc5"]


# -------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("sets, needle", [
    ({"task": "pretrain"}, "task: classification"),
    ({"init": "/no/such/run"}, "does not exist"),
    ({"finetune.mixup": 0.8, "data.batch_size": 7}, "even"),
    ({"finetune.layer_decay": 1.5}, "layer_decay"),
    ({"init": "timm:test_vit", "finetune.zeroshot_head": True}, "projection"),
    ({"finetune.classnames": "imagenet"}, "gives 1000 names, but the data has 16 classes"),
])
def test_bad_input_is_a_usage_error(sets, needle, tmp_path, uta_ckpt):
    sets = {"init": uta_ckpt, **sets}
    if sets["init"].startswith("timm:"):
        sets["finetune.init_weights"] = _timm_file(tmp_path)
        sets["student.timm_kwargs"] = "{img_size: 32}"
    init = sets.pop("init")
    with pytest.raises(UtaUsageError, match=needle):
        finetune("classification", init, tmp_path, **sets)


def test_an_open_clip_folder_as_init_names_the_open_clip_form(uta_ckpt):
    import re

    from uta_cli.loading.starts import resolve_init, student_init_state
    from uta_cli.recipe import StudentConfig

    folder = os.path.join(os.path.dirname(uta_ckpt), "clip")  # the tiny CLIP: no meta.json
    with pytest.raises(UtaUsageError, match=re.escape(f"init=open_clip:local-dir:{folder}")):
        resolve_init(folder)
    with pytest.raises(UtaUsageError, match="student.init .* is an open_clip folder"):
        student_init_state(folder, StudentConfig(), 32)
    assert resolve_init(f"open_clip:local-dir:{folder}").kind == "open_clip"


def _timm_file(tmp_path) -> str:
    """Weights of timm's tiny test ViT at 32 px, as a local file (tests never download)."""
    import timm
    from safetensors.torch import save_file

    path = str(tmp_path / "test_vit.safetensors")
    save_file(timm.create_model("test_vit", img_size=32, num_classes=0).state_dict(), path)
    return path


def test_cli_reports_bad_input_as_exit_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "uta_cli", "finetune", "demo", "--output-dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "task: classification" in " ".join(out.stderr.split())


def test_classnames_file_in_another_order_maps_to_the_folders(tmp_path):
    from uta_cli.data.pipeline import EvalTransform, View
    from uta_cli.tasks.tuning_data import open_data

    classes = ("red_thing", "blue_thing", "green_thing")
    write_images(tmp_path / "train", 6, classes=classes)
    view = View("image", 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    names = tmp_path / "names.txt"
    names.write_text("red thing\ngreen thing\nblue thing\n")
    recipe = recipe_for("classification", "unused", **{"data.source": str(tmp_path / "train"),
                                                       "finetune.classnames": str(names)})
    data = open_data(recipe, EvalTransform([view]), EvalTransform([view]), 0, 1)
    assert data.classnames == ["blue thing", "green thing", "red thing"]  # label order
    assert "mapped by name" in data.classnames_note
    names.write_text("rot\ngruen\nblau\n")
    data = open_data(recipe, EvalTransform([view]), EvalTransform([view]), 0, 1)
    assert data.classnames == ["rot", "gruen", "blau"]
    assert "'blue thing' -> 'rot'" in data.classnames_note


def test_classification_validation_is_read_by_every_process_a_share_each(tmp_path):
    """Each process validates its share (the sums are reduced, test above): the shares of 3
    processes are disjoint and together the whole validation set, in folders and tar shards."""
    from test_scale import write_shards

    from uta_cli.data.pipeline import ArrayImageDataset, EvalTransform, View, open_dataset
    from uta_cli.tasks.classification import ClassificationTask
    from uta_cli.tasks.tuning_data import DataSpec
    from uta_cli.workflows.finetune import _eval_batches

    assert ClassificationTask.validates_on_every_rank
    tf = EvalTransform([View("image", 16, (0.5,) * 3, (0.5,) * 3)])
    rng = np.random.default_rng(0)
    write_shards(tmp_path, 4, 3, size=16)
    for val in (ArrayImageDataset(rng.integers(0, 255, (13, 16, 16, 3), dtype=np.uint8),
                                  np.arange(13) % 3, tf),
                open_dataset(str(tmp_path / "shard-{00..03}.tar"), "auto", tf)):
        data = DataSpec(None, val, None, 3, [], "folder", "")
        recipe = recipe_for("classification", "scratch", **{"data.num_workers": 0})
        shares = [[int(i) for b in _eval_batches(recipe, data, tf, rank, 3)()
                   for i in b["sample_id"]] for rank in range(3)]
        whole = [int(i) for b in _eval_batches(recipe, data, tf)() for i in b["sample_id"]]
        assert all(shares) and sorted(sum(shares, [])) == sorted(whole)
        assert len(whole) == len(set(whole)) == (13 if isinstance(val, ArrayImageDataset) else 12)
