"""Shared command-line plumbing: usage errors become exit 2 with a message, no traceback;
-v/-q on every command; options that take one of a few words or a path."""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import logging
import os
import sys
from collections.abc import Callable
from typing import Literal

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
def cli_errors(memory_hint: str = "lower data.batch_size (raise train.grad_accum to keep the "
               "global batch), train in bf16 (train.precision=bf16) or turn on activation "
               "checkpointing (train.grad_checkpointing=true)"):
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


# -- verbosity --------------------------------------------------------------------------------
def set_verbosity(level: int) -> None:
    """-1 (-q): errors only, no per-step progress; 0: warnings; 1 (-v): uta's own info lines
    (checkpoints written, epochs ended early); 2 (-vv): debug, libraries included."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(message)s")
    uta = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(level, logging.DEBUG)
    logging.getLogger("uta_cli").setLevel(uta)
    logging.getLogger().setLevel(logging.DEBUG if level >= 2 else
                                 logging.ERROR if level < 0 else logging.WARNING)


def with_verbosity(command: Callable) -> Callable:
    """Give a command function -v/--verbose (repeatable) and -q/--quiet."""
    signature = inspect.signature(command)
    extra = [
        inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, annotation=int,
                          default=typer.Option(0, "-v", "--verbose", count=True,
                                               help="More output: -v uta's info lines, -vv "
                                               "debug (libraries too).")),
        inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "-q", "--quiet", help="Errors and "
                                               "results only: no warnings, no per-step "
                                               "progress.")),
    ]

    @functools.wraps(command)
    def run(*args, verbose: int = 0, quiet: bool = False, **kwargs):
        set_verbosity(-1 if quiet else verbose)
        return command(*args, **kwargs)

    run.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])
    run.__annotations__ = {**getattr(command, "__annotations__", {}), "verbose": int,
                           "quiet": bool}
    return run


class UtaTyper(typer.Typer):
    """typer.Typer whose every command takes -v/--verbose and -q/--quiet."""

    def command(self, *args, **kwargs):
        register = super().command(*args, **kwargs)
        return lambda command: register(with_verbosity(command))


# -- one of a few words, or a path ------------------------------------------------------------
def word_or_path(option: str, words: tuple[str, ...], allow_empty: bool = False):
    """A parser for options such as --resume (auto, never or a path) and --templates (openai,
    simple or a file): a word must be spelled right, anything else must look like a path."""

    def parse(value: str) -> str:
        if value in words or (allow_empty and value == ""):
            return value
        if os.path.exists(value) or any(c in value for c in "/\\.:{"):
            return value  # a path, a file name, a URL or a shard pattern: checked where used
        close = difflib.get_close_matches(value, words, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise typer.BadParameter(f"{value!r} is neither one of {', '.join(words)} nor an "
                                 f"existing path.{hint}", param_hint=option)

    return parse


def metavar(words: tuple[str, ...], other: str) -> str:
    return "[" + "|".join((*words, other)) + "]"


DEVICES = ("auto", "cpu", "cuda", "cuda:N")
DEVICE_METAVAR = "[" + "|".join(DEVICES) + "]"


def parse_device(value: str) -> str:
    """--device: auto, cpu, cuda or cuda:N (N a GPU index)."""
    head, _, index = value.partition(":")
    if value in DEVICES[:3] or (head == "cuda" and index.isdigit()):
        return value
    close = difflib.get_close_matches(value, DEVICES[:3], n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise typer.BadParameter(f"{value!r} is not one of {', '.join(DEVICES)}.{hint}",
                             param_hint="--device")


# The run options `uta pretrain` and `uta finetune` share (one engine, one meaning).
RESUME = ("auto", "never")
OUTPUT_DIR_OPTION = typer.Option(
    "", "--output-dir", help="Run directory (default: train.output_dir, else runs/<recipe name>).")
RESUME_OPTION = typer.Option(
    "auto", "--resume", help="auto: continue from the checkpoint that the run directory's "
    "checkpoints/latest names; never; or a checkpoint path.",
    parser=word_or_path("--resume", RESUME), metavar=metavar(RESUME, "PATH"),
    autocompletion=lambda: list(RESUME))
ALLOW_CHANGES_OPTION = typer.Option(
    [], "--allow-changes", help="On resume, accept these recipe keys differing from the "
    "checkpoint's (comma-separated or repeated), e.g. --allow-changes optim.lr,schedule.steps. "
    "Anything else that differs refuses to resume.")
DRY_RUN_OPTION = typer.Option(
    False, "--dry-run", help="Print the resolved recipe and a summary of data, teacher, student "
    "and run directory, check that they are reachable, and exit without training.")


# The checkpoint options `uta embed` and `uta classify` share (one loader, one meaning).
CKPT_OPTION = typer.Option(
    ..., "--ckpt", help="A run directory (its newest checkpoint), a checkpoint folder "
    "(checkpoints/step_*), a released UTA file (uta_base_p16_224.pt, ...) or an exported "
    "open_clip folder (uta export --format open-clip | hf-hub, uta convert).")
CKPT_FORMAT_OPTION = typer.Option(
    "auto", "--ckpt-format", help="auto (a file is a released UTA file, a folder a uta "
    "checkpoint or an exported open_clip folder), uta or uta-release.")

# Option value types shared by several commands (Typer lists and checks the choices)
CkptFormat = Literal["auto", "uta", "uta-release"]  # release.FORMATS
Precision = Literal["auto", "bf16", "fp32"]
TextContext = Literal["trimmed", "full"]  # zeroshot.TEXT_CONTEXTS
