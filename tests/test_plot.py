"""`uta plot`: curves from metrics.jsonl (training and validation loss against step, accuracy,
gradient norm, lr), several runs overlaid; the PNG is read back, the terminal drawing checked."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import cli
from PIL import Image

from uta_cli.workflows import plot as plot


def fake_run(folder, scale: float, steps: int = 60) -> list[dict]:
    """A metrics.jsonl as the engine writes it: steps, validations, a zero-shot record, end."""
    folder.mkdir()
    records = []
    for s in range(1, steps + 1):
        records.append({"step": s, "epoch": s / steps, "lr": scale * 1e-3 * math.cos(s / steps),
                        "loss": scale * (0.3 + math.exp(-s / 15)), "grad_norm": scale + 1 / s,
                        "images_per_s": 100.0})
        if s % 20 == 0:
            records.append({"event": "val", "step": s, "val_loss": scale * (0.35 + 1 / s)})
    records.append({"event": "zeroshot", "dataset": "demo", "step": steps,
                    "student_acc1": 0.8 * scale, "teacher_acc1": 0.95})
    records.append({"event": "end", "step": steps, "rank_weights": ["abc"]})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_panels_hold_the_logged_numbers(tmp_path):
    recs = fake_run(tmp_path / "a", 1.0)
    (loss, acc, grad, lr) = plot.panels([str(tmp_path / "a")])
    train, val = loss.series
    assert train.label == "a train" and train.steps == list(range(1, 61))
    assert train.values == [r["loss"] for r in recs if "loss" in r]
    assert val.steps == [20, 40, 60] and val.markers
    assert [s.label for s in acc.series] == ["a zero-shot student", "a zero-shot teacher"]
    assert acc.series[0].values == [0.8] and grad.series[0].values[0] == 2.0
    assert lr.series[0].values == [r["lr"] for r in recs if "lr" in r]


def test_png_is_written_and_shows_both_runs(tmp_path):
    fake_run(tmp_path / "short_mask", 1.0)
    fake_run(tmp_path / "long_mask", 0.7)
    out = tmp_path / "fig.png"
    result = cli("plot", tmp_path / "short_mask", tmp_path / "long_mask", "--output", out,
                 "--title", "two runs")
    assert result.exit_code == 0, result.output
    image = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert image.shape == (round(3.8 * 120), round(4 * 4.8 * 120), 3)  # four panels
    # each run's colour (matplotlib's first two: C0 and C1) covers a real share of the
    # panels, not a few pixels of a legend
    for rgb in ((31, 119, 180), (255, 127, 14)):
        hits = (np.abs(image - np.array(rgb)).sum(-1) < 40).sum()
        assert hits > 2000, (rgb, hits)
    assert (image.std(axis=(0, 1)) > 10).all()  # not blank


def test_terminal_drawing_and_errors(tmp_path, monkeypatch):
    fake_run(tmp_path / "r1", 1.0)
    result = cli("plot", tmp_path / "r1", "--width", "80")
    assert result.exit_code == 0, result.output
    for text in ("loss (train: lines, validation: dots)", "r1 train", "r1 val", "learning rate",
                 "gradient norm"):
        assert text in result.output
    assert "\x1b[" not in result.output  # no colour codes outside a terminal
    missing = cli("plot", tmp_path / "nothere")
    assert missing.exit_code == 2 and "metrics.jsonl" in missing.output
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    cut = cli("plot", tmp_path / "cut")
    assert cut.exit_code == 2 and "line 2" in cut.output
    real = plot.importlib.util.find_spec
    monkeypatch.setattr(plot.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    no_extra = cli("plot", tmp_path / "r1", "--output", tmp_path / "x.png")
    assert no_extra.exit_code == 2 and "uta-cli[plot]" in no_extra.output


@pytest.mark.parametrize("name", ["fig.svg"])
def test_other_formats_by_file_name(tmp_path, name):
    fake_run(tmp_path / "r", 1.0, steps=5)
    assert cli("plot", tmp_path / "r", "-o", tmp_path / name).exit_code == 0
    assert (tmp_path / name).stat().st_size > 1000
