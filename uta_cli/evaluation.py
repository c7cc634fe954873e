"""Zero-shot evaluation of a UTA checkpoint, and of its teacher beside it (`uta zeroshot`).

The student is scored through the recorded teacher's text tower (docs/method.md §6), on its own
recorded preprocessing; with `teacher=True` the teacher is scored on its own preprocessing in the
same pass over the data (one decode, two crops when the sizes differ).

Datasets: `imagenet` (ImageNet-layout val folder, OpenAI class names by sorted wnid), any class
folder (local or fsspec URL), webdataset tar shards with `.cls` labels, the held-out `demo` images,
and image-caption sets for retrieval (a folder of images + a JSON or CSV of captions).

Each process evaluates a disjoint shard (indices rank::world, or whole tar shards) and the
per-sample results are gathered and merged by sample id, so a distributed evaluation reports
exactly what one process would. Precision: see `resolve_precision` and `StudentEncoder`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch.utils.data import DataLoader

from uta_cli import __version__
from uta_cli import checkpoint as ckpt
from uta_cli.data import (
    EvalTransform,
    View,
    normalize,
)
from uta_cli.datasets import (
    ImageFolderIndex,
    TarShardDataset,
    collate_skip_none,
)
from uta_cli.encoders import (
    PRECISIONS,
    Encoder,
    build_encoders,
    eval_view,
    resolve_precision,
    text_encoder,
)
from uta_cli.errors import UtaUsageError
from uta_cli.eval_classifier import cached_classifier
from uta_cli.eval_datasets import (
    EvalSet,
    resolve_dataset,
    resolve_eval_templates,
)
from uta_cli.io import cache_root
from uta_cli.progress import progress_bar
from uta_cli.zeroshot import (
    RECALL_KS,
    TEXT_CONTEXTS,
    Predictions,
    classification_metrics,
    encode_texts,
    merge_by_id,
    retrieval_metrics,
    zero_shot_logits,
)

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


@dataclass
class ZeroShotResult:
    """The JSON report (CLIP_benchmark schema + provenance) and what the table and CSV need."""

    report: dict
    task: str
    classnames: list[str] = field(default_factory=list)
    per_class: dict[str, dict] = field(default_factory=dict)  # role -> per-class counts
    is_main: bool = True


def shard_loader(evalset: EvalSet, transform, rank: int, world: int, batch_size: int,
                 workers: int, pin: bool) -> tuple[DataLoader, int | None]:
    """This process's loader (indices rank::world, or whole tar shards) and its image count."""
    common = dict(batch_size=batch_size, collate_fn=collate_skip_none, pin_memory=pin)
    if evalset.shards is not None:
        if len(evalset.shards) < world:
            raise UtaUsageError(f"{len(evalset.shards)} tar shard(s) cannot be split over {world} "
                                "processes: each process reads whole shards. Use fewer "
                                "processes or more, smaller shards.")
        workers = min(workers, len(evalset.shards) // world)  # each reader slot needs a shard
        dataset = TarShardDataset(evalset.shards, transform, rank=rank, world_size=world,
                                  seed=0, shuffle_shards=False)
        dataset.check_split(workers)
        return DataLoader(dataset, num_workers=workers, **common), None
    dataset = evalset.dataset(transform)
    order = list(range(rank, len(dataset), world))  # disjoint, no padding: no sample twice
    workers = min(workers, max(1, math.ceil(len(order) / batch_size)))
    kwargs = dict(prefetch_factor=4) if workers else {}
    return (DataLoader(dataset, sampler=order, num_workers=workers, **common, **kwargs),
            len(order))


def classify_shard(loader, total: int | None, encoders: list[Encoder],
                   classifiers: dict[str, torch.Tensor], device: torch.device, console: Console,
                   main: bool) -> dict:
    """Top-k predictions of every encoder (role -> its class weights) for this process's
    images, plus the skip count."""
    num_classes = next(iter(classifiers.values())).shape[1]
    k = min(5, num_classes)
    ids, labels, tops = [], [], {e.role: [] for e in encoders}
    skipped, error = 0, None
    t0 = time.perf_counter()
    with progress_bar(console, main, total, "images") as advance, torch.inference_mode():
        for batch in loader:
            skipped += int(batch["num_skipped"])
            if "sample_id" in batch:
                y = batch["label"].long()
                bad = y[(y < 0) | (y >= num_classes)]
                if len(bad):  # only tar shards can carry labels outside the class list
                    error = ("A sample has no .cls label. Zero-shot classification needs an "
                             "integer class index in a .cls member of every sample."
                             if int(bad[0]) < 0 else
                             f"A sample has label {int(bad[0])} (.cls), but there are only "
                             f"{num_classes} class names (labels 0..{num_classes - 1}). Check "
                             f"--classnames: one name per line, in label order.")
                    break
                for e in encoders:
                    x = normalize(batch[e.view.name].to(device, non_blocking=True), e.view)
                    logits = zero_shot_logits(e.encode(x), classifiers[e.role])
                    tops[e.role].append(logits.topk(k, dim=-1).indices.cpu())
                ids.append(batch["sample_id"].long())
                labels.append(y)
            advance(len(batch.get("sample_id", ())) + int(batch["num_skipped"]))
    seconds = time.perf_counter() - t0
    preds = {role: Predictions(_cat_long(ids), _cat_long(labels),
                               torch.cat(t) if t else torch.zeros(0, k, dtype=torch.long))
             for role, t in tops.items()}
    return {"error": error, "skipped": skipped, "seconds": seconds, "predictions": preds}


def _cat_long(xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long)


def retrieval_shard(loader, total: int | None, encoders: list[Encoder],
                    captions: list[list[str]], device: torch.device, texts_per_batch: int,
                    console: Console, main: bool, text_context: str = "trimmed") -> dict:
    """Normalised embeddings of this process's images and of their captions, per encoder (each
    through its own text tower; encoders sharing one share the text embeddings)."""
    ids, embs = [], {e.role: [] for e in encoders}
    skipped = 0
    t0 = time.perf_counter()
    with progress_bar(console, main, total, "images") as advance, torch.inference_mode():
        for batch in loader:
            skipped += int(batch["num_skipped"])
            if "sample_id" in batch:
                for e in encoders:
                    x = normalize(batch[e.view.name].to(device, non_blocking=True), e.view)
                    embs[e.role].append(F.normalize(e.encode(x), dim=-1).cpu())
                ids.append(batch["sample_id"].long())
            advance(len(batch.get("sample_id", ())) + int(batch["num_skipped"]))
        image_ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)
        # The captions of the images this process read (a skipped image takes its captions
        # with it: they would have no positive). Text ids are global caption indices.
        offsets = [0]
        for caps in captions:
            offsets.append(offsets[-1] + len(caps))
        text_ids, text_image, texts = [], [], []
        for i in image_ids.tolist():
            for j, c in enumerate(captions[i]):
                text_ids.append(offsets[i] + j)
                text_image.append(i)
                texts.append(c)
        by_tower: dict[int, torch.Tensor] = {}
        for e in encoders:
            if id(e.text) not in by_tower:
                encode = text_encoder(e.text, text_context)
                # encode_texts: sorted by length, so trimmed forwards stay short
                chunks = [F.normalize(encode_texts(
                    encode, e.text.tokenizer(texts[s:s + texts_per_batch])), dim=-1).cpu()
                    for s in range(0, len(texts), texts_per_batch)]
                by_tower[id(e.text)] = torch.cat(chunks) if chunks else \
                    torch.zeros(0, e.text.embed_dim)
    dim = encoders[0].text.embed_dim
    return {"error": None, "skipped": skipped, "seconds": time.perf_counter() - t0,
            "image_ids": image_ids,
            "image_emb": {r: torch.cat(v) if v else torch.zeros(0, dim) for r, v in embs.items()},
            "text_ids": torch.tensor(text_ids, dtype=torch.long),
            "text_image": torch.tensor(text_image, dtype=torch.long),
            "text_emb": {e.role: by_tower[id(e.text)] for e in encoders}}


def _probe_train_set(opts: ZeroShotOptions, evalset: EvalSet, meta: dict) -> EvalSet:
    """The images the probe is fitted on: --train-dataset, else a CLIP_benchmark webdataset's
    train split."""
    if opts.train_dataset:
        train = resolve_dataset(opts.train_dataset, opts.data_dir, opts.classnames,
                                "classification", meta, "train")
    elif evalset.kind == "wds":
        train = resolve_dataset(opts.dataset, "", opts.classnames, "classification", meta,
                                "train")
    else:
        raise UtaUsageError("--task linear-probe needs images to fit the probe on: "
                            "--train-dataset (a class folder or any --dataset form), or a "
                            "CLIP_benchmark webdataset with a train split.")
    if len(train.classnames) != len(evalset.classnames):
        raise UtaUsageError(f"The train set has {len(train.classnames)} classes, the test set "
                            f"{len(evalset.classnames)}; the probe needs the same classes.")
    return train


def embed_shard(loader, total: int | None, encoders: list[Encoder], device: torch.device,
                console: Console, main: bool, label: str = "images") -> dict:
    """Image embeddings of every encoder (role -> (N, D) on CPU) with sample ids and labels."""
    ids, labels, embs = [], [], {e.role: [] for e in encoders}
    skipped = 0
    t0 = time.perf_counter()
    with progress_bar(console, main, total, label) as advance, torch.inference_mode():
        for batch in loader:
            skipped += int(batch["num_skipped"])
            if "sample_id" in batch:
                for e in encoders:
                    x = normalize(batch[e.view.name].to(device, non_blocking=True), e.view)
                    embs[e.role].append(e.encode(x).float().cpu())
                ids.append(batch["sample_id"].long())
                labels.append(batch["label"].long())
            advance(len(batch.get("sample_id", ())) + int(batch["num_skipped"]))
    return {"error": None, "skipped": skipped, "seconds": time.perf_counter() - t0,
            "ids": _cat_long(ids), "labels": _cat_long(labels),
            "emb": {r: torch.cat(v) if v else torch.zeros(0, 1) for r, v in embs.items()}}


def _merged_features(parts: list[dict], role: str) -> tuple[torch.Tensor, torch.Tensor]:
    _, labels = merge_by_id([(p["ids"], p["labels"][:, None]) for p in parts])
    _, emb = merge_by_id([(p["ids"], p["emb"][role]) for p in parts])
    return emb, labels[:, 0] if len(labels) else labels


def fit_probes(train_parts: list[dict], test_parts: list[dict], roles: list[str],
               num_classes: int, opts: ZeroShotOptions, say) -> dict:
    """role -> linear-probe metrics (linear_probe.py) on the merged features of every process;
    each process fits the same probe from the same features, so all agree."""
    from uta_cli.linear_probe import ProbeConfig, linear_probe

    cfg = ProbeConfig(lr=opts.probe_lr, epochs=opts.probe_epochs, batch_size=opts.batch_size,
                      val_proportion=opts.probe_val_proportion, seed=opts.seed)
    out = {}
    for role in roles:
        train_x, train_y = _merged_features(train_parts, role)
        test_x, test_y = _merged_features(test_parts, role)
        for y, what in ((train_y, "train"), (test_y, "test")):
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
                raise UtaUsageError(f"A {what} image has no label in 0..{num_classes - 1} "
                                    "(.cls of tar shards, or class folders).")
        say(f"[dim]{role}: fitting the probe on {len(train_x)} images (weight decay search "
            f"on {opts.probe_val_proportion:.0%} of them)[/dim]", highlight=False)
        out[role] = linear_probe(train_x, train_y, test_x, test_y, num_classes, cfg)
    return out


def merge_classification(parts: list[dict], roles: list[str], num_classes: int) -> dict:
    """role -> metrics over the merged per-sample predictions of every process."""
    out = {}
    for role in roles:
        merged = Predictions.merge([p["predictions"][role] for p in parts])
        if len(torch.unique(merged.sample_ids)) != len(merged.sample_ids):
            raise RuntimeError("a sample was evaluated twice across processes")
        out[role] = classification_metrics(merged.labels, merged.topk, num_classes)
    return out


def merge_retrieval(parts: list[dict], roles: list[str]) -> dict:
    """role -> retrieval metrics over the merged embeddings of every process."""
    image_ids, _ = merge_by_id([(p["image_ids"], p["image_ids"][:, None]) for p in parts])
    text_ids, text_image = merge_by_id([(p["text_ids"], p["text_image"][:, None])
                                        for p in parts])
    if len(image_ids) == 0 or len(text_ids) == 0:
        raise UtaUsageError("No readable images (or no captions) to evaluate retrieval on.")
    # rows of the merged image matrix are sorted by image id: map each text to its row
    text_row = torch.searchsorted(image_ids, text_image[:, 0])
    out = {}
    for role in roles:
        _, image_emb = merge_by_id([(p["image_ids"], p["image_emb"][role]) for p in parts])
        _, text_emb = merge_by_id([(p["text_ids"], p["text_emb"][role]) for p in parts])
        out[role] = {**retrieval_metrics(image_emb, text_emb, text_row),
                     "num_samples": len(image_ids), "num_texts": len(text_emb)}
    return out


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
    from uta_cli.models import release

    if release.resolve_format(opts.ckpt, opts.ckpt_format) == "uta-release":
        if opts.teacher or opts.teacher_weights:
            raise UtaUsageError("A released UTA file has no separate CLIP teacher: its own text "
                                "tower scores it. Drop --teacher / --teacher-weights.")
        ckpt_dir = opts.ckpt
        meta = release.read_release(opts.ckpt)[2]  # strict validation, no model built yet
    else:
        ckpt_dir = ckpt.resolve_checkpoint(opts.ckpt)
        meta = ckpt.load_meta(ckpt_dir)
    if "student" not in meta or "embed_dim" not in meta:
        raise UtaUsageError(f"{ckpt_dir} is a '{meta.get('task')}' checkpoint, not a UTA "
                            "student: uta zeroshot evaluates pre-training checkpoints.")
    probe = opts.task == "linear-probe"
    evalset = resolve_dataset(opts.dataset, opts.data_dir, opts.classnames,
                              "classification" if probe else opts.task, meta, opts.split)
    trainset = _probe_train_set(opts, evalset, meta) if probe else None
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

    cache_dir = "" if opts.cache_dir.lower() == "none" else opts.cache_dir
    if not cache_dir and opts.cache_dir.lower() != "none":

        cache_dir = os.path.join(cache_root(), "classifiers")
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
        results = fit_probes(train_parts, parts, roles, len(evalset.classnames), opts, say)
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


# --------------------------------------------------------------------------------------------
# output


def render_table(result: ZeroShotResult, console: Console) -> None:
    r = result.report
    rows = [("UTA student", r)]
    if "teacher_result" in r:
        rows.append(("CLIP teacher", r["teacher_result"]))
    skipped = str(r["skipped_images"])
    if result.task == "linear-probe":
        table = Table(title=f"Linear probe on {escape(r['dataset'])} ({r['num_classes']} "
                            f"classes, fitted on {escape(r['train_dataset'])})")
        for col in ("model", "top-1", "top-5", "mean per-class recall", "weight decay",
                    "samples"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for name, e in rows:
            table.add_row(name, f"{e['lp_acc1']:.4f}", f"{e['lp_acc5']:.4f}",
                          f"{e['lp_mean_per_class_recall']:.4f}",
                          f"{e['probe']['weight_decay']:.2e}", str(e["num_samples"]))
        console.print(table)
    elif result.task == "classification":
        table = Table(title=f"Zero-shot classification on {escape(r['dataset'])} "
                            f"({r['num_classes']} classes, {r['templates']['count']} templates)")
        for col in ("model", "top-1", "top-5", "mean per-class recall", "samples", "skipped"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for name, e in rows:
            table.add_row(name, f"{e['acc1']:.4f}", f"{e['acc5']:.4f}",
                          f"{e['mean_per_class_recall']:.4f}", str(e["num_samples"]), skipped)
        console.print(table)
        if "teacher_result" in r and r["teacher_result"]["acc1"] > 0:
            console.print(f"student / teacher top-1: "
                          f"{r['acc1'] / r['teacher_result']['acc1']:.3f}", highlight=False)
    else:
        table = Table(title=f"Zero-shot retrieval on {escape(r['dataset'])} "
                            f"({r['num_samples']} images, {r['num_texts']} captions)")
        table.add_column("model")
        for k in RECALL_KS:
            table.add_column(f"I→T R@{k}", justify="right")
        for k in RECALL_KS:
            table.add_column(f"T→I R@{k}", justify="right")
        table.add_column("skipped", justify="right")
        table.caption = ("I→T: image-to-text (text_retrieval_recall@k), T→I: text-to-image "
                         "(image_retrieval_recall@k), as CLIP_benchmark")
        for name, e in rows:
            table.add_row(name, *[f"{e[f'text_retrieval_recall@{k}']:.4f}" for k in RECALL_KS],
                          *[f"{e[f'image_retrieval_recall@{k}']:.4f}" for k in RECALL_KS],
                          skipped)
        console.print(table)
    console.print(f"[dim]{r['precision']} on {r['device']}"
                  + (f" x {r['world_size']}" if r["world_size"] > 1 else "")
                  + f", {r['timing']['images_per_s']:.1f} images/s"
                  + (f", class weights {r['classifier']['cache']}" if "classifier" in r else "")
                  + (f", text context {r['text_context']['used']}" if "text_context" in r
                     else "")
                  + "[/dim]", highlight=False)


def _parent_dir(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)


def write_json(result: ZeroShotResult, path: str) -> None:
    """A local path or an fsspec URL (memory://, s3://, ...), written whole or not at all."""
    from uta_cli.outputs import open_output

    with open_output(path) as f:
        json.dump(result.report, f, indent=1)


def dataset_slug(name: str) -> str:
    """A dataset's name for file names ({dataset}): a path's last part, no separators."""
    name = name.rstrip("/")
    if "/" in name and not name.startswith(("imagenet", "objectnet")):
        name = name.rsplit("/", 1)[-1] or name
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_per_model_json(result: ZeroShotResult, pattern: str) -> list[str]:
    """CLIP_benchmark's --output: one JSON per model, `{dataset}` and `{model}` filled in
    ({model}: student or teacher)."""
    r = result.report
    slug = dataset_slug(r["dataset"])
    per_model = {"student": {k: v for k, v in r.items() if k != "teacher_result"}}
    if "teacher_result" in r:
        per_model["teacher"] = {**r["teacher_result"],
                                **{k: r[k] for k in ("precision", "device", "versions",
                                                     "templates", "skipped_images")
                                   if k in r}}
    paths = []
    for model, report in per_model.items():
        path = pattern.replace("{dataset}", slug).replace("{model}", model)
        from uta_cli.outputs import open_output

        with open_output(path) as f:
            json.dump(report, f, indent=1)
        paths.append(path)
    return paths


def render_summary(results: list[ZeroShotResult], console: Console) -> None:
    """Several datasets in one call: one row per dataset, top-1 (top-5) per model."""
    classification = results[0].task == "classification"
    probe = results[0].task == "linear-probe"
    table = Table(title="Linear probe: top-1 (top-5)" if probe else
                  "Zero-shot " + ("classification: top-1 (top-5)" if classification
                                  else "retrieval: image / text R@1"))
    table.add_column("dataset")
    roles = ["student"] + (["teacher"] if "teacher_result" in results[0].report else [])
    for role in roles:
        table.add_column("UTA student" if role == "student" else "CLIP teacher", justify="right")
    table.add_column("samples", justify="right")
    for res in results:
        r = res.report
        cells = []
        for role in roles:
            e = r if role == "student" else r["teacher_result"]
            cells.append(f"{e['acc1']:.4f} ({e['acc5']:.4f})" if classification else
                         f"{e['lp_acc1']:.4f} ({e['lp_acc5']:.4f})" if probe else
                         f"{e['image_retrieval_recall@1']:.4f} / "
                         f"{e['text_retrieval_recall@1']:.4f}")
        table.add_row(escape(r["dataset"]), *cells, str(r["num_samples"]))
    console.print(table)


def write_per_class_csv(result: ZeroShotResult, path: str) -> None:
    """class_index, classname, num_samples, then <role>_top1_correct, <role>_recall (top-1)
    and <role>_top5_correct per model. Recall is empty for a class without samples."""
    if result.task != "classification":
        raise UtaUsageError("--per-class applies to --task classification.")
    from uta_cli.outputs import open_output

    roles = list(result.per_class)
    with open_output(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class_index", "classname", "num_samples",
                    *[f"{r}_{c}" for r in roles for c in ("top1_correct", "recall",
                                                          "top5_correct")]])
        count = result.per_class[roles[0]]["count"]
        for i, name in enumerate(result.classnames):
            row = [i, name, count[i]]
            for r in roles:
                top1 = result.per_class[r]["top1"][i]
                row += [top1, f"{top1 / count[i]:.6f}" if count[i] else "",
                        result.per_class[r]["top5"][i]]
            w.writerow(row)


# --------------------------------------------------------------------------------------------
# zero-shot while pre-training


def _spread_subset(evalset: EvalSet, limit: int) -> EvalSet:
    """The first `limit` of an evenly spaced pick over the whole set, so every class keeps its
    share (folders list their images class by class)."""
    n = evalset.num_samples
    if limit <= 0 or n is None or limit >= n:
        return evalset
    pick = [i * n // limit for i in range(limit)]
    if evalset.index is not None:
        ix = evalset.index
        index = ImageFolderIndex(root=ix.root, files=[ix.files[i] for i in pick],
                                 labels=[ix.labels[i] for i in pick], classes=ix.classes)
        return EvalSet(**{**evalset.__dict__, "index": index})
    return EvalSet(**{**evalset.__dict__, "demo_images": evalset.demo_images[pick],
                      "demo_labels": evalset.demo_labels[pick]})


class TrainingZeroShot:
    """Zero-shot top-1 / top-5 of the student while it trains (`eval.zeroshot`,
    `eval.zeroshot_every`): the dataset is resolved before training (bad input fails at once),
    the class weights are built once when the teacher is on its device (and cached on disk as
    `uta zeroshot` caches them), and each evaluation is sharded over the processes and gathered,
    so it reports what one process would."""

    def __init__(self, evalset: EvalSet, templates_name: str, templates: list[str], view: View,
                 every: int, batch_size: int, workers: int, cache_dir: str):
        self.evalset, self.templates_name, self.templates = evalset, templates_name, templates
        self.view, self.every = view, every
        self.batch_size, self.workers, self.cache_dir = batch_size, workers, cache_dir
        self.classifier: torch.Tensor | None = None
        self.classifier_info: dict = {}
        self.teacher: CLIPTeacher | None = None

    @classmethod
    def from_recipe(cls, recipe, student_view: View) -> TrainingZeroShot:
        from uta_cli.recipe import recipe_to_dict

        e = recipe.eval
        if e.zeroshot_every < 0 or e.zeroshot_samples < 0:
            raise UtaUsageError("eval.zeroshot_every and eval.zeroshot_samples must be >= 0.")
        evalset = resolve_dataset(e.zeroshot, e.data_dir, e.classnames, "classification",
                                  {"recipe": recipe_to_dict(recipe)})
        if e.zeroshot_samples and evalset.shards is not None:
            raise UtaUsageError("eval.zeroshot_samples picks images of a folder; tar shards are "
                                "read whole. Point eval.zeroshot at fewer shards instead.")
        templates_name, templates = resolve_eval_templates(e.templates, evalset)
        view = eval_view("student", student_view.size, student_view.mean, student_view.std,
                         student_view.interpolation, student_view.resize_mode)
        return cls(_spread_subset(evalset, e.zeroshot_samples), templates_name, templates, view,
                   e.zeroshot_every, recipe.data.batch_size, recipe.data.num_workers,
                   os.path.join(cache_root(), "classifiers"))

    def describe(self) -> str:
        n = self.evalset.num_samples
        when = f"every {self.every} steps and at the end" if self.every else "at the end"
        return (f"zero-shot on {self.evalset.name} ({n if n is not None else 'streamed'} images,"
                f" {len(self.evalset.classnames)} classes, {self.templates_name} templates x "
                f"{len(self.templates)}) {when}")

    def setup(self, teacher: CLIPTeacher, state, console: Console | None = None) -> None:
        """Build (or load) the class weights: once, on the teacher's device, split over ranks."""
        self.teacher = teacher
        self.classifier, self.classifier_info = cached_classifier(
            text_encoder(teacher), teacher.tokenizer, teacher.identity.to_dict(),
            self.evalset.classnames, self.templates, teacher.device, self.cache_dir,
            dtype=teacher.dtype, tuned_text=teacher.text_fingerprint, state=state,
            console=console or Console(quiet=True))

    def due(self, step: int, final: bool) -> bool:
        return final or (self.every > 0 and step > 0 and step % self.every == 0)

    @torch.no_grad()
    def __call__(self, student: torch.nn.Module, state, autocast=contextlib.nullcontext
                 ) -> dict:
        """{"zeroshot_acc1", "zeroshot_acc5", "zeroshot_samples"}; every process must call."""
        from accelerate.utils import gather_object

        if self.classifier is None:
            raise RuntimeError("TrainingZeroShot.setup was not called")
        device = self.classifier.device
        was_training = student.training
        student.eval()

        def encode(x: torch.Tensor) -> torch.Tensor:
            with autocast():
                return student.encode_image(x).float()

        encoder = Encoder("student", "student", "", self.view, encode, self.teacher)
        loader, total = shard_loader(self.evalset, EvalTransform([self.view]),
                                     state.process_index, state.num_processes, self.batch_size,
                                     self.workers, pin=device.type == "cuda")
        payload = classify_shard(loader, total, [encoder], {"student": self.classifier}, device,
                                 Console(quiet=True), False)
        student.train(was_training)
        parts = gather_object([payload])
        errors = [p["error"] for p in parts if p["error"]]
        if errors:
            raise UtaUsageError(errors[0])
        r = merge_classification(parts, ["student"], len(self.evalset.classnames))["student"]
        return {"zeroshot_acc1": r["acc1"], "zeroshot_acc5": r["acc5"],
                "zeroshot_samples": r["num_samples"]}
