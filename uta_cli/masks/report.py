"""The report of `uta inspect-mask` (inspect_mask.inspect_masks) shown and written: rich tables
and heat maps in the terminal, and JSON, CSV and PNG files.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uta_cli.io import atomic_path, atomic_write_json

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
    atomic_write_json(str(path), report, indent=2)


def write_csv(report: dict[str, Any], path: str | Path) -> None:
    """The maps in long form: strategy,row,col,p_masked,p_visible (one line per location)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(str(path)) as tmp, open(tmp, "w", newline="") as f:
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
    with atomic_path(str(path)) as tmp:
        image.save(tmp, format="PNG")
    return size


__all__ = ["colour", "png_size", "render_report", "write_csv", "write_json", "write_png"]
