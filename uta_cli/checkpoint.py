"""Checkpoints: step-named folders, written atomically, with a pointer to the newest complete one.

    RUN/checkpoints/step_00001000/
        model.safetensors     trainable weights (the unwrapped model's state_dict)
        training_state.pt     optimizer, grad scaler, step, epoch: plain types (weights_only=True)
        rng_rank{R}.pt        each process's RNG state (dropout, drop path)
        meta.json             resolved recipe, teacher identity, mask settings, task, version
    RUN/checkpoints/latest    text: the folder name of the newest complete checkpoint

A folder is written under a temporary name and renamed when complete, and `latest` is replaced
atomically after that, so a kill at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from uta_cli.errors import UtaUsageError

LATEST = "latest"


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    """RNG state as plain types, loadable with weights_only=True."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                       *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def begin(ckpt_root: str, step: int) -> str:
    """Create (fresh) the temporary folder for the checkpoint of `step`; returns its path."""
    tmp = os.path.join(ckpt_root, f".{step_dirname(step)}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def write_weights(folder: str, state_dict: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()},
              os.path.join(folder, "model.safetensors"))


def commit(ckpt_root: str, tmp: str, step: int, keep: int) -> str:
    """Rename the finished folder into place, move `latest`, prune old checkpoints."""
    final = os.path.join(ckpt_root, step_dirname(step))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(os.path.join(ckpt_root, LATEST), step_dirname(step) + "\n")
    if keep > 0:
        done = sorted(d for d in os.listdir(ckpt_root) if d.startswith("step_"))
        for old in done[:-keep]:
            shutil.rmtree(os.path.join(ckpt_root, old), ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint folder of a run directory, or None."""
    root = os.path.join(run_dir, "checkpoints")
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        if name and os.path.isfile(os.path.join(root, name, "meta.json")):
            return os.path.join(root, name)
    # Pointer missing (e.g. copied without it): fall back to the newest complete folder.
    if os.path.isdir(root):
        done = sorted(d for d in os.listdir(root)
                      if d.startswith("step_") and os.path.isfile(os.path.join(root, d,
                                                                               "meta.json")))
        if done:
            return os.path.join(root, done[-1])
    return None


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder, or a run directory (its newest checkpoint)."""
    if os.path.isfile(os.path.join(path, "meta.json")) and os.path.isfile(
            os.path.join(path, "model.safetensors")):
        return path
    if os.path.isdir(path):
        found = latest_checkpoint(path)
        if found:
            return found
        raise UtaUsageError(f"{path} holds no complete checkpoint (expected checkpoints/step_*/ "
                            f"with meta.json and model.safetensors). Was the run started?")
    raise UtaUsageError(f"Checkpoint not found: {path}. Give a run directory or a "
                        f"checkpoints/step_* folder.")


def load_meta(ckpt: str) -> dict:
    with open(os.path.join(ckpt, "meta.json")) as f:
        return json.load(f)


def load_weights(ckpt: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(ckpt, "model.safetensors"))


def load_training_state(ckpt: str) -> dict:
    return torch.load(os.path.join(ckpt, "training_state.pt"), map_location="cpu",
                      weights_only=True)


def load_rng(ckpt: str, rank: int) -> dict | None:
    path = os.path.join(ckpt, f"rng_rank{rank}.pt")
    if not os.path.isfile(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
