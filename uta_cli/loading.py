"""Checkpoints of every kind back as models: a UTA student (run directory, checkpoint folder,
released file, exported open_clip folder, contrastive-tuning run) with the text side it goes
with, and the teacher a checkpoint records; and the starting points of training that a recipe
names (`init` of uta finetune, also timm:NAME and open_clip:MODEL, and `student.init` of uta
pretrain), decided and checked here so the workflows only consume them.

Above models/ and checkpoint.py, below the tasks and workflows that use it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from uta_cli import checkpoint as ckpt
from uta_cli.data import View
from uta_cli.errors import UtaUsageError
from uta_cli.models import open_clip_folder, release
from uta_cli.models.release import ReleasedModel, ReleaseTextTower, text_tower_from_meta
from uta_cli.models.student import UTAStudent, fit_mask_token
from uta_cli.models.teacher import (
    CLIPTeacher,
    TeacherIdentity,
    file_fingerprint,
    load_clip,
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
    student.load_state_dict(student_state_dict(state))
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
    if meta.get("task") == "uta-contrastive":
        student, tuned, meta = tuned_clip_from_checkpoint(folder, teacher_weights)
        return LoadedModel(student, meta, "contrastive", tuned)
    if "student" not in meta or "embed_dim" not in meta:
        raise UtaUsageError(f"{folder} is a '{meta.get('task')}' checkpoint, not a UTA student.")
    cfg = StudentConfig(**meta["student"])
    model = UTAStudent(cfg, int(meta["embed_dim"]))
    model.load_state_dict(fit_mask_token(ckpt.load_weights(folder), model))
    meta["checkpoint_dir"] = folder
    return LoadedModel(model.eval(), meta, "checkpoint")


def student_from_checkpoint(path: str, fmt: str = "auto", teacher_weights: str = ""
                            ) -> tuple[UTAStudent, dict]:
    """(student, meta) of load_model: the short form for notebooks and tests."""
    loaded = load_model(path, fmt, teacher_weights)
    return loaded.student, loaded.meta


# -- starting points of training ------------------------------------------------------------------
UTA_STARTS = ("uta", "uta-contrastive", "uta-release")  # the Start kinds that hold a UTA student


@dataclass
class Start:
    """What a recipe's `init` names, resolved and checked before anything heavy is built: a UTA
    checkpoint (its meta; a released file is loaded, which validates it strictly), a timm or
    open_clip model name, or nothing (a random student)."""

    kind: str  # scratch | uta | uta-contrastive | uta-release | timm | open_clip
    location: str = ""  # checkpoint folder, released file, timm or open_clip model name
    meta: dict = field(default_factory=dict)
    release: ReleasedModel | None = None  # uta-release: the loaded file (student + text tower)

    def describe(self) -> dict:
        return {"kind": self.kind, "location": self.location, "step": self.meta.get("step")}

    @property
    def is_uta(self) -> bool:
        return self.kind in UTA_STARTS

    def student(self, drop_path: float) -> UTAStudent:
        """The UTA student of the checkpoint, rebuilt with the fine-tuning drop path."""
        cfg = StudentConfig(**self.meta["student"])
        cfg.drop_path = drop_path
        cfg.init = ""
        student = UTAStudent(cfg, int(self.meta["embed_dim"]))
        if self.kind == "uta-release":
            state = self.release.student.state_dict()
            # the rebuilt student replaces it; otherwise a giant release stays in memory twice
            self.release.student = None
        else:
            state = ckpt.load_weights(self.location)
        if self.kind == "uta-contrastive":
            state = student_state_dict(state)
        student.load_state_dict(fit_mask_token(state, student))  # a MIM run's [MASK] is unused
        return student

    def text_tower(self, teacher_weights: str = "") -> CLIPTeacher | ReleaseTextTower:
        """The text side of the UTA checkpoint: a released file's own, a contrastive run's tuned
        one, else the verified teacher it records. teacher_weights: where that teacher lives
        now."""
        if self.kind == "uta-release":
            return self.release.text_tower
        if self.kind == "uta-contrastive":
            return tuned_text_tower(self.location, self.meta, ckpt.load_weights(self.location),
                                    teacher_weights)
        return teacher_from_meta(self.meta, teacher_weights)

    def preprocess(self, mean=(), std=()) -> Preprocess:
        return student_preprocess(self.meta, mean, std)


def resolve_init(init: str) -> Start:
    """uta finetune's `init`: empty (a random student), timm:NAME, open_clip:MODEL, a released
    uta_*.pt file, or a UTA pre-training or contrastive-tuning run or checkpoint."""
    init = init.strip()
    if not init:
        return Start("scratch")
    if init.startswith("timm:"):
        return Start("timm", init[len("timm:"):])
    if init.startswith("open_clip:"):
        return Start("open_clip", init[len("open_clip:"):])
    if not os.path.exists(init):
        raise UtaUsageError(
            f"init {init!r} does not exist. Give a UTA run directory or checkpoint folder (for "
            f"the demo: run `uta pretrain` first, it writes runs/demo), a released uta_*.pt "
            f"file, timm:MODEL or open_clip:MODEL, or --set init= for a random start.")
    if release.resolve_format(init) == "uta-release":  # a released uta_*.pt file
        rel = release.load_release(init)
        return Start("uta-release", os.path.abspath(init), rel.meta, rel)
    folder = ckpt.resolve_checkpoint(init)
    meta = ckpt.load_meta(folder)
    task = meta.get("task")
    if task not in ckpt.UTA_STUDENT_TASKS:
        raise UtaUsageError(
            f"init {folder} is a '{task}' checkpoint; `uta finetune` starts from a UTA "
            f"pre-training or contrastive-tuning checkpoint. To continue this run, use its "
            f"--output-dir with --resume auto.")
    return Start("uta" if task in ckpt.ALIGNMENT_TASKS else "uta-contrastive", folder, meta)


def load_timm_backbone(name: str, weights: str, timm_kwargs: dict, drop_path: float,
                       mean, std) -> tuple[nn.Module, Preprocess]:
    """init timm:NAME: the timm model without its classifier, with the pretrained weights (the
    hub's, or the local file `weights`, finetune.init_weights), and its own preprocessing (mean
    and std: where its pretrained config names none)."""
    import timm

    kwargs = dict(timm_kwargs)
    kwargs.setdefault("drop_path_rate", drop_path)
    if weights and not os.path.isfile(weights):
        raise UtaUsageError(f"finetune.init_weights {weights} is not a file. Give a local "
                            f"weights file for {name}, or leave it empty for the "
                            f"hub's weights (needs network).")
    if name not in timm.list_models(pretrained=False) and \
            name.split(".")[0] not in timm.list_models(pretrained=False):
        raise UtaUsageError(f"timm has no model {name!r} (init: timm:NAME, e.g. "
                            f"timm:vit_base_patch16_224.augreg_in21k).")
    overlay = {"file": weights} if weights else None
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay=overlay, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise UtaUsageError(f"Cannot load the weights of timm model {name}: {e}. "
                            f"Offline? Set finetune.init_weights to a local file.") from None
    cfg = model.pretrained_cfg
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    size = size[0] if isinstance(size, (tuple, list)) else size or cfg["input_size"][-1]
    interp = cfg.get("interpolation")
    return model, Preprocess(int(size), tuple(cfg.get("mean", mean)), tuple(cfg.get("std", std)),
                             interp if interp in ("bicubic", "bilinear", "nearest") else "bicubic")


def load_open_clip_init(model: str, weights: str
                        ) -> tuple[nn.Module, TeacherIdentity, Preprocess]:
    """init open_clip:MODEL: the CLIP (its image tower is the backbone, its text tower gives
    the zero-shot head), its identity and its image preprocessing."""
    clip, identity = load_clip(model, weights)
    return clip, identity, Preprocess(identity.image_size, tuple(identity.mean),
                                      tuple(identity.std), identity.interpolation)


# what decides the shapes of a student's weights
_SHAPE_FIELDS = ("family", "image_size", "patch_size", "width", "depth", "heads", "mlp_ratio")


def student_init_state(init: str, cfg: StudentConfig, embed_dim: int
                       ) -> tuple[dict[str, torch.Tensor], str]:
    """uta pretrain's `student.init`: the weights (and a description) of a released UTA file
    (uta_*.pt), or of the student of a UTA pre-training or contrastive-tuning checkpoint. The
    recipe's student `cfg` must have the same shape; a mismatch is named field by field instead
    of failing in load_state_dict."""
    if os.path.isfile(init):
        return _release_init_state(init, cfg, embed_dim), f"the released UTA file {init}"
    folder = ckpt.resolve_checkpoint(init)
    meta = ckpt.load_meta(folder)
    task = meta.get("task")
    if task not in ckpt.UTA_STUDENT_TASKS:
        raise UtaUsageError(f"student.init {folder} is a '{task}' checkpoint. student.init takes "
                            f"a UTA pre-training or contrastive-tuning checkpoint, or a released "
                            f"uta_*.pt file.")
    want, have = dataclasses.asdict(cfg), meta["student"]
    diffs = [f"student.{k}={want[k]!r} (checkpoint: {have.get(k)!r})" for k in _SHAPE_FIELDS
             if have.get(k) != want[k]]
    if int(meta["embed_dim"]) != embed_dim:
        diffs.append(f"teacher embed_dim {embed_dim} (checkpoint: {meta['embed_dim']})")
    if diffs:
        raise UtaUsageError(f"student.init {folder} does not fit the recipe: {'; '.join(diffs)}. "
                            f"Set the student section to the checkpoint's (the 'student' of its "
                            f"meta.json) and use the same teacher.")
    state = ckpt.load_weights(folder)
    if task == ckpt.CONTRASTIVE_TASK:
        state = student_state_dict(state)
    return state, f"{folder} ({task}, step {meta.get('step')})"


def _release_init_state(path: str, cfg: StudentConfig, embed_dim: int
                        ) -> dict[str, torch.Tensor]:
    """A released file's vision weights for `student.init`; the student config must match."""
    state, arch, _ = release.read_release(path)
    want = arch.student_config()
    diffs = [f"{f}={getattr(cfg, f)!r} (release: {getattr(want, f)!r})"
             for f in ("family", "image_size", "patch_size", "width", "depth", "heads")
             if getattr(cfg, f) != getattr(want, f)]
    if int(cfg.width * cfg.mlp_ratio) != arch.mlp_hidden:
        diffs.append(f"mlp_ratio={cfg.mlp_ratio} (release hidden {arch.mlp_hidden}: "
                     f"mlp_ratio {want.mlp_ratio!r})")
    ref = cfg.timm_kwargs.get("ref_feat_shape")
    if ref is None or list(ref) != [release.ROPE_REF_GRID, release.ROPE_REF_GRID]:
        diffs.append(f"timm_kwargs.ref_feat_shape={ref!r} (release: [16, 16])")
    if embed_dim != arch.embed_dim:
        diffs.append(f"teacher embed_dim={embed_dim} (release head: {arch.embed_dim})")
    if diffs:
        raise UtaUsageError(f"student.init {path} is {arch.name}, which does not match the "
                            f"recipe's student: {'; '.join(diffs)}.")
    return release.vision_state(state)
