"""The speed and memory levers change nothing but speed and memory: activation checkpointing
and torch.compile in real (tiny) pre-training runs, and the fast training render."""

from __future__ import annotations

import json

import torch
from conftest import tiny_overrides
from rich.console import Console
from safetensors.torch import load_file

from uta_cli import checkpoint as ckpt
from uta_cli.recipe import load_recipe
from uta_cli.workflows.pretrain import run_pretrain


def pretrain(run_dir, teacher_dir, **sets):
    recipe = load_recipe("demo", tiny_overrides(teacher_dir, **sets))
    summary = run_pretrain(recipe, str(run_dir), resume="never", console=Console(quiet=True))
    return summary, load_file(f"{ckpt.latest_checkpoint(str(run_dir))}/model.safetensors")


def test_grad_checkpointing_trains_to_the_same_weights(tmp_path, tiny_clip_dir, monkeypatch):
    from uta_cli.models import student

    calls = []
    real = student.checkpoint
    monkeypatch.setattr(student, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    common = {"schedule.steps": 3, "train.checkpoint_every": 0, "student.drop_path": 0.1}
    _, plain = pretrain(tmp_path / "plain", tiny_clip_dir, **common)
    assert not calls
    _, recomputed = pretrain(tmp_path / "ckpt", tiny_clip_dir, **common,
                             **{"train.grad_checkpointing": True})
    assert len(calls) == 3 * 2  # every block of every training step (not validation)
    assert plain.keys() == recomputed.keys()
    for k in plain:
        torch.testing.assert_close(recomputed[k], plain[k], rtol=1e-4, atol=1e-5, msg=k)


def first_loss(run_dir) -> float:
    with open(run_dir / "metrics.jsonl") as f:
        return next(json.loads(line)["loss"] for line in f if '"loss"' in line)


def test_compiled_step_gives_the_eager_loss_and_plain_checkpoints(tmp_path, tiny_clip_dir,
                                                                   monkeypatch):
    """One step of a tiny run, compiled and eager: the same loss and weights, and checkpoint
    keys without `_orig_mod`. Inductor's C++ build takes minutes on a 2-core CPU, so the test
    compiles with the aot_eager backend: TorchDynamo's capture of the kept-token forward, the
    loss and the teacher, and AOTAutograd's backward, without kernel generation."""
    from uta_cli.tasks.alignment import use_compile

    assert use_compile("auto", torch.device("cuda"))
    assert not use_compile("auto", torch.device("cpu"))
    compiled = []
    real_compile = torch.compile

    def aot_eager_compile(fn, **kwargs):
        compiled.append(fn)
        return real_compile(fn, **dict(kwargs, backend="aot_eager"))

    monkeypatch.setattr(torch, "compile", aot_eager_compile)
    common = {"schedule.steps": 1, "train.checkpoint_every": 0, "data.val_samples": 8}
    _, eager = pretrain(tmp_path / "eager", tiny_clip_dir, **common)
    assert not compiled  # auto: off on CPU
    _, comp = pretrain(tmp_path / "compiled", tiny_clip_dir, **common, **{"train.compile": True})
    assert len(compiled) == 3  # the student's call, the teacher's tokens, the loss
    assert abs(first_loss(tmp_path / "compiled") - first_loss(tmp_path / "eager")) < 1e-5
    assert comp.keys() == eager.keys()
    assert not any("_orig_mod" in k for k in comp)
    for k in eager:
        torch.testing.assert_close(comp[k], eager[k], rtol=1e-4, atol=1e-5, msg=k)


def write_jpeg(path, width: int, height: int, seed: int) -> None:
    """A smooth photograph-like field: a misplaced crop would change the render a lot."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (height // 64 + 2, width // 64 + 2, 3), dtype=np.uint8)
    Image.fromarray(low).resize((width, height), Image.BICUBIC).save(path, quality=92)


def test_draft_decode_renders_the_same_crop(tmp_path):
    """The reduced-scale JPEG decode of the training path: exactly the plain tensors where the
    crop is too small to draft (ImageNet-size images at these views) and for non-JPEGs; the same
    crop and flip within JPEG noise where it drafts; evaluation never drafts."""
    from PIL import Image

    from uta_cli.data.folders import ImageFolderDataset, decode_image, index_image_folder
    from uta_cli.data.pipeline import EvalTransform, TrainTransform, View

    views = [View("student", 224, (0.5,) * 3, (0.5,) * 3),
             View("teacher", 196, (0.5,) * 3, (0.5,) * 3)]
    train = TrainTransform(views, (0.2, 1.0), hflip=True, seed=3)
    (tmp_path / "a").mkdir()
    write_jpeg(tmp_path / "a" / "small.jpg", 500, 375, seed=0)
    write_jpeg(tmp_path / "a" / "large.jpg", 1024, 768, seed=1)
    Image.open(tmp_path / "a" / "large.jpg").save(tmp_path / "a" / "large.png")
    index = index_image_folder(str(tmp_path))
    names = [f.rsplit("/", 1)[-1] for f in index.files]
    fast = ImageFolderDataset(index, train)
    plain = ImageFolderDataset(index, lambda img, i: train(img, i))  # no draft hook
    drafted = 0
    for epoch in range(6):
        train.set_epoch(epoch)
        for i, name in enumerate(names):
            a, b = fast[i], plain[i]
            with open(index.files[i], "rb") as f:
                img = Image.open(f)
                train.draft(img, i)
                was_drafted = "uta_draft" in img.info
            for view in ("student", "teacher"):
                assert a[view].shape == b[view].shape and a[view].dtype == torch.uint8
                if not was_drafted:
                    assert torch.equal(a[view], b[view]), (name, epoch, view)
                else:
                    diff = (a[view].float() - b[view].float()).abs()
                    assert diff.mean() < 1.5 and diff.quantile(0.99) < 8, (name, epoch, view)
            drafted += was_drafted
            assert not was_drafted or name == "large.jpg"
    assert drafted >= 2  # the large JPEG's bigger crops do draft
    # evaluation decodes at full size: the transform has no draft hook
    evaluation = ImageFolderDataset(index, EvalTransform(views))
    with open(index.files[1], "rb") as f:
        expected = EvalTransform(views)(decode_image(f.read()), 1)
    assert torch.equal(evaluation[1]["student"], expected["student"])
