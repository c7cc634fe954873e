"""`uta inspect-mask`: what a masking setting does, before spending GPU-hours on it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import typer
from rich.console import Console

from uta_cli.errors import UtaUsageError

_CHOICES = ("random", "block", "reversed-block", "attention", "all")
_FLAG_HINT = ("With inspect-mask, change it with --mask-ratio R, --grid HxW, --strategy S, or "
              "--set mask.KEY=VALUE (e.g. --set mask.min_block_patches=4).")


def parse_grid(text: str) -> tuple[int, int]:
    """'14' -> (14, 14); '16x12' -> (16, 12)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*", text)
    if not match or int(match.group(1)) < 1 or (match.group(2) and int(match.group(2)) < 1):
        raise UtaUsageError(
            f"--grid {text!r} is not a patch grid. Give H or HxW in patches (positive integers), "
            "e.g. --grid 14 for ViT-B/16 at 224 px, or --grid 16x12."
        )
    h = int(match.group(1))
    return h, int(match.group(2) or h)


def inspect_mask(
    recipe: str | None = typer.Argument(
        None, help="A built-in recipe name (demo, vitb16, vitl14) or a YAML path/URL whose mask "
        "settings and student grid apply. Default: the demo recipe."),
    strategy: Literal["random", "block", "reversed-block", "attention", "all"] | None = \
        typer.Option(None, "--strategy", help="random, block, reversed-block, attention (a run's "
                     "teacher on real images: needs --ckpt and --data), or all (the first three "
                     "side by side). Default: the recipe's mask.strategy."),
    mask_ratio: float | None = typer.Option(
        None, "--mask-ratio", help="Fraction of patch tokens masked (dropped), in (0, 1). "
        "Default: the recipe's mask.ratio."),
    grid: str | None = typer.Option(
        None, "--grid", help="Patch grid H or HxW. Default: the recipe's "
        "student.image_size // student.patch_size."),
    samples: int | None = typer.Option(
        None, "--samples", help="Masks to draw per strategy (>= 100; default 5000). With "
        "--strategy attention: images of --data (default: all of them, at most 256)."),
    seed: int | None = typer.Option(None, "--seed", help="Mask seed. Default: the recipe's "
                                       "seed."),
    epoch: int = typer.Option(0, "--epoch", help="Epoch whose masks to draw (masks change with "
                              "the epoch)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key, e.g. --set "
                                   "mask.min_block_patches=16 (repeatable)."),
    output_json: Path | None = typer.Option(None, "--output-json", help="Write every figure "
                                               "(and the maps) as JSON."),
    png: Path | None = typer.Option(None, "--png", help="Write the heat map(s) with a colour "
                                       "bar as a PNG."),
    csv_path: Path | None = typer.Option(None, "--csv", help="Write the probability map(s) as "
                                            "CSV: strategy,row,col,p_masked,p_visible."),
    ckpt: str | None = typer.Option(None, "--ckpt", help="--strategy attention: the pre-training "
                                    "run whose teacher, grid, ratio and temperature apply."),
    data: str | None = typer.Option(None, "--data", help="--strategy attention: a folder of "
                                    "images (class folders or flat)."),
) -> None:
    """Mask statistics and heat maps: how often each patch is masked, how even the coverage is,
    how large the blocks are, how much samples differ (the paper's Figure 3, and more).

    The masks come from the same generator as training (seeded by seed, epoch and sample index).

    Examples:

      uta inspect-mask                        (the demo recipe's settings)

      uta inspect-mask vitb16 --strategy all --png fig3.png

      uta inspect-mask --strategy all --grid 14 --set mask.min_block_patches=16

      uta inspect-mask vitb16 --mask-ratio 0.75 --output-json m.json --csv m.csv

      uta inspect-mask my.yaml --grid 16x12 --samples 20000 --seed 3

      uta inspect-mask --strategy attention --ckpt runs/demo --data images/ --samples 64
    """
    err = Console(stderr=True)
    try:
        if strategy == "attention" or ckpt is not None or data is not None:
            report = _run_attention(strategy, ckpt, data, samples, seed)
        else:
            report = _run(recipe, strategy, mask_ratio, grid, 5000 if samples is None else samples,
                          seed, epoch, set_)
        from uta_cli.masks.report import render_report, write_csv, write_json, write_png

        out = Console()
        render_report(report, out)
        for path, write, what in ((output_json, write_json, "JSON"), (csv_path, write_csv, "CSV"),
                                  (png, write_png, "PNG")):
            if path is not None:
                try:
                    write(report, path)
                except OSError as e:
                    raise UtaUsageError(f"Cannot write the {what} file {path}: {e.strerror or e}. "
                                        "Choose a writable path.") from None
                out.print(f"wrote {what}: {path}", highlight=False)
    except UtaUsageError as e:
        err.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _run_attention(strategy: str | None, ckpt: str | None, data: str | None,
                   samples: int | None, seed: int | None) -> dict:
    if strategy != "attention" or not ckpt or not data:
        raise UtaUsageError("--ckpt and --data go with --strategy attention, and it needs both: "
                            "uta inspect-mask --strategy attention --ckpt RUN --data DIR (the "
                            "run's teacher draws the masks on the images of DIR).")
    if samples is not None and samples < 1:
        raise UtaUsageError(f"--samples {samples}: give a positive number of images (at most "
                            f"256), or leave it out for all images of --data.")
    from uta_cli.workflows.inspect_mask import inspect_attention_masks

    return inspect_attention_masks(ckpt, data, images=samples or 0, seed=seed or 0)


def _run(recipe: str | None, strategy: str | None, mask_ratio: float | None, grid: str | None,
         samples: int, seed: int | None, epoch: int, overrides: list[str]) -> dict:
    from uta_cli.masks.generate import STRATEGIES, MaskSpec
    from uta_cli.recipe import load_recipe
    from uta_cli.workflows.inspect_mask import check_samples, inspect_masks

    # Flags first: their messages name the flag, not the recipe key.
    if strategy is not None and strategy not in _CHOICES:
        raise UtaUsageError(f"--strategy {strategy!r} is not a masking strategy. Use one of: "
                            f"{', '.join(_CHOICES)}.")
    if mask_ratio is not None and not 0.0 < mask_ratio < 1.0:
        raise UtaUsageError(f"--mask-ratio {mask_ratio} is outside (0, 1). It is the fraction of "
                            "patch tokens masked (dropped); give a value strictly between 0 and "
                            "1, e.g. --mask-ratio 0.5.")
    parsed_grid = parse_grid(grid) if grid is not None else None
    check_samples(samples)

    loaded = load_recipe(recipe, overrides)
    m, student = loaded.mask, loaded.student
    if parsed_grid is None:
        side_h = side_w = student.image_size // student.patch_size
        parsed_grid = (side_h, side_w)
    chosen = strategy or m.strategy
    spec = MaskSpec(strategy=m.strategy if chosen == "all" else chosen,
                    ratio=m.ratio if mask_ratio is None else mask_ratio,
                    min_block_patches=m.min_block_patches, min_aspect=m.min_aspect,
                    max_tries=m.max_tries)
    try:
        return inspect_masks(
            spec, parsed_grid, samples=samples, seed=loaded.seed if seed is None else seed,
            epoch=epoch, strategies=list(STRATEGIES) if chosen == "all" else [chosen],
            width=student.width, mlp_ratio=student.mlp_ratio, source=recipe or "demo",
        )
    except UtaUsageError as e:
        raise UtaUsageError(f"{e} {_FLAG_HINT}") from None
