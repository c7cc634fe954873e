"""`uta pretrain`: UTA pre-training; with no recipe, the embedded offline demo."""

from __future__ import annotations

import typer

from uta_cli.commands._common import cli_errors, metavar, quiet_libraries, word_or_path

RESUME = ("auto", "never")


def pretrain(
    recipe: str = typer.Argument(None, help="A built-in recipe name (demo, vitb16, vitl14) or a "
                                 "YAML path/URL. Default: the demo."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key, typed: "
                                   "--set optim.lr=1e-3 (repeatable)."),
    output_dir: str = typer.Option("", "--output-dir", help="Run directory "
                                   "(default: train.output_dir, else runs/<recipe name>)."),
    resume: str = typer.Option("auto", "--resume", help="auto: continue from the checkpoint "
                               "that the run directory's checkpoints/latest names; never; or a "
                               "checkpoint path.", parser=word_or_path("--resume", RESUME),
                               metavar=metavar(RESUME, "PATH"),
                               autocompletion=lambda: list(RESUME)),
    allow_changes: list[str] = typer.Option([], "--allow-changes", help="On resume, accept "
                                            "these recipe keys differing from the checkpoint's "
                                            "(comma-separated or repeated), e.g. --allow-changes "
                                            "optim.lr,schedule.steps. Anything else that differs "
                                            "refuses to resume."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe and a "
                                 "summary of data, teacher, student and run directory, check "
                                 "that they are reachable, and exit without training."),
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
        from uta_cli.pretrain import check_recipe, run_pretrain

        check_recipe(loaded)
        if dry_run:
            from uta_cli.dryrun import dry_run as show

            show(loaded, output_dir=output_dir, resume=resume)
            return
        from uta_cli.resume_guard import parse_allow_changes

        parse_allow_changes(allow_changes)  # unsafe keys fail before any model is built
        run_pretrain(loaded, output_dir=output_dir, resume=resume, allow_changes=allow_changes)
