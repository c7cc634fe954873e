"""The speed and memory levers change nothing but speed and memory: activation checkpointing
and torch.compile in real (tiny) pre-training runs, and the fast training render."""

from __future__ import annotations

import torch
from conftest import tiny_overrides
from rich.console import Console
from safetensors.torch import load_file

from uta_cli import checkpoint as ckpt
from uta_cli.pretrain import run_pretrain
from uta_cli.recipe import load_recipe


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
