"""The Typer app: registers the commands, nothing else."""

from __future__ import annotations

import typer

from uta_cli import __version__
from uta_cli.commands import (
    classify,
    convert,
    embed,
    export,
    finetune,
    inspect_mask,
    plot,
    pretrain,
    recipes,
    repoint,
    shards,
    zeroshot,
)
from uta_cli.commands._common import UtaTyper

app = UtaTyper(  # every command gets -v/--verbose and -q/--quiet
    name="uta",
    help="Unmasked Token Alignment: train a ViT into CLIP's joint space, evaluate, export.",
    no_args_is_help=True,
    add_completion=True,  # uta --install-completion
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"uta {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """uta: Unmasked Token Alignment toolkit."""


# Command registration: one line per command module.
app.command("pretrain")(pretrain.pretrain)
app.command("inspect-mask")(inspect_mask.inspect_mask)
app.command("zeroshot")(zeroshot.zeroshot)
app.command("export")(export.export)
app.command("finetune")(finetune.finetune)
app.command("convert")(convert.convert)
app.command("embed")(embed.embed)
app.command("classify")(classify.classify)
app.command("repoint")(repoint.repoint)
app.command("recipes")(recipes.recipes)
app.command("plot")(plot.plot)
app.command("shards")(shards.shards)


def main() -> None:
    app()
