"""`uta embed`: normalised image embeddings of files or a folder, with the file list beside."""

from __future__ import annotations

import typer

from uta_cli.commands._common import (
    CKPT_FORMAT_OPTION,
    CKPT_OPTION,
    DEVICE_METAVAR,
    CkptFormat,
    Precision,
    cli_errors,
    parse_device,
    quiet_libraries,
)

# The words these options take (checked again where used: release.FORMATS, PRECISIONS).


def embed(
    images: list[str] = typer.Argument(None, help="Image files, embedded in this order."),
    ckpt: str = CKPT_OPTION,
    folder: str = typer.Option("", "--dir", help="Embed every image under this folder "
                               "(recursive, sorted by path; local or fsspec URL)."),
    output: str = typer.Option(..., "--output", help="emb.safetensors (tensor 'embeddings') or "
                               "emb.npy; emb.files.txt beside it names the image of each row."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward."),
    workers: int = typer.Option(-1, "--workers", help="Image decoding processes (default: "
                                "CPUs - 1, at most 8)."),
    device: str = typer.Option("auto", "--device", parser=parse_device,
                               metavar=DEVICE_METAVAR, help="auto (a GPU when there is one), cpu, "
                               "cuda or cuda:N."),
    precision: Precision = typer.Option("auto", "--precision", help="auto (bf16 where the "
                                        "hardware has it), bf16 or fp32."),
    ckpt_format: CkptFormat = CKPT_FORMAT_OPTION,
    teacher_weights: str = typer.Option("", "--teacher-weights", help="Where the checkpoint's "
                                        "teacher lives now, if moved (contrastive checkpoints)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
) -> None:
    """Write L2-normalised image embeddings (the student's, in CLIP's joint space).

    Images get the checkpoint's own zero-shot preprocessing (short-side resize, centre crop,
    its mean and std). Row i of the output is the image on line i of OUTPUT's .files.txt;
    unreadable images are skipped, listed on stderr and left out of both.

    Examples:

      uta embed --ckpt runs/vitb16 --dir photos/ --output photos.safetensors

      uta embed --ckpt uta_base_p16_224.pt a.jpg b.png --output ab.npy
    """
    quiet_libraries()
    with cli_errors():
        from uta_cli.evaluate import inference as inf
        from uta_cli.workflows.zeroshot import default_workers

        inf.check_embed_output(output, force)
        index = inf.image_index(images or [], folder)
        model = inf.load_model(ckpt, ckpt_format, teacher_weights, device, precision)
        typer.echo(f"embedding {len(index)} image(s) with {model.encoder.model} "
                   f"({model.precision} on {model.device.type})", err=True)
        emb, files, skipped = inf.embed(model, index, batch_size,
                                        default_workers() if workers < 0 else workers)
        for path in skipped[:10]:
            typer.echo(f"skipped unreadable image: {path}", err=True)
        if len(skipped) > 10:
            typer.echo(f"... and {len(skipped) - 10} more unreadable images", err=True)
        out, listing = inf.write_embeddings(output, emb, files, inf.embedding_info(model))
        typer.echo(f"wrote {out} ({emb.shape[0]} x {emb.shape[1]}, normalised) and {listing}"
                   + (f"; skipped {len(skipped)} unreadable" if skipped else ""))
