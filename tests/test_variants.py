"""The masked-distillation variants (docs/method.md): target normalisation, multi-layer targets,
teacher-attention masks and the unmasked finish, each against a reference; and that a run with
them resumes, zero-shots and exports."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CLIP_CFG, tiny_overrides, write_clip_folder
from eva_teachers import shrunk_teacher_folder
from typer.testing import CliRunner

from uta_cli import checkpoint as ckpt
from uta_cli.app import app
from uta_cli.data.transforms import View
from uta_cli.errors import UtaUsageError
from uta_cli.losses import (
    gather_targets,
    masked_token_loss,
    normalize_targets,
    token_alignment_loss,
)
from uta_cli.masks.generate import attention_keep, attention_noise
from uta_cli.models.student import UTAStudent
from uta_cli.models.teacher import load_teacher
from uta_cli.recipe import StudentConfig, load_recipe
from uta_cli.tasks.alignment import AlignmentTask, masked_from_keep
from uta_cli.workflows.pretrain import run_pretrain

runner = CliRunner()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    return write_clip_folder(tmp_path_factory.mktemp("clip"), TINY_CLIP_CFG)


@pytest.fixture(scope="module")
def eva_dir(tmp_path_factory) -> str:
    return shrunk_teacher_folder(tmp_path_factory.mktemp("eva"), "EVA02-L-14")


def tiny_student(extra_heads: int = 0, mask_token: bool = False) -> UTAStudent:
    torch.manual_seed(0)
    cfg = StudentConfig(family="eva", image_size=32, patch_size=8, width=32, depth=2, heads=2,
                        mlp_ratio=2.0)
    return UTAStudent(cfg, embed_dim=32, mask_token=mask_token, extra_heads=extra_heads)


def make_task(teacher_dir: str, **sets) -> AlignmentTask:
    recipe = load_recipe("demo", tiny_overrides(teacher_dir, **sets))
    teacher = load_teacher(f"local-dir:{teacher_dir}", "")
    layers = teacher.resolve_layers(recipe.align.teacher_layers)
    student = tiny_student(extra_heads=len(layers) - 1, mask_token=recipe.objective == "mim")
    teacher.match_grid(student.grid_size, recipe.teacher.grid_match)
    views = {"student": View("student", 32, (0.5,) * 3, (0.25,) * 3),
             "teacher": View("teacher", teacher.image_size, (0.4,) * 3, (0.3,) * 3)}
    return AlignmentTask(recipe, student, teacher, None, None, views, "")


def fixed_batch(n: int = 3) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"student": torch.rand(n, 3, 32, 32, generator=g),
            "teacher": torch.rand(n, 3, 32, 32, generator=g),
            "keep_idx": torch.stack([torch.randperm(16, generator=g)[:8].sort().values
                                     for _ in range(n)]),
            "mask_noise": torch.from_numpy(attention_noise(0, 0, np.arange(n), 16))}


# ------------------------------------------------------------------------------ targets


def test_target_norm_gives_zero_loss_on_equal_tokens():
    t = torch.randn(2, 5, 16) + 3.0  # tokens with a clear per-token mean
    normed = normalize_targets(t, "layernorm")
    assert float(token_alignment_loss(normed, normed)["loss"]) == pytest.approx(0, abs=1e-6)
    assert float(token_alignment_loss(t, normalize_targets(t, "none"))["loss"]) == \
        pytest.approx(0, abs=1e-6)
    # the norm acts: raw tokens are no longer aligned with their normalised targets ...
    assert float(token_alignment_loss(t, normed)["loss"]) > 0.1
    # ... and it is per token, parameter-free: LayerNorm over channels without weights
    ref = torch.nn.LayerNorm(16, eps=1e-6, elementwise_affine=False)(t)
    assert torch.allclose(normed, ref, atol=1e-6)


def test_teacher_layers_last_is_bit_identical_to_the_single_target_path(teacher_dir):
    task = make_task(teacher_dir)
    assert task.layers == (1,) and task.model.layer_heads is None
    batch = fixed_batch()
    out = task._loss(task.model, batch, train=True)
    # today's path, written out: the teacher's tokens, the visible ones gathered, 1 - cos
    student_in, teacher_in, keep = task._inputs(batch)
    ref = token_alignment_loss(task.model(student_in, keep),
                               gather_targets(task.teacher.tokens(teacher_in), keep))
    assert torch.equal(out["loss"], ref["loss"])
    assert torch.equal(out["patch_cos"], ref["patch_cos"])
    assert sorted(task.model.state_dict()) == sorted(tiny_student().state_dict())
    assert task.checkpoint_meta()["align"] == {"target_norm": "none", "teacher_layers": [1],
                                               "inference_head": "head", "training_only": []}


def test_every_layer_target_goes_through_the_final_norm_and_projection(teacher_dir, eva_dir):
    # native open_clip ViT: open_clip's own forward_intermediates is the reference
    t = load_teacher(f"local-dir:{teacher_dir}", "")
    x = torch.rand(2, 3, 32, 32)
    tokens, _ = t.targets(x, (0, 1))
    assert tokens.shape == (2, 2, 17, 32)
    assert torch.equal(tokens[1], t.tokens(x))
    inter = t.visual.forward_intermediates(x, indices=[0], intermediates_only=True,
                                           output_fmt="NLC", output_extra_tokens=True)
    block0 = torch.cat([inter["image_intermediates_prefix"][0], inter["image_intermediates"][0]],
                       dim=1)
    v = t.visual
    normed = v.ln_post(block0)
    assert torch.allclose(tokens[0], normed @ v.proj, atol=1e-5)
    # EVA/timm tower: timm's forward_intermediates, through the trunk's norm and the heads
    e = load_teacher(f"local-dir:{eva_dir}", "")
    x = torch.rand(2, 3, 224, 224)
    tokens, _ = e.targets(x, (0, 1))
    assert torch.allclose(tokens[1], e.tokens(x), atol=1e-6)
    trunk = e.visual.trunk
    feats = trunk.forward_intermediates(x, indices=[0], norm=True, intermediates_only=True,
                                        output_fmt="NLC", return_prefix_tokens=True)
    patches, prefix = feats[0]
    full = torch.cat([prefix, patches], dim=1)
    cls = e.visual.head(trunk.forward_head(full))
    assert torch.allclose(tokens[0][:, 0], cls, atol=1e-5)
    assert torch.allclose(tokens[0][:, 1:], e.project_timm_tokens(patches), atol=1e-5)


def test_teacher_layers_must_hold_the_last_block(teacher_dir):
    t = load_teacher(f"local-dir:{teacher_dir}", "")
    assert t.resolve_layers([-1, -2, 1]) == [0, 1]
    with pytest.raises(UtaUsageError, match="last block"):
        t.resolve_layers([0])
    with pytest.raises(UtaUsageError, match="outside"):
        t.resolve_layers([-1, 5])


@pytest.mark.parametrize("objective", ["uta", "mim", "fd"])
def test_multi_layer_loss_is_the_mean_over_layers_with_one_head_each(teacher_dir, objective):
    task = make_task(teacher_dir, **{"align.teacher_layers": "[-2,-1]",
                                     "align.target_norm": "layernorm", "objective": objective})
    assert len(task.model.layer_heads) == 1
    batch = fixed_batch()
    out = task._loss(task.model, batch, train=True)
    student_in, teacher_in, keep = task._inputs(batch)
    tokens, _ = task.teacher.targets(teacher_in, (0, 1))
    targets = normalize_targets(tokens, "layernorm")
    heads = [task.model.layer_heads[0], task.model.head]
    if objective == "uta":
        feats = task.model.forward_tokens(student_in, keep)
        per = [token_alignment_loss(h(feats), gather_targets(t, keep))["loss"]
               for h, t in zip(heads, targets)]
    elif objective == "mim":
        mask = masked_from_keep(keep, 16)
        feats = task.model.forward_tokens(student_in, mask=mask)
        per = [masked_token_loss(h(feats), t, mask)["loss"] for h, t in zip(heads, targets)]
    else:
        feats = task.model.forward_tokens(student_in)
        per = [token_alignment_loss(h(feats), t)["loss"] for h, t in zip(heads, targets)]
    assert torch.allclose(out["loss"], (per[0] + per[1]) / 2, atol=1e-6)


# ------------------------------------------------------------------------------ attention


def test_cls_attention_row_equals_the_attention_layers_own_weights(teacher_dir, eva_dir):
    # native: nn.MultiheadAttention's need_weights (heads averaged) is the reference
    t = load_teacher(f"local-dir:{teacher_dir}", "")
    x = torch.rand(2, 3, 32, 32)
    seen = {}
    blk = t.visual.transformer.resblocks[-1]
    h = blk.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    _, attn = t.targets(x, cls_attention=True)
    h.remove()
    q = blk.ln_1(seen["x"])
    _, weights = blk.attn(q, q, q, need_weights=True, average_attn_weights=True)
    ref = weights[:, 0, 1:]  # the CLS row over the patches, renormalised (CLS to itself left out)
    assert torch.allclose(attn, ref / ref.sum(1, keepdim=True), atol=1e-6)
    # timm (EVA02, RoPE): the last block's unfused attention matrix, read at its dropout
    e = load_teacher(f"local-dir:{eva_dir}", "")
    x = torch.rand(2, 3, 224, 224)
    _, attn = e.targets(x, cls_attention=True)
    last = e.visual.trunk.blocks[-1].attn
    last.fused_attn = False
    grabbed = {}
    h = last.attn_drop.register_forward_hook(lambda m, a, o: grabbed.setdefault("a", o))
    e.tokens(x)
    h.remove()
    ref = grabbed["a"].mean(1)[:, 0, 1:]
    assert torch.allclose(attn, ref / ref.sum(1, keepdim=True), atol=1e-5)


def test_a_peaked_attention_always_keeps_its_peak_and_a_uniform_one_covers_evenly():
    n, k, b = 16, 8, 4000
    noise = torch.from_numpy(attention_noise(3, 0, np.arange(b), n))
    peaked = torch.full((b, n), 1e-3)
    peaked[:, 5] = 10.0
    keep = attention_keep(peaked, noise, k)
    assert (keep == 5).any(dim=1).all()
    assert keep.shape == (b, k) and (keep.diff(dim=1) > 0).all()  # distinct, ascending
    coverage = torch.zeros(n).index_add_(0, attention_keep(torch.ones(b, n), noise, k).flatten(),
                                         torch.ones(b * k)) / b
    assert torch.allclose(coverage, torch.full((n,), k / n), atol=0.03)  # sd ~ 0.008
    # proportional: a token with twice the weight is kept more often, and temperature flattens
    p = torch.ones(b, n)
    p[:, 0] = 3.0
    share = lambda keep: float((keep == 0).any(dim=1).float().mean())  # noqa: E731
    assert share(attention_keep(p, noise, 4)) > share(attention_keep(p, noise, 4, 100.0)) + 0.1


def test_the_same_seed_gives_the_same_keep():
    attn = torch.rand(6, 16)
    a = attention_keep(attn, torch.from_numpy(attention_noise(0, 1, np.arange(6), 16)), 8)
    b = attention_keep(attn, torch.from_numpy(attention_noise(0, 1, np.arange(6), 16)), 8)
    assert torch.equal(a, b)
    # a row depends on its sample id only, not on the batch around it
    c = attention_keep(attn[2:3], torch.from_numpy(attention_noise(0, 1, np.array([2]), 16)), 8)
    assert torch.equal(a[2:3], c)
    d = attention_keep(attn, torch.from_numpy(attention_noise(1, 1, np.arange(6), 16)), 8)
    assert not torch.equal(a, d)


def test_grid_matching_maps_the_attention_onto_the_students_grid(tmp_path):
    # a p14 teacher (4x4 grid at 56 px) and a p16 student (3x3 grid at 48 px)
    cfg = {**TINY_CLIP_CFG, "vision_cfg": {**TINY_CLIP_CFG["vision_cfg"], "image_size": 56,
                                           "patch_size": 14}}
    folder = write_clip_folder(tmp_path / "p14", cfg)
    resized = load_teacher(f"local-dir:{folder}", "")
    resized.match_grid((3, 3), "resize")
    x = torch.rand(2, 3, 42, 42)
    tokens, attn = resized.targets(x, cls_attention=True)
    assert tokens.shape[2] == 10 and attn.shape == (2, 9)
    assert torch.allclose(attn.sum(1), torch.ones(2), atol=1e-5)
    inter = load_teacher(f"local-dir:{folder}", "")
    x = torch.rand(2, 3, 56, 56)
    _, own = inter.targets(x, cls_attention=True)  # the teacher's own 4x4 grid
    inter.match_grid((3, 3), "interpolate")
    _, attn = inter.targets(x, cls_attention=True)
    ref = F.interpolate(own.reshape(2, 1, 4, 4), size=(3, 3), mode="bilinear",
                        align_corners=False, antialias=True).reshape(2, 9)
    ref = ref / ref.sum(1, keepdim=True)
    assert attn.shape == (2, 9) and torch.allclose(attn, ref, atol=1e-6)
    # where the teacher attends is where the student's draw concentrates: top-left to top-left
    peak = torch.zeros(1, 16, 1)
    peak[0, 0] = 1.0
    assert int(inter.resample_grid(peak)[0, :, 0].argmax()) == 0


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def variant_runs(teacher_dir, tmp_path_factory) -> dict[str, str]:
    """Every variant at once for uta (unmasked finish included), attention masks for mim."""
    root = tmp_path_factory.mktemp("variants")
    every = {"mask.strategy": "attention", "mask.attention_temperature": 0.5,
             "align.target_norm": "layernorm", "align.teacher_layers": "[-2,-1]"}
    out = {}
    for name, sets in (("uta", {**every, "schedule.unmasked_steps": 2}),
                       ("mim", {**every, "objective": "mim"})):
        recipe = load_recipe("demo", tiny_overrides(teacher_dir, steps=4, **sets))
        run_pretrain(recipe, output_dir=str(root / name), resume="never")
        out[name] = str(root / name)
    return out


@pytest.mark.parametrize("name", ["uta", "mim"])
def test_each_variant_checkpoint_records_itself_zero_shots_and_exports(variant_runs, name,
                                                                       tmp_path):
    run = variant_runs[name]
    folder = ckpt.latest_checkpoint(run)
    meta = ckpt.load_meta(folder)
    assert meta["mask"]["strategy"] == "attention" and meta["mask"]["attention_temperature"] == 0.5
    assert meta["align"] == {"target_norm": "layernorm", "teacher_layers": [0, 1],
                             "inference_head": "head", "training_only": ["layer_heads.*"]}
    assert meta["unmasked_steps"] == (2 if name == "uta" else 0)
    result = runner.invoke(app, ["zeroshot", "--ckpt", run, "--dataset", "demo", "--workers", "0",
                                 "--output-json", str(tmp_path / "zs.json")],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert 0 <= json.loads((tmp_path / "zs.json").read_text())["acc1"] <= 1
    out = tmp_path / "model.pt"
    result = runner.invoke(app, ["export", "--ckpt", run, "--format", "torchscript",
                                 "--output", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    exported = torch.jit.load(str(out))
    assert not any("layer_heads" in n for n, _ in exported.named_parameters())


def test_inspect_mask_attention_draws_through_the_runs_teacher(variant_runs, tmp_path):
    from conftest import write_images

    write_images(tmp_path / "imgs", 6, size=40)
    out = tmp_path / "m.json"
    result = runner.invoke(app, ["inspect-mask", "--strategy", "attention", "--ckpt",
                                 variant_runs["uta"], "--data", str(tmp_path / "imgs"),
                                 "--output-json", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    stats = report["strategies"]["attention"]
    assert stats["attention"]["images"] == 6 and stats["num_visible"] == 8
    assert report["settings"]["samples"] == 6 * stats["attention"]["draws_per_image"] >= 5000
    p = np.array(stats["mask_probability"]["map"])
    assert p.shape == (4, 4) and p.mean() == pytest.approx(0.5, abs=1e-5)
    # where the teacher attends more, tokens stay visible more often (temperature 0.5)
    attn = np.array(stats["attention"]["mean_map"]).ravel()
    assert np.corrcoef(attn, 1 - p.ravel())[0, 1] > 0.5
    result = runner.invoke(app, ["inspect-mask", "--strategy", "attention"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "--ckpt" in result.output


# ------------------------------------------------------------------------------ unmasked finish


def test_the_unmasked_finish_feeds_every_token_in_its_last_steps(teacher_dir):
    task = make_task(teacher_dir, **{"schedule.unmasked_steps": 2})
    seen = []

    def spy(images, keep_idx=None, mask=None, **kw):
        seen.append(None if keep_idx is None else keep_idx.shape[1])
        return task.model(images, keep_idx, mask, **kw)

    notes = [task.begin_step(step, 6) for step in range(6)]
    assert [bool(n) for n in notes] == [False] * 4 + [True, False]
    assert notes[4]["event"] == "unmasked_finish" and notes[4]["step"] == 4
    assert "steps 5-6" in notes[4]["message"]
    for step in (3, 4, 5):
        task.begin_step(step, 6)
        out = task._loss(spy, fixed_batch(), train=True)
        assert out["loss"].requires_grad
    assert seen == [8, None, None]  # 8 of 16 visible, then every token
    # validation keeps the masked objective: the phase changes training only
    task._val_losses(spy, fixed_batch())
    assert seen[3] == 8


def test_the_unmasked_phase_is_logged_and_a_resume_lands_in_it(teacher_dir, tmp_path):
    sets = tiny_overrides(teacher_dir, steps=6, **{"schedule.unmasked_steps": 3,
                                                   "train.checkpoint_every": 5})
    whole = tmp_path / "whole"
    run_pretrain(load_recipe("demo", sets), output_dir=str(whole), resume="never")

    def events(run):
        with open(os.path.join(run, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()]

    phases = [r for r in events(whole) if r.get("event") == "unmasked_finish"]
    assert [(r["step"], r["steps"]) for r in phases] == [(3, 3)]
    # resume from step 5, inside the phase: the same weights at the end as without the stop
    part = tmp_path / "part"
    shutil.copytree(whole, part)
    shutil.rmtree(part / "checkpoints" / ckpt.step_dirname(6))
    step5 = str(part / "checkpoints" / ckpt.step_dirname(5))
    with pytest.raises(UtaUsageError, match="schedule.unmasked_steps"):
        run_pretrain(load_recipe("demo", [*sets, "schedule.unmasked_steps=2"]),
                     output_dir=str(part), resume=step5)
    run_pretrain(load_recipe("demo", sets), output_dir=str(part), resume=step5)
    end = {name: next(r for r in events(run) if r.get("event") == "end")
           for name, run in (("whole", whole), ("part", part))}
    assert end["part"]["rank_weights"] == end["whole"]["rank_weights"]
    assert [r["step"] for r in events(part) if r.get("event") == "unmasked_finish"] == [3, 5]


# ------------------------------------------------------------------------------ the benchmark


def _objectives_benchmark():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "objectives.py")
    spec = importlib.util.spec_from_file_location("objectives_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_figure_without_validation_and_one_evaluation_is_never_blank(teacher_dir,
                                                                              tmp_path):
    import argparse

    from conftest import write_images

    bench = _objectives_benchmark()
    write_images(tmp_path / "imgs", 16, size=40)
    (tmp_path / "t.txt").write_text("a picture of {c}.\n")
    args = argparse.Namespace(
        recipe="demo", evals=1, zeroshot_dataset=str(tmp_path / "imgs"),
        zeroshot_classnames="", zeroshot_templates=str(tmp_path / "t.txt"),
        set=tiny_overrides(teacher_dir, steps=2, **{"data.source": str(tmp_path / "imgs"),
                                                    "data.val_source": ""}))
    run = bench.pretrain(args, "uta", 0, 2, str(tmp_path / "run"),
                         ("align.teacher_layers=[-2,-1]",))
    assert run["val_loss"] is None and len(run["curve"]) == 1
    assert 0 <= run["zeroshot_top1"] <= 1 and run["train_flops"] > 0
    run["finetune_top1"] = 0.5
    shown = bench.plot({"UTA": [run]}, str(tmp_path / "fig.png"), "test")
    assert os.path.getsize(tmp_path / "fig.png") > 0
    panels = list(shown.values())
    assert panels[:2] == [bench.NO_VAL_NOTE] * 2 and panels[2] == "data"
    # nothing at all measured: every panel says so, none is blank
    empty = bench.plot({"UTA": [{**run, "curve": [], "zeroshot_top1": None,
                                 "finetune_top1": None}]}, str(tmp_path / "e.png"), "test")
    assert all(v != "data" and v for v in empty.values())


def test_variant_rows_their_overrides_and_the_winners_rule():
    import argparse

    bench = _objectives_benchmark()
    args = argparse.Namespace(unmasked_share=0.1, evals=1)
    assert bench.variant_overrides(args, ["uta"], 400) == ()
    assert bench.variant_overrides(args, ["attention", "unmasked"], 376) == (
        "mask.strategy=attention", "schedule.unmasked_steps=38")
    assert bench.equal_flops_steps(args, ["unmasked"], 400, 3.0e12, 3.2e12) == 375

    def row(zs, zs_sd, ft=0.9, ft_sd=0.01):
        return {"zeroshot_top1": {"mean": zs, "sd": zs_sd},
                "finetune_top1": {"mean": ft, "sd": ft_sd}}

    summary = {"uta": row(0.90, 0.01), "a": row(0.93, 0.02), "b": row(0.915, 0.02)}
    assert bench.beats(summary, "a") and not bench.beats(summary, "b")
    summary["b"] = row(0.90, 0.01, ft=0.95)  # a fine-tune win counts too
    assert bench.beats(summary, "b")
