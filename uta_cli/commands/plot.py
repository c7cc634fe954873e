"""`uta plot`: loss, accuracy, gradient norm and lr curves of one or more runs."""

from __future__ import annotations

import typer

from uta_cli.commands._common import cli_errors


def plot(
    runs: list[str] = typer.Argument(..., help="Run directories (or metrics.jsonl files); "
                                     "several are overlaid under their names."),
    output: str = typer.Option("", "--output", "-o", help="Write the figure (.png, .pdf, .svg). "
                               "Without it the curves are drawn in the terminal."),
    title: str = typer.Option("", "--title", help="A title above the panels."),
    width: int = typer.Option(100, "--width", help="Terminal drawing: characters per line."),
) -> None:
    """Training and validation loss against step (the paper's Figure 4), accuracy where logged
    (validation, zero-shot), gradient norm and learning rate, from metrics.jsonl.

    Needs the plot extra: pip install 'uta-cli[plot]'.

    Examples:

      uta plot runs/demo                             # in the terminal

      uta plot runs/demo runs/demo_mask75 --output compare.png
    """
    with cli_errors():
        from uta_cli.workflows.plot import panels, terminal_figure, write_figure

        plots = panels(list(runs))
        if output:
            write_figure(plots, output, title)
            typer.echo(f"wrote {output}")
        else:
            import sys

            typer.echo(terminal_figure(plots, width=width, color=sys.stdout.isatty()))
