"""`uta classify`: the top zero-shot labels of images, with probabilities."""

from __future__ import annotations

import json

import typer

from uta_cli.commands._common import (
    CKPT_FORMAT_OPTION,
    CKPT_OPTION,
    DEVICE_METAVAR,
    CkptFormat,
    Precision,
    cli_errors,
    metavar,
    parse_device,
    quiet_libraries,
    word_or_path,
)

TEMPLATES = ("openai", "simple", "none")


def classify(
    images: list[str] = typer.Argument(None, help="Image files."),
    ckpt: str = CKPT_OPTION,
    labels: str = typer.Option("", "--labels", help='Candidate labels, comma-separated: '
                               '"cat,dog,red car".'),
    classnames: str = typer.Option("", "--classnames", help="Or a file of labels, one a line."),
    templates: str = typer.Option("openai", "--templates", help="openai (80 prompts, as uta "
                                  "zeroshot), simple ('a photo of a {c}.'), none (each label "
                                  "is the whole prompt) or a file of templates with {c}.",
                                  parser=word_or_path("--templates", TEMPLATES),
                                  metavar=metavar(TEMPLATES, "FILE"),
                                  autocompletion=lambda: list(TEMPLATES)),
    top_k: int = typer.Option(5, "--top-k", help="Labels to show per image."),
    folder: str = typer.Option("", "--dir", help="Classify every image under this folder."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout "
                                 "(progress stays on stderr)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward."),
    workers: int = typer.Option(0, "--workers", help="Image decoding processes."),
    device: str = typer.Option("auto", "--device", parser=parse_device,
                               metavar=DEVICE_METAVAR, help="auto, cpu, cuda or cuda:N."),
    precision: Precision = typer.Option("auto", "--precision", help="auto, bf16 or fp32."),
    ckpt_format: CkptFormat = CKPT_FORMAT_OPTION,
    teacher_weights: str = typer.Option("", "--teacher-weights", help="Where the checkpoint's "
                                        "teacher lives now, if moved."),
) -> None:
    """Zero-shot classify images against your labels, through the checkpoint's text tower.

    The text tower is the one uta zeroshot uses: the CLIP teacher's for a pre-training
    checkpoint, the tuned one after contrastive tuning, the file's own for a released UTA file
    or an exported open_clip folder. Probabilities are softmax(100 x cosine) over the labels.

    Examples:

      uta classify --ckpt runs/vitb16 cat.jpg --labels "cat,dog,red car"

      uta classify --ckpt uta_large_p14_336.pt --dir shots/ --classnames names.txt --json
    """
    quiet_libraries()
    with cli_errors():
        from uta_cli.evaluate import inference as inf

        names = inf.parse_labels(labels, classnames)
        prompts = inf.label_templates(templates)
        index = inf.image_index(images or [], folder)
        model = inf.load_model(ckpt, ckpt_format, teacher_weights, device, precision)

        def show(result: dict) -> None:
            typer.echo(result["file"])
            for p in result["predictions"]:
                typer.echo(f"  {p['probability']:6.1%}  {p['label']}")

        results = inf.classify(model, index, names, prompts, top_k, batch_size, workers,
                               on_result=None if as_json else show)
        done = {r["file"] for r in results}
        skipped = [f for f in index.files if f not in done]
        for path in skipped:
            typer.echo(f"skipped unreadable image: {path}", err=True)
        if as_json:
            typer.echo(json.dumps({"checkpoint": model.meta.get("checkpoint_dir"),
                                   "model": model.encoder.model, "labels": names,
                                   "templates": prompts, "results": results,
                                   "skipped": skipped}, indent=1))
