"""`uta finetune`: classification fine-tuning or image-text contrastive tuning of a UTA ViT."""

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


def finetune(
    recipe: str = typer.Argument(..., help="A built-in recipe name (finetune_demo, "
                                 "contrastive_demo, finetune_vitb16_in1k, contrastive_vitb16) or "
                                 "a YAML path/URL with task: classification or contrastive."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key, typed: "
                                   "--set finetune.layer_decay=0.75 (repeatable)."),
    output_dir: str = OUTPUT_DIR_OPTION,
    resume: str = RESUME_OPTION,
    allow_changes: list[str] = ALLOW_CHANGES_OPTION,
    dry_run: bool = DRY_RUN_OPTION,
) -> None:
    """Fine-tune a UTA ViT: classification or contrastive tuning, as the recipe's task says.

    It starts from the recipe's init: a UTA run directory or checkpoint, a released uta_*.pt
    file, timm:NAME or open_clip:MODEL.

    Validation every train.val_every steps; the best checkpoint is kept in RUN/checkpoints/best.

    Examples:

      uta pretrain && uta finetune finetune_demo            # the offline demo, CPU, minutes

      uta finetune finetune_demo --set init= --output-dir runs/scratch    # from random init

      uta finetune contrastive_demo --set finetune.text_locked=true

      uta finetune finetune_vitb16_in1k --set init=runs/b16 --set data.source=/in1k/train ...

      accelerate launch --multi_gpu --num_processes 8 -m uta_cli finetune finetune_vitb16_in1k ...
    """
    quiet_libraries()
    with cli_errors():
        from uta_cli.recipe import load_recipe

        loaded = load_recipe(recipe, set_)  # bad recipes fail here, before torch is imported
        from uta_cli.workflows.finetune import check_recipe, run_finetune

        check_recipe(loaded)
        if dry_run:
            from uta_cli.workflows.dryrun import dry_run as show

            show(loaded, output_dir=output_dir, resume=resume)
            return
        from uta_cli.train.resume_guard import parse_allow_changes

        parse_allow_changes(allow_changes)  # unsafe keys fail before any model is built
        run_finetune(loaded, output_dir=output_dir, resume=resume, allow_changes=allow_changes)
