"""`uta finetune` end to end: recipe -> starting model, data -> task -> the one engine -> report.

Two tasks, chosen by the recipe's `task` (docs/method.md §7):
- classification: a backbone (a UTA student, a timm model or an open_clip image tower) with a
  linear head, or a head initialised from the teacher's text embeddings of the class names
  (`finetune.zeroshot_head`), so that training starts at the zero-shot accuracy;
- contrastive: the UTA student as the image tower of its teacher's CLIP, the text tower tuned or
  locked, trained with open_clip's ClipLoss (`tasks/contrastive.py`, the demo teacher's code).

`run_finetune` is what the command calls; a notebook can call it too.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence

from accelerate.utils import set_seed
from rich.console import Console
from rich.table import Table
from torch import nn

from uta_cli.data.demo import demo_splits
from uta_cli.data.pipeline import (
    ArrayImageDataset,
    EvalTransform,
    MaskCollator,
    Source,
    View,
)
from uta_cli.errors import UtaUsageError
from uta_cli.evaluate.class_weights import (
    cached_classifier,
    default_cache_dir,
    zeroshot_accuracy,
    zeroshot_accuracy_in_shares,
)
from uta_cli.evaluate.zeroshot import (
    TEXT_CONTEXTS,
    TextEncoder,
)
from uta_cli.loading.model import STUDENT_PREFIX
from uta_cli.loading.starts import Start, load_open_clip_init, load_timm_backbone, resolve_init
from uta_cli.models.release import ReleaseTextTower
from uta_cli.models.student import UTAStudent
from uta_cli.models.teacher import CLIPTeacher, load_teacher, teacher_tokenizer
from uta_cli.progress import metric_text
from uta_cli.recipe import Recipe
from uta_cli.tasks.classification import (
    ClassificationModel,
    ClassificationTask,
    KeyedMixup,
    RandAugmentTrainTransform,
    ZeroShotHead,
    eval_loader,
)
from uta_cli.tasks.contrastive import ContrastiveTask, uta_clip
from uta_cli.tasks.demo_teacher import ensure_demo_teacher
from uta_cli.tasks.tuning_data import DataSpec, first_samples, open_data, train_source
from uta_cli.train.engine import Engine
from uta_cli.train.setup import engine_config, make_accelerator, run_directory
from uta_cli.train.sharding import check_sharding, shard_model, wants_sharding

TASKS = ("classification", "contrastive")


# ----------------------------------------------------------------------------------------------
# checks that need no model (they run before anything heavy)


def check_recipe(recipe: Recipe) -> None:
    r, f = recipe, recipe.finetune
    if r.task not in TASKS:
        raise UtaUsageError(f"Recipe '{r.name}' has task: {r.task}. `uta finetune` runs "
                            f"task: classification or task: contrastive (add the line to the "
                            f"recipe, or --set task=classification); pre-training is "
                            f"`uta pretrain`.")
    check_sharding(r.train.sharding, r.train.precision)
    if r.train.sharding == "fsdp" and r.task == "contrastive":
        raise UtaUsageError("train.sharding=fsdp covers pre-training and classification "
                            "fine-tuning; contrastive tuning runs with DDP (FSDP2 cannot shard "
                            "the CLIP's scalar logit_scale parameter). Use --set "
                            "train.sharding=ddp.")
    if r.student.init:
        raise UtaUsageError("student.init is pre-training's warm start; `uta finetune` starts "
                            f"from `init`. Use --set init={r.student.init} instead.")
    if not r.data.source:
        raise UtaUsageError(f"data.source is not set in recipe '{r.name}'. Point it at the "
                            f"training data, e.g. --set data.source=/data/imagenet/train.")
    if r.data.batch_size < 1 or r.train.grad_accum < 1:
        raise UtaUsageError("data.batch_size and train.grad_accum must be at least 1.")
    if r.data.decode == "gpu":
        raise UtaUsageError("data.decode=gpu serves pre-training (uta pretrain); fine-tuning's "
                            "augmentations run on decoded images in the loader workers. Use "
                            "data.decode=auto or cpu here.")
    if r.train.compile is True:
        raise UtaUsageError("train.compile compiles UTA pre-training (`uta pretrain`); "
                            "`uta finetune` runs eager. Drop --set train.compile=true.")
    if len(r.data.crop_scale) != 2 or not 0 < r.data.crop_scale[0] <= r.data.crop_scale[1] <= 1:
        raise UtaUsageError("data.crop_scale must be [low, high] with 0 < low <= high <= 1.")
    if not 0 < f.layer_decay <= 1:
        raise UtaUsageError(f"finetune.layer_decay must be in (0, 1] (1 = off; EVA-02 uses "
                            f"0.65 for ViT-B); got {f.layer_decay}.")
    if f.text_context not in TEXT_CONTEXTS:
        raise UtaUsageError(f"finetune.text_context must be one of {', '.join(TEXT_CONTEXTS)}; "
                            f"got {f.text_context!r}.")
    if not 0 <= f.label_smoothing < 1:
        raise UtaUsageError(f"finetune.label_smoothing must be in [0, 1); got "
                            f"{f.label_smoothing}.")
    if not 0 <= f.ema_decay < 1:
        raise UtaUsageError(f"finetune.ema_decay must be in [0, 1) (0 = off, e.g. 0.9999); got "
                            f"{f.ema_decay}.")
    if f.mixup < 0 or f.cutmix < 0 or not 0 <= f.mixup_prob <= 1 or \
            not 0 <= f.mixup_switch_prob <= 1:
        raise UtaUsageError("finetune.mixup and finetune.cutmix are alphas >= 0 (0 = off); "
                            "finetune.mixup_prob and mixup_switch_prob are in [0, 1].")
    if (f.mixup > 0 or f.cutmix > 0) and r.data.batch_size % 2:
        raise UtaUsageError(f"Mixup/CutMix mix a batch with its reverse and need an even "
                            f"data.batch_size; got {r.data.batch_size}.")
    if f.num_classes < 0:
        raise UtaUsageError("finetune.num_classes must be >= 0 (0 = from the data).")
    if r.task == "contrastive":
        if r.init.startswith(("timm:", "open_clip:")):
            raise UtaUsageError(
                "Contrastive tuning trains a UTA student with its teacher's text tower: set init "
                "to a UTA checkpoint or run directory (or leave it empty for a random student "
                "against `teacher`), not a timm:/open_clip: model.")
        unused = [k for k, on in (("mixup", f.mixup > 0), ("cutmix", f.cutmix > 0),
                                  ("ema_decay", f.ema_decay > 0),
                                  ("zeroshot_head", f.zeroshot_head),
                                  ("label_smoothing", f.label_smoothing > 0),
                                  ("layer_decay", f.layer_decay != 1)) if on]
        if unused:
            raise UtaUsageError(f"finetune.{unused[0]} is a classification setting; contrastive "
                                f"tuning does not use it. Remove it or set task: classification.")


# ----------------------------------------------------------------------------------------------
# the starting model


def start_teacher(recipe: Recipe, start: Start, acc, say) -> CLIPTeacher | ReleaseTextTower:
    """The CLIP whose text tower gives class embeddings (and is tuned in contrastive): a UTA
    checkpoint's own text side (its verified teacher, tuned or a release's), else the recipe's
    teacher."""
    if start.is_uta:
        relocated = recipe.teacher.weights if recipe.teacher.weights not in ("", "demo") else ""
        return start.text_tower(relocated)
    model, weights = recipe.teacher.model, recipe.teacher.weights
    if weights == "demo":
        model, weights = "local-dir:" + ensure_demo_teacher(recipe.demo, acc, say), ""
    return load_teacher(model, weights)


def student_view(name: str, start: Start, recipe: Recipe) -> View:
    """The student's input: a UTA checkpoint's recorded preprocessing (what it was trained on),
    else the recipe's size and normalisation."""
    if start.is_uta:
        return start.preprocess(recipe.data.mean, recipe.data.std).view(name)
    return View(name, recipe.student.image_size, tuple(recipe.data.mean),
                tuple(recipe.data.std))


# ----------------------------------------------------------------------------------------------
# the two tasks


def _eval_batches(recipe: Recipe, data: DataSpec, transform: EvalTransform, rank: int = 0,
                  world: int = 1):
    """This process's share of the validation data, one ordered pass per call (all of it with
    the default world of 1); tar shards limited to their first data.val_samples samples."""
    if data.val is None:
        return None
    source = Source(data.val, transform, MaskCollator(None, (1, 1), 0),
                    max(recipe.data.batch_size, 64), recipe.data.num_workers, 0, rank, world,
                    shuffle=False, drop_last=False, evaluation=True,
                    limit=recipe.data.val_samples)
    return source.one_pass


def build_classification(recipe: Recipe, start: Start, acc, say) -> ClassificationTask:
    f = recipe.finetune
    set_seed(recipe.seed)  # the same initial backbone and head on every rank and every run
    text = None  # (clip, tokenizer, identity, cacheable) giving the zero-shot head
    teacher_identity = start.meta.get("teacher")
    if start.kind == "timm":
        backbone, preprocess = load_timm_backbone(
            start.location, f.init_weights, recipe.student.timm_kwargs, recipe.student.drop_path,
            recipe.data.mean, recipe.data.std)
        view = preprocess.view("image")
        width, proj = backbone.num_features, None
        backbone_meta = {"kind": "timm", "model": start.location,
                         "timm_kwargs": recipe.student.timm_kwargs}
    elif start.kind == "open_clip":
        clip, identity, preprocess = _open_clip_init(recipe, start, acc, say)
        backbone, width, proj = clip.visual, identity.embed_dim, nn.Identity()
        view = preprocess.view("image")
        text = (clip, teacher_tokenizer(identity.model), identity, True)
        teacher_identity = identity.to_dict()
        backbone_meta = {"kind": "open_clip", "open_clip": identity.to_dict()}
    else:  # a UTA student: pre-trained, contrastively tuned, or random
        if f.zeroshot_head:
            teacher = start_teacher(recipe, start, acc, say)
            # cacheable: not a tuned text tower (the teacher identity, the cache key, would
            # not tell it from the original)
            text = (teacher.clip, teacher.tokenizer, teacher.identity,
                    start.kind != "uta-contrastive")
            teacher_identity = teacher.identity.to_dict()
            set_seed(recipe.seed)  # building the demo teacher (first use) draws from it
        if start.kind == "scratch":
            embed_dim = text[2].embed_dim if text else recipe.student.width
            student = UTAStudent(recipe.student, embed_dim)
        else:
            student = start.student(recipe.student.drop_path)
        backbone, width, proj = student.trunk, student.cfg.width, student.head
        view = student_view("image", start, recipe)
        backbone_meta = {"kind": "uta-student", "student": dataclasses.asdict(student.cfg),
                         "embed_dim": student.embed_dim}

    train_tf = RandAugmentTrainTransform(view, tuple(recipe.data.crop_scale), recipe.data.hflip,
                                         recipe.seed, f.randaugment)
    val_tf = EvalTransform([view])
    data = open_data(recipe, train_tf, val_tf, acc.process_index, acc.num_processes)
    if data.classnames_note:
        say(f"[yellow]{data.classnames_note}[/yellow]")
    if f.zeroshot_head:
        if proj is None:
            raise UtaUsageError("finetune.zeroshot_head needs a backbone with a projection into "
                                "a CLIP joint space: init from a UTA checkpoint or open_clip:MODEL "
                                "(a timm classifier has none).")
        if data.classnames is None:
            raise UtaUsageError("finetune.zeroshot_head needs class names: set "
                                "finetune.classnames to a file (one per line, in label order) "
                                "or 'imagenet'.")
        say(f"[dim]zero-shot head: {len(data.classnames)} class names x {len(data.templates)} "
            f"templates through the teacher's text tower[/dim]")
        clip, tokenizer, identity, cacheable = text
        # a tuned text tower is not cached: its identity would not tell it from the original
        weights, _ = cached_classifier(TextEncoder(clip, f.text_context), tokenizer,
                                       identity.to_dict(), data.classnames, data.templates,
                                       acc.device, default_cache_dir() if cacheable else "")
        head: nn.Module = ZeroShotHead(proj, weights)
    else:
        head = nn.Linear(width, data.num_classes)
        nn.init.trunc_normal_(head.weight, std=2e-5)  # near-zero start, as EVA-02 / MAE
        nn.init.zeros_(head.bias)
    if recipe.train.grad_checkpointing:  # timm, open_clip and the UTA trunk all have it
        backbone.set_grad_checkpointing(True)
    model = ClassificationModel(backbone, head).requires_grad_(True)
    mixup = None
    if f.mixup > 0 or f.cutmix > 0:
        mixup = KeyedMixup(f.mixup, f.cutmix, f.mixup_prob, f.mixup_switch_prob,
                           f.label_smoothing, data.num_classes, recipe.seed)
    meta = {"backbone": backbone_meta, "num_classes": data.num_classes,
            "classnames": data.classnames, "head": "zeroshot" if f.zeroshot_head else "linear",
            "init": start.describe(), "teacher": teacher_identity,
            "preprocess": {"size": view.size, "mean": list(view.mean), "std": list(view.std),
                           "interpolation": view.interpolation}}
    if data.val is None:
        say("[yellow]No validation data (data.val_source): no top-1 during training and no "
            "best checkpoint.[/yellow]")
    return ClassificationTask(model, train_source(recipe, data, train_tf, acc.process_index,
                                                  acc.num_processes),
                              view, _eval_batches(recipe, data, val_tf, acc.process_index,
                                                  acc.num_processes), data.num_classes,
                              seed=recipe.seed, layer_decay=f.layer_decay,
                              label_smoothing=f.label_smoothing, mixup=mixup,
                              ema_decay=f.ema_decay, ema_warmup=f.ema_warmup, meta=meta)


def _open_clip_init(recipe: Recipe, start: Start, acc, say):
    model, weights = start.location, recipe.finetune.init_weights
    if model == "demo":  # the cached demo teacher's image tower
        model, weights = "local-dir:" + ensure_demo_teacher(recipe.demo, acc, say), ""
    loaded = load_open_clip_init(model, weights)
    if recipe.student.drop_path > 0:
        say("[yellow]open_clip image towers have no drop path; student.drop_path is "
            "ignored.[/yellow]")
    return loaded


def build_contrastive(recipe: Recipe, start: Start, acc, say
                      ) -> tuple[ContrastiveTask, Callable[[], dict] | None]:
    """The task, and for the demo data a function giving the teacher's own zero-shot top-1 on
    the same held-out images (the number contrastive tuning is measured against)."""
    f = recipe.finetune
    teacher = start_teacher(recipe, start, acc, say)
    set_seed(recipe.seed)
    if start.kind == "scratch":
        student = UTAStudent(recipe.student, teacher.embed_dim)
    else:
        student = start.student(recipe.student.drop_path)
    if student.embed_dim != teacher.embed_dim:
        raise UtaUsageError(f"The student projects to {student.embed_dim} dimensions, the "
                            f"teacher's text tower to {teacher.embed_dim}.")
    student.set_grad_checkpointing(recipe.train.grad_checkpointing)
    view = student_view("image", start, recipe)
    model = uta_clip(teacher.clip, student, text_locked=f.text_locked)
    train_tf = RandAugmentTrainTransform(view, tuple(recipe.data.crop_scale), recipe.data.hflip,
                                         recipe.seed, f.randaugment)
    val_tf = EvalTransform([view])
    data = open_data(recipe, train_tf, val_tf, acc.process_index, acc.num_processes)
    if data.classnames_note:
        say(f"[yellow]{data.classnames_note}[/yellow]")
    # every process validates its share (the engine calls validate on every process)
    batches = _eval_batches(recipe, data, val_tf, acc.process_index, acc.num_processes)
    validate = None
    if batches is not None and data.classnames:
        def validate(clip: nn.Module) -> dict:
            r = zeroshot_accuracy_in_shares(clip, teacher.tokenizer, data.classnames,
                                            data.templates, batches(), view, acc,
                                            f.text_context)
            return {"val_zeroshot_acc1": r["acc1"], "val_zeroshot_acc5": r["acc5"]}
    else:
        say("[yellow]No labelled validation data with class names (data.val_source, "
            "finetune.classnames): no zero-shot accuracy during tuning.[/yellow]")
    ident = teacher.identity
    meta = {"student": dataclasses.asdict(student.cfg), "embed_dim": student.embed_dim,
            "teacher": ident.to_dict(), "teacher_input_size": teacher.image_size,
            "student_preprocess": {"size": view.size, "mean": list(view.mean),
                                   "std": list(view.std), "interpolation": view.interpolation},
            "weights_layout": {"student": STUDENT_PREFIX, "text": "keys outside 'visual.'"},
            "text_tower": {"locked": f.text_locked, "tuned": not f.text_locked,
                           "tokenizer": ident.model, "from": start.location or "teacher"},
            "init": start.describe()}
    source = train_source(recipe, data, train_tf, acc.process_index, acc.num_processes)
    task = ContrastiveTask(model, teacher.tokenizer, source, view, validate, meta,
                           name="uta-contrastive", validates_on_every_rank=True)
    reference = None
    # (a released file's text tower has no CLIP image tower to measure)
    if data.kind == "demo" and validate is not None and teacher.kind != "release":
        teacher_view = View("image", teacher.image_size, tuple(ident.mean), tuple(ident.std),
                            ident.interpolation)
        _, split = demo_splits(0, recipe.demo.val_images, recipe.demo.data_seed)
        teacher_val = first_samples(ArrayImageDataset(split.images, split.labels,
                                                      EvalTransform([teacher_view])),
                                    recipe.data.val_samples)

        def reference() -> dict:
            teacher.clip.to(acc.device)
            r = zeroshot_accuracy(teacher.clip, teacher.tokenizer, data.classnames,
                                  data.templates, eval_loader(teacher_val, 256, 0),
                                  teacher_view, acc.device, f.text_context)
            return {"teacher_zeroshot_acc1": r["acc1"], "teacher_zeroshot_acc5": r["acc5"]}
    return task, reference


# ----------------------------------------------------------------------------------------------
# the run


def describe(recipe: Recipe, start: Start) -> Table:
    r, f = recipe, recipe.finetune
    table = Table(title=f"recipe: {r.name} ({r.task})", show_header=False, box=None,
                  padding=(0, 2))
    table.add_row("init", f"{start.kind}  {start.location or ''}".rstrip())
    table.add_row("data", f"{r.data.source}  batch={r.data.batch_size}/process  "
                  f"val={r.data.val_source or ('demo' if r.data.source == 'demo' else 'none')}")
    length = f"{r.schedule.steps} steps" if r.schedule.steps else f"{r.schedule.epochs} epochs"
    table.add_row("schedule", f"{length}  lr={r.optim.lr:g}  warmup="
                  f"{r.schedule.warmup_steps or r.schedule.warmup_epochs}")
    if r.task == "classification":
        table.add_row("optimiser", f"layer_decay={f.layer_decay:g}  weight_decay="
                      f"{r.optim.weight_decay:g}")
        table.add_row("regularise", f"drop_path={r.student.drop_path:g}  label_smoothing="
                      f"{f.label_smoothing:g}  mixup={f.mixup:g}  cutmix={f.cutmix:g}  "
                      f"randaugment={f.randaugment or 'off'}  ema={f.ema_decay:g}")
        table.add_row("head", "zero-shot (teacher text embeddings)" if f.zeroshot_head
                      else "linear")
    else:
        table.add_row("text tower", "locked" if f.text_locked else "tuned")
    table.add_row("train", f"precision={r.train.precision}  accum={r.train.grad_accum}  "
                  f"seed={r.seed}")
    return table


def best_metric_for(recipe: Recipe) -> str:
    spec = recipe.finetune.best_metric
    if spec != "auto":
        return spec
    if recipe.task == "contrastive":
        return "val_zeroshot_acc1"
    return "val_ema_acc1" if recipe.finetune.ema_decay > 0 else "val_acc1"


def run_finetune(recipe: Recipe, output_dir: str = "", resume: str = "auto",
                 console: Console | None = None, allow_changes: Sequence[str] = ()) -> dict:
    """Fine-tune by `recipe` (uta finetune): classification (task: classify) or image-text
    contrastive tuning (task: contrastive) from the checkpoint its `init` names, into a run
    directory (output_dir, else train.output_dir/name). resume and allow_changes as in
    pretrain. Returns the run's summary (run_dir, step, checkpoint, val, ...).
    """
    console = console or Console()
    check_recipe(recipe)
    start = resolve_init(recipe.init)
    acc = make_accelerator(recipe.train.precision)
    main = acc.is_main_process
    say = console.print if main else (lambda *a, **k: None)
    run_dir = run_directory(output_dir or recipe.train.output_dir, recipe.name)
    say(describe(recipe, start))

    reference = None
    if recipe.task == "classification":
        task = build_classification(recipe, start, acc, say)
    else:
        task, reference = build_contrastive(recipe, start, acc, say)
    if recipe.task == "classification" and wants_sharding(recipe.train.sharding):
        task.shard(lambda m: shard_model(m, recipe.train.precision))
        say(f"[dim]model sharded over {acc.num_processes} processes (FSDP2)[/dim]")
    cfg = engine_config(recipe)  # the engine writes config.yaml (or config.<step>.yaml)
    cfg.val_at_start = recipe.finetune.val_at_start
    cfg.best_metric = best_metric_for(recipe)
    engine = Engine(cfg, acc, run_dir)
    label = "fine-tuning" if recipe.task == "classification" else "contrastive tuning"
    result = engine.fit(task, resume=resume, label=label, allow_changes=allow_changes)
    summary = {"run_dir": run_dir, "step": result["step"], "checkpoint": result["checkpoint"],
               "val": result["val"], "best": result["best"], "start": start.describe()}
    if main:
        summary["first_val"] = _first_val(engine)
        if reference is not None:
            summary["reference"] = reference()
            engine.log_metrics({"event": "reference", "step": result["step"],
                                **summary["reference"]})
        report(recipe, summary, console)
    engine.close()
    acc.wait_for_everyone()
    return summary


def _first_val(engine: Engine) -> dict:
    if not os.path.isfile(engine.metrics_path):
        return {}
    with open(engine.metrics_path) as f:
        vals = [json.loads(line) for line in f if '"event": "val"' in line]
    return vals[0] if vals else {}


def report(recipe: Recipe, summary: dict, console: Console) -> None:
    first, last = summary.get("first_val") or {}, summary.get("val") or {}
    if not last:
        console.print(f"Done: step {summary['step']}, checkpoint {summary['checkpoint']}")
        return
    keys = [k for k in last if k.endswith(("acc1", "acc5"))]
    table = Table(title=f"{recipe.task} on held-out images")
    table.add_column("metric")
    table.add_column(f"step {first.get('step', 0)}", justify="right")
    table.add_column(f"step {summary['step']}", justify="right")
    for k in keys:
        table.add_row(k, metric_text(first[k]) if k in first else "-", metric_text(last[k]))
    for k, v in (summary.get("reference") or {}).items():
        if k.endswith("acc1"):
            table.add_row(f"{k} (CLIP teacher)", f"{v:.4f}", f"{v:.4f}")
    console.print(table)
    best = summary.get("best")
    if best:
        console.print(f"best {best['metric']} {best['value']:.4f} at step {best['step']}: "
                      f"{os.path.join(summary['run_dir'], 'checkpoints', 'best')}")
