"""The three pre-training objectives (uta, mim, fd) in the one engine: each trains and records
itself; each loss scores exactly its positions; what enters the student's first block; a MIM
checkpoint works with zero-shot, fine-tuning and export, its [MASK] embedding left behind."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import TINY_CLIP_CFG, tiny_overrides, write_clip_folder
from safetensors.torch import load_file
from typer.testing import CliRunner

from uta_cli import checkpoint as ckpt
from uta_cli.app import app
from uta_cli.errors import UtaUsageError
from uta_cli.loading.model import student_from_checkpoint
from uta_cli.losses import gather_targets
from uta_cli.masks.generate import MaskSpec, generate_masks, keep_indices
from uta_cli.models.student import UTAStudent
from uta_cli.recipe import StudentConfig, load_recipe
from uta_cli.tasks.alignment import masked_from_keep, objective_loss
from uta_cli.workflows.pretrain import run_pretrain

runner = CliRunner()
OBJECTIVES = ("uta", "mim", "fd")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    return write_clip_folder(tmp_path_factory.mktemp("clip"),
                             {**TINY_CLIP_CFG, "init_logit_scale": math.log(50)})


@pytest.fixture(scope="module")
def runs(teacher_dir, tmp_path_factory) -> dict[str, str]:
    """Two optimizer steps of each objective, same recipe otherwise (in-process)."""
    root = tmp_path_factory.mktemp("objectives")
    out = {}
    for objective in OBJECTIVES:
        sets = tiny_overrides(teacher_dir, steps=2, **{"objective": objective,
                                                       "train.checkpoint_every": 2})
        run_pretrain(load_recipe("demo", sets), output_dir=str(root / objective), resume="never")
        out[objective] = str(root / objective)
    return out


def records(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def tiny_student(mask_token: bool = False) -> UTAStudent:
    torch.manual_seed(0)
    cfg = StudentConfig(family="eva", image_size=32, patch_size=8, width=32, depth=2, heads=2,
                        mlp_ratio=2.0)
    return UTAStudent(cfg, embed_dim=24, mask_token=mask_token)


def masks_and_keep(batch: int, ratio: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    masks = generate_masks(MaskSpec(strategy="random", ratio=ratio), (4, 4), 0, 0,
                           np.arange(batch))
    return torch.from_numpy(masks), torch.from_numpy(keep_indices(masks))


# ------------------------------------------------------------------------------ training


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_each_objective_trains_two_steps_and_records_itself(runs, objective):
    folder = ckpt.latest_checkpoint(runs[objective])
    meta = ckpt.load_meta(folder)
    assert meta["objective"] == objective and meta["recipe"]["objective"] == objective
    assert meta["task"] == f"{objective}-alignment" and meta["step"] == 2
    steps = [r for r in records(runs[objective]) if "loss" in r and "step" in r]
    assert [r["step"] for r in steps] == [1, 2]
    # train_s: the wall-clock axis of benchmarks/objectives.py, growing, validation excluded
    assert 0 < steps[0]["train_s"] < steps[1]["train_s"]
    assert all(math.isfinite(r["loss"]) and 0 < r["loss"] < 2 for r in steps)
    val = [r for r in records(runs[objective]) if r.get("event") == "val"][-1]
    # the full-image alignment is reported for every objective; fd's own loss is that one
    assert 0 < val["val_full_loss"] < 2
    assert steps[1]["train_s"] <= val["train_s"] < steps[1]["train_s"] + 0.5
    if objective == "fd":
        assert val["val_full_loss"] == val["val_loss"]
    state = load_file(os.path.join(folder, "model.safetensors"))
    assert ("mask_token" in state) == (objective == "mim")


def test_mim_trains_its_mask_token(runs, teacher_dir):
    sets = tiny_overrides(teacher_dir, steps=2, **{"objective": "mim"})
    torch.manual_seed(0)  # the student run_pretrain builds at seed 0, before training
    init = UTAStudent(load_recipe("demo", sets).student, 32, mask_token=True)
    state = load_file(os.path.join(ckpt.latest_checkpoint(runs["mim"]), "model.safetensors"))
    assert init.mask_token.abs().sum() > 0  # trunc-normal, not zeros
    assert not torch.equal(state["mask_token"], init.mask_token.detach())


def test_a_run_does_not_resume_as_another_objective(runs, teacher_dir):
    sets = tiny_overrides(teacher_dir, steps=4, **{"objective": "fd"})
    with pytest.raises(UtaUsageError, match="Cannot resume a 'fd-alignment' run .* "
                                            "'uta-alignment' checkpoint"):
        run_pretrain(load_recipe("demo", sets), output_dir=runs["uta"], resume="auto")


# ------------------------------------------------------------------------------ the losses


class Echo(torch.nn.Module):
    """A 'student' that returns given tokens: the teacher's at the positions an objective scores
    and noise elsewhere; it checks that it got the inputs its objective feeds."""

    def __init__(self, objective, teacher_tokens, keep, mask):
        super().__init__()
        self.objective, self.t, self.keep, self.mask = objective, teacher_tokens, keep, mask
        self.scored_noise = 0.0

    def forward(self, images, keep_idx=None, mask=None):
        t, noise = self.t, torch.randn_like(self.t)
        if self.objective == "uta":
            assert mask is None and torch.equal(keep_idx, self.keep)
            return gather_targets(t + self.scored_noise * noise, keep_idx)
        if self.objective == "fd":
            assert keep_idx is None and mask is None
            return t + self.scored_noise * noise
        assert keep_idx is None and torch.equal(mask, self.mask)
        scored = torch.cat([torch.zeros_like(mask[:, :1]), mask], dim=1).unsqueeze(-1)
        return torch.where(scored, t + self.scored_noise * noise, 5.0 * noise)  # CLS unscored


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_loss_is_zero_when_the_student_equals_the_teacher_where_it_is_scored(objective):
    torch.manual_seed(0)
    mask, keep = masks_and_keep(batch=3)
    teacher_tokens = torch.randn(3, 17, 24)
    student = Echo(objective, teacher_tokens, keep, mask)
    out = objective_loss(objective, student, torch.zeros(3, 3, 32, 32), teacher_tokens, keep, 16)
    assert float(out["loss"]) == pytest.approx(0.0, abs=1e-6)
    assert float(out["patch_cos"]) == pytest.approx(1.0, abs=1e-6)
    student.scored_noise = 0.5  # now the scored tokens differ: the loss sees it
    assert float(objective_loss(objective, student, torch.zeros(3, 3, 32, 32), teacher_tokens,
                                keep, 16)["loss"]) > 0.01


def test_mask_is_the_complement_of_the_kept_positions():
    mask, keep = masks_and_keep(batch=4, ratio=0.25)
    assert torch.equal(masked_from_keep(keep, 16), mask)
    assert int(mask.sum()) == 4 * 4  # a quarter of 16 patches, per sample


# ------------------------------------------------------------------------------ the student


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_tokens_entering_block_one(objective):
    """uta: CLS + visible tokens; mim and fd: CLS + every patch. For mim, the masked inputs are
    the [MASK] embedding (+ position), whatever the image holds there."""
    student = tiny_student(mask_token=objective == "mim").eval()
    seen = []
    student.trunk.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    mask, keep = masks_and_keep(batch=2)
    images = torch.randn(2, 2, 3, 32, 32)
    teacher_tokens = torch.randn(2, 17, 24)
    with torch.no_grad():
        for x in images:
            objective_loss(objective, student, x, teacher_tokens, keep, 16)
    assert seen[0].shape[1] == {"uta": 1 + keep.shape[1], "mim": 17, "fd": 17}[objective]
    assert seen[0].shape[1] == (9 if objective == "uta" else 17)
    if objective == "mim":
        same = torch.isclose(seen[0], seen[1], atol=1e-6).all(-1)[:, 1:]  # per patch
        assert torch.equal(same, mask)  # masked inputs do not depend on the image, visible do


def test_mim_forward_without_masked_tokens_is_the_plain_forward():
    student = tiny_student(mask_token=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(student(x, mask=torch.zeros(2, 16, dtype=torch.bool)),
                                   student(x), rtol=0, atol=0)
        assert not torch.allclose(student(x, mask=torch.ones(2, 16, dtype=torch.bool)),
                                  student(x))
    with pytest.raises(ValueError, match="no \\[MASK\\] embedding"):
        tiny_student()(x, mask=torch.zeros(2, 16, dtype=torch.bool))


# ------------------------------------------------------------------------------ downstream


def test_mim_checkpoint_zero_shots_fine_tunes_and_exports(runs, tmp_path):
    student, meta = student_from_checkpoint(runs["mim"])
    assert student.mask_token is None and meta["objective"] == "mim"
    trained = load_file(os.path.join(ckpt.latest_checkpoint(runs["mim"]), "model.safetensors"))
    assert all(torch.equal(v, trained[k]) for k, v in student.state_dict().items())

    result = runner.invoke(app, ["zeroshot", "--ckpt", runs["mim"], "--dataset", "demo",
                                 "--workers", "0", "--output-json", str(tmp_path / "zs.json")],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    zs = json.loads((tmp_path / "zs.json").read_text())
    assert zs["num_samples"] == 16 and 0 <= zs["acc1"] <= 1

    out = tmp_path / "mim.pt"
    result = runner.invoke(app, ["export", "--ckpt", runs["mim"], "--format", "torchscript",
                                 "--output", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    exported = torch.jit.load(str(out))
    assert not any("mask_token" in name for name, _ in exported.named_parameters())
    assert json.loads((tmp_path / "mim.pt.json").read_text())["objective"] == "mim"

    from uta_cli.loading.starts import resolve_init

    recipe = load_recipe("finetune_demo", [f"init={runs['mim']}"])
    start = resolve_init(recipe.init)
    assert start.kind == "uta"
    tuned = start.student(drop_path=0.1)
    assert tuned.mask_token is None
    assert torch.equal(tuned.trunk.cls_token, trained["trunk.cls_token"])


@pytest.mark.parametrize("src,dst", [("mim", "uta"), ("uta", "mim")])
def test_pretrain_student_init_across_objectives(runs, teacher_dir, tmp_path, src, dst):
    """A MIM student warm-starts UTA (its [MASK] dropped) and vice versa (a fresh [MASK])."""
    sets = tiny_overrides(teacher_dir, steps=1, **{"objective": dst, "optim.lr": 0.0,
                                                   "student.init": runs[src],
                                                   "train.checkpoint_every": 1})
    run_pretrain(load_recipe("demo", sets), output_dir=str(tmp_path / "run"), resume="never")
    got = load_file(os.path.join(ckpt.latest_checkpoint(str(tmp_path / "run")),
                                 "model.safetensors"))
    ref = load_file(os.path.join(ckpt.latest_checkpoint(runs[src]), "model.safetensors"))
    assert ("mask_token" in got) == (dst == "mim")
    assert all(torch.equal(got[k], ref[k]) for k in got if k != "mask_token")
