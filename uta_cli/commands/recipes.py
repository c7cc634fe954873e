"""`uta recipes`: the built-in recipes, or one recipe fully resolved as YAML."""

from __future__ import annotations

import typer

from uta_cli.commands._common import cli_errors


def _recipe_names() -> list[str]:
    from uta_cli.recipe import builtin_recipe_names

    return builtin_recipe_names()


def recipes(
    name: str = typer.Argument(None, help="A built-in recipe name or a YAML path/URL. Without "
                               "it: the list of built-in recipes.",
                               autocompletion=_recipe_names),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key, typed: "
                                   "--set optim.lr=1e-3 (repeatable)."),
) -> None:
    """List the built-in recipes, or print one resolved (every default filled, --set applied)
    as YAML, ready to save, edit and run.

    Examples:

      uta recipes

      uta recipes vitb16 --set data.batch_size=128 > my_b16.yaml && uta pretrain my_b16.yaml
    """
    with cli_errors():
        from uta_cli.errors import UtaUsageError
        from uta_cli.recipe import load_recipe
        from uta_cli.workflows.dryrun import catalogue, recipe_yaml

        if name is None:
            if set_:
                raise UtaUsageError("--set applies to one recipe: uta recipes NAME --set ...")
            from rich.console import Console
            from rich.table import Table

            table = Table(title="built-in recipes (uta recipes NAME prints one in full)")
            for column in ("name", "command", "what"):
                table.add_column(column)
            for recipe_name, task, line in catalogue():
                command = "uta pretrain" if task == "pretrain" else "uta finetune"
                table.add_row(recipe_name, command, line)
            Console().print(table)
            return
        typer.echo(recipe_yaml(load_recipe(name, set_)), nl=False)
