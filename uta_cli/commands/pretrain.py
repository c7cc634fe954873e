"""`uta pretrain`: UTA pre-training; with no recipe, the embedded offline demo."""

from __future__ import annotations

import typer

from uta_cli.commands._common import (
    ALLOW_CHANGES_OPTION,
    DRY_RUN_OPTION,
    OUTPUT_DIR_OPTION,
    RESUME_OPTION,
    cli_errors,
    quiet_libraries,
)


def pretrain(
    recipe: str = typer.Argument(None, help="A built-in recipe name (demo, vitb16, vitl14) or a "
                                 "YAML path/URL. Default: the demo."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key, typed: "
                                   "--set optim.lr=1e-3 (repeatable)."),
    output_dir: str = OUTPUT_DIR_OPTION,
    resume: str = RESUME_OPTION,
    allow_changes: list[str] = ALLOW_CHANGES_OPTION,
    dry_run: bool = DRY_RUN_OPTION,
) -> None:
    """UTA pre-training: align a ViT student's visible tokens with a frozen CLIP teacher.

    Examples:

      uta pretrain                                   # offline demo, CPU, a few minutes

      uta pretrain vitb16 --set data.source=/data/in21k --set teacher.weights=/m/eva02_l14.pt

      accelerate launch --multi_gpu --num_processes 8 -m uta_cli pretrain vitb16 ...

      uta pretrain my.yaml --set optim.lr=1e-3 --set train.precision=fp32
    """
    quiet_libraries()
    with cli_errors():
        from uta_cli.recipe import load_recipe

        loaded = load_recipe(recipe, set_)  # bad recipes fail here, before torch is imported
        from uta_cli.workflows.pretrain import check_recipe, run_pretrain

        check_recipe(loaded)
        if dry_run:
            from uta_cli.workflows.dryrun import dry_run as show

            show(loaded, output_dir=output_dir, resume=resume)
            return
        from uta_cli.train.resume_guard import parse_allow_changes

        parse_allow_changes(allow_changes)  # unsafe keys fail before any model is built
        run_pretrain(loaded, output_dir=output_dir, resume=resume, allow_changes=allow_changes)
