"""Mask coverage statistics and heat maps (the paper's Figure 3, and more).

The core of `uta inspect-mask`, usable from a notebook:

    from uta_cli.inspect_mask import inspect_masks, render_report, write_png
    from uta_cli.masking import MaskSpec
    report = inspect_masks(MaskSpec(ratio=0.5), (14, 14), samples=5000,
                           strategies=["random", "block", "reversed-block"])
    render_report(report)                # rich tables and terminal heat maps
    write_png(report, "figure3.png")     # side-by-side heat maps with a colour bar

The masks come from `uta_cli.masking.generate_masks_detailed`, the very generator training uses
(sample ids 0..samples-1 at the given seed and epoch), generated in chunks: rows do not depend on
the batch they are generated in, so chunking changes nothing.

Probabilities are over samples. "P(masked)" at a location is the fraction of samples that drop it;
UTA aligns only visible tokens, so P(visible) = 1 - P(masked) is where the student learns.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uta_cli.errors import UtaUsageError
from uta_cli.masking import (
    STRATEGIES,
    MaskSpec,
    generate_masks_detailed,
    num_masked,
    num_visible,
    validate_mask_spec,
)

MIN_SAMPLES = 100
DEFAULT_SAMPLES = 5000
_CHUNK = 4096

DEFINITIONS = {
    "mask_probability": "per location: the fraction of samples in which the patch is masked "
                        "(dropped); visible probability = 1 - it",
    "centre": "the central 2x2 patches (1 patch along an odd side)",
    "border": "the outermost ring of patches, corners included",
    "corner": "the 4 corner patches",
    "interior": "every patch not on the border",
    "coverage": "evenness of the VISIBLE probability map (where UTA trains): cv = spatial std / "
                "mean; min_max_ratio = least / most often visible location",
    "blocks": "rectangles accepted by the BEiT block procedure (masked blocks for block, visible "
              "blocks for reversed-block); area = h*w as drawn, new_patches = patches it added, "
              "aspect = h/w; random_fill = patches set by the exact-count fix instead",
    "components": "4-connected regions of visible / masked patches in each sample",
    "sample_variation": "between two independent samples: fraction of locations whose state "
                        "differs (hamming) and intersection-over-union of their visible sets",
    "flop_share": "student cost relative to the full sequence: tokens = (visible + 1) / (N + 1) "
                  "with CLS; vit_blocks = transformer-block FLOPs, n(8 + 4*mlp_ratio)D^2 + "
                  "4n^2 D per block for width D and a two-matrix MLP (patch embedding and head "
                  "excluded)",
}


# --------------------------------------------------------------------------------------------
# Statistics


def _summary(x: np.ndarray) -> dict[str, float]:
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return {k: 0.0 for k in ("mean", "std", "min", "p10", "p50", "p90", "max")}
    p10, p50, p90 = np.percentile(x, [10, 50, 90])
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()),
            "p10": float(p10), "p50": float(p50), "p90": float(p90), "max": float(x.max())}


def _histogram(values: np.ndarray) -> dict[str, int]:
    counts = np.bincount(np.asarray(values, dtype=np.int64))
    return {str(k): int(c) for k, c in enumerate(counts) if c}


def _components(sets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4-connected components of each sample's True set, for the whole batch at once.

    Returns (components per sample, every component's size, the largest size per sample). Each
    cell starts labelled with its own position; labels shrink to the smallest neighbour label and
    jump to their label's label until nothing changes, leaving each component's smallest position.
    """
    b, h, w = sets.shape
    n = h * w
    none = n  # label of cells outside the set: larger than any position
    lab = np.where(sets, np.arange(n, dtype=np.int32).reshape(1, h, w), none).astype(np.int32)
    todo, cur, cur_sets = np.arange(b), lab, sets  # only samples whose labels still change
    while todo.size:
        k = todo.size
        new = cur.copy()
        np.minimum(new[:, 1:], cur[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], cur[:, 1:], out=new[:, :-1])
        np.minimum(new[:, :, 1:], cur[:, :, :-1], out=new[:, :, 1:])
        np.minimum(new[:, :, :-1], cur[:, :, 1:], out=new[:, :, :-1])
        new[~cur_sets] = none
        flat = new.reshape(k, n)
        padded = np.concatenate([flat, np.full((k, 1), none, dtype=np.int32)], axis=1)
        jumped = padded.ravel()[(np.arange(k, dtype=np.int64) * (n + 1))[:, None] + flat]
        changed = (jumped != cur.reshape(k, n)).any(axis=1)
        jumped = jumped.reshape(k, h, w)
        lab[todo] = jumped
        todo, cur, cur_sets = todo[changed], jumped[changed], cur_sets[changed]
    flat = lab.reshape(b, n)
    rows = np.repeat(np.arange(b), n).reshape(b, n)
    sizes = np.bincount((rows * (n + 1) + flat)[sets.reshape(b, n)], minlength=b * (n + 1))
    sizes = sizes.reshape(b, n + 1)
    return (sizes > 0).sum(axis=1), sizes[sizes > 0], sizes.max(axis=1)


def _region_masks(grid: tuple[int, int]) -> dict[str, np.ndarray]:
    h, w = grid
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    border = (r == 0) | (r == h - 1) | (c == 0) | (c == w - 1)
    corner = ((r == 0) | (r == h - 1)) & ((c == 0) | (c == w - 1))
    centre = ((r == (h - 1) // 2) | (r == h // 2)) & ((c == (w - 1) // 2) | (c == w // 2))
    return {"centre": centre, "border": border, "corner": corner, "interior": ~border}


def flop_share(grid: tuple[int, int], ratio: float, width: int = 768,
               mlp_ratio: float = 4.0) -> dict[str, float]:
    """Student cost on the visible tokens (+CLS) relative to the full sequence (+CLS)."""
    n = grid[0] * grid[1]
    full, kept = n + 1, num_visible(n, ratio) + 1

    def block_flops(tokens: int) -> float:
        return tokens * (8 + 4 * mlp_ratio) * width**2 + 4 * tokens**2 * width

    return {"tokens": kept / full, "vit_blocks": block_flops(kept) / block_flops(full),
            "width": int(width), "mlp_ratio": float(mlp_ratio)}


def _strategy_stats(spec: MaskSpec, grid: tuple[int, int], samples: int, seed: int, epoch: int,
                    width: int, mlp_ratio: float) -> tuple[dict[str, Any], float]:
    h, w = grid
    n = h * w
    map_sum = np.zeros(n, dtype=np.int64)
    masked_counts, vis_comp, vis_largest, mask_comp, mask_largest = [], [], [], [], []
    vis_sizes, mask_sizes, hamming, iou, fills = [], [], [], [], []
    rect_sample, rect_h, rect_w, rect_new = [], [], [], []
    seconds = 0.0
    for start in range(0, samples, _CHUNK):
        ids = np.arange(start, min(start + _CHUNK, samples))
        t0 = time.perf_counter()
        batch = generate_masks_detailed(spec, grid, seed, epoch, ids)
        seconds += time.perf_counter() - t0
        masks = batch.masks
        map_sum += masks.sum(axis=0)
        masked_counts.append(masks.sum(axis=1))
        fills.append(batch.random_fill)
        rect_sample.append(batch.rect_sample + start)
        rect_h.append(batch.rect_h)
        rect_w.append(batch.rect_w)
        rect_new.append(batch.rect_new)
        grid_masks = masks.reshape(-1, h, w)
        for sets, comp, largest, sizes in ((~grid_masks, vis_comp, vis_largest, vis_sizes),
                                           (grid_masks, mask_comp, mask_largest, mask_sizes)):
            c, s, big = _components(sets)
            comp.append(c)
            sizes.append(s)
            largest.append(big)
        # Independent pairs (sample 2k, sample 2k+1) for the sample-to-sample variation.
        a, b = masks[0:len(ids) - 1:2], masks[1:len(ids):2]
        hamming.append((a != b).mean(axis=1))
        va, vb = ~a, ~b
        iou.append((va & vb).sum(axis=1) / np.maximum((va | vb).sum(axis=1), 1))

    cat = np.concatenate
    masked_counts = cat(masked_counts)
    prob = map_sum / samples
    visible_prob = 1.0 - prob
    prob_grid = prob.reshape(h, w)
    regions = _region_masks(grid)
    region_stats = {}
    for name, sel in regions.items():
        if sel.any():
            p = float(prob_grid[sel].mean())
            region_stats[name] = {"masked": p, "visible": 1.0 - p, "locations": int(sel.sum())}
        else:
            region_stats[name] = None
    vis_mean = float(visible_prob.mean())
    least, most = int(visible_prob.argmin()), int(visible_prob.argmax())
    n_visible = num_visible(n, spec.ratio)
    stats: dict[str, Any] = {
        "strategy": spec.strategy,
        "num_patches": n,
        "num_masked": num_masked(n, spec.ratio),
        "num_visible": n_visible,
        "masked_ratio": _summary(masked_counts / n),
        "visible_tokens": _summary(n - masked_counts),
        "mask_probability": {
            "min": float(prob.min()), "max": float(prob.max()), "mean": float(prob.mean()),
            "spatial_std": float(prob.std()),
            "sampling_std_error": math.sqrt(spec.ratio * (1 - spec.ratio) / samples),
            "map": prob_grid.round(6).tolist(),
        },
        "regions": region_stats,
        "coverage": {
            "cv": float(visible_prob.std() / vis_mean) if vis_mean > 0 else 0.0,
            "min_max_ratio": float(visible_prob.min() / visible_prob.max())
            if visible_prob.max() > 0 else 0.0,
            "least_visible": {"row": least // w, "col": least % w,
                              "probability": float(visible_prob[least])},
            "most_visible": {"row": most // w, "col": most % w,
                             "probability": float(visible_prob[most])},
        },
        "blocks": None,
        "components": {
            "visible": {"per_sample": _summary(cat(vis_comp)),
                        "size": _summary(cat(vis_sizes)),
                        "largest_share": _summary(cat(vis_largest) / max(n_visible, 1))},
            "masked": {"per_sample": _summary(cat(mask_comp)),
                       "size": _summary(cat(mask_sizes)),
                       "largest_share": _summary(cat(mask_largest) / max(n - n_visible, 1))},
        },
        "sample_variation": {
            "hamming": _summary(cat(hamming)),
            "visible_iou": _summary(cat(iou)),
            "hamming_if_independent_uniform": 2 * spec.ratio * (1 - spec.ratio),
            "pairs": int(sum(x.size for x in hamming)),
        },
        "flop_share": flop_share(grid, spec.ratio, width, mlp_ratio),
    }
    if spec.strategy != "random":
        r_sample, r_h, r_w, r_new = cat(rect_sample), cat(rect_h), cat(rect_w), cat(rect_new)
        per_mask = np.bincount(r_sample, minlength=samples)
        fill = cat(fills)
        stats["blocks"] = {
            "blocks_are": "masked" if spec.strategy == "block" else "visible",
            "per_mask": {**_summary(per_mask), "histogram": _histogram(per_mask)},
            "area": _summary(r_h * r_w),
            "new_patches": _summary(r_new),
            "aspect": {**_summary(r_h / r_w), "geometric_mean": float(np.exp(np.mean(
                np.log(r_h / r_w)))) if r_h.size else 0.0},
            "height": _summary(r_h),
            "width": _summary(r_w),
            "random_fill": {**_summary(fill),
                            "share_of_target": float(fill.mean()) / max(
                                n_visible if spec.strategy == "reversed-block"
                                else n - n_visible, 1)},
        }
    return stats, seconds


def check_samples(samples: int) -> None:
    if samples < MIN_SAMPLES:
        raise UtaUsageError(
            f"--samples {samples} is too few: a location's masking probability estimated from "
            f"so few masks has a standard error of up to {0.5 / math.sqrt(max(samples, 1)):.2f}. "
            f"Use --samples {MIN_SAMPLES} or more; the paper's Figure 3 averages "
            f"{DEFAULT_SAMPLES}."
        )


def inspect_masks(
    spec: MaskSpec,
    grid: tuple[int, int],
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    epoch: int = 0,
    strategies: Sequence[str] | None = None,
    width: int = 768,
    mlp_ratio: float = 4.0,
    source: str | None = None,
) -> dict[str, Any]:
    """Every statistic of `uta inspect-mask`, as a JSON-ready dict.

    `strategies` defaults to `spec.strategy`; the other `spec` fields apply to each of them.
    `width` and `mlp_ratio` describe the student for the FLOP share; `source` (e.g. the recipe
    name) is recorded in the settings. Raises UtaUsageError on bad settings.
    """
    names = list(strategies) if strategies else [spec.strategy]
    for name in names:
        validate_mask_spec(MaskSpec(name, spec.ratio, spec.min_block_patches, spec.min_aspect,
                                    spec.max_tries), grid)
    check_samples(samples)
    grid = (int(grid[0]), int(grid[1]))
    report: dict[str, Any] = {
        "settings": {
            "source": source, "grid": list(grid), "ratio": float(spec.ratio),
            "samples": int(samples), "seed": int(seed), "epoch": int(epoch),
            "min_block_patches": int(spec.min_block_patches), "min_aspect": float(spec.min_aspect),
            "max_tries": int(spec.max_tries), "strategies": names,
            "student_width": int(width), "student_mlp_ratio": float(mlp_ratio),
        },
        "definitions": DEFINITIONS,
        "strategies": {},
        "timing": {},
    }
    total = 0.0
    for name in names:
        one = MaskSpec(name, spec.ratio, spec.min_block_patches, spec.min_aspect, spec.max_tries)
        stats, seconds = _strategy_stats(one, grid, samples, seed, epoch, width, mlp_ratio)
        report["strategies"][name] = stats
        report["timing"][name] = {"seconds": seconds,
                                  "masks_per_second": samples / seconds if seconds else None}
        total += seconds
    report["timing"]["total_seconds"] = total
    return report


# --------------------------------------------------------------------------------------------
# Colours: an approximation of matplotlib's viridis (perceptually ordered, colour-blind safe).

_VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)],
                    dtype=np.float64)


def colour(value: float) -> tuple[int, int, int]:
    """RGB for a probability in [0, 1]."""
    x = min(max(float(value), 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(x), len(_VIRIDIS) - 2)
    rgb = _VIRIDIS[i] + (x - i) * (_VIRIDIS[i + 1] - _VIRIDIS[i])
    return int(round(rgb[0])), int(round(rgb[1])), int(round(rgb[2]))


def _rgb(rgb: tuple[int, int, int]) -> str:
    return f"rgb({rgb[0]},{rgb[1]},{rgb[2]})"


def _ink(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


# --------------------------------------------------------------------------------------------
# Terminal


def _fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}"


_BLOCK_LABELS = ("blocks/mask mean±std", "block area (p10..p90)", "block h/w (p10..p90)",
                 "random fill per mask")


def _rows(stats: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of the terminal table; labels stay short for 80-column terminals."""
    mr, mp, reg = stats["masked_ratio"], stats["mask_probability"], stats["regions"]
    cov, var, comp = stats["coverage"], stats["sample_variation"], stats["components"]

    def region(key: str) -> str:
        parts = [reg[k][key] if reg[k] else None for k in ("centre", "border", "corner")]
        return "/".join("-" if p is None else _fmt(p, 2) for p in parts)

    def regions(part: dict[str, Any]) -> str:
        return f"{part['per_sample']['mean']:.2f}, max {part['largest_share']['mean']:.0%}"

    vt = stats["visible_tokens"]
    rows = [
        ("masked/visible tokens",
         f"{stats['num_masked']}/{stats['num_visible']} of {stats['num_patches']}"),
        ("masked ratio mean±std", f"{_fmt(mr['mean'], 4)}±{_fmt(mr['std'], 4)}"),
        ("visible tokens/sample", f"{vt['min']:.0f}..{vt['max']:.0f}"),
        ("P(masked) min/max", f"{_fmt(mp['min'])}/{_fmt(mp['max'])}"),
        ("P(masked) mean/xy-std", f"{_fmt(mp['mean'])}/{_fmt(mp['spatial_std'])}"),
        ("P(masked) ctr/border/cnr", region("masked")),
        ("P(visible) ctr/border/cnr", region("visible")),
        ("coverage cv (visible)", _fmt(cov["cv"])),
        ("least/most visible", _fmt(cov["min_max_ratio"])),
    ]
    blocks = stats["blocks"]
    if blocks:
        pm, area, asp = blocks["per_mask"], blocks["area"], blocks["aspect"]
        rows += [
            ("blocks are", blocks["blocks_are"]),
            (_BLOCK_LABELS[0], f"{pm['mean']:.2f}±{pm['std']:.2f}"),
            (_BLOCK_LABELS[1], f"{area['mean']:.1f} ({area['p10']:.0f}..{area['p90']:.0f})"),
            (_BLOCK_LABELS[2],
             f"{asp['geometric_mean']:.2f} ({asp['p10']:.2f}..{asp['p90']:.2f})"),
            (_BLOCK_LABELS[3], f"{blocks['random_fill']['mean']:.2f}"),
        ]
    else:
        rows += [("blocks are", "no blocks")] + [(label, "-") for label in _BLOCK_LABELS]
    rows += [
        ("visible regions (max)", regions(comp["visible"])),
        ("masked regions (max)", regions(comp["masked"])),
        ("hamming (if uniform)",
         f"{_fmt(var['hamming']['mean'])} ({var['hamming_if_independent_uniform']:.3f})"),
        ("visible IoU 2 samples", _fmt(var["visible_iou"]["mean"])),
        ("FLOP share tokens/ViT",
         f"{stats['flop_share']['tokens']:.3f}/{stats['flop_share']['vit_blocks']:.3f}"),
    ]
    return rows


def _heatmap_text(stats: dict[str, Any], values: bool, coloured: bool = True):
    from rich.text import Text

    prob = np.asarray(stats["mask_probability"]["map"])
    text = Text()
    for r, row in enumerate(prob):
        for p in row:
            rgb = colour(p)
            style = f"{_rgb(_ink(rgb))} on {_rgb(rgb)}" if coloured else ""
            cell = f"{min(round(p * 100), 99):>3d}" if values else "  "
            text.append(cell, style=style)
        if r < prob.shape[0] - 1:
            text.append("\n")
    return text


def _legend(coloured: bool = True):
    from rich.text import Text

    if not coloured:
        return Text("Cells: P(masked) in percent (99 = 99-100).")
    text = Text("P(masked)  0.0 ")
    for k in range(21):
        text.append(" ", style=f"on {_rgb(colour(k / 20))}")
    text.append(" 1.0   (numbers in cells: percent, 99 = 99-100)")
    return text


def render_report(report: dict[str, Any], console: Any = None) -> None:
    """Print the summary table and the heat maps (side by side) with rich."""
    from rich import box
    from rich.console import Console, Group
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    settings, strategies = report["settings"], report["strategies"]
    h, w = settings["grid"]
    title = (f"Mask statistics: {h}x{w} grid, ratio {settings['ratio']}, "
             f"{settings['samples']} samples, seed {settings['seed']}"
             + (f", epoch {settings['epoch']}" if settings["epoch"] else "")
             + (f" ({settings['source']})" if settings["source"] else ""))
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("figure", style="bold")
    columns = [_rows(stats) for stats in strategies.values()]
    for name in strategies:
        table.add_column(name, justify="right")
    for i, (label, _) in enumerate(columns[0]):  # every strategy has the same rows
        table.add_row(label, *(column[i][1] for column in columns))
    timing = report["timing"]
    table.add_row("generation time",
                  *(f"{timing[name]['seconds']:.3f} s" for name in strategies))
    console.print(table)
    console.print(Text("ctr = central 2x2, border = outer ring, cnr = the 4 corners; xy-std = "
                       "spatial std; h/w = geometric mean; regions = 4-connected (mean count, mean "
                       "share of the largest); hamming = share of locations two samples differ in. "
                       "--output-json writes every figure with its definition.", style="dim"))

    # Three-character cells show the percentage; two-character ones only the colour. Without
    # colour (a pipe, NO_COLOR) always show the numbers; wrap the maps when the console is narrow.
    names = list(strategies)
    coloured = console.color_system is not None

    def per_row(cell: int) -> int:
        return max(1, (console.width + 3) // (cell * w + 3))

    cell = 2 if coloured and per_row(3) < len(names) <= per_row(2) else 3
    step = min(len(names), per_row(cell))
    for i in range(0, len(names), step):
        grid = Table.grid(padding=(0, 3))
        group = names[i:i + step]
        for _ in group:
            grid.add_column()
        grid.add_row(*(Group(Text(f"{name}: P(masked)", style="bold"),
                             _heatmap_text(strategies[name], cell == 3, coloured))
                       for name in group))
        console.print(grid)
    console.print(_legend(coloured))


# --------------------------------------------------------------------------------------------
# Files


def write_json(report: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def write_csv(report: dict[str, Any], path: str | Path) -> None:
    """The maps in long form: strategy,row,col,p_masked,p_visible (one line per location)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["strategy", "row", "col", "p_masked", "p_visible"])
        for name, stats in report["strategies"].items():
            for r, row in enumerate(stats["mask_probability"]["map"]):
                for c, p in enumerate(row):
                    out.writerow([name, r, c, f"{p:.6f}", f"{1 - p:.6f}"])


# PNG layout, in pixels.
_MARGIN, _GAP, _TITLE, _BAR, _BAR_LABELS, _FOOT = 16, 16, 44, 16, 48, 24


def png_cell_size(grid: Sequence[int]) -> int:
    """Pixels per patch: about 280 px per map side, between 4 and 40."""
    return int(min(40, max(4, round(280 / max(grid)))))


def png_size(grid: Sequence[int], maps: int) -> tuple[int, int]:
    """(width, height) of the PNG that `write_png` draws for `maps` heat maps of `grid`."""
    cell = png_cell_size(grid)
    map_w, map_h = cell * grid[1], cell * grid[0]
    width = _MARGIN + maps * map_w + (maps - 1) * _GAP + _GAP + _BAR + _BAR_LABELS + _MARGIN
    height = _TITLE + map_h + _FOOT
    return width, height


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def write_png(report: dict[str, Any], path: str | Path) -> tuple[int, int]:
    """Heat map(s) of P(masked), side by side, with a colour bar; returns (width, height)."""
    from PIL import Image, ImageDraw

    settings, strategies = report["settings"], report["strategies"]
    grid = settings["grid"]
    cell = png_cell_size(grid)
    map_w, map_h = cell * grid[1], cell * grid[0]
    size = png_size(grid, len(strategies))
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    title_font, small = _font(14), _font(11)
    value_font = _font(max(8, cell // 3))

    x = _MARGIN
    for name, stats in strategies.items():
        prob = np.asarray(stats["mask_probability"]["map"])
        draw.text((x, 6), name, fill=(0, 0, 0), font=title_font)
        reg = stats["regions"]
        sub = f"P(masked) mean {stats['mask_probability']['mean']:.2f}"
        if reg["centre"] and reg["corner"]:
            sub = (f"P(masked): centre {reg['centre']['masked']:.2f}, "
                   f"corner {reg['corner']['masked']:.2f}")
        draw.text((x, 24), sub, fill=(80, 80, 80), font=small)
        for r in range(grid[0]):
            for c in range(grid[1]):
                rgb = colour(prob[r, c])
                box = (x + c * cell, _TITLE + r * cell, x + (c + 1) * cell - 1,
                       _TITLE + (r + 1) * cell - 1)
                draw.rectangle(box, fill=rgb)
                if cell >= 28:
                    draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2),
                              f"{prob[r, c]:.2f}", fill=_ink(rgb), font=value_font, anchor="mm")
        x += map_w + _GAP

    # Colour bar: 1 at the top, 0 at the bottom, ticks every 0.25.
    bar_x = x
    for y in range(map_h):
        draw.line([(bar_x, _TITLE + y), (bar_x + _BAR - 1, _TITLE + y)],
                  fill=colour(1 - y / max(map_h - 1, 1)))
    draw.rectangle((bar_x, _TITLE, bar_x + _BAR - 1, _TITLE + map_h - 1), outline=(0, 0, 0))
    for k in range(5):
        v = k / 4
        y = _TITLE + round((1 - v) * (map_h - 1))
        draw.line([(bar_x + _BAR, y), (bar_x + _BAR + 3, y)], fill=(0, 0, 0))
        draw.text((bar_x + _BAR + 6, y), f"{v:.2f}", fill=(0, 0, 0), font=small, anchor="lm")
    draw.text((bar_x, 24), "P(masked)", fill=(80, 80, 80), font=small)
    foot = (f"{grid[0]}x{grid[1]}, ratio {settings['ratio']}, {settings['samples']} samples, "
            f"seed {settings['seed']}")
    draw.text((_MARGIN, _TITLE + map_h + 6), foot, fill=(80, 80, 80), font=small)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return size


__all__ = [
    "DEFAULT_SAMPLES", "MIN_SAMPLES", "STRATEGIES", "check_samples", "colour", "flop_share",
    "inspect_masks", "png_size", "render_report", "write_csv", "write_json", "write_png",
]
