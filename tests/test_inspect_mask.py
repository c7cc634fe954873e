"""`uta inspect-mask`: statistics, reproducibility, files, errors (issue 6 acceptance list)."""

from __future__ import annotations

import csv
import json
from collections import deque

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import uta_cli.workflows.inspect_mask as im
from uta_cli.app import app
from uta_cli.masks.generate import STRATEGIES, MaskSpec, generate_masks
from uta_cli.masks.report import colour, png_size, render_report, write_csv, write_png
from uta_cli.workflows.inspect_mask import flop_share, inspect_masks

runner = CliRunner()
FIG3 = ["--strategy", "all", "--grid", "14", "--mask-ratio", "0.5",
        "--set", "mask.min_block_patches=16"]


def _invoke(args: list[str]):
    # A wide console, as in a terminal; CliRunner's default is 80 columns.
    return runner.invoke(app, ["inspect-mask", *args], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def fig3(tmp_path_factory):
    """One CLI run of all strategies at 14x14, ratio 0.5, with every output file."""
    out = tmp_path_factory.mktemp("fig3")
    paths = {"json": out / "r.json", "png": out / "f.png", "csv": out / "m.csv"}
    result = _invoke([*FIG3, "--samples", "2000", "--seed", "7",
                      "--output-json", str(paths["json"]), "--png", str(paths["png"]),
                      "--csv", str(paths["csv"])])
    assert result.exit_code == 0, result.output
    return result, paths, json.loads(paths["json"].read_text())


# ------------------------------------------------------------------------------------------
# Statistics


def test_random_map_flat_within_sampling_error():
    report = inspect_masks(MaskSpec("random", 0.5), (14, 14), samples=3000, seed=1)
    mp = report["strategies"]["random"]["mask_probability"]
    se = mp["sampling_std_error"]
    assert se == pytest.approx(np.sqrt(0.25 / 3000))
    assert max(abs(mp["min"] - 0.5), abs(mp["max"] - 0.5)) < 5 * se
    assert 0.6 < mp["spatial_std"] / se < 1.4  # the spread is binomial noise, no structure
    assert report["strategies"]["random"]["coverage"]["cv"] < 5 * se / 0.5
    assert report["strategies"]["random"]["blocks"] is None


def test_exact_count_for_every_strategy(fig3):
    _, _, report = fig3
    for name in STRATEGIES:
        stats = report["strategies"][name]
        assert stats["num_masked"] == 98 and stats["num_visible"] == 98
        assert stats["masked_ratio"]["mean"] == pytest.approx(0.5)
        assert stats["masked_ratio"]["std"] == 0.0
        vt = stats["visible_tokens"]
        assert vt["min"] == vt["max"] == 98 and vt["std"] == 0.0
        assert stats["mask_probability"]["mean"] == pytest.approx(0.5)


def test_block_centre_masked_and_reversed_block_centre_visible(fig3):
    _, _, report = fig3
    block, rev = report["strategies"]["block"], report["strategies"]["reversed-block"]
    assert block["regions"]["centre"]["visible"] < block["regions"]["corner"]["visible"]
    assert rev["regions"]["centre"]["visible"] > rev["regions"]["corner"]["visible"]
    # the method notes' figures for 14x14 at 0.5: centre ~0.85 masked, corners ~0.06
    assert block["regions"]["centre"]["masked"] == pytest.approx(0.85, abs=0.05)
    assert block["regions"]["corner"]["masked"] == pytest.approx(0.06, abs=0.04)
    assert rev["regions"]["centre"]["visible"] == pytest.approx(0.85, abs=0.05)
    assert block["mask_probability"]["spatial_std"] > 0.15
    # UTA trains on visible tokens: reversed-block puts them in the centre
    most = rev["coverage"]["most_visible"]
    assert 4 <= most["row"] <= 9 and 4 <= most["col"] <= 9


def test_block_statistics(fig3):
    _, _, report = fig3
    for name, are in (("block", "masked"), ("reversed-block", "visible")):
        blocks = report["strategies"][name]["blocks"]
        assert blocks["blocks_are"] == are
        assert sum(blocks["per_mask"]["histogram"].values()) == 2000
        assert 3 < blocks["per_mask"]["mean"] < 8
        assert blocks["area"]["min"] >= 1 and blocks["area"]["max"] < 14 * 14
        assert blocks["new_patches"]["mean"] <= blocks["area"]["mean"]
        assert 0.3 <= blocks["aspect"]["p10"] and blocks["aspect"]["p90"] <= 1 / 0.3 + 1
        assert blocks["aspect"]["geometric_mean"] == pytest.approx(1.0, abs=0.15)
        assert blocks["random_fill"]["mean"] < 3
    comps = report["strategies"]["block"]["components"]
    rand = report["strategies"]["random"]["components"]
    assert comps["masked"]["per_sample"]["mean"] < rand["masked"]["per_sample"]["mean"]
    var = report["strategies"]["random"]["sample_variation"]
    assert var["hamming"]["mean"] == pytest.approx(var["hamming_if_independent_uniform"], abs=0.02)
    assert var["pairs"] == 1000


def _bfs_components(cells: np.ndarray) -> list[int]:
    h, w = cells.shape
    seen, sizes = np.zeros_like(cells), []
    for r in range(h):
        for c in range(w):
            if cells[r, c] and not seen[r, c]:
                size, queue = 0, deque([(r, c)])
                seen[r, c] = True
                while queue:
                    y, x = queue.popleft()
                    size += 1
                    for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                        if 0 <= yy < h and 0 <= xx < w and cells[yy, xx] and not seen[yy, xx]:
                            seen[yy, xx] = True
                            queue.append((yy, xx))
                sizes.append(size)
    return sorted(sizes)


def test_connected_components_match_bfs():
    rng = np.random.default_rng(0)
    sets = rng.random((60, 9, 11)) < 0.55
    sets[0] = True
    sets[1] = False
    spiral = np.zeros((9, 11), dtype=bool)  # a long snake needs many propagation steps
    spiral[0, :], spiral[:, 10], spiral[8, 1:], spiral[2:, 1], spiral[2, 1:9] = True, 1, 1, 1, 1
    sets[2] = spiral
    count, sizes, largest = im._components(sets)
    offset = 0
    for i in range(sets.shape[0]):
        expected = _bfs_components(sets[i])
        assert count[i] == len(expected)
        assert largest[i] == (max(expected) if expected else 0)
        assert sorted(sizes[offset:offset + count[i]].tolist()) == expected
        offset += count[i]


def test_flop_share():
    share = flop_share((14, 14), 0.5, width=768, mlp_ratio=4.0)
    assert share["tokens"] == pytest.approx(99 / 197)
    d = 768
    flops = lambda n: 24 * n * d * d + 4 * n * n * d  # noqa: E731
    assert share["vit_blocks"] == pytest.approx(flops(99) / flops(197))
    assert 0.48 < share["vit_blocks"] < 0.5


def test_chunking_changes_nothing(monkeypatch):
    spec = MaskSpec("reversed-block", 0.6)
    whole = inspect_masks(spec, (10, 10), samples=300, seed=4)
    monkeypatch.setattr(im, "_CHUNK", 64)
    chunked = inspect_masks(spec, (10, 10), samples=300, seed=4)
    assert chunked["strategies"] != {} and whole["strategies"] == chunked["strategies"]
    masks = generate_masks(spec, (10, 10), 4, 0, np.arange(300))
    np.testing.assert_allclose(whole["strategies"]["reversed-block"]["mask_probability"]["map"],
                               masks.mean(axis=0).reshape(10, 10), atol=1e-6)


# ------------------------------------------------------------------------------------------
# Reproducibility and the JSON


def test_reproducible_from_seed(tmp_path):
    paths = [tmp_path / f"{i}.json" for i in range(3)]
    for path, seed in zip(paths, ["3", "3", "4"]):
        result = _invoke([*FIG3, "--samples", "300", "--seed", seed, "--output-json", str(path)])
        assert result.exit_code == 0, result.output
    a, b, c = (json.loads(p.read_text()) for p in paths)
    for report in (a, b, c):
        report.pop("timing")
    assert a == b
    assert a["strategies"]["block"]["mask_probability"]["map"] != \
        c["strategies"]["block"]["mask_probability"]["map"]


REQUIRED = {
    "strategy", "num_patches", "num_masked", "num_visible",
    "masked_ratio.mean", "masked_ratio.std", "visible_tokens.mean", "visible_tokens.min",
    "mask_probability.min", "mask_probability.max", "mask_probability.mean",
    "mask_probability.spatial_std", "mask_probability.map",
    "regions.centre.masked", "regions.border.masked", "regions.corner.masked",
    "regions.centre.visible", "regions.corner.visible", "regions.interior.masked",
    "coverage.cv", "coverage.min_max_ratio", "coverage.least_visible.probability",
    "coverage.most_visible.row",
    "components.visible.per_sample.mean", "components.masked.size.mean",
    "sample_variation.hamming.mean", "sample_variation.visible_iou.mean",
    "flop_share.tokens", "flop_share.vit_blocks",
}
BLOCKS = {"blocks.blocks_are", "blocks.per_mask.mean", "blocks.per_mask.histogram",
          "blocks.area.mean", "blocks.area.p50", "blocks.aspect.geometric_mean",
          "blocks.aspect.p90", "blocks.new_patches.mean", "blocks.random_fill.mean"}


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def test_json_has_every_field(fig3):
    _, _, report = fig3
    assert set(report) == {"settings", "definitions", "strategies", "timing"}
    settings = report["settings"]
    assert settings["grid"] == [14, 14] and settings["ratio"] == 0.5
    assert settings["samples"] == 2000 and settings["seed"] == 7
    assert settings["min_block_patches"] == 16 and settings["strategies"] == list(STRATEGIES)
    for name in STRATEGIES:
        stats = report["strategies"][name]
        for key in REQUIRED | (BLOCKS if name != "random" else set()):
            assert _get(stats, key) is not None, (name, key)
        assert np.asarray(stats["mask_probability"]["map"]).shape == (14, 14)
        assert report["timing"][name]["masks_per_second"] > 0
    assert report["strategies"]["random"]["blocks"] is None
    json.dumps(report, allow_nan=False)  # strict JSON: no NaN or infinity anywhere


# ------------------------------------------------------------------------------------------
# Files and terminal


def test_png_is_valid_and_of_expected_size(fig3):
    _, paths, report = fig3
    with Image.open(paths["png"]) as image:
        image.verify()
    with Image.open(paths["png"]) as image:
        assert image.format == "PNG"
        assert image.size == png_size((14, 14), 3) == (984, 348)
        # the block map's top-left cell (x 16.., y 44..; 20 px cells; block is the second map)
        rgb = image.convert("RGB").getpixel((16 + 280 + 16 + 10, 44 + 10))
    expected = colour(report["strategies"]["block"]["mask_probability"]["map"][0][0])
    assert max(abs(a - b) for a, b in zip(rgb, expected)) <= 1


def test_png_single_map_size(tmp_path):
    report = inspect_masks(MaskSpec("random", 0.5), (4, 6), samples=100)
    assert write_png(report, tmp_path / "a.png") == png_size((4, 6), 1)
    with Image.open(tmp_path / "a.png") as image:
        assert image.size == png_size((4, 6), 1)


def test_csv_holds_the_maps(fig3):
    _, paths, report = fig3
    with paths["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 14 * 14
    assert set(rows[0]) == {"strategy", "row", "col", "p_masked", "p_visible"}
    for row in rows[::37]:
        p = report["strategies"][row["strategy"]]["mask_probability"]["map"][int(row["row"])][
            int(row["col"])]
        assert float(row["p_masked"]) == pytest.approx(p, abs=1e-6)
        assert float(row["p_visible"]) == pytest.approx(1 - p, abs=1e-6)


def test_terminal_report_side_by_side(fig3):
    result, _, _ = fig3
    out = result.output
    for name in STRATEGIES:
        assert f"{name}: P(masked)" in out
    assert "masked ratio mean±std" in out and "0.5000±0.0000" in out
    assert "coverage cv" in out and "blocks/mask" in out
    assert "wrote PNG" in out and "wrote JSON" in out and "wrote CSV" in out


def test_render_report_colour_heatmap():
    from rich.console import Console

    report = inspect_masks(MaskSpec("block", 0.5, min_block_patches=4), (6, 6), samples=100)
    console = Console(record=True, width=120, color_system="truecolor", force_terminal=True)
    render_report(report, console)
    text = console.export_text(styles=True, clear=False)
    r, g, b = colour(report["strategies"]["block"]["mask_probability"]["map"][0][0])
    assert f"48;2;{r};{g};{b}m" in text  # the first cell's background is its probability colour
    assert "P(masked)  0.0" in console.export_text()


def test_write_csv_creates_parent_dirs(tmp_path):
    report = inspect_masks(MaskSpec("random", 0.3), (5, 5), samples=100)
    write_csv(report, tmp_path / "deep" / "m.csv")
    assert (tmp_path / "deep" / "m.csv").read_text().count("\n") == 26


# ------------------------------------------------------------------------------------------
# Recipes and flags


def test_default_is_the_demo_recipe(tmp_path):
    from uta_cli.recipe import load_recipe

    demo = load_recipe(None)
    side = demo.student.image_size // demo.student.patch_size
    result = _invoke(["--samples", "200", "--output-json", str(tmp_path / "d.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["settings"]["grid"] == [side, side]
    assert report["settings"]["ratio"] == demo.mask.ratio
    assert report["settings"]["min_block_patches"] == demo.mask.min_block_patches
    assert report["settings"]["strategies"] == [demo.mask.strategy]
    assert report["settings"]["student_width"] == demo.student.width


def test_recipe_grid_and_flag_overrides(tmp_path):
    path = tmp_path / "v.json"
    result = _invoke(["vitb16", "--strategy", "block", "--mask-ratio", "0.75", "--samples",
                      "200", "--seed", "11", "--output-json", str(path)])
    assert result.exit_code == 0, result.output
    report = json.loads(path.read_text())
    assert report["settings"]["grid"] == [14, 14] and report["settings"]["seed"] == 11
    assert report["strategies"]["block"]["num_masked"] == 147
    result = _invoke(["vitb16", "--grid", "16x12", "--samples", "100", "--output-json", str(path)])
    assert result.exit_code == 0, result.output
    assert json.loads(path.read_text())["strategies"]["reversed-block"]["num_patches"] == 192


@pytest.mark.parametrize("args, words", [
    (["--mask-ratio", "1.5"], ["--mask-ratio", "(0, 1)"]),
    (["--mask-ratio", "0"], ["--mask-ratio"]),
    (["--grid", "3", "--strategy", "block", "--set", "mask.min_block_patches=16"],
     ["too small", "min_block_patches"]),
    (["--samples", "10"], ["--samples", "too few"]),
    (["--grid", "14y"], ["--grid"]),
    (["--grid", "0"], ["--grid"]),
    (["no-such-recipe"], ["recipe"]),
    (["--set", "mask.ratio=1.0"], ["mask.ratio", "--mask-ratio"]),
])
def test_usage_errors_exit_2_with_a_message(args, words):
    result = _invoke(args)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "Traceback" not in result.output
    for word in words:
        assert word in result.output


def test_help_has_examples():
    result = _invoke(["--help"])
    assert result.exit_code == 0
    assert "Examples" in result.output and "--strategy all" in result.output
