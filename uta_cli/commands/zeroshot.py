"""`uta zeroshot`: zero-shot classification and retrieval through the teacher's text tower."""

from __future__ import annotations

from typing import Literal

import typer

from uta_cli.commands._common import (
    CkptFormat,
    Precision,
    TextContext,
    cli_errors,
    metavar,
    quiet_libraries,
    word_or_path,
)

# The words these options take (the core checks them again: evaluation.TASKS, PRECISIONS).
Task = Literal["classification", "retrieval", "linear-probe"]
DATASETS = ("imagenet", "demo", "imagenet-v2", "imagenet-a", "imagenet-r", "imagenet-sketch",
            "objectnet")
TEMPLATES = ("openai", "simple")


def zeroshot(
    ckpt: str = typer.Option(..., "--ckpt", help="A checkpoint folder (checkpoints/step_*), a "
                             "run directory (its newest complete checkpoint), or a released "
                             "UTA file (uta_base_p16_224.pt, ...)."),
    ckpt_format: CkptFormat = typer.Option("auto", "--ckpt-format", help="auto (a file is a "
                                           "released UTA checkpoint, a folder a uta "
                                           "checkpoint), uta or uta-release."),
    dataset: list[str] = typer.Option(..., "--dataset", help="imagenet, imagenet-v2, "
                                      "imagenet-a, imagenet-r, imagenet-sketch or objectnet "
                                      "(with --data-dir), demo, a class folder (path or fsspec "
                                      "URL), a CLIP_benchmark webdataset folder (classnames.txt,"
                                      " test/*.tar), tar shards (data/val-{000..009}.tar, with "
                                      "--classnames), or for --task retrieval a captions "
                                      ".json/.csv or a folder holding captions.json|csv. Repeat "
                                      "for several datasets in one call.",
                                      parser=word_or_path("--dataset", DATASETS),
                                metavar=metavar(DATASETS, "PATH"),
                                autocompletion=lambda: list(DATASETS)),
    data_dir: str = typer.Option("", "--data-dir", help="imagenet: the folder holding "
                                 "val/<wnid>/ (or val itself); imagenet-v2: its 0..999 folders; "
                                 "imagenet-a/-r/-sketch: their wnid folders; objectnet: the "
                                 "folder with objectnet-1.0/images and the mapping files. "
                                 "retrieval: the images' folder (default: the captions file's "
                                 "folder)."),
    split: str = typer.Option("test", "--split", help="The split folder of a CLIP_benchmark "
                              "webdataset (test, train, ...)."),
    classnames: str = typer.Option("", "--classnames", help="One class name per line, in label "
                                   "order (default: OpenAI's for imagenet, folder names with _ "
                                   "as spaces, the demo's)."),
    templates: str = typer.Option("", "--templates", help="openai (80), simple ('a photo of a "
                                  "{c}.'), or a file with one template per line using {c}. "
                                  "Default: openai; the demo's own for demo.",
                                  parser=word_or_path("--templates", TEMPLATES, allow_empty=True),
                                  metavar=metavar(TEMPLATES, "FILE"),
                                  autocompletion=lambda: list(TEMPLATES)),
    task: Task = typer.Option("classification", "--task", help="classification, retrieval, "
                              "or linear-probe (CLIP_benchmark's: a linear layer on the "
                              "normalised embeddings, its L2 weight chosen on a validation "
                              "part of the train images)."),
    train_dataset: str = typer.Option("", "--train-dataset", help="linear-probe: the images "
                                      "to fit on, any --dataset form (default: the train "
                                      "split of a CLIP_benchmark webdataset)."),
    probe_epochs: int = typer.Option(10, "--probe-epochs", help="linear-probe: epochs."),
    probe_lr: float = typer.Option(0.1, "--probe-lr", help="linear-probe: AdamW learning "
                                   "rate (cosine schedule)."),
    probe_val_proportion: float = typer.Option(0.2, "--probe-val-proportion", help="linear-"
                                               "probe: share of the train images held out to "
                                               "choose the weight decay."),
    seed: int = typer.Option(0, "--seed", help="linear-probe: seed of the split and training."),
    teacher: bool = typer.Option(False, "--teacher", help="Also evaluate the CLIP teacher on the "
                                 "same images, side by side."),
    teacher_weights: str = typer.Option("", "--teacher-weights", help="Where the recorded "
                                        "teacher's weights are now (a moved run). They must "
                                        "still match the recorded fingerprint."),
    output_json: str = typer.Option("", "--output-json", help="Write the results as JSON "
                                    "(CLIP_benchmark's schema plus provenance); with several "
                                    "datasets the path needs {dataset}."),
    output: str = typer.Option("", "--output", help="CLIP_benchmark-style: one JSON per "
                               "dataset and model, the path with {dataset} and {model} "
                               "placeholders, e.g. 'results/{dataset}_{model}.json'."),
    per_class: str = typer.Option("", "--per-class", help="Write per-class recall as CSV "
                                  "(classification)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward, per process."),
    workers: int = typer.Option(-1, "--workers", help="DataLoader worker processes "
                                "(default: CPUs - 1, at most 8)."),
    precision: Precision = typer.Option("auto", "--precision", help="auto (bf16 where the hardware "
                                  "has it: GPUs, CPUs with AMX/AVX512-BF16; else fp32), bf16 "
                                  "or fp32."),
    cache_dir: str = typer.Option("", "--cache-dir", help="Where class weights are cached "
                                  "(default: ~/.cache/uta/classifiers or $UTA_CACHE_DIR/"
                                  "classifiers); 'none' to never cache."),
    text_context: TextContext = typer.Option("trimmed", "--text-context", help="trimmed: run each "
                                     "text batch only up to its longest prompt (exact for "
                                     "causal, end-of-text pooled CLIP text towers; others use "
                                     "the full context); full: the whole context, bit for bit "
                                     "what reference tools compute."),
) -> None:
    """Zero-shot classification or retrieval through the teacher's text tower.

    Scores the student (and with --teacher the teacher itself, side by side): top-1, top-5,
    mean per-class recall; or image/text retrieval recall@1/5/10 (CLIP_benchmark's).
    The protocol (docs/method.md §6): template-averaged normalised class weights, each model's
    own open_clip preprocess pixel for pixel (resize of the short side and centre crop by
    default), logits = 100 x cosine. A dataset's own templates are used where it brings them
    (CLIP_benchmark webdatasets), OpenAI's ImageNet set otherwise. Launched on several
    processes (torchrun), each evaluates a disjoint shard and the results are gathered.

    Examples:

      uta zeroshot --ckpt runs/demo --dataset demo --teacher

      uta zeroshot --ckpt runs/b16 --dataset imagenet --data-dir /in1k --teacher --per-class pc.csv

      uta zeroshot --ckpt runs/b16/checkpoints/step_00100000 --dataset s3://bkt/flowers/val

      uta zeroshot --ckpt uta_base_p16_224.pt --dataset imagenet --data-dir /in1k

      uta zeroshot --ckpt runs/b16 --dataset 'val-{000..063}.tar' --classnames names.txt

      uta zeroshot --ckpt runs/b16 --dataset wds_cars --dataset wds_dtd --output '{dataset}.json'

      uta zeroshot --ckpt runs/b16 --dataset imagenet-v2 --data-dir /data/imagenetv2 --teacher

      uta zeroshot --ckpt runs/b16 --task retrieval --dataset coco/caps.json --output-json r.json

      torchrun --nproc_per_node 8 -m uta_cli zeroshot --ckpt runs/b16 --dataset imagenet ...
    """
    quiet_libraries()
    with cli_errors(f"lower --batch-size (now {batch_size})"):
        from uta_cli.errors import UtaUsageError

        if per_class and task != "classification":
            raise UtaUsageError("--per-class applies to --task classification.")
        several = len(dataset) > 1
        for path, name in ((output_json, "--output-json"), (per_class, "--per-class")):
            if several and path and "{dataset}" not in path:
                raise UtaUsageError(f"{name} {path} would be overwritten by each of the "
                                    f"{len(dataset)} datasets: put {{dataset}} in the path.")
        if output and "{dataset}" not in output and several or \
                output and "{model}" not in output and teacher:
            raise UtaUsageError(f"--output {output} needs {{dataset}} (several datasets) and "
                                f"{{model}} (--teacher) so that no file overwrites another.")
        from rich.console import Console

        console = Console()
        finished = []
        for one in dataset:
            finished.append(_one_dataset(
                # with several datasets, --data-dir goes to those that read it
                console, ckpt=ckpt, dataset=one, classnames=classnames,
                data_dir=data_dir if not several or one in DATASETS[:1] + DATASETS[2:] or
                task == "retrieval" else "",
                templates=templates, task=task, teacher=teacher, teacher_weights=teacher_weights,
                batch_size=batch_size, workers=workers, precision=precision,
                cache_dir=cache_dir, ckpt_format=ckpt_format, text_context=text_context,
                split=split, output_json=output_json, per_class=per_class, output=output,
                train_dataset=train_dataset, probe_epochs=probe_epochs, probe_lr=probe_lr,
                probe_val_proportion=probe_val_proportion, seed=seed))
        if several and finished[0].is_main:
            from uta_cli.evaluate.report import render_summary

            render_summary(finished, console)


def _one_dataset(console, output_json: str, per_class: str, output: str, workers: int,
                 **options):
    """One dataset: evaluate, print its table, write its files."""
    from uta_cli.evaluate.report import (
        dataset_slug,
        render_table,
        write_json,
        write_per_class_csv,
        write_per_model_json,
    )
    from uta_cli.workflows.zeroshot import ZeroShotOptions, default_workers, run_zeroshot

    opts = ZeroShotOptions(workers=default_workers() if workers < 0 else workers, **options)
    result = run_zeroshot(opts, console)
    slug = dataset_slug(result.report["dataset"])
    output_json = output_json.replace("{dataset}", slug)
    per_class = per_class.replace("{dataset}", slug)
    if result.is_main:
        render_table(result, console)
        if output:
            for path in write_per_model_json(result, output):
                console.print(f"wrote {path}", highlight=False)
        if output_json:
            write_json(result, output_json)
            console.print(f"wrote {output_json}", highlight=False)
        if per_class:
            write_per_class_csv(result, per_class)
            console.print(f"wrote {per_class}", highlight=False)
    return result
