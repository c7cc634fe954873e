"""Checkpoints of every kind back as models: a UTA student (run directory, checkpoint folder,
released file, exported open_clip folder, contrastive-tuning run) with the text side it goes
with, the teacher a checkpoint records, and the input preprocessing it records for its
student. The starting points of training that recipes name are read in starts.py.

Above models/ and checkpoint.py, below the tasks and workflows that use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from uta_cli import checkpoint as ckpt
from uta_cli.data.pipeline import View
from uta_cli.errors import UtaUsageError
from uta_cli.models import open_clip_folder, release
from uta_cli.models.release import ReleaseTextTower, text_tower_from_meta
from uta_cli.models.student import UTAStudent, fit_training_parts
from uta_cli.models.teacher import (
    CLIPTeacher,
    file_fingerprint,
    load_teacher,
)
from uta_cli.recipe import StudentConfig

# Checkpoint layout of contrastive tuning (meta.json "weights_layout"): in model.safetensors the
# student's own keys (those of UTAStudent) sit under STUDENT_PREFIX; every key outside "visual."
# belongs to the CLIP's text side (token embedding, transformer, ln_final, text_projection,
# logit_scale, or "text." for open_clip's CustomTextCLIP).
STUDENT_PREFIX = "visual.student."


def text_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text side of a contrastive checkpoint's weights (everything outside `visual.`)."""
    return {k: v for k, v in state.items() if not k.startswith("visual.")}


def student_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The UTAStudent weights of a contrastive checkpoint (prefix removed)."""
    return {k[len(STUDENT_PREFIX):]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}


def student_weights(folder: str, meta: dict, state: dict[str, torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """The UTAStudent weights of a UTA checkpoint folder: a pre-training run's own keys, or a
    contrastive run's student keys (under STUDENT_PREFIX). state: the folder's weights, if read
    already."""
    state = ckpt.load_weights(folder) if state is None else state
    return student_state_dict(state) if meta.get("task") == ckpt.CONTRASTIVE_TASK else state


def tuned_clip_from_checkpoint(ckpt_dir: str, teacher_weights: str = ""):
    """(student, teacher, meta) of a contrastive-tuning checkpoint (file or run directory): the
    UTA student, and the verified teacher whose CLIP now carries the TUNED text tower and logit
    scale, so zero-shot classification uses the text side that was trained with the student."""
    folder = ckpt.resolve_checkpoint(ckpt_dir)
    meta = ckpt.load_meta(folder)
    if "text_tower" not in meta:
        raise UtaUsageError(f"{folder} is a '{meta.get('task')}' checkpoint without a tuned text "
                            f"tower (not a contrastive-tuning checkpoint).")
    state = ckpt.load_weights(folder)
    student = UTAStudent(StudentConfig(**meta["student"]), int(meta["embed_dim"]))
    student.load_state_dict(student_weights(folder, meta, state))
    teacher = tuned_text_tower(folder, meta, state, teacher_weights)
    meta["checkpoint_dir"] = folder
    return student.eval(), teacher, meta


def tuned_text_tower(folder: str, meta: dict, state: dict[str, torch.Tensor],
                     teacher_weights: str = "") -> CLIPTeacher:
    """The verified teacher of a contrastive-tuning checkpoint with its tuned text tower and
    logit scale loaded from the checkpoint's weights (`state`)."""
    teacher = teacher_from_meta(meta, teacher_weights)
    missing, unexpected = teacher.clip.load_state_dict(text_state_dict(state), strict=False)
    missing = [k for k in missing if not k.startswith("visual.")]
    if missing or unexpected:
        raise UtaUsageError(f"The text tower in {folder} does not fit the teacher's CLIP "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]}).")
    teacher.clip.eval().requires_grad_(False)
    # the tuned text gives other class weights than the teacher's: keep them apart in the cache
    teacher.text_fingerprint = file_fingerprint(os.path.join(folder, "model.safetensors"))
    return teacher


def teacher_from_meta(meta: dict, weights_override: str = "") -> CLIPTeacher:
    """The teacher recorded in a checkpoint's meta.json, refused if it is not the same one.

    weights_override: where the weights live now (a run directory moved to another machine).
    The fingerprint, embed_dim and open_clip config must still match what training used.
    A checkpoint tuned from a released UTA file gets that file's text tower instead (a
    release.ReleaseTextTower: same clip/tokenizer/identity, no image tower).
    """
    recorded = meta.get("teacher")
    if not recorded:
        raise UtaUsageError("The checkpoint records no teacher; pass one explicitly.")
    if recorded["model"].startswith("uta-release:"):  # tuned from a released file: its text
        return text_tower_from_meta(recorded, weights_override)
    model, weights = recorded["model"], recorded["weights"]
    if weights_override:
        if model.startswith("local-dir:"):
            model = "local-dir:" + weights_override if os.path.isdir(weights_override) else model
            weights = "" if os.path.isdir(weights_override) else weights_override
        else:
            weights = weights_override
    elif model.startswith("local-dir:") and not os.path.isdir(model[len("local-dir:"):]):
        if meta.get("converted_from") and meta.get("checkpoint_dir"):  # `uta convert` output
            raise UtaUsageError(f"The converted checkpoint {meta['checkpoint_dir']} was moved: "
                                f"it still names its open_clip folder by the old path. Re-point "
                                f"it once with: uta repoint {meta['checkpoint_dir']}")
        raise UtaUsageError(f"The checkpoint's teacher folder {model[len('local-dir:'):]} does "
                            f"not exist here. Pass --teacher-weights with its new location.")
    elif weights and not weights.startswith("local-dir:") and os.sep in weights and \
            not os.path.exists(weights):
        raise UtaUsageError(f"The checkpoint's teacher weights {weights} do not exist here. "
                            f"Pass --teacher-weights with their new location.")
    teacher = load_teacher(model, weights)
    now = teacher.identity
    problems = []
    if now.embed_dim != recorded["embed_dim"]:
        problems.append(f"embed_dim {now.embed_dim} != {recorded['embed_dim']}")
    if recorded.get("weights_fingerprint") and \
            now.weights_fingerprint != recorded["weights_fingerprint"]:
        problems.append("different weights (fingerprint mismatch)")
    if recorded.get("model_cfg") and now.model_cfg != recorded["model_cfg"]:
        problems.append("different open_clip config (e.g. QuickGELU)")
    if problems:
        raise UtaUsageError(f"Teacher mismatch: the checkpoint was trained against "
                            f"{recorded['model']} ({recorded['weights'] or 'folder'}), but the "
                            f"teacher found has {', '.join(problems)}. Point --teacher-weights at "
                            f"the teacher used for training.")
    return teacher


@dataclass(frozen=True)
class Preprocess:
    """A student's input preprocessing as its checkpoint records it (meta "student_preprocess"):
    the square input size, normalisation, resampling and how an image meets the square."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def view(self, name: str) -> View:
        return View(name, self.size, self.mean, self.std, self.interpolation, self.resize_mode)


def student_preprocess(meta: dict, mean=(), std=()) -> Preprocess:
    """The one reader of meta["student_preprocess"]. What a checkpoint does not record falls
    back to its student's image size, the given mean and std, bicubic, shortest side."""
    sp = meta.get("student_preprocess") or {}
    return Preprocess(int(sp.get("size", meta["student"]["image_size"])),
                      tuple(sp.get("mean", mean)), tuple(sp.get("std", std)),
                      sp.get("interpolation", "bicubic"), sp.get("resize_mode", "shortest"))


@dataclass
class LoadedModel:
    """A UTA student rebuilt from any checkpoint kind, with what it was trained against.

    text: the text side that belongs to the student when the checkpoint carries its own (a
    released file's text tower, a contrastive run's tuned one, an exported open_clip folder's);
    None when the recorded teacher's text tower is the one to use (`text_tower()` loads it).
    """

    student: UTAStudent
    meta: dict  # the checkpoint's meta.json (schema defaults filled), checkpoint_dir included
    source: str  # "checkpoint", "contrastive", "uta-release" or "open-clip-folder"
    text: CLIPTeacher | ReleaseTextTower | None = None

    def text_tower(self, teacher_weights: str = "") -> CLIPTeacher | ReleaseTextTower:
        """The text side that scores this student: its own, else the verified teacher's."""
        return self.text if self.text is not None else teacher_from_meta(self.meta,
                                                                         teacher_weights)

    def preprocess(self, mean=(), std=()) -> Preprocess:
        """The student's recorded preprocessing (mean and std: where none is recorded)."""
        return student_preprocess(self.meta, mean, std)


def checkpoint_kind(path: str, fmt: str = "auto") -> str:
    """"uta-release" (a released file), "open-clip-folder" (an exported one) or "checkpoint" (a
    uta checkpoint folder or run directory); fmt: --ckpt-format (auto, uta or uta-release)."""
    if release.resolve_format(path, fmt) == "uta-release":
        return "uta-release"
    if open_clip_folder.is_open_clip_folder(path):
        return "open-clip-folder"
    return "checkpoint"


def read_model_meta(path: str, fmt: str = "auto") -> tuple[str, dict]:
    """(location, meta) of what load_model(path, fmt) loads, checked without building a model,
    so that a command refuses bad input in a second."""
    kind = checkpoint_kind(path, fmt)
    if kind == "uta-release":
        return path, release.read_release(path)[2]  # strict validation
    if kind == "open-clip-folder":
        return path, open_clip_folder.read_folder(path)
    folder = ckpt.resolve_checkpoint(path)
    return folder, ckpt.load_meta(folder)


def load_model(path: str, fmt: str = "auto", teacher_weights: str = "") -> LoadedModel:
    """Any checkpoint as a LoadedModel: a run directory or checkpoint folder, a contrastive-tuning
    run, a released UTA file (uta_*.pt, detected with fmt "auto" or forced with "uta-release"),
    or an exported open_clip folder (uta export / uta convert). teacher_weights: where a
    contrastive run's teacher lives now, if it moved."""
    kind = checkpoint_kind(path, fmt)
    if kind == "uta-release":
        rel = release.load_release(path)
        return LoadedModel(rel.student, rel.meta, "uta-release", rel.text_tower)
    if kind == "open-clip-folder":
        student, text, meta = open_clip_folder.load_folder(path)
        return LoadedModel(student, meta, "open-clip-folder", text)
    folder = ckpt.resolve_checkpoint(path)
    meta = ckpt.load_meta(folder)
    if meta.get("task") == ckpt.CONTRASTIVE_TASK:
        student, tuned, meta = tuned_clip_from_checkpoint(folder, teacher_weights)
        return LoadedModel(student, meta, "contrastive", tuned)
    if "student" not in meta or "embed_dim" not in meta:
        raise UtaUsageError(f"{folder} is a '{meta.get('task')}' checkpoint, not a UTA student.")
    cfg = StudentConfig(**meta["student"])
    model = UTAStudent(cfg, int(meta["embed_dim"]))
    model.load_state_dict(fit_training_parts(student_weights(folder, meta), model))
    meta["checkpoint_dir"] = folder
    return LoadedModel(model.eval(), meta, "checkpoint")


def student_from_checkpoint(path: str, fmt: str = "auto", teacher_weights: str = ""
                            ) -> tuple[UTAStudent, dict]:
    """(student, meta) of load_model: the short form for notebooks and tests."""
    loaded = load_model(path, fmt, teacher_weights)
    return loaded.student, loaded.meta
