"""Shared command-line plumbing: usage errors become exit 2 with a message, no traceback."""

from __future__ import annotations

import contextlib
import logging
import sys

import typer
from rich.console import Console
from rich.markup import escape

from uta_cli.errors import (
    OutOfMemory,
    TrainingDiverged,
    TrainingInterrupted,
    UtaUsageError,
    is_out_of_memory,
)

err_console = Console(stderr=True)


@contextlib.contextmanager
def cli_errors(memory_hint: str = "lower data.batch_size and raise train.grad_accum"):
    """Map known failures to exit codes: bad usage/input 2, training failures 1.

    memory_hint: what to change when memory runs out outside the training loop (which names its
    own batch size), e.g. "lower --batch-size (now 64)".
    """
    try:
        yield
    except OutOfMemory as e:
        err_console.print(f"[bold red]out of memory:[/bold red] {escape(str(e))}",
                          highlight=False)
        raise typer.Exit(1) from None
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
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        err_console.print(f"[bold red]out of memory:[/bold red] {escape(str(e).splitlines()[0])}"
                          f". To fit, {escape(memory_hint)}.", highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]Interrupted.[/yellow] The newest complete checkpoint is kept; "
                          "run the same command to resume.")
        raise typer.Exit(130) from None


def quiet_libraries() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(message)s")
