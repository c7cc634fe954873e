"""Mask coverage statistics (the paper's Figure 3, and more); masks/report.py shows and writes
them (terminal tables and heat maps, JSON, CSV, PNG).

The core of `uta inspect-mask`, usable from a notebook:

    from uta_cli.workflows.inspect_mask import inspect_masks
    from uta_cli.masks.report import render_report, write_png
    from uta_cli.masks.generate import MaskSpec
    report = inspect_masks(MaskSpec(ratio=0.5), (14, 14), samples=5000,
                           strategies=["random", "block", "reversed-block"])
    render_report(report)                # rich tables and terminal heat maps
    write_png(report, "figure3.png")     # side-by-side heat maps with a colour bar

The masks come from `uta_cli.masks.generate.generate_masks_detailed`, the very generator
training uses (sample ids 0..samples-1 at the given seed and epoch), generated in chunks: rows
do not depend on the batch they are generated in, so chunking changes nothing.

Probabilities are over samples. "P(masked)" at a location is the fraction of samples that drop it;
UTA aligns only visible tokens, so P(visible) = 1 - P(masked) is where the student learns.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from uta_cli import checkpoint as ckpt
from uta_cli.data.pipeline import open_dataset
from uta_cli.data.transforms import EvalTransform, View, normalize
from uta_cli.errors import UtaUsageError
from uta_cli.loading.model import teacher_from_meta
from uta_cli.masks.generate import (
    DEVICE_STRATEGIES,
    STRATEGIES,
    MaskBatch,
    MaskSpec,
    attention_keep,
    attention_noise,
    generate_masks_detailed,
    num_masked,
    num_visible,
    validate_mask_spec,
)

MAX_ATTENTION_IMAGES = 256  # each image costs one teacher forward

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


def _generated(spec: MaskSpec, grid: tuple[int, int], samples: int, seed: int, epoch: int):
    """(first sample index, MaskBatch, seconds) chunks of the generator training uses."""
    for start in range(0, samples, _CHUNK):
        ids = np.arange(start, min(start + _CHUNK, samples))
        t0 = time.perf_counter()
        batch = generate_masks_detailed(spec, grid, seed, epoch, ids)
        yield start, batch, time.perf_counter() - t0


def _strategy_stats(spec: MaskSpec, grid: tuple[int, int], samples: int, seed: int, epoch: int,
                    width: int, mlp_ratio: float, chunks=None) -> tuple[dict[str, Any], float]:
    """Statistics of `samples` masks: generated, or the given (start, MaskBatch, seconds)."""
    h, w = grid
    n = h * w
    map_sum = np.zeros(n, dtype=np.int64)
    masked_counts, vis_comp, vis_largest, mask_comp, mask_largest = [], [], [], [], []
    vis_sizes, mask_sizes, hamming, iou, fills = [], [], [], [], []
    rect_sample, rect_h, rect_w, rect_new = [], [], [], []
    seconds = 0.0
    for start, batch, took in chunks or _generated(spec, grid, samples, seed, epoch):
        seconds += took
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
        a, b = masks[0:len(masks) - 1:2], masks[1:len(masks):2]
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
    if spec.strategy in ("block", "reversed-block"):
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
    device_drawn = [n for n in names if n in DEVICE_STRATEGIES]
    if device_drawn:
        raise UtaUsageError(
            f"Strategy {device_drawn[0]} draws from a teacher's attention on real images: give "
            f"the run and the images, uta inspect-mask --strategy {device_drawn[0]} --ckpt RUN "
            f"--data DIR.")
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


def inspect_attention_masks(run: str, data: str, images: int = 0, seed: int = 0,
                            width: int | None = None, batch_size: int = 32) -> dict[str, Any]:
    """`uta inspect-mask --strategy attention`: the masks a run's teacher draws on real images.

    Each of the first `images` images of `data` (0 = all of them, at most 256) goes once
    through the run's teacher, at the run's grid matching; its CLS-to-patch attention then gives
    masks by the training code's draw (`attention_keep`, the run's ratio and temperature), as
    many per image as make DEFAULT_SAMPLES masks in all. Statistics as for the other strategies,
    plus the mean attention map.
    """
    folder = ckpt.resolve_checkpoint(run)
    meta = ckpt.load_meta(folder)
    if "mask" not in meta or "teacher" not in meta or "student" not in meta:
        raise UtaUsageError(f"{folder} is not a pre-training checkpoint (its meta.json records "
                            f"no mask, teacher and student). Give the run directory of a "
                            f"`uta pretrain` run to --ckpt.")
    student = meta["student"]
    grid = (student["image_size"] // student["patch_size"],) * 2
    teacher = teacher_from_meta(meta)
    problem = teacher.attention_problem()
    if problem:
        raise UtaUsageError(f"The teacher of {folder} cannot give attention masks: {problem}.")
    teacher.match_grid(grid, meta.get("grid_match", "resize"))
    ident = teacher.identity
    view = View("teacher", teacher.image_size, tuple(ident.mean), tuple(ident.std),
                ident.interpolation, resize_mode=ident.resize_mode)
    dataset = open_dataset(data, "folder", EvalTransform([view]))
    limit = min(len(dataset), images or MAX_ATTENTION_IMAGES)
    if images > MAX_ATTENTION_IMAGES:
        raise UtaUsageError(f"--samples {images}: at most {MAX_ATTENTION_IMAGES} images, each "
                            f"costs one teacher forward. Give --samples {MAX_ATTENTION_IMAGES} "
                            f"or fewer.")
    rows = []
    for start in range(0, limit, batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, limit))]
        pixels = [it["teacher"] for it in items if it is not None]
        if pixels:
            _, attn = teacher.targets(normalize(torch.stack(pixels), view), cls_attention=True)
            rows.append(attn)
    if not rows:
        raise UtaUsageError(f"No readable image among the first {limit} of {data}. Give a "
                            f"folder of images (class folders or flat) to --data.")
    attention = torch.cat(rows)
    count, n = attention.shape[0], grid[0] * grid[1]
    mask = meta["mask"]
    spec = MaskSpec(strategy="attention", ratio=float(mask["ratio"]),
                    attention_temperature=float(mask.get("attention_temperature", 1.0)))
    validate_mask_spec(spec, grid)
    draws = max(1, math.ceil(DEFAULT_SAMPLES / count))
    keep_n = num_visible(n, spec.ratio)
    empty = np.zeros(0, dtype=np.int64)

    def chunks():
        for d in range(draws):  # draw d of every image: neighbours are different images
            t0 = time.perf_counter()
            noise = torch.from_numpy(attention_noise(seed, d, np.arange(count), n))
            keep = attention_keep(attention, noise, keep_n, spec.attention_temperature)
            masks = np.ones((count, n), dtype=bool)
            np.put_along_axis(masks, keep.numpy(), False, axis=1)
            yield d * count, MaskBatch(masks, empty, empty, empty, empty,
                                       np.zeros(count, np.int64)), time.perf_counter() - t0

    samples = draws * count
    stats, seconds = _strategy_stats(spec, grid, samples, seed, 0,
                                     width or student["width"], student.get("mlp_ratio", 4.0),
                                     chunks=chunks())
    stats["attention"] = {"images": count, "draws_per_image": draws,
                          "temperature": spec.attention_temperature,
                          "mean_map": attention.mean(0).reshape(grid).numpy().round(6).tolist()}
    return {
        "settings": {"source": f"{folder} on {data}", "grid": list(grid), "ratio": spec.ratio,
                     "samples": samples, "seed": int(seed), "epoch": 0,
                     "strategies": ["attention"], "images": count,
                     "student_width": int(width or student["width"]),
                     "student_mlp_ratio": float(student.get("mlp_ratio", 4.0))},
        "definitions": {**DEFINITIONS, "attention": "masks drawn by the run's teacher on the "
                        "images of --data: per image its CLS-to-patch attention, then "
                        "draws_per_image draws; mean_map = the attention averaged over images"},
        "strategies": {"attention": stats},
        "timing": {"attention": {"seconds": seconds, "masks_per_second":
                                 samples / seconds if seconds else None},
                   "total_seconds": seconds},
    }


__all__ = [
    "DEFAULT_SAMPLES", "MIN_SAMPLES", "STRATEGIES", "check_samples", "flop_share",
    "inspect_attention_masks", "inspect_masks",
]
