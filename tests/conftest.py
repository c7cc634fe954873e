"""Shared fixtures: tiny CLIP teachers as open_clip local-dir folders, tiny recipes, images."""

from __future__ import annotations

import json
import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under `pytest -n N` the workers share the cores: one thread each, in the processes the
    # tests spawn too (they inherit this), or N workers x all-core thread pools oversubscribe
    # and the suite gets slower instead of faster. Set before torch is imported.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

def cli(*args, env: dict | None = None):
    """Run `uta ARGS` in-process (Typer's runner); an unexpected exception is re-raised so the
    test shows its traceback, while exit codes (SystemExit) come back in the result."""
    from typer.testing import CliRunner

    from uta_cli.app import app

    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def free_port() -> int:
    """A TCP port nobody listens on now: torchrun tests must not collide with another test run
    on the same machine (a fixed --master_port fails when two suites run at once)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_clip_folder(path, model_cfg=TINY_CLIP_CFG, seed=0) -> str:
    """A random-weight open_clip CLIP saved as a `local-dir:` folder."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": model_cfg,
                   "preprocess_cfg": {"size": model_cfg["vision_cfg"]["image_size"],
                                      "mean": list(open_clip.OPENAI_DATASET_MEAN),
                                      "std": list(open_clip.OPENAI_DATASET_STD),
                                      "interpolation": "bicubic"}}, f)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(path, "open_clip_model.safetensors"))
    return str(path)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> str:
    return write_clip_folder(tmp_path_factory.mktemp("tiny_clip"))


def tiny_overrides(teacher_dir: str, steps: int = 6, **extra) -> list[str]:
    """--set overrides for a seconds-long pre-training run on a few demo images."""
    sets = {
        "teacher.model": f"local-dir:{teacher_dir}", "teacher.weights": "",
        "data.source": "demo", "data.batch_size": 8, "data.num_workers": 0,
        "demo.train_images": 64, "demo.val_images": 16, "data.val_samples": 16,
        "student.family": "eva", "student.image_size": 32, "student.patch_size": 8,
        "student.width": 32, "student.depth": 2, "student.heads": 2,
        "mask.min_block_patches": 4, "schedule.steps": steps, "schedule.warmup_steps": 2,
        "train.precision": "fp32", "train.log_every": 1, "train.checkpoint_every": 3,
        "eval.zeroshot": "none",
    }
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


def write_images(folder, n: int, size: int = 40, seed: int = 0, classes=("a", "b")) -> list[str]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        cls_dir = os.path.join(folder, classes[i % len(classes)])
        os.makedirs(cls_dir, exist_ok=True)
        path = os.path.join(cls_dir, f"{i:04d}.png")
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's cache; never reach the network."""
    monkeypatch.setenv("UTA_CACHE_DIR", str(tmp_path / "uta-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
