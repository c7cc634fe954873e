"""The linear probe (CLIP_benchmark's protocol) on a separable toy set. `uta zeroshot --task
linear-probe` is tested in test_zeroshot.py, on its pre-trained run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from uta_cli.errors import UtaUsageError
from uta_cli.evaluate.linear_probe import WEIGHT_DECAYS, ProbeConfig, linear_probe
from uta_cli.io import json_safe


def _clusters(n_per_class: int, seed: int, classes: int = 4, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:classes] * 3
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[y] + 0.3 * torch.randn(len(y), dim, generator=g), y


def test_probe_separates_a_separable_set_and_is_reproducible():
    train_x, train_y = _clusters(20, 0)
    test_x, test_y = _clusters(10, 1)
    cfg = ProbeConfig(epochs=5, batch_size=16)
    r = linear_probe(train_x, train_y, test_x, test_y, 4, cfg)
    assert r["lp_acc1"] == 1.0 and r["lp_mean_per_class_recall"] == 1.0
    # four classes: every label is in the top 5, so top-5 is meaningless (CLIP_benchmark: NaN)
    assert math.isnan(r["lp_acc5"])
    assert r["num_samples"] == 40 and r["num_train"] == 80
    # the search: CLIP_benchmark's 7 starting values, then refinements on the 97-value grid
    tried = r["weight_decay_search"]
    assert all(w in tried for w in np.logspace(-6, 2, 7).tolist())
    assert 7 < len(tried) <= 7 + 4 * 2 and r["weight_decay"] in WEIGHT_DECAYS
    assert tried[1e2] < 1.0  # so strong an L2 weight underfits: the search has something to do
    again = linear_probe(train_x, train_y, test_x, test_y, 4, cfg)  # same seed, same result
    assert json_safe(r) == json_safe(again)
    with pytest.raises(UtaUsageError, match="validation"):
        linear_probe(train_x, train_y, test_x, test_y, 4, ProbeConfig(val_proportion=1.5))


def test_top5_is_reported_from_five_classes_on():
    train_x, train_y = _clusters(12, 0, classes=5)
    test_x, test_y = _clusters(6, 1, classes=5)
    r = linear_probe(train_x, train_y, test_x, test_y, 5, ProbeConfig(epochs=3, batch_size=16))
    assert r["lp_acc5"] == 1.0  # five classes: top-5 is every class, yet CLIP_benchmark counts it
