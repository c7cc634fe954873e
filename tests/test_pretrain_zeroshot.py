"""Zero-shot accuracy while pre-training (eval.zeroshot, eval.zeroshot_every): logged at the
chosen steps, sharded over processes, and equal to `uta zeroshot` on the same checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import free_port, tiny_overrides
from PIL import Image
from typer.testing import CliRunner

from uta_cli.app import app
from uta_cli.errors import UtaUsageError


def write_folder(root, classes=("cat", "big_dog", "fish"), per_class: int = 5) -> str:
    rng = np.random.default_rng(7)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            w, h = [(45, 33), (33, 45), (40, 40), (51, 37)][i % 4]
            img = rng.uniform(0, 1, (1, 1, 3)) + rng.normal(0, rng.uniform(0, 0.5), (h, w, 3))
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(
                os.path.join(root, c, f"{i:02d}.png"))
    return str(root)


def test_two_process_pretraining_logs_zero_shot_at_the_chosen_steps(tmp_path, tiny_clip_dir):
    data = write_folder(tmp_path / "val")
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {c}.\nart of the {c}.\n")
    sets = tiny_overrides(tiny_clip_dir, steps=4, **{
        "eval.zeroshot": data, "eval.zeroshot_every": 2, "eval.templates": str(templates),
        "train.log_every": 2})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "uta_cli", "pretrain", "demo",
           "--output-dir", str(tmp_path / "run")]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UTA_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    events = [r for r in records if r.get("event") == "zeroshot"]
    assert [r["step"] for r in events] == [2, 4]
    assert all(r["zeroshot_samples"] == 15 and r["dataset"] == data for r in events)
    assert all(0 <= r["zeroshot_acc1"] <= 1 for r in events)
    assert all(r["zeroshot_acc5"] is None for r in events)  # 3 classes: top-5 is meaningless
    # on the progress line after the first evaluation
    assert any("loss" in line and "zeroshot_acc1" in line for line in out.stdout.splitlines())
    # class weights were built once and cached: the cache holds one entry
    assert len(os.listdir(tmp_path / "cache" / "classifiers")) == 1

    # the last one is what `uta zeroshot` (one process) reports for the final checkpoint
    result = CliRunner().invoke(app, [
        "zeroshot", "--ckpt", str(tmp_path / "run"), "--dataset", data, "--templates",
        str(templates), "--precision", "fp32", "--workers", "0", "--cache-dir", "none",
        "--output-json", str(tmp_path / "zs.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "zs.json").read_text())
    assert report["num_samples"] == 15
    assert events[-1]["zeroshot_acc1"] == report["metrics"]["acc1"]
    assert events[-1]["zeroshot_acc5"] == report["metrics"]["acc5"]


def test_bad_zero_shot_dataset_fails_before_training(tmp_path, tiny_clip_dir):
    from uta_cli.recipe import load_recipe
    from uta_cli.workflows.pretrain import run_pretrain

    recipe = load_recipe("demo", tiny_overrides(tiny_clip_dir, steps=2, **{
        "eval.zeroshot": str(tmp_path / "nope"), "eval.zeroshot_every": 1}))
    with pytest.raises(UtaUsageError, match="nope"):
        run_pretrain(recipe, output_dir=str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")
