"""Masks: exact counts, determinism, batch independence, BEiT-like spatial statistics."""

from __future__ import annotations

import numpy as np
import pytest

from uta_cli.errors import UtaUsageError
from uta_cli.masks.generate import (
    STRATEGIES,
    MaskSpec,
    generate_masks,
    generate_masks_detailed,
    keep_indices,
    num_masked,
    num_visible,
    validate_mask_spec,
)


def _centre_and_corner(prob: np.ndarray) -> tuple[float, float]:
    h, w = prob.shape
    centre = prob[h // 2 - 1: h // 2 + 1, w // 2 - 1: w // 2 + 1].mean()
    corner = prob[[0, 0, h - 1, h - 1], [0, w - 1, 0, w - 1]].mean()
    return float(centre), float(corner)


def test_counts_helpers():
    assert num_masked(196, 0.5) == 98 and num_visible(196, 0.5) == 98
    assert num_masked(196, 0.75) == 147 and num_visible(196, 0.75) == 49
    assert num_masked(16, 0.3) + num_visible(16, 0.3) == 16
    assert num_masked(10, 0.25) == 2  # round half to even, like Python's round


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("grid", [(14, 14), (16, 16), (7, 9), (12, 6), (24, 24)])
@pytest.mark.parametrize("ratio", [0.1, 0.4, 0.5, 0.75, 0.9])
def test_exact_count_every_row(strategy, grid, ratio):
    spec = MaskSpec(strategy=strategy, ratio=ratio, min_block_patches=4 if min(grid) < 9 else 16)
    masks = generate_masks(spec, grid, seed=1, epoch=0, sample_ids=np.arange(200))
    n = grid[0] * grid[1]
    assert masks.dtype == bool and masks.shape == (200, n)
    np.testing.assert_array_equal(masks.sum(axis=1), num_masked(n, ratio))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_keep_indices_sorted_complement(strategy):
    masks = generate_masks(MaskSpec(strategy=strategy, ratio=0.6), (14, 14), 0, 0, np.arange(64))
    keep = keep_indices(masks)
    assert keep.dtype == np.int64 and keep.shape == (64, num_visible(196, 0.6))
    assert np.all(np.diff(keep, axis=1) > 0)
    for row, idx in zip(masks, keep):
        np.testing.assert_array_equal(idx, np.flatnonzero(~row))
        assert not row[idx].any()


def test_keep_indices_rejects_ragged_rows():
    masks = np.zeros((2, 4), dtype=bool)
    masks[0, 0] = True
    with pytest.raises(ValueError, match="same visible count"):
        keep_indices(masks)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_deterministic_from_seed_and_independent_of_global_state(strategy):
    spec = MaskSpec(strategy=strategy)
    np.random.seed(0)
    a = generate_masks(spec, (14, 14), seed=5, epoch=2, sample_ids=np.arange(100))
    np.random.seed(123)
    np.random.rand(17)
    b = generate_masks(spec, (14, 14), seed=5, epoch=2, sample_ids=np.arange(100))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_row_independent_of_batch_composition(strategy):
    spec = MaskSpec(strategy=strategy, ratio=0.7)
    batch = generate_masks(spec, (14, 14), seed=9, epoch=3, sample_ids=np.arange(256))
    alone = generate_masks(spec, (14, 14), seed=9, epoch=3, sample_ids=np.array([7]))
    np.testing.assert_array_equal(alone[0], batch[7])
    ids = np.array([200, 7, 31, 7, 1000])
    shuffled = generate_masks(spec, (14, 14), seed=9, epoch=3, sample_ids=ids)
    np.testing.assert_array_equal(shuffled[1], batch[7])
    np.testing.assert_array_equal(shuffled[3], batch[7])
    np.testing.assert_array_equal(shuffled[0], batch[200])
    np.testing.assert_array_equal(shuffled[2], batch[31])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_different_seed_epoch_or_sample_give_different_masks(strategy):
    spec = MaskSpec(strategy=strategy)
    ids = np.arange(50)
    base = generate_masks(spec, (14, 14), seed=0, epoch=0, sample_ids=ids)
    other_epoch = generate_masks(spec, (14, 14), seed=0, epoch=1, sample_ids=ids)
    other_seed = generate_masks(spec, (14, 14), seed=1, epoch=0, sample_ids=ids)
    # Whole rows may collide by chance only with negligible probability.
    assert (base != other_epoch).any(axis=1).mean() > 0.95
    assert (base != other_seed).any(axis=1).mean() > 0.95
    assert len({row.tobytes() for row in base}) == len(ids)


def test_block_centre_heavy_and_reversed_block_centre_visible():
    ids = np.arange(2000)
    block = generate_masks(MaskSpec("block", 0.5), (14, 14), 0, 0, ids).reshape(-1, 14, 14)
    rev = generate_masks(MaskSpec("reversed-block", 0.5), (14, 14), 0, 0, ids).reshape(-1, 14, 14)
    b_centre, b_corner = _centre_and_corner(block.mean(axis=0))
    r_centre, r_corner = _centre_and_corner(1.0 - rev.mean(axis=0))  # visibility
    # block: centre masked far more often than corners (method notes: ~0.85 vs ~0.06)
    assert b_centre > 0.75 and b_corner < 0.15
    # reversed block: centre VISIBLE far more often than corners
    assert r_centre > 0.75 and r_corner < 0.15
    assert r_centre > r_corner and b_centre > b_corner


def test_reversed_block_flatter_at_high_ratio():
    ids = np.arange(2000)
    spec = MaskSpec("reversed-block", 0.75)
    block_map = generate_masks(MaskSpec("block", 0.75), (14, 14), 0, 0, ids).mean(axis=0)
    rev_map = generate_masks(spec, (14, 14), 0, 0, ids).mean(axis=0)
    assert rev_map.std() < block_map.std()


def test_random_map_flat_within_sampling_error():
    n_samples, ratio = 4000, 0.5
    masks = generate_masks(MaskSpec("random", ratio), (14, 14), 0, 0, np.arange(n_samples))
    prob = masks.mean(axis=0)
    se = np.sqrt(ratio * (1 - ratio) / n_samples)
    assert np.abs(prob - ratio).max() < 5 * se  # 196 locations: max |z| < 5 essentially always
    # the spatial spread matches pure binomial noise (chi-square-like check)
    assert 0.6 < prob.std() / se < 1.4


def test_block_rectangles_respect_beit_constraints():
    spec = MaskSpec("block", 0.5)
    det = generate_masks_detailed(spec, (14, 14), 0, 0, np.arange(500))
    assert det.rect_h.size > 500  # several rectangles per mask
    assert (det.rect_h < 14).all() and (det.rect_w < 14).all()
    assert (det.rect_h >= 1).all() and (det.rect_w >= 1).all()
    assert (det.rect_new >= 1).all()
    # rectangles plus the random fill cover exactly the masked count, row by row
    per_row = np.bincount(det.rect_sample, weights=det.rect_new, minlength=500)
    np.testing.assert_array_equal(per_row + det.random_fill, 98)
    assert det.random_fill.mean() < 5  # the fill is a small correction, not the mask


def test_global_random_state_untouched():
    state = np.random.get_state()
    generate_masks(MaskSpec("block"), (14, 14), 0, 0, np.arange(10))
    after = np.random.get_state()
    assert state[0] == after[0] and np.array_equal(state[1], after[1]) and state[2] == after[2]


@pytest.mark.parametrize(
    "spec, grid, key",
    [
        (MaskSpec(strategy="blocky"), (14, 14), "mask.strategy"),
        (MaskSpec(ratio=0.0), (14, 14), "mask.ratio"),
        (MaskSpec(ratio=1.0), (14, 14), "mask.ratio"),
        (MaskSpec(ratio=-0.2), (14, 14), "mask.ratio"),
        (MaskSpec(ratio="0.5"), (14, 14), "mask.ratio"),  # type: ignore[arg-type]
        (MaskSpec(ratio=0.01), (7, 7), "mask.ratio"),  # rounds to 0 masked
        (MaskSpec(ratio=0.99), (7, 7), "mask.ratio"),  # rounds to 0 visible
        (MaskSpec(min_block_patches=0), (14, 14), "mask.min_block_patches"),
        (MaskSpec(min_block_patches=2.5), (14, 14), "mask.min_block_patches"),  # type: ignore[arg-type]
        (MaskSpec(min_aspect=1.5), (14, 14), "mask.min_aspect"),
        (MaskSpec(max_tries=0), (14, 14), "mask.max_tries"),
        (MaskSpec(max_tries=True), (14, 14), "mask.max_tries"),  # type: ignore[arg-type]
        (MaskSpec("block"), (4, 4), "mask.min_block_patches"),
        (MaskSpec("reversed-block", min_block_patches=200), (14, 14), "mask.min_block_patches"),
        (MaskSpec("block"), (2, 60), "mask.min_block_patches"),
    ],
)
def test_validation_errors_name_the_key(spec, grid, key):
    with pytest.raises(UtaUsageError) as info:
        validate_mask_spec(spec, grid)
    assert key in str(info.value)
    with pytest.raises(UtaUsageError):
        generate_masks(spec, grid, 0, 0, np.arange(2))


def test_validation_error_lists_strategies():
    with pytest.raises(UtaUsageError, match="random, block, reversed-block"):
        validate_mask_spec(MaskSpec(strategy="mae"), (14, 14))


def test_random_ignores_block_settings_and_small_grids_pass_for_random():
    validate_mask_spec(MaskSpec("random", min_block_patches=10_000), (2, 2))
    validate_mask_spec(MaskSpec("block"), (6, 6))  # 4x4 rectangle fits with h, w < 6
    masks = generate_masks(MaskSpec("random", 0.5), (2, 2), 0, 0, np.arange(10))
    np.testing.assert_array_equal(masks.sum(axis=1), 2)


def test_bad_grid():
    with pytest.raises(UtaUsageError, match="grid"):
        validate_mask_spec(MaskSpec(), (0, 14))


def _sequential_beit(spec: MaskSpec, grid: tuple[int, int], key: np.ndarray, target: int):
    """BEiT's generator written the slow, obvious way, fed the same counter-based draws."""
    import math

    from uta_cli.masks.generate import _STREAM_RECT, _uniform

    height, width = grid
    mask = np.zeros((height, width), dtype=bool)
    count, r, tries = 0, 0, spec.max_tries
    lo, hi = math.log(spec.min_aspect), -math.log(spec.min_aspect)
    while count < target:
        remaining, delta = target - count, 0
        draws = _uniform(key, _STREAM_RECT, r * 4 * tries + np.arange(4 * tries, dtype=np.uint64))
        for attempt in range(tries):
            u = draws[4 * attempt: 4 * attempt + 4]
            area = spec.min_block_patches + u[0] * (remaining - spec.min_block_patches)
            aspect = math.exp(lo + u[1] * (hi - lo))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 1 <= h < height and 1 <= w < width:
                top, left = int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1))
                new = h * w - mask[top: top + h, left: left + w].sum()
                if 0 < new <= remaining:
                    mask[top: top + h, left: left + w] = True
                    delta = new
                    break
        if delta == 0:
            break
        count += delta
        r += 1
    return mask.reshape(-1), count


@pytest.mark.parametrize("grid, ratio", [((14, 14), 0.5), ((14, 14), 0.75), ((10, 7), 0.3)])
def test_vectorised_block_equals_sequential_beit(grid, ratio):
    from uta_cli.masks.generate import _block_masks, _sample_keys

    spec = MaskSpec("block", ratio, min_block_patches=8)
    ids = np.arange(40)
    keys = _sample_keys(3, 1, ids)
    target = num_masked(grid[0] * grid[1], ratio)
    exact, _, fill = _block_masks(spec, grid, keys, target)
    for i, key in enumerate(keys):
        blocks, count = _sequential_beit(spec, grid, key[None], target)
        assert fill[i] == target - count
        assert (exact[i] | ~blocks).all()  # every block patch stays masked; the rest is the fill
    det = generate_masks_detailed(spec, grid, 3, 1, ids)
    np.testing.assert_array_equal(det.masks, exact)


def test_empty_batch():
    for strategy in STRATEGIES:
        masks = generate_masks(MaskSpec(strategy), (14, 14), 0, 0, np.arange(0))
        assert masks.shape == (0, 196)
        assert keep_indices(masks).shape == (0, 0)
