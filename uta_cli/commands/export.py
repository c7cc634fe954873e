"""`uta export`: a checkpoint as ONNX, TorchScript, torch.export or open_clip, verified."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import tempfile
from typing import Literal

import typer
from rich.markup import escape

from uta_cli.commands._common import (
    CkptFormat,
    TextContext,
    cli_errors,
    err_console,
    metavar,
    quiet_libraries,
    word_or_path,
)
from uta_cli.errors import UtaUsageError

# The words these options take (the core checks them again: export.FORMATS, KINDS).
Format = Literal["onnx", "torchscript", "pt2", "open-clip", "hf-hub"]
OutputKind = Literal["embedding", "tokens", "classifier"]
TEMPLATES = ("openai", "simple")


def invoked_command(ctx: typer.Context) -> str:
    """The command line as given (options set on it, in declaration order): for the model card."""
    parts = ["uta", ctx.info_name or "export"]
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if getattr(source, "name", "") != "COMMANDLINE" or param.name not in ctx.params:
            continue
        value, opt = ctx.params[param.name], max(param.opts, key=len)
        if getattr(param, "is_flag", False) and not getattr(param, "count", False):
            parts += [opt] if value else []
        elif getattr(param, "multiple", False):
            for v in value:
                parts += [opt, str(v)]
        else:
            parts += [opt, str(value)]
    return shlex.join(parts)


def export(
    ctx: typer.Context,
    ckpt: str = typer.Option(..., "--ckpt", help="A checkpoint folder (checkpoints/step_*), a "
                             "run directory (its newest checkpoint), or a released UTA file "
                             "(uta_base_p16_224.pt, ...)."),
    ckpt_format: CkptFormat = typer.Option("auto", "--ckpt-format", help="auto (a file is a "
                                           "released UTA checkpoint, a folder a uta "
                                           "checkpoint), uta or uta-release."),
    format_: Format = typer.Option(..., "--format", help="What to write."),
    output: str = typer.Option(..., "--output", help="The file to write (a folder for "
                               "open-clip and hf-hub)."),
    output_kind: OutputKind = typer.Option("embedding", "--output-kind", help="embedding: the "
                                    "L2-normalised CLIP-space embedding; tokens: every token in "
                                    "the joint space; classifier: zero-shot logits (needs "
                                    "--classnames)."),
    classnames: str = typer.Option("", "--classnames", help="Class names, one a line "
                                   "(classifier only)."),
    templates: str = typer.Option("openai", "--templates", help="openai (80 prompts), simple "
                                  "(one), or a file of templates with {c}, one a line; the same "
                                  "choices as uta zeroshot.",
                                  parser=word_or_path("--templates", TEMPLATES),
                                  metavar=metavar(TEMPLATES, "FILE"),
                                  autocompletion=lambda: list(TEMPLATES)),
    opset: int | None = typer.Option(None, "--opset", help="ONNX opset (default: the "
                                     "exporter's)."),
    atol: float | None = typer.Option(None, "--atol", help="Largest allowed absolute "
                                      "difference from PyTorch (default: 1e-4 embedding, 1e-3 "
                                      "tokens, 1e-2 logits)."),
    min_cosine: float = typer.Option(0.9999, "--min-cosine", help="Smallest allowed cosine "
                                     "between the artefact's outputs and PyTorch's."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip loading the artefact back "
                                   "and comparing it with PyTorch."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    repo_id: str = typer.Option("", "--repo-id", help="hf-hub: the Hugging Face repository "
                                "ORG/NAME the folder is for (open_clip and timm load it as "
                                "hf-hub:ORG/NAME)."),
    push_to_hub: bool = typer.Option(False, "--push-to-hub", help="hf-hub: upload the folder "
                                     "with huggingface_hub afterwards (needs the network and a "
                                     "login)."),
    private: bool = typer.Option(False, "--private", help="hf-hub: create the repository as "
                                 "private when pushing."),
    zeroshot_json: list[str] = typer.Option([], "--zeroshot-json", help="hf-hub: a `uta "
                                            "zeroshot --output-json` report for the model "
                                            "card (repeatable)."),
    license_id: str = typer.Option("other", "--license", help="hf-hub: the model card's "
                                   "license id (e.g. apache-2.0, mit, other)."),
    teacher_weights: str = typer.Option("", "--teacher-weights", help="Where the checkpoint's "
                                        "teacher lives now, if moved (classifier, open-clip)."),
    text_context: TextContext = typer.Option("trimmed", "--text-context", help="Class weights of "
                                     "--output-kind classifier: trimmed (each text forward "
                                     "only up to its longest prompt, exact for causal CLIP "
                                     "text towers) or full (the whole context)."),
) -> None:
    """Export a UTA student for deployment, then load it back and check it against PyTorch.

    Verification runs random and image-like inputs at batch 1 and 3 through the reloaded artefact
    (onnxruntime, torch.jit.load, torch.export.load, open_clip) and prints the max absolute
    difference and cosine; beyond tolerance it exits 1 and writes nothing.

    hf-hub writes a Hugging Face model repository (open_clip and timm configs and weights, a
    model card) whose image tower is named hf-hub:ORG/NAME, so nothing names a local path; it is
    verified by loading it by that name from a temporary Hugging Face cache, offline, in open_clip
    and in timm.

    The open-clip folder loads with open_clip.create_model_and_transforms("local-dir:FOLDER"):
    the student is a timm image tower (described by FOLDER/timm_trunk/config.json, referenced by
    absolute path: after moving the folder run uta repoint FOLDER) and the teacher's text tower
    is kept.

    Examples:

      uta export --ckpt runs/demo --format onnx --output student.onnx

      uta export --ckpt runs/demo --format onnx --output-kind classifier \\
          --classnames classes.txt --templates simple --output zeroshot.onnx

      uta export --ckpt runs/vitb16 --format open-clip --output exported/uta-b16

      uta export --ckpt runs/vitb16 --format hf-hub --output hub/uta-b16 \\
          --repo-id my-lab/uta-vitb16 --zeroshot-json in1k.json [--push-to-hub]

      uta export --ckpt runs/demo --format pt2 --output-kind tokens --output tokens.pt2
    """
    quiet_libraries()
    with cli_errors("free memory on this machine (it holds the whole model once)"):
        from uta_cli.workflows.export import (
            ExportFailed,
            ExportOptions,
            VerificationFailed,
            export_checkpoint,
        )

        opts = ExportOptions(ckpt=ckpt, format=format_, output=output, output_kind=output_kind,
                             classnames=classnames, templates=templates, opset=opset, atol=atol,
                             min_cosine=min_cosine, verify=not no_verify, force=force,
                             teacher_weights=teacher_weights, ckpt_format=ckpt_format,
                             text_context=text_context, repo_id=repo_id,
                             push_to_hub=push_to_hub, private=private,
                             zeroshot_json=list(zeroshot_json), license=license_id,
                             command=invoked_command(ctx))
        try:
            with _remote_output(opts, format_, force):
                export_checkpoint(opts, say=typer.echo)
        except UtaUsageError as e:
            # As cli_errors, but escaped: the message names the extra "uta-cli[onnx]", which rich
            # would otherwise swallow as a markup tag.
            err_console.print(f"[bold red]error:[/bold red] {escape(str(e))}", highlight=False)
            raise typer.Exit(2) from None
        except (ExportFailed, VerificationFailed) as e:
            err_console.print(f"[bold red]export failed:[/bold red] {escape(str(e))}",
                              highlight=False)
            raise typer.Exit(1) from None


@contextlib.contextmanager
def _remote_output(opts, format_: str, force: bool):
    """--output as an fsspec URL: export and verify in a local temporary folder, then upload the
    artefact (and its .json metadata); nothing reaches the URL unless verification passed.
    file:// URLs are local paths."""
    from uta_cli.outputs import is_remote, local_path, upload

    url = opts.output
    opts.output = local_path(url)
    if not is_remote(url):
        yield
        return
    from uta_cli.export.formats import REGISTRY

    if REGISTRY[format_].metadata == "folder":
        raise UtaUsageError(f"--format {format_} writes a folder for local use; export it to a "
                            f"local --output, then copy it (e.g. with fsspec or the hub).")
    from uta_cli.io import url_to_fs

    fs, target = url_to_fs(url, writing=True)
    if fs.exists(target) and not force:
        raise UtaUsageError(f"{url} exists. Pass --force to replace it, or another --output.")
    staging = tempfile.mkdtemp(prefix="uta-export-")
    try:
        opts.output = os.path.join(staging, url.rstrip("/").rsplit("/", 1)[-1])
        yield
        side = opts.output + ".json"
        upload(opts.output, url)  # the artefact first, its metadata after
        if os.path.isfile(side):
            upload(side, url + ".json")
        typer.echo(f"uploaded to {url}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
