"""`uta convert`: a released UTA checkpoint as a uta checkpoint folder plus an open_clip folder."""

from __future__ import annotations

from typing import Literal

import typer

from uta_cli.commands._common import cli_errors, quiet_libraries


def convert(
    source: str = typer.Argument(..., help="The released file, e.g. uta_base_p16_224.pt."),
    from_: Literal["uta-release"] = typer.Option(..., "--from", help="The input format."),
    output: str = typer.Option(..., "--output", help="The uta checkpoint folder to write."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
) -> None:
    """Convert the authors' released checkpoints into uta's own checkpoint format.

    Writes OUTPUT/model.safetensors + meta.json (a uta checkpoint: uta zeroshot, export,
    finetune and pretrain's student.init take it), OUTPUT/text_tower.safetensors (the released
    text tower) and OUTPUT/open_clip/, an open_clip folder that loads with
    open_clip.create_model_and_transforms("local-dir:OUTPUT/open_clip") (it names its timm tower
    by absolute path: after moving OUTPUT run uta repoint OUTPUT). Both are loaded back and
    checked against the release. The load is strict: any unexpected or missing key is an error.

    Example:

      uta convert --from uta-release uta_base_p16_224.pt --output ckpts/uta-b16
    """
    quiet_libraries()
    with cli_errors("free memory on this machine (it holds the whole model once)"):
        from uta_cli.errors import UtaUsageError

        if from_ != "uta-release":
            raise UtaUsageError(f"--from {from_!r} is not supported; the only input format is "
                                f"uta-release (the authors' uta_*.pt files).")
        from uta_cli.workflows.convert import convert_release

        convert_release(source, output, force=force, say=typer.echo)
