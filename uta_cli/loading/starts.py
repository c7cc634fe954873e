"""The starting points of training that a recipe names, decided and checked here so that the
workflows only consume them: uta finetune's `init` (a UTA checkpoint of any kind, a released
file, timm:NAME, open_clip:MODEL, or nothing) and uta pretrain's `student.init` (a UTA
checkpoint or a released file, which must fit the recipe's student).

Beside model.py (the same checkpoints as models for evaluation and export), below the
workflows.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from uta_cli import checkpoint as ckpt
from uta_cli.errors import UtaUsageError
from uta_cli.loading.model import (
    Preprocess,
    checkpoint_kind,
    student_preprocess,
    student_weights,
    teacher_from_meta,
    tuned_text_tower,
)
from uta_cli.models import release
from uta_cli.models.release import ReleasedModel, ReleaseTextTower
from uta_cli.models.student import UTAStudent, fit_training_parts
from uta_cli.models.teacher import CLIPTeacher, TeacherIdentity, load_clip
from uta_cli.recipe import StudentConfig

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
            state = student_weights(self.location, self.meta)
        student.load_state_dict(fit_training_parts(state, student))  # a MIM run's [MASK] is unused
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
    kind = checkpoint_kind(init)
    if kind == "uta-release":  # a released uta_*.pt file
        rel = release.load_release(init)
        return Start("uta-release", os.path.abspath(init), rel.meta, rel)
    if kind == "open-clip-folder":  # an open_clip CLIP, e.g. one `uta export` wrote
        raise UtaUsageError(
            f"init {init} is an open_clip folder, not a UTA checkpoint. Start from its image "
            f"tower with --set init=open_clip:local-dir:{os.path.abspath(init)}, or from the UTA "
            f"run it was exported from.")
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
    kind = checkpoint_kind(init)
    if kind == "uta-release":
        return _release_init_state(init, cfg, embed_dim), f"the released UTA file {init}"
    if kind == "open-clip-folder":
        raise UtaUsageError(f"student.init {init} is an open_clip folder, not a UTA checkpoint. "
                            f"student.init takes a UTA pre-training or contrastive-tuning "
                            f"checkpoint, or a released uta_*.pt file: give the run it was "
                            f"exported from.")
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
    return student_weights(folder, meta), f"{folder} ({task}, step {meta.get('step')})"


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
