"""Patch masks for UTA pre-training: random (MAE), block (BEiT) and reversed block (UTA).

A mask is a bool array over the H*W patch grid in row-major order; True means the patch is MASKED,
i.e. dropped before the student's first block. Only visible (False) tokens are aligned with the
teacher, so for UTA the visible set is the one that matters (docs/method.md §4).

What comes from where:
- `random` is MAE's random masking: rank the positions by per-sample uniform noise and mask the
  top `num_masked`.
- `block` is BEiT's block-wise masking generator (`MaskingGenerator`, BEiT's
  `masking_generator.py`): rectangles with area uniform in [min_block_patches, remaining], aspect
  log-uniform in [min_aspect, 1/min_aspect], h < H and w < W, top-left uniform where it fits,
  accepted when it adds between 1 and `remaining` new patches, at most `max_tries` attempts per
  rectangle.
- `attention` is UMT's, MILAN's and MaskAlign's teacher-guided masking: each sample's visible tokens
  are drawn without replacement in proportion to the teacher's last-layer CLS-to-patch attention
  (heads averaged). It needs the teacher's forward, so it is drawn on the device by the training
  task (`attention_keep`); the collate function supplies only the per-sample noise
  (`attention_noise`), keyed like every other mask, and a Gumbel-top-k turns it into the
  multinomial draw (Gumbel-top-k of log p samples k items without replacement with the same law
  as successive multinomial draws; Kool et al., 2019).
- Ours:
  - `reversed-block` (the paper's idea, our code): the same block procedure with the target
    num_visible, and the blocks become the VISIBLE set.
  - The exact count. BEiT's generator can stop short of the target; we then mask random extra
    patches, so every row of a batch has the same visible count (dense batches need it).
  - Per-sample determinism. Every random number is a counter-based hash (splitmix64) of
    (seed, epoch, sample_id, draw counter), never global random state. A row depends on nothing
    but its own sample id, whatever batch it is generated in.
  - Vectorised across the batch. One loop iteration adds one rectangle to every sample still short
    of its target, with all of that rectangle's tries drawn and scored at once (an integral image
    counts the patches each try would add). Thousands of masks take a fraction of a second; call it
    per batch (or per chunk of upcoming sample ids), not per sample: numpy's per-call overhead
    dominates tiny batches.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from uta_cli.errors import UtaUsageError

STRATEGIES = ("random", "block", "reversed-block")  # drawn by generate_masks
# Drawn from the teacher's attention on the device, not by generate_masks in the collate function.
DEVICE_STRATEGIES = ("attention",)


@dataclass(frozen=True)
class MaskSpec:
    """How to mask a patch grid. `ratio` is the fraction of patch tokens MASKED (dropped)."""

    strategy: str = "reversed-block"
    ratio: float = 0.5            # fraction of patch tokens masked; visible = N - round(ratio*N)
    min_block_patches: int = 16   # BEiT's minimum rectangle area
    min_aspect: float = 0.3       # aspect ratio log-uniform in [min_aspect, 1/min_aspect]
    max_tries: int = 10           # attempts per rectangle before the sample stops adding any
    attention_temperature: float = 1.0  # attention: keep probability ~ attention^(1 / T)


@dataclass(frozen=True)
class MaskBatch:
    """Masks plus a log of the rectangles the block procedure accepted (for `inspect-mask`).

    For `random` the rectangle arrays are empty. For `reversed-block` the rectangles are VISIBLE
    blocks. `rect_sample[j]` is the batch row of rectangle j, `rect_h`/`rect_w` its size, and
    `rect_new` the patches it added that no earlier rectangle of that row covered.
    `random_fill[i]` counts the patches of row i set by the final exact-count fix rather than by a
    rectangle (always num_masked for `random`).
    """

    masks: np.ndarray         # bool (B, H*W), True = masked
    rect_sample: np.ndarray   # int64 (R,)
    rect_h: np.ndarray        # int64 (R,)
    rect_w: np.ndarray        # int64 (R,)
    rect_new: np.ndarray      # int64 (R,)
    random_fill: np.ndarray   # int64 (B,)


def num_masked(num_patches: int, ratio: float) -> int:
    """Number of masked (dropped) patch tokens: round(ratio * num_patches)."""
    return round(float(ratio) * num_patches)


def num_visible(num_patches: int, ratio: float) -> int:
    """Number of visible (kept) patch tokens, the same for every sample."""
    return num_patches - num_masked(num_patches, ratio)


# --------------------------------------------------------------------------------------------
# Validation


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _rect_hw(area: float, aspect: float) -> tuple[int, int]:
    # BEiT's rounding of a rectangle with this area and aspect (h / w).
    return round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))


def _smallest_fitting_grid_hint(spec: MaskSpec) -> str:
    side = 2
    while not _block_fits(spec, (side, side)):
        side += 1
    return f"{side}x{side}"


def _block_fits(spec: MaskSpec, grid: tuple[int, int]) -> bool:
    """Whether some rectangle of area >= min_block_patches can have h < H and w < W.

    Height and width grow with the area, so the smallest area is the easiest to fit; scan the
    aspect range finely at that area.
    """
    height, width = grid
    lo, hi = math.log(spec.min_aspect), -math.log(spec.min_aspect)
    for k in range(2001):
        aspect = math.exp(lo + (hi - lo) * k / 2000)
        h, w = _rect_hw(spec.min_block_patches, aspect)
        if 1 <= h < height and 1 <= w < width:
            return True
    return False


def validate_mask_spec(spec: MaskSpec, grid: tuple[int, int]) -> None:
    """Raise UtaUsageError naming the setting and the fix when `spec` cannot mask `grid`."""
    if not isinstance(spec.strategy, str) or spec.strategy not in STRATEGIES + DEVICE_STRATEGIES:
        raise UtaUsageError(
            f"mask.strategy = {spec.strategy!r} is not a masking strategy. Use one of: "
            f"{', '.join(STRATEGIES + DEVICE_STRATEGIES)} (reversed-block is UTA's default)."
        )
    if not _is_number(spec.ratio):
        raise UtaUsageError(
            f"mask.ratio = {spec.ratio!r} is not a number. Set mask.ratio to the fraction of patch "
            "tokens to mask, a float strictly between 0 and 1 such as 0.5."
        )
    if not 0.0 < float(spec.ratio) < 1.0:
        raise UtaUsageError(
            f"mask.ratio = {spec.ratio} is outside (0, 1). It is the fraction of patch tokens "
            "masked (dropped); set it strictly between 0 and 1, e.g. 0.5."
        )
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(_is_int(g) and g >= 1 for g in grid)
    ):
        raise UtaUsageError(
            f"The patch grid {grid!r} is not two positive integers (H, W). It is "
            "student.image_size // student.patch_size on each side; fix those settings."
        )
    height, width = int(grid[0]), int(grid[1])
    n = height * width
    masked, visible = num_masked(n, spec.ratio), num_visible(n, spec.ratio)
    if masked == 0 or visible == 0:
        which = "no patch is masked" if masked == 0 else "no patch stays visible"
        raise UtaUsageError(
            f"mask.ratio = {spec.ratio} on a {height}x{width} grid ({n} patches) rounds to "
            f"{masked} masked and {visible} visible tokens, so {which}. Choose a ratio between "
            f"{1 / n:.3g} and {1 - 1 / n:.3g}, or use a finer grid."
        )
    if spec.strategy == "random":
        return
    if spec.strategy == "attention":
        t = spec.attention_temperature
        if not _is_number(t) or not 0.0 < float(t) < math.inf:
            raise UtaUsageError(
                f"mask.attention_temperature = {t!r} must be a positive number: tokens are "
                "drawn in proportion to attention^(1 / T). Set it to e.g. 1.0 (the attention "
                "itself); larger values flatten the draw towards random masking.")
        return
    if not _is_int(spec.min_block_patches) or spec.min_block_patches < 1:
        raise UtaUsageError(
            f"mask.min_block_patches = {spec.min_block_patches!r} must be a positive integer "
            "(BEiT uses 16). Set mask.min_block_patches to e.g. 16."
        )
    if not _is_number(spec.min_aspect) or not 0.0 < float(spec.min_aspect) <= 1.0:
        raise UtaUsageError(
            f"mask.min_aspect = {spec.min_aspect!r} must be a number in (0, 1]: aspect ratios are "
            "drawn log-uniformly from [min_aspect, 1/min_aspect]. Set mask.min_aspect to e.g. 0.3."
        )
    if not _is_int(spec.max_tries) or spec.max_tries < 1:
        raise UtaUsageError(
            f"mask.max_tries = {spec.max_tries!r} must be a positive integer (BEiT uses 10). "
            "Set mask.max_tries to e.g. 10."
        )
    if not _block_fits(spec, (height, width)):
        raise UtaUsageError(
            f"The {height}x{width} patch grid is too small for {spec.strategy} masking: no "
            f"rectangle of mask.min_block_patches = {spec.min_block_patches} patches with aspect "
            f"in [{spec.min_aspect}, {1 / spec.min_aspect:.3g}] fits with h < {height} and "
            f"w < {width}. Lower mask.min_block_patches, use a larger grid (at least "
            f"{_smallest_fitting_grid_hint(spec)}), or use mask.strategy = random."
        )


# --------------------------------------------------------------------------------------------
# Counter-based random numbers: uniform(key, counter) is a pure function, so a sample's draws
# never depend on which other samples share its batch, or on any global random state.

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1

# Independent streams per purpose, so e.g. the exact-count fix does not reuse rectangle draws.
_STREAM_RANDOM = 1
_STREAM_RECT = 2
_STREAM_FILL = 3
_STREAM_ATTENTION = 4


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective avalanche of uint64 arrays (wraps mod 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _sample_keys(seed: int, epoch: int, sample_ids: np.ndarray) -> np.ndarray:
    """One uint64 key per sample from (seed, epoch, sample_id)."""
    base = _mix(np.array([(int(seed) & _MASK64)], dtype=np.uint64) + _GOLDEN)
    base = _mix(base ^ np.array([int(epoch) & _MASK64], dtype=np.uint64))
    ids = np.asarray(sample_ids).astype(np.int64).astype(np.uint64)
    return _mix((base + _GOLDEN) ^ ids)


def _uniform(keys: np.ndarray, stream: int, counters: np.ndarray) -> np.ndarray:
    """float64 uniforms in [0, 1): `keys` and `counters` broadcast against each other."""
    ctr = np.asarray(counters, dtype=np.uint64) + np.uint64(stream << 48)
    z = _mix(keys ^ _mix(ctr * _GOLDEN))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Bool (B, N) with True at each row's k largest scores."""
    out = np.zeros(scores.shape, dtype=bool)
    if k > 0:
        idx = np.argpartition(scores, scores.shape[1] - k, axis=1)[:, scores.shape[1] - k:]
        np.put_along_axis(out, idx, True, axis=1)
    return out


# --------------------------------------------------------------------------------------------
# Generators


def _random_masks(keys: np.ndarray, n: int, masked: int) -> np.ndarray:
    # MAE: per-sample noise over the positions, mask the `masked` positions with the largest noise.
    noise = _uniform(keys[:, None], _STREAM_RANDOM, np.arange(n, dtype=np.uint64)[None, :])
    return _top_k_mask(noise, masked)


def _block_masks(
    spec: MaskSpec, grid: tuple[int, int], keys: np.ndarray, target: int
) -> tuple[np.ndarray, tuple[np.ndarray, ...], np.ndarray]:
    """BEiT's block procedure for every sample at once; returns blocks (True = in a block).

    Iteration r adds rectangle r to every sample that is still short of `target`: its up to
    `max_tries` attempts are drawn and scored all at once, and the first acceptable one is kept.
    Failed attempts leave the mask unchanged, so that is exactly what BEiT's sequential loop keeps.
    A sample whose attempts all fail stops adding rectangles, as in BEiT. Draws are
    uniform(key, attempt counter), so a row never depends on the other rows. Finally each row is
    topped up with random patches to exactly `target`.
    """
    height, width = grid
    n, batch, tries = height * width, keys.shape[0], spec.max_tries
    blocks = np.zeros((batch, height, width), dtype=bool)
    count = np.zeros(batch, dtype=np.int64)
    fill_rows, fill_cols = np.arange(height), np.arange(width)
    log_lo, log_hi = math.log(spec.min_aspect), -math.log(spec.min_aspect)
    slots = np.arange(4 * tries, dtype=np.uint64)  # (attempt, [area, aspect, top, left])
    log: list[tuple[np.ndarray, ...]] = [tuple(np.zeros(0, dtype=np.int64) for _ in range(4))]

    idx = np.arange(batch)  # the samples still adding rectangles
    r = 0
    while idx.size:
        u = _uniform(keys[idx, None], _STREAM_RECT, r * 4 * tries + slots).reshape(-1, tries, 4)
        remaining = (target - count[idx])[:, None]
        # BEiT: random.uniform(min_patches, remaining); like Python's, fine when remaining < min.
        area = spec.min_block_patches + u[..., 0] * (remaining - spec.min_block_patches)
        aspect = np.exp(log_lo + u[..., 1] * (log_hi - log_lo))
        h = np.rint(np.sqrt(area * aspect)).astype(np.int64)
        w = np.rint(np.sqrt(area / aspect)).astype(np.int64)
        fits = (h >= 1) & (w >= 1) & (h < height) & (w < width)
        # Top-left uniform among the positions where the rectangle fits (randint's inclusive end);
        # clamped only so that attempts that do not fit still index safely below.
        top = np.maximum((u[..., 2] * (height - h + 1)).astype(np.int64), 0)
        left = np.maximum((u[..., 3] * (width - w + 1)).astype(np.int64), 0)
        bottom, right = np.minimum(top + h, height), np.minimum(left + w, width)

        # Patches each attempt would add: its area minus the patches already covered, read from
        # an integral image of the current mask (four look-ups per attempt, no per-attempt grid).
        integral = np.zeros((idx.size, height + 1, width + 1), dtype=np.int32)
        integral[:, 1:, 1:] = blocks[idx].cumsum(axis=1, dtype=np.int32).cumsum(axis=2)
        s = np.arange(idx.size)[:, None]
        covered = (integral[s, bottom, right] - integral[s, top, right]
                   - integral[s, bottom, left] + integral[s, top, left])
        added = h * w - covered
        ok = fits & (added >= 1) & (added <= remaining)

        # Keep each sample's first acceptable attempt; samples with none stop here.
        found = ok.any(axis=1)
        first = ok.argmax(axis=1)[found]
        rows = idx[found]
        pick = np.flatnonzero(found)
        t, b, lt, rt = (a[pick, first] for a in (top, bottom, left, right))
        in_rows = (fill_rows >= t[:, None]) & (fill_rows < b[:, None])
        in_cols = (fill_cols >= lt[:, None]) & (fill_cols < rt[:, None])
        blocks[rows] |= in_rows[:, :, None] & in_cols[:, None, :]
        count[rows] += added[pick, first]
        log.append((rows, h[pick, first], w[pick, first], added[pick, first]))
        idx = rows[count[rows] < target]
        r += 1

    flat = blocks.reshape(batch, n)
    # Exact count: blocks first, then the highest-noise free patches (count <= target always).
    noise = _uniform(keys[:, None], _STREAM_FILL, np.arange(n, dtype=np.uint64)[None, :])
    exact = _top_k_mask(flat + noise, target)
    rect_log = tuple(np.concatenate([entry[j] for entry in log]) for j in range(4))
    return exact, rect_log, target - count


def generate_masks_detailed(
    spec: MaskSpec, grid: tuple[int, int], seed: int, epoch: int, sample_ids: np.ndarray
) -> MaskBatch:
    """Like `generate_masks`, plus the log of accepted rectangles (see MaskBatch)."""
    validate_mask_spec(spec, grid)
    if spec.strategy in DEVICE_STRATEGIES:
        raise ValueError(
            f"mask.strategy {spec.strategy!r} is drawn from the teacher's attention on the device "
            "(attention_noise in the collate function, attention_keep after the teacher's "
            "forward); generate_masks cannot draw it without a teacher.")
    height, width = int(grid[0]), int(grid[1])
    n = height * width
    ids = np.asarray(sample_ids).reshape(-1)
    keys = _sample_keys(seed, epoch, ids)
    masked, visible = num_masked(n, spec.ratio), num_visible(n, spec.ratio)
    empty = np.zeros(0, dtype=np.int64)
    if spec.strategy == "random":
        masks = _random_masks(keys, n, masked)
        return MaskBatch(masks, empty, empty, empty, empty, np.full(ids.size, masked, np.int64))
    target = masked if spec.strategy == "block" else visible
    blocks, (r_sample, r_h, r_w, r_new), fill = _block_masks(spec, (height, width), keys, target)
    masks = blocks if spec.strategy == "block" else ~blocks
    order = np.argsort(r_sample, kind="stable")  # group the log by row, rectangles in order
    return MaskBatch(masks, r_sample[order], r_h[order], r_w[order], r_new[order], fill)


def generate_masks(
    spec: MaskSpec, grid: tuple[int, int], seed: int, epoch: int, sample_ids: np.ndarray
) -> np.ndarray:
    """Bool masks (B, H*W), True = masked, exactly num_masked(H*W, ratio) per row.

    Row i is a pure function of (spec, grid, seed, epoch, sample_ids[i]).
    """
    return generate_masks_detailed(spec, grid, seed, epoch, sample_ids).masks


def keep_indices(masks: np.ndarray) -> np.ndarray:
    """int64 (B, K): the visible (False) positions of each row, ascending."""
    masks = np.asarray(masks, dtype=bool)
    visible = (~masks).sum(axis=1)
    if masks.shape[0] and not np.all(visible == visible[0]):
        raise ValueError(
            "keep_indices needs the same visible count in every row; got counts "
            f"{sorted(set(visible.tolist()))[:5]}. Build masks with generate_masks."
        )
    k = int(visible[0]) if masks.shape[0] else 0
    # np.nonzero walks row-major, so each row's columns come out ascending.
    return np.nonzero(~masks)[1].astype(np.int64).reshape(masks.shape[0], k)


# --------------------------------------------------------------------------------------------
# Attention masks: the noise comes from the collate function (per-sample, seeded like every other
# mask), the draw happens on the device once the teacher's attention is there.


def attention_noise(seed: int, epoch: int, sample_ids: np.ndarray, n: int) -> np.ndarray:
    """float64 (B, n) uniforms in (0, 1), row i a pure function of (seed, epoch, sample_ids[i])."""
    keys = _sample_keys(seed, epoch, np.asarray(sample_ids).reshape(-1))
    u = _uniform(keys[:, None], _STREAM_ATTENTION, np.arange(n, dtype=np.uint64)[None, :])
    return u + 0.5 / (1 << 53)  # never exactly 0, so the Gumbel transform stays finite


def attention_keep(attention: torch.Tensor, noise: torch.Tensor, num_keep: int,
                   temperature: float = 1.0) -> torch.Tensor:
    """int64 (B, K): each row's visible positions, ascending, drawn without replacement with
    probability proportional to attention^(1 / temperature).

    attention: (B, N) non-negative CLS-to-patch attention; noise: (B, N) uniforms in (0, 1).
    Gumbel-top-k: the K largest log p_i + G_i, G_i = -log(-log u_i), are a sample of K items
    without replacement from p (the law of torch.multinomial(p, K) as UMT calls it), with no loop
    over samples. A position of zero attention is kept only when fewer than K have any.
    """
    logp = attention.float().clamp_min(1e-30).log() / float(temperature)
    gumbel = -(-noise.to(logp.device, torch.float64).log()).log()
    scores = logp.double() + gumbel
    return scores.topk(num_keep, dim=1).indices.sort(dim=1).values
