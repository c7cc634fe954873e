"""UTA pre-training end to end: recipe -> teacher, student, data -> engine -> zero-shot result.

`run_pretrain` is what `uta pretrain` calls; a notebook can call it too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from accelerate.utils import set_seed
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch.utils.data import Subset

from uta_cli.data.decode import DeviceDecoder, check_decode, resolve_decode
from uta_cli.data.demo import CLASSNAMES, demo_splits
from uta_cli.data.pipeline import (
    ArrayImageDataset,
    EvalTransform,
    MaskCollator,
    Source,
    TrainTransform,
    View,
    detect_format,
    epoch_samples,
    open_dataset,
)
from uta_cli.errors import UtaUsageError
from uta_cli.evaluate.during_training import TrainingZeroShot
from uta_cli.loading.starts import student_init_state
from uta_cli.masks.generate import MaskSpec, validate_mask_spec
from uta_cli.models.student import UTAStudent, fit_training_parts
from uta_cli.models.teacher import load_teacher
from uta_cli.recipe import Recipe
from uta_cli.tasks.alignment import AlignmentTask, use_compile
from uta_cli.tasks.demo_teacher import ensure_demo_teacher, zeroshot_demo
from uta_cli.train.engine import Engine
from uta_cli.train.setup import engine_config, make_accelerator, run_directory
from uta_cli.train.sharding import check_sharding, shard_model, wants_sharding


def describe(recipe: Recipe) -> Table:
    """The resolved recipe in brief."""
    r = recipe
    table = Table(title=f"recipe: {r.name}", show_header=False, box=None, padding=(0, 2))
    table.add_row("student", f"{r.student.family} {r.student.width}x{r.student.depth} "
                  f"p{r.student.patch_size} @ {r.student.image_size}px")
    table.add_row("teacher", f"{r.teacher.model}  weights={r.teacher.weights or '(unset)'}  "
                  f"grid_match={r.teacher.grid_match}")
    table.add_row("objective", r.objective)
    table.add_row("mask", f"{r.mask.strategy}  ratio={r.mask.ratio}"
                  + ("  (unused: fd aligns every token)" if r.objective == "fd" else ""))
    if r.align.target_norm != "none" or list(r.align.teacher_layers) != [-1]:
        table.add_row("align", f"target_norm={r.align.target_norm}  "
                      f"teacher_layers={list(r.align.teacher_layers)}")
    table.add_row("data", f"{r.data.source}  batch={r.data.batch_size}/process  "
                  f"workers={r.data.num_workers}")
    length = f"{r.schedule.steps} steps" if r.schedule.steps else f"{r.schedule.epochs} epochs"
    table.add_row("schedule", f"{length}  lr={r.optim.lr:g}  warmup="
                  f"{r.schedule.warmup_steps or r.schedule.warmup_epochs}")
    table.add_row("train", f"precision={r.train.precision}  accum={r.train.grad_accum}  "
                  f"seed={r.seed}")
    return table


def check_recipe(recipe: Recipe) -> None:
    if getattr(recipe, "task", "pretrain") != "pretrain":
        raise UtaUsageError(f"Recipe '{recipe.name}' is a '{recipe.task}' recipe; run it with "
                            f"`uta finetune {recipe.name}`.")
    if not recipe.data.source:
        raise UtaUsageError(f"data.source is not set in recipe '{recipe.name}'. Point it at your "
                            f"images, e.g. --set data.source=/data/imagenet/train (a folder, an "
                            f"fsspec URL such as s3://bucket/train, or tar shards).")
    if recipe.data.batch_size < 1 or recipe.train.grad_accum < 1:
        raise UtaUsageError("data.batch_size and train.grad_accum must be at least 1.")
    if len(recipe.data.crop_scale) != 2 or not 0 < recipe.data.crop_scale[0] <= \
            recipe.data.crop_scale[1] <= 1:
        raise UtaUsageError("data.crop_scale must be [low, high] with 0 < low <= high <= 1.")
    if recipe.student.image_size % recipe.student.patch_size:
        raise UtaUsageError("student.image_size must be a multiple of student.patch_size.")
    if recipe.schedule.unmasked_steps < 0:
        raise UtaUsageError(f"schedule.unmasked_steps = {recipe.schedule.unmasked_steps} is "
                            f"negative. It counts the last steps run unmasked; set 0 (off) or a "
                            f"positive number below the run's length.")
    if recipe.schedule.unmasked_steps and recipe.objective != "uta":
        why = "has no masked tokens left to score" if recipe.objective == "mim" else \
            "sees every token already"
        raise UtaUsageError(f"schedule.unmasked_steps is for objective uta: {recipe.objective} "
                            f"{why} when nothing is masked. Set schedule.unmasked_steps=0.")
    check_sharding(recipe.train.sharding, recipe.train.precision)
    grid = recipe.student.image_size // recipe.student.patch_size
    validate_mask_spec(MaskSpec(**dataclasses.asdict(recipe.mask)), (grid, grid))
    check_decode(recipe.data.decode)


def run_pretrain(recipe: Recipe, output_dir: str = "", resume: str = "auto",
                 console: Console | None = None, allow_changes: Sequence[str] = ()) -> dict:
    """Pre-train a student by `recipe` (uta pretrain): teacher, student and data from the
    recipe, trained by the engine into a run directory (output_dir, else train.output_dir/name).

    resume: "auto" (this run directory's newest checkpoint, if any), "never", or a checkpoint.
    allow_changes: recipe keys that may differ from the checkpoint's on resume. Returns a
    summary: run_dir, step, checkpoint, val (the last validation) and, on the demo, zeroshot.
    """
    console = console or Console()
    check_recipe(recipe)
    acc = make_accelerator(recipe.train.precision)
    main = acc.is_main_process
    say = console.print if main else (lambda *a, **k: None)
    run_dir = run_directory(output_dir or recipe.train.output_dir, recipe.name)
    say(describe(recipe))

    teacher_model, teacher_weights = recipe.teacher.model, recipe.teacher.weights
    if teacher_weights == "demo":
        folder = ensure_demo_teacher(recipe.demo, acc, say)
        teacher_model, teacher_weights = "local-dir:" + folder, ""
    teacher = load_teacher(teacher_model, teacher_weights)
    if teacher.identity.weights_layout != "open_clip":
        say(f"teacher weights: {teacher.identity.weights_layout} layout detected in "
            f"{teacher_weights}, converted to open_clip's")
    set_seed(recipe.seed)  # the same initial student on every rank
    layers = teacher.resolve_layers(recipe.align.teacher_layers)
    if recipe.mask.strategy == "attention" and recipe.objective != "fd":
        problem = teacher.attention_problem()
        if problem:
            raise UtaUsageError(f"mask.strategy attention needs the teacher's last-layer CLS "
                                f"attention, but teacher '{teacher.identity.model}' cannot give "
                                f"it: {problem}. Use mask.strategy reversed-block (UTA's) or "
                                f"another strategy with this teacher.")
    student = UTAStudent(recipe.student, teacher.embed_dim, mask_token=recipe.objective == "mim",
                         extra_heads=len(layers) - 1)
    if recipe.student.init:
        state, source = student_init_state(recipe.student.init, recipe.student,
                                           teacher.embed_dim)
        student.load_state_dict(fit_training_parts(state, student))
        say(f"student initialised from {source}")
    student.set_grad_checkpointing(recipe.train.grad_checkpointing)
    grid_note = teacher.match_grid(student.grid_size, recipe.teacher.grid_match)
    say(f"[dim]grid: {grid_note}[/dim]")

    views = [View("student", recipe.student.image_size, tuple(recipe.data.mean),
                  tuple(recipe.data.std)),
             View("teacher", teacher.image_size, tuple(teacher.identity.mean),
                  tuple(teacher.identity.std), teacher.identity.interpolation)]
    spec = MaskSpec(**dataclasses.asdict(recipe.mask))
    rank, world = acc.process_index, acc.num_processes
    train_tf = TrainTransform(views, tuple(recipe.data.crop_scale), recipe.data.hflip, recipe.seed)
    val_tf = EvalTransform(views)
    demo_val = None
    if detect_format(recipe.data.source, recipe.data.format) == "demo":
        train_split, demo_val = demo_splits(recipe.demo.train_images, recipe.demo.val_images,
                                            recipe.demo.data_seed)
        train_set = ArrayImageDataset(train_split.images, train_split.labels, train_tf)
        val_set = ArrayImageDataset(demo_val.images, demo_val.labels, val_tf)
    else:
        train_set = open_dataset(recipe.data.source, recipe.data.format, train_tf, rank, world,
                                 recipe.seed, recipe.data.shuffle_buffer,
                                 recipe.data.shuffle_interleave)
        val_set = open_dataset(recipe.data.val_source, "auto", val_tf) \
            if recipe.data.val_source else None
    limit = recipe.data.val_samples  # 0 = all of them
    if val_set is not None and limit > 0 and \
            not isinstance(val_set, torch.utils.data.IterableDataset):
        val_set = Subset(val_set, range(min(len(val_set), limit)))
    collator = MaskCollator(spec, student.grid_size, recipe.seed)
    source = Source(train_set, train_tf, collator, recipe.data.batch_size,
                    recipe.data.num_workers, recipe.seed, rank, world,
                    samples_per_epoch=epoch_samples(recipe.data.source,
                                                     recipe.data.samples_per_epoch))
    if demo_val is None and resolve_decode(recipe.data.decode, train_set, acc.device) == "gpu":
        train_tf.defer_jpeg = True  # the workers read bytes; this process decodes on the device
        source.device_decode = DeviceDecoder(views, acc.device)
        say("[dim]decode: JPEGs on the device (data.decode); other images in the workers[/dim]")
    val_source = None
    if val_set is not None:
        val_collator = MaskCollator(spec, student.grid_size, recipe.seed + 1, key_view="student")
        val_source = Source(val_set, val_tf, val_collator, recipe.data.batch_size,
                            recipe.data.num_workers, 0, rank, world, shuffle=False,
                            drop_last=False, evaluation=True, limit=limit)
    zeroshot = None
    if recipe.eval.zeroshot not in ("", "none") and \
            (recipe.eval.zeroshot != "demo" or recipe.eval.zeroshot_every > 0):
        zeroshot = TrainingZeroShot.from_recipe(recipe, views[0])
        say(f"[dim]{escape(zeroshot.describe())}[/dim]")
    task = AlignmentTask(recipe, student, teacher, source, val_source,
                         {v.name: v for v in views}, grid_note, zeroshot=zeroshot)
    sharded = wants_sharding(recipe.train.sharding)
    if sharded:  # checkpointing is set above; then compile, then shard (torchtitan's order)
        shard_model(student, recipe.train.precision,
                    compile_blocks=use_compile(recipe.train.compile, acc.device))
        say(f"[dim]student sharded over {world} processes (FSDP2); the teacher is "
            f"replicated[/dim]")

    engine = Engine(engine_config(recipe), acc, run_dir)  # writes config.yaml (or .<step>.yaml)
    result = engine.fit(task, resume=resume, label=f"{recipe.objective.upper()} pre-training",
                        allow_changes=allow_changes)
    summary = {"run_dir": run_dir, "step": result["step"], "checkpoint": result["checkpoint"],
               "val": result["val"]}
    # (a sharded student's forwards are collectives: every process runs the report)
    if recipe.eval.zeroshot == "demo" and (main or sharded):
        if demo_val is None:
            _, demo_val = demo_splits(recipe.demo.train_images, recipe.demo.val_images,
                                      recipe.demo.data_seed)
        summary["zeroshot"] = demo_zeroshot_report(result["model"], teacher, views, demo_val,
                                                   engine, result["step"],
                                                   console if main else Console(quiet=True),
                                                   recipe.objective)
    engine.close()
    acc.wait_for_everyone()
    return summary


def demo_zeroshot_report(student: UTAStudent, teacher, views, split, engine: Engine, step: int,
                         console: Console, objective: str = "uta") -> dict:
    """Student vs teacher zero-shot top-1 on held-out demo images; appended to metrics.jsonl."""
    device = engine.acc.device
    student.eval()
    with engine.acc.autocast():
        s = zeroshot_demo(student.encode_image, teacher.clip, teacher.tokenizer, split, views,
                          "student", device)
    t = zeroshot_demo(teacher.encode_image, teacher.clip, teacher.tokenizer, split, views,
                      "teacher", device)
    record = {"event": "zeroshot", "dataset": "demo", "step": step,
              "student_acc1": round(s["acc1"], 4), "teacher_acc1": round(t["acc1"], 4),
              "chance": round(1 / len(CLASSNAMES), 4), "student_acc5": round(s["acc5"], 4),
              "num_samples": s["num_samples"]}
    engine.log_metrics(record)
    table = Table(title="Zero-shot top-1 on held-out demo images "
                        f"({s['num_samples']} images, {len(CLASSNAMES)} classes)")
    for col in (f"{objective.upper()} student", "CLIP teacher", "chance", "student / teacher"):
        table.add_column(col, justify="right")
    ratio = s["acc1"] / t["acc1"] if t["acc1"] else 0.0
    table.add_row(f"{s['acc1']:.3f}", f"{t['acc1']:.3f}", f"{1 / len(CLASSNAMES):.3f}",
                  f"{ratio:.2f}")
    console.print(table)
    if objective == "mim":  # EVA-02's loss scores the masked patch tokens only
        console.print("MIM's loss scores the masked patch tokens only, never the CLS output, so "
                      "this zero-shot top-1 reads an unaligned CLS; compare MIM after "
                      "fine-tuning (uta finetune).")
    else:
        how = "aligning visible tokens alone" if objective == "uta" else "aligning every token"
        console.print(f"The student never saw a caption: its CLS token landed in the teacher's "
                      f"joint space by {how}.")
    return record

