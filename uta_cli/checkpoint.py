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
import logging
import os
import pickle
import random
import shutil

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from uta_cli import io
from uta_cli.errors import UtaUsageError
from uta_cli.outputs import mirror_of

LATEST = "latest"
# meta.json's "task": which model a checkpoint holds. Pre-training names its objective (so a run
# cannot resume as another objective); these and contrastive tuning hold a UTA student.
TASK_NAMES = {"uta": "uta-alignment", "mim": "mim-alignment", "fd": "fd-alignment"}
ALIGNMENT_TASKS = tuple(TASK_NAMES.values())  # checkpoints holding a pre-trained student
CONTRASTIVE_TASK = "uta-contrastive"  # a student tuned with its teacher's text tower
UTA_STUDENT_TASKS = (*ALIGNMENT_TASKS, CONTRASTIVE_TASK)
# meta.json's "meta_schema": the version of the fields a checkpoint's meta holds. Version 1 is
# the first versioned format; a meta without the field is version 1. A field added later gets a
# new version and its default in META_DEFAULTS, so checkpoints written before it keep loading.
META_SCHEMA = 1
# Fields of version 1 that runs written before they existed lack, with the value those runs used.
META_DEFAULTS: dict = {"objective": "uta"}
log = logging.getLogger(__name__)


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


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
    io.replace(tmp, final)
    io.atomic_write_text(os.path.join(ckpt_root, LATEST), step_dirname(step) + "\n")
    log.info("checkpoint written: %s", final)

    mirror = mirror_of(os.path.dirname(ckpt_root))
    if keep > 0:
        done = sorted(d for d in os.listdir(ckpt_root) if d.startswith("step_"))
        for old in done[:-keep]:
            shutil.rmtree(os.path.join(ckpt_root, old), ignore_errors=True)
    if mirror is not None:  # a run directory at a URL: complete files first, `latest` last
        mirror.push_checkpoint(final)
    return final


def latest_checkpoint(run_dir: str) -> str | None:
    """The checkpoint that RUN/checkpoints/latest names, or None when the run has none.

    Only `latest` is trusted: it is written after its checkpoint is complete, so a step folder it
    does not name may be one that a crash cut short. A pointer to a folder that is not there, and
    step folders without any pointer, are errors that say how to go on.
    """
    root = os.path.join(run_dir, "checkpoints")
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        try:
            with open(pointer) as f:
                name = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UtaUsageError(f"{pointer} cannot be read ({e}). Delete it and pass --resume "
                                f"with a checkpoints/step_* folder, or --resume never.") from None
        folder = os.path.join(root, name)
        if not name.startswith("step_") or "/" in name or not os.path.isdir(folder):
            raise UtaUsageError(
                f"{pointer} names {name!r}, which is not a checkpoint folder of this run (a "
                f"half-written or edited run directory). Pass a complete checkpoint explicitly "
                f"(--resume {root}/step_...), or start over with --resume never.")
        return folder
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_")) \
        if os.path.isdir(root) else []
    if steps:
        raise UtaUsageError(
            f"{run_dir} has checkpoint folders ({', '.join(steps[-3:])}) but no "
            f"checkpoints/latest, so none is known to be complete (a run killed while writing "
            f"its first checkpoint, or a copy without the pointer). Pass one explicitly "
            f"(--resume / --ckpt {os.path.join(root, steps[-1])}), or start over with "
            f"--resume never.")
    return None


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder, or a run directory (the checkpoint its `latest` names)."""
    if os.path.isfile(os.path.join(path, "meta.json")) or os.path.isfile(
            os.path.join(path, "model.safetensors")):
        missing = [n for n in ("meta.json", "model.safetensors")
                   if not os.path.isfile(os.path.join(path, n))]
        if missing:
            raise UtaUsageError(f"{path} is an incomplete checkpoint: {' and '.join(missing)} "
                                f"missing (a half-written or partly copied folder). Use another "
                                f"checkpoint of the run, or copy this one again.")
        return path
    if os.path.isdir(path):
        found = latest_checkpoint(path)
        if found:
            return resolve_checkpoint(found)
        raise UtaUsageError(f"{path} holds no complete checkpoint (expected checkpoints/step_*/ "
                            f"with meta.json and model.safetensors). Was the run started?")
    raise UtaUsageError(f"Checkpoint not found: {path}. Give a run directory or a "
                        f"checkpoints/step_* folder.")


def _damaged(path: str, what: str, error: BaseException) -> UtaUsageError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return UtaUsageError(
        f"{path} is damaged: {what} ({reason[:200]}). It was probably cut short (a full disk, "
        f"an interrupted copy or upload). Copy it again, or use another checkpoint of the run "
        f"(checkpoints/step_*; to resume from one: --resume PATH).")


def load_meta(ckpt: str) -> dict:
    path = os.path.join(ckpt, "meta.json")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise UtaUsageError(f"{ckpt} is not a complete checkpoint: meta.json is missing.") \
            from None
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _damaged(path, "not valid JSON", e) from None
    if not isinstance(meta, dict):
        raise UtaUsageError(f"{path} is not a uta checkpoint's meta.json (a JSON object).")
    schema = meta.get("meta_schema", 1)
    if not isinstance(schema, int) or not 1 <= schema <= META_SCHEMA:
        raise UtaUsageError(f"{path} has meta_schema {schema!r}, newer than this uta reads "
                            f"(up to {META_SCHEMA}). Upgrade uta (pip install -U uta-cli) to "
                            f"load it.")
    return {**META_DEFAULTS, **meta, "meta_schema": schema}


def load_weights(ckpt: str) -> dict[str, torch.Tensor]:
    path = os.path.join(ckpt, "model.safetensors")
    if not os.path.isfile(path):
        raise UtaUsageError(f"{ckpt} is not a complete checkpoint: model.safetensors is missing.")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _damaged(path, "unreadable safetensors", e) from None


def _torch_load(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UtaUsageError(f"{os.path.dirname(path)} is not a complete checkpoint: "
                            f"{os.path.basename(path)} is missing.") from None
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise _damaged(path, "unreadable torch file", e) from None


def load_training_state(ckpt: str) -> dict:
    return _torch_load(os.path.join(ckpt, "training_state.pt"))


def load_rng(ckpt: str, rank: int) -> dict | None:
    path = os.path.join(ckpt, f"rng_rank{rank}.pt")
    if not os.path.isfile(path):
        return None
    return _torch_load(path)
