"""A checkpoint's student and its teacher as encoders for evaluation: each on its own
preprocessing and precision, with the text tower that scores it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from uta_cli.data.pipeline import (
    RESIZE_MODES,
    View,
)
from uta_cli.errors import UtaUsageError
from uta_cli.evaluate.zeroshot import (
    TextEncoder,
)
from uta_cli.loading.model import load_model, teacher_from_meta
from uta_cli.models.teacher import CLIPTeacher

PRECISIONS = ("auto", "bf16", "fp32")
_RESAMPLING = ("bicubic", "bilinear", "nearest")


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run in hardware here (AMX or AVX512-BF16 on CPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(torch.cpu, probe, None)  # private probes: absent means "don't know"
        with contextlib.suppress(Exception):
            if fn is not None and fn():
                return True
    return False


def resolve_precision(requested: str, device: torch.device) -> str:
    """'auto' is bf16 where the hardware has bf16 (GPUs, CPUs with AMX/AVX512-BF16), else fp32.

    Measured on a 2-core AVX512 CPU without BF16 (ViT-B/16, 224 px, batch 8): the student ran
    2.4 img/s in fp32, 0.67 with bf16 autocast and 0.68 with bf16 weights; the open_clip teacher
    1.24 in fp32 and 0.46 with bf16 weights. Emulated bf16 is 2-3x slower there.
    """
    if requested not in PRECISIONS:
        raise UtaUsageError(f"--precision {requested!r} is not one of: {', '.join(PRECISIONS)}.")
    if requested == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return requested


# --------------------------------------------------------------------------------------------
# models


class StudentEncoder:
    """The student's CLS embedding at the chosen precision.

    On CPU, bf16 casts the WEIGHTS: autocast re-casts every weight of a frozen model on every
    call (its cast cache only keeps tensors that require grad), the pitfall measured on the
    teacher (models/teacher.py). On GPU, bf16 is autocast over fp32 weights (fp32 norms and
    softmax).
    """

    def __init__(self, student: torch.nn.Module, device: torch.device, precision: str):
        self.student = student.eval().requires_grad_(False)
        self.device = device
        self.autocast = precision == "bf16" and device.type != "cpu"
        self.dtype = torch.bfloat16 if precision == "bf16" and device.type == "cpu" \
            else torch.float32
        self.student.to(device=device, dtype=self.dtype)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, self.dtype)
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast \
            else contextlib.nullcontext()
        with ctx:
            return self.student.encode_image(images).float()


def text_encoder(teacher: CLIPTeacher, context: str = "trimmed") -> TextEncoder:
    """The teacher's text tower at the teacher's precision (weights cast by CLIPTeacher.to),
    trimmed to each batch's longest prompt where that is exact (zeroshot.TextEncoder)."""
    autocast = (lambda: torch.autocast("cuda", dtype=teacher.dtype)) \
        if teacher.device.type == "cuda" and teacher.dtype != torch.float32 else None
    return TextEncoder(teacher.clip, context, teacher.device, autocast)


@dataclass
class Encoder:
    role: str  # student | teacher
    model: str  # CLIP_benchmark's "model"
    pretrained: str  # CLIP_benchmark's "pretrained"
    view: View
    encode: Callable[[torch.Tensor], torch.Tensor]
    # The text tower that scores this encoder: the checkpoint's for the student (a tuned one
    # after contrastive tuning), the teacher's own for the teacher.
    text: CLIPTeacher


def eval_view(name: str, size: int, mean, std, interpolation: str,
              resize_mode: str = "shortest", fill: int = 0) -> View:
    """A model's evaluation preprocessing. open_clip runs anything but bilinear as bicubic."""
    interpolation = interpolation if interpolation in _RESAMPLING else "bicubic"
    if resize_mode not in RESIZE_MODES:
        raise UtaUsageError(f"The recorded resize_mode {resize_mode!r} is not one of: "
                            f"{', '.join(RESIZE_MODES)}.")
    return View(name, int(size), tuple(float(m) for m in mean), tuple(float(s) for s in std),
                interpolation, resize_mode, int(fill))


def teacher_view(name: str, teacher: CLIPTeacher) -> View:
    """The teacher's own open_clip preprocess (its preprocess_cfg), at its input size."""
    ident = teacher.identity
    pp = getattr(getattr(teacher, "visual", None), "preprocess_cfg", None) or {}
    return eval_view(name, teacher.image_size, ident.mean, ident.std, ident.interpolation,
                     getattr(ident, "resize_mode", "shortest"), int(pp.get("fill_color") or 0))


def student_label(meta: dict) -> str:
    if meta.get("release"):  # a released UTA file: its published name
        return meta["release"]["name"]
    s = meta["student"]
    return (f"uta-{s.get('family', 'vit')}-w{s.get('width')}-d{s.get('depth')}-"
            f"p{s.get('patch_size')}-{s.get('image_size')}px")


def build_encoders(ckpt_dir: str, device: torch.device, precision: str, with_teacher: bool,
                   teacher_weights: str = "", ckpt_format: str = "auto"
                   ) -> tuple[list[Encoder], CLIPTeacher, dict]:
    """The student (on its recorded preprocessing) and, with_teacher, the teacher (on its own),
    plus the verified teacher whose text tower scores both. A released UTA file brings its own
    text tower, which takes the teacher's place."""
    loaded = load_model(ckpt_dir, ckpt_format, teacher_weights)
    student, meta = loaded.student, loaded.meta
    if loaded.text is not None:
        teacher = loaded.text.to(device, precision)
        if with_teacher and teacher.kind == "release":
            raise UtaUsageError(f"{ckpt_dir} was tuned from a released UTA file, which has no "
                                f"CLIP image tower to compare with. Drop --teacher.")
        if with_teacher and loaded.source == "open-clip-folder":
            raise UtaUsageError(f"{ckpt_dir} is an exported open_clip folder: its image tower "
                                f"is the student, there is no teacher to compare with.")
    else:
        teacher = teacher_from_meta(meta, teacher_weights).to(device, precision)
    # A tuned text tower scores the student only; the teacher row is the teacher as it was,
    # with its own text tower (else it would be a hybrid that no one trained).
    original = teacher
    if with_teacher and teacher.text_fingerprint:
        original = teacher_from_meta(meta, teacher_weights).to(device, precision)
    ident = teacher.identity
    sp = loaded.preprocess(ident.mean, ident.std)
    student_view = eval_view("student", sp.size, sp.mean, sp.std, sp.interpolation,
                             sp.resize_mode)
    encoders = [Encoder("student", student_label(meta), meta["checkpoint_dir"], student_view,
                        StudentEncoder(student, device, precision), teacher)]
    if with_teacher:
        encoders.append(Encoder("teacher", ident.model, ident.weights or ident.model,
                                teacher_view("teacher", original), original.encode_image,
                                original))
    return encoders, teacher, meta
