"""`uta repoint`: make a moved open_clip export (or `uta convert` output) loadable again."""

from __future__ import annotations

import typer

from uta_cli.commands._common import cli_errors, quiet_libraries


def repoint(
    folder: str = typer.Argument(..., help="The moved folder: an open_clip export (uta export "
                                 "--format open-clip) or a uta convert output."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip loading it back with "
                                   "open_clip afterwards."),
) -> None:
    """Re-point a moved open_clip folder at its new location.

    open_clip and timm find a local-dir export's image tower by the absolute path written in
    open_clip_config.json, so a copied or moved folder names the old place. This rewrites that
    path (and, for a uta convert output, the checkpoint's record of its open_clip teacher),
    then loads the folder with open_clip to check it. Nothing else changes; running it again is
    harmless. To share a model without paths, use uta export --format hf-hub.

    Example:

      uta repoint /data/models/uta-b16-openclip
    """
    quiet_libraries()
    with cli_errors():
        import os

        from uta_cli.models.open_clip_folder import repoint as repoint_folder

        changes = repoint_folder(folder)
        for line in changes:
            typer.echo(f"  {line}")
        if not no_verify:
            from uta_cli.models.open_clip_folder import load_open_clip

            path = os.path.abspath(folder)
            if os.path.isfile(os.path.join(path, "meta.json")):
                path = os.path.join(path, "open_clip")
            load_open_clip(path)
        typer.echo(f"{folder}: " + ("re-pointed" if changes else "already points at itself")
                   + ("" if no_verify else "; open_clip loads it"))
