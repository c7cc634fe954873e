"""Zero-shot evaluation of a UTA checkpoint, and of its teacher beside it (`uta zeroshot`).

The student is scored through the recorded teacher's text tower (docs/method.md §6), on its own
recorded preprocessing; with `teacher=True` the teacher is scored on its own preprocessing in the
same pass over the data (one decode, two crops when the sizes differ).

Datasets: `imagenet` (ImageNet-layout val folder, OpenAI class names by sorted wnid), any class
folder (local or fsspec URL), webdataset tar shards with `.cls` labels, the held-out `demo` images,
and image-caption sets for retrieval (a folder of images + a JSON or CSV of captions).

Each process evaluates a disjoint shard (indices rank::world, or whole tar shards) and the
per-sample results are gathered and merged by sample id, so a distributed evaluation reports
exactly what one process would (evaluate/per_process.py). Precision: see `resolve_precision` and
`StudentEncoder` (evaluate/encoders.py). The class weights: evaluate/class_weights.py; the tables
and files the command writes: evaluate/report.py.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from rich.console import Console
from rich.markup import escape

from uta_cli import __version__
from uta_cli.data.pipeline import EvalTransform
from uta_cli.errors import UtaUsageError
from uta_cli.evaluate.class_weights import cached_classifier, default_cache_dir
from uta_cli.evaluate.datasets import resolve_dataset, resolve_eval_templates
from uta_cli.evaluate.encoders import (
    PRECISIONS,
    build_encoders,
    resolve_precision,
    text_encoder,
)
from uta_cli.evaluate.linear_probe import ProbeConfig
from uta_cli.evaluate.per_process import (
    classify_shard,
    embed_shard,
    fit_probes,
    merge_classification,
    merge_retrieval,
    probe_train_set,
    retrieval_shard,
    shard_loader,
)
from uta_cli.evaluate.report import ZeroShotResult
from uta_cli.evaluate.zeroshot import TEXT_CONTEXTS
from uta_cli.loading.model import checkpoint_kind, read_model_meta

if TYPE_CHECKING:
    from uta_cli.models.teacher import CLIPTeacher

TASKS = ("classification", "retrieval", "linear-probe")


# --------------------------------------------------------------------------------------------
# options


def default_workers() -> int:
    # One core feeds the model, the others decode: more workers than cores only thrash.
    return max(0, min(8, (os.cpu_count() or 1) - 1))


@dataclass
class ZeroShotOptions:
    """What `uta zeroshot` takes; see `uta zeroshot --help`."""

    ckpt: str
    dataset: str
    data_dir: str = ""
    classnames: str = ""
    templates: str = ""  # "" = the dataset's own: openai (ImageNet, folders, tars), demo's
    task: str = "classification"
    teacher: bool = False
    teacher_weights: str = ""
    batch_size: int = 64
    workers: int = field(default_factory=default_workers)
    precision: str = "auto"
    cache_dir: str = ""  # "" = <uta cache>/classifiers; "none" = never cache
    texts_per_batch: int = 1024
    split: str = "test"  # CLIP_benchmark's webdataset layout: the split folder to read
    # linear-probe: the images the probe is fitted on ("" = the "train" split of a
    # CLIP_benchmark webdataset), and its training settings (linear_probe.ProbeConfig)
    train_dataset: str = ""
    probe_epochs: int = 10
    probe_lr: float = 0.1
    probe_val_proportion: float = 0.2
    seed: int = 0
    ckpt_format: str = "auto"  # auto | uta | uta-release (a released uta_*.pt file)
    text_context: str = "trimmed"  # trimmed | full: zeroshot.TextEncoder


def check_options(opts: ZeroShotOptions) -> None:
    if opts.task not in TASKS:
        raise UtaUsageError(f"--task {opts.task!r} is not one of: {', '.join(TASKS)}.")
    if opts.precision not in PRECISIONS:
        raise UtaUsageError(f"--precision {opts.precision!r} is not one of: "
                            f"{', '.join(PRECISIONS)}.")
    if opts.batch_size < 1 or opts.workers < 0 or opts.texts_per_batch < 1:
        raise UtaUsageError("--batch-size must be at least 1 and --workers at least 0.")
    if opts.text_context not in TEXT_CONTEXTS:
        raise UtaUsageError(f"--text-context {opts.text_context!r} is not one of: "
                            f"{', '.join(TEXT_CONTEXTS)}.")
    if opts.task == "linear-probe" and (opts.probe_epochs < 1 or opts.probe_lr <= 0 or
                                        not 0 < opts.probe_val_proportion < 1):
        raise UtaUsageError("--probe-epochs must be >= 1, --probe-lr > 0 and "
                            "--probe-val-proportion in (0, 1).")
    if opts.task == "retrieval" and (opts.templates or opts.classnames):
        raise UtaUsageError("--templates and --classnames apply to --task classification; "
                            "retrieval scores the captions themselves.")


# --------------------------------------------------------------------------------------------
# the run


def _text_context_report(tower: CLIPTeacher, requested: str) -> dict:
    encode = text_encoder(tower, requested)
    return {"requested": requested, "used": encode.context, "note": encode.note}


def _versions() -> dict:
    import open_clip
    import timm

    return {"uta": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "timm": timm.__version__}


def run_zeroshot(opts: ZeroShotOptions, console: Console | None = None) -> ZeroShotResult:
    """Evaluate the checkpoint's student (and its teacher) on one dataset; see the module doc."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    t_start = time.perf_counter()
    check_options(opts)
    console = console or Console()
    # Inputs are checked before any model is built, so mistakes come back in a second.
    kind = checkpoint_kind(opts.ckpt, opts.ckpt_format)
    if kind == "uta-release" and (opts.teacher or opts.teacher_weights):
        raise UtaUsageError("A released UTA file has no separate CLIP teacher: its own text "
                            "tower scores it. Drop --teacher / --teacher-weights.")
    if kind == "open-clip-folder" and opts.teacher:
        raise UtaUsageError(f"{opts.ckpt} is an exported open_clip folder: its image tower "
                            f"is the student, there is no teacher to compare with.")
    ckpt_dir, meta = read_model_meta(opts.ckpt, opts.ckpt_format)  # no model built yet
    if "student" not in meta or "embed_dim" not in meta:
        raise UtaUsageError(f"{ckpt_dir} is a '{meta.get('task')}' checkpoint, not a UTA "
                            "student: uta zeroshot evaluates pre-training checkpoints.")
    probe = opts.task == "linear-probe"
    evalset = resolve_dataset(opts.dataset, opts.data_dir, opts.classnames,
                              "classification" if probe else opts.task, meta, opts.split)
    trainset = probe_train_set(evalset, meta, opts.train_dataset, opts.dataset,
                               opts.data_dir, opts.classnames) if probe else None
    classification = opts.task == "classification"
    templates_name, templates = resolve_eval_templates(opts.templates, evalset) \
        if classification else ("", [])

    state = PartialState(cpu=not torch.cuda.is_available())
    main, device = state.is_main_process, state.device
    say = console.print if main else (lambda *a, **k: None)
    precision = resolve_precision(opts.precision, device)
    encoders, teacher, meta = build_encoders(ckpt_dir, device, precision, opts.teacher,
                                             opts.teacher_weights, opts.ckpt_format)
    ident = teacher.identity
    roles = [e.role for e in encoders]
    transform = EvalTransform([e.view for e in encoders])
    n = evalset.num_samples
    say(f"[bold]uta zeroshot[/bold] {opts.task} on {escape(evalset.name)} "
        f"({n if n is not None else 'streamed'} images"
        + (f", {len(evalset.classnames)} classes, {len(templates)} templates" if classification
           else f", {len(evalset.classnames)} classes, probe fitted on {trainset.name}"
           if probe else f", {sum(len(c) for c in evalset.captions)} captions")
        + f") | {', '.join(roles)} | {precision} on {device.type}"
        + (f" x {state.num_processes} processes" if state.num_processes > 1 else ""),
        highlight=False)
    if evalset.classnames_note:
        say(f"[yellow]{escape(evalset.classnames_note)}[/yellow]", highlight=False)
    if classification:
        say(f"templates: {escape(templates_name)} ({len(templates)}), "
            + ("given by --templates" if opts.templates else
               "the dataset's own" if evalset.default_templates != "openai" else
               "OpenAI's ImageNet set (the dataset brings none)"), highlight=False)

    cache_dir = "" if opts.cache_dir.lower() == "none" else opts.cache_dir or default_cache_dir()
    loader, total = shard_loader(evalset, transform, state.process_index, state.num_processes,
                                 opts.batch_size, opts.workers, pin=device.type == "cuda")
    classifier_info: dict = {}
    if classification:
        built: dict[int, tuple[torch.Tensor, dict]] = {}  # one per distinct text tower
        for e in encoders:
            if id(e.text) not in built:
                built[id(e.text)] = cached_classifier(
                    text_encoder(e.text, opts.text_context), e.text.tokenizer,
                    e.text.identity.to_dict(), evalset.classnames, templates, device,
                    cache_dir, dtype=e.text.dtype, tuned_text=e.text.text_fingerprint,
                    texts_per_batch=opts.texts_per_batch, state=state, console=console)
        classifier_info = built[id(encoders[0].text)][1]
        payload = classify_shard(loader, total, encoders,
                                 {e.role: built[id(e.text)][0] for e in encoders}, device,
                                 console, main)
    elif probe:
        train_loader, train_total = shard_loader(trainset, transform, state.process_index,
                                                 state.num_processes, opts.batch_size,
                                                 opts.workers, pin=device.type == "cuda")
        train_parts = gather_object([embed_shard(train_loader, train_total, encoders, device,
                                                 console, main, "train images")])
        payload = embed_shard(loader, total, encoders, device, console, main, "test images")
    else:
        payload = retrieval_shard(loader, total, encoders, evalset.captions, device,
                                  opts.texts_per_batch, console, main, opts.text_context)
    parts = gather_object([payload])
    errors = [p["error"] for p in parts if p["error"]]
    if errors:
        raise UtaUsageError(errors[0])
    skipped = sum(p["skipped"] for p in parts)
    loop_seconds = max(p["seconds"] for p in parts)
    if classification:
        results = merge_classification(parts, roles, len(evalset.classnames))
    elif probe:
        probe_cfg = ProbeConfig(lr=opts.probe_lr, epochs=opts.probe_epochs,
                                batch_size=opts.batch_size,
                                val_proportion=opts.probe_val_proportion, seed=opts.seed)
        results = fit_probes(train_parts, parts, roles, len(evalset.classnames), probe_cfg, say)
    else:
        results = merge_retrieval(parts, roles)
    num = results["student"]["num_samples"]
    if num == 0:
        raise UtaUsageError(f"No readable images in {evalset.name}: all {skipped} were skipped "
                            "as unreadable." if skipped else
                            f"{evalset.name} yielded no images (empty tar shards?).")

    task_name = "zeroshot_classification" if classification else \
        "linear_probe" if probe else "zeroshot_retrieval"
    entries = {}
    for e in encoders:
        r = results[e.role]
        if classification:
            metrics = {k: r[k] for k in ("acc1", "acc5", "mean_per_class_recall")}
        elif probe:
            metrics = {k: r[k] for k in ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall")}
        else:
            metrics = {k: v for k, v in r.items() if "recall@" in k}
        entry = {"dataset": evalset.name, "model": e.model, "pretrained": e.pretrained,
                 "task": task_name, "metrics": metrics, "language": "en", **metrics,
                 "num_samples": r["num_samples"], "image_size": e.view.size,
                 "preprocess": {"size": e.view.size, "mean": list(e.view.mean),
                                "std": list(e.view.std), "interpolation": e.view.interpolation,
                                "resize_mode": e.view.resize_mode}}
        if probe:
            entry["probe"] = {k: v for k, v in r.items() if k not in metrics}
        elif not classification:
            entry["num_texts"] = r["num_texts"]
        entries[e.role] = entry
    report = dict(entries["student"])
    report.update({
        "skipped_images": skipped,
        "checkpoint": {"path": ckpt_dir, "step": meta.get("step"), "task": meta.get("task"),
                       "student": meta["student"], "uta_version": meta.get("uta_version")},
        "teacher": {k: v for k, v in ident.to_dict().items()},
        "precision": precision, "precision_requested": opts.precision,
        "text_context": _text_context_report(encoders[0].text, opts.text_context),
        "device": device.type, "world_size": state.num_processes,
        "versions": _versions(),
        "timing": {"total_s": round(time.perf_counter() - t_start, 3),
                   "eval_loop_s": round(loop_seconds, 3),
                   "images_per_s": round((num + skipped) / max(loop_seconds, 1e-9), 2)},
    })
    if classification:
        report.update({
            "num_classes": len(evalset.classnames),
            "classnames_source": evalset.classnames_source,
            "templates": {"name": templates_name, "count": len(templates),
                          "templates": templates},
            "classifier": classifier_info,
        })
    if probe:
        report.update({"num_classes": len(evalset.classnames), "train_dataset": trainset.name})
    if opts.teacher:
        report["teacher_result"] = entries["teacher"]
    per_class = {}
    if classification:
        per_class = {role: {"count": r["per_class_count"], "top1": r["per_class_top1"],
                            "top5": r["per_class_top5"]} for role, r in results.items()}
    return ZeroShotResult(report=report, task=opts.task, classnames=evalset.classnames,
                          per_class=per_class, is_main=main)


