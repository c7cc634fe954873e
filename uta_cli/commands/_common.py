"""Shared command-line plumbing: usage errors become exit 2 with a message, no traceback."""

from __future__ import annotations

import contextlib
import logging
import sys

import typer
from rich.console import Console
from rich.markup import escape

from uta_cli.errors import TrainingDiverged, TrainingInterrupted, UtaUsageError

err_console = Console(stderr=True)


@contextlib.contextmanager
def cli_errors():
    """Map known failures to exit codes: bad usage/input 2, training failures 1."""
    try:
        yield
    except UtaUsageError as e:
        err_console.print(f"[bold red]error:[/bold red] {escape(str(e))}", highlight=False)
        raise typer.Exit(2) from None
    except TrainingDiverged as e:
        err_console.print(f"[bold red]training stopped:[/bold red] {escape(str(e))}",
                          highlight=False)
        raise typer.Exit(1) from None
    except TrainingInterrupted as e:
        err_console.print(f"[yellow]{escape(str(e))}[/yellow]", highlight=False)
        raise typer.Exit(143) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]Interrupted.[/yellow] The newest complete checkpoint is kept; "
                          "run the same command to resume.")
        raise typer.Exit(130) from None


def quiet_libraries() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(message)s")
