"""`uta export`: a UTA student as ONNX, TorchScript, torch.export (pt2), an open_clip folder or a
Hugging Face repository, loaded back and checked against PyTorch before it is put in place.

This module is the workflow: the options, the model and its metadata, then the format's writer,
the reload and its checks, and the move into place. What each format is (its writer, its loader,
where its metadata goes) lives in export/formats.py; how an export is checked, in export/verify.py.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from uta_cli import __version__
from uta_cli.errors import UtaUsageError
from uta_cli.evaluate.zeroshot import (
    TextEncoder,
    build_classifier,
    read_classnames,
    resolve_templates,
)
from uta_cli.export import hub as hub
from uta_cli.export.formats import (
    CLIP_FORMATS,
    FORMATS,
    INPUT_NAME,
    KINDS,
    LOGIT_SCALE,
    OUTPUT_NAMES,
    REGISTRY,
    ExportFailed,
    ExportJob,
    ExportModule,
    require_onnx,
)
from uta_cli.export.verify import (
    DEFAULT_ATOL,
    DEFAULT_MIN_COSINE,
    Check,
    VerificationFailed,
    sample_inputs,
    summary,
    verify,
)
from uta_cli.io import atomic_path, atomic_write_json
from uta_cli.loading.model import load_model, student_preprocess, teacher_from_meta
from uta_cli.models.open_clip_folder import EXPORT_METADATA as OPEN_CLIP_METADATA

# what callers of the workflow use, wherever it is defined
__all__ = ["DEFAULT_ATOL", "FORMATS", "KINDS", "ExportFailed", "ExportOptions", "ExportResult",
           "VerificationFailed", "check_options", "export_checkpoint"]


@dataclass
class ExportOptions:
    ckpt: str
    format: str
    output: str
    output_kind: str = "embedding"
    classnames: str = ""
    templates: str = "openai"
    opset: int | None = None
    atol: float | None = None  # None: DEFAULT_ATOL of the output kind
    min_cosine: float = DEFAULT_MIN_COSINE
    verify: bool = True
    force: bool = False
    teacher_weights: str = ""
    ckpt_format: str = "auto"  # auto | uta | uta-release (a released uta_*.pt file)
    text_context: str = "trimmed"  # zeroshot.TextEncoder: trimmed | full
    # hf-hub: the repository the folder is for, and what its model card reports
    repo_id: str = ""
    push_to_hub: bool = False
    private: bool = False
    zeroshot_json: list[str] = field(default_factory=list)  # `uta zeroshot --output-json` files
    license: str = "other"
    command: str = ""  # the command line for the model card (default: rebuilt from the options)


@dataclass
class ExportResult:
    path: str
    format: str
    output_kind: str
    exporter: str
    metadata: dict
    metadata_path: str | None
    checks: list[Check] = field(default_factory=list)


# -- options ---------------------------------------------------------------------------------------
def _choice(value: str, choices: Sequence[str], option: str) -> str:
    if value in choices:
        return value
    near = difflib.get_close_matches(value, choices, n=1)
    hint = f" Did you mean '{near[0]}'?" if near else ""
    raise UtaUsageError(f"Unknown {option} '{value}'. Choose one of: {', '.join(choices)}.{hint}")


def check_options(opts: ExportOptions) -> tuple[str, str, float]:
    """Everything that can be refused before a model is loaded; returns (format, kind, atol)."""
    fmt = _choice(opts.format, FORMATS, "--format")
    kind = _choice(opts.output_kind, KINDS, "--output-kind")
    if fmt in CLIP_FORMATS and kind != "embedding":
        raise UtaUsageError(
            f"--format {fmt} exports a CLIP model (encode_image / encode_text), not a "
            f"'{kind}' head. Drop --output-kind, or use --format onnx, torchscript or pt2.")
    if fmt == "hf-hub":
        hub.check_repo_id(opts.repo_id)
        if opts.push_to_hub:
            hub.check_push_possible()
    elif opts.repo_id or opts.push_to_hub or opts.zeroshot_json:
        raise UtaUsageError("--repo-id, --push-to-hub and --zeroshot-json apply to --format "
                            "hf-hub only.")
    if kind != "classifier" and opts.classnames:
        raise UtaUsageError("--classnames is used only with --output-kind classifier.")
    _choice(opts.text_context, ("trimmed", "full"), "--text-context")
    if opts.opset is not None and fmt != "onnx":
        raise UtaUsageError("--opset applies to --format onnx only.")
    if fmt == "onnx":
        require_onnx(opts.verify)
        if opts.opset is not None:
            import onnx.defs

            top = onnx.defs.onnx_opset_version()
            if not 14 <= opts.opset <= top:
                raise UtaUsageError(f"--opset {opts.opset} is out of range: use 14 to {top} "
                                    f"(this onnx's newest), or leave it to the exporter.")
    atol = DEFAULT_ATOL[kind] if opts.atol is None else float(opts.atol)
    if atol < 0:
        raise UtaUsageError(f"--atol must be >= 0, not {atol}.")
    if not -1.0 <= opts.min_cosine <= 1.0:
        raise UtaUsageError(f"--min-cosine must lie in [-1, 1], not {opts.min_cosine}.")
    output = os.path.abspath(opts.output)
    for path in (output, REGISTRY[fmt].side_file(output)):
        if path and os.path.lexists(path) and not opts.force:
            raise UtaUsageError(f"{path} already exists. Pass --force to replace it, or choose "
                                f"another --output.")
    return fmt, kind, atol


# -- metadata --------------------------------------------------------------------------------------
def checkpoint_hash(folder: str) -> str:
    """SHA-256 of the checkpoint's weights (the file itself for a released UTA file)."""
    h = hashlib.sha256()
    path = folder if os.path.isfile(folder) else os.path.join(folder, "model.safetensors")
    if not os.path.isfile(path):  # an exported open_clip folder given as the checkpoint
        path = os.path.join(folder, "open_clip_model.safetensors")
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def build_metadata(meta: dict, fmt: str, kind: str, student: nn.Module,
                   classnames: list[str] | None, templates: list | None) -> dict:
    pp = student_preprocess(meta)
    size = pp.size
    md = {
        "format": fmt,
        "output_kind": kind,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAMES[kind],
        "input_size": [3, size, size],
        "input_range": "RGB scaled to [0, 1], then (x - mean) / std per channel",
        "mean": [float(v) for v in pp.mean],
        "std": [float(v) for v in pp.std],
        "interpolation": pp.interpolation,
        # the zero-shot protocol of uta_cli.data.pipeline.EvalTransform
        "resize": "shortest side to input size",
        "crop": "center",
        "crop_pct": 1.0,
        "embed_dim": int(student.embed_dim),
        "normalized": kind != "tokens",
        "uta_version": __version__,
        "checkpoint_hash": checkpoint_hash(meta["checkpoint_dir"]),
        "checkpoint_step": meta.get("step"),
        "student": {"family": student.cfg.family, "image_size": student.cfg.image_size,
                    "patch_size": student.cfg.patch_size, "width": student.cfg.width,
                    "depth": student.cfg.depth, "heads": student.cfg.heads},
        "teacher_model": (meta.get("teacher") or {}).get("model", ""),
        # how the student was pre-trained (uta, mim or fd); MIM's [MASK] embedding is not exported
        "objective": meta.get("objective", "uta"),
        "torch_version": torch.__version__,
    }
    if kind == "tokens":
        md["tokens"] = f"CLS then {student.num_patches} patches, row-major over the " \
                       f"{student.grid_size[0]}x{student.grid_size[1]} grid"
    if kind == "classifier":
        md["classnames"] = list(classnames or [])
        md["templates"] = list(templates or [])
        md["logit_scale"] = LOGIT_SCALE
    return md


def _make_parent(output: str) -> None:
    parent = os.path.dirname(output)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise UtaUsageError(f"Cannot create the output folder {parent}: {e}") from None


def _local_teacher_dir(meta: dict) -> str:
    """A recorded `local-dir:` teacher's folder, when it still exists.

    teacher_from_meta tests the recorded `weights` as a file path, but for a local-dir teacher
    load_clip records the "local-dir:/path" name there, which never exists as a path; naming the
    folder as the override loads the same teacher (fingerprint and config are still checked).
    """
    model = (meta.get("teacher") or {}).get("model", "")
    if model.startswith("local-dir:") and os.path.isdir(model[len("local-dir:"):]):
        return model[len("local-dir:"):]
    return ""


# -- the whole export ------------------------------------------------------------------------------
def export_checkpoint(opts: ExportOptions, say: Callable[[str], None] = print) -> ExportResult:
    """Export, reload, verify, then move into place. Raises UtaUsageError (bad usage or input),
    ExportFailed, or VerificationFailed; on any of them nothing is left at the output path."""
    fmt, kind, atol = check_options(opts)
    spec = REGISTRY[fmt]
    classnames = templates = None
    if kind == "classifier":
        classnames = read_classnames(opts.classnames)
        templates = resolve_templates(opts.templates)[1]  # the same prompts as `uta zeroshot`
    output = os.path.abspath(opts.output)

    loaded = load_model(opts.ckpt, opts.ckpt_format, opts.teacher_weights)
    student, meta = loaded.student, loaded.meta
    student.requires_grad_(False)
    teacher = classifier = None
    if loaded.text is not None:  # the checkpoint's own text tower (a release has no CLIP teacher)
        teacher = loaded.text
    elif kind == "classifier" or spec.whole_clip:
        teacher = teacher_from_meta(meta, opts.teacher_weights or _local_teacher_dir(meta))
    if kind == "classifier":
        say(f"building a zero-shot head: {len(classnames)} classes x {len(templates)} templates "
            f"through {teacher.identity.model}")
        classifier = build_classifier(TextEncoder(teacher.clip, opts.text_context),
                                      teacher.tokenizer, classnames, templates, "cpu")
    module = ExportModule(student, kind, classifier).eval()
    metadata = build_metadata(meta, fmt, kind, student, classnames, templates)
    size = metadata["input_size"][1]
    # An image-like example at batch 2, not 1: torch.export specialises a dimension whose
    # example size is 0 or 1, which would fix the batch.
    _, example = sample_inputs(size, metadata["mean"], metadata["std"], seed=1, batches=(2,))[1]
    job = ExportJob(student, module, example, metadata, teacher, opts.opset, say=say)
    if fmt == "hf-hub":
        job.repo_id = metadata["repo_id"] = opts.repo_id
        job.model_card = _model_card(opts, meta, metadata, teacher)
    if spec.check:
        spec.check(job)

    side = spec.side_file(output)
    _make_parent(output)
    # Nothing half-written at the output path: the artefact and its side file are staged beside
    # it and renamed into place only once verified, the artefact first.
    with contextlib.ExitStack() as staging:
        tmp_side = staging.enter_context(atomic_path(side)) if side else None
        tmp = staging.enter_context(atomic_path(output))
        say(f"exporting {kind} ({fmt}) from {meta['checkpoint_dir']}")
        try:
            exporter = spec.write(job, tmp)
        except (UtaUsageError, ExportFailed, KeyboardInterrupt):
            raise
        except Exception as e:
            raise ExportFailed(f"{fmt} export failed: {type(e).__name__}: {e}") from e
        metadata["exporter"] = exporter
        checks: list[Check] = []
        if opts.verify:
            say(f"verifying: reloaded {fmt} vs PyTorch (atol {atol:g}, min cosine "
                f"{opts.min_cosine:g})")
            try:
                reloaded = spec.load(tmp)
            except Exception as e:
                raise ExportFailed(f"The exported {fmt} artefact does not load back: "
                                   f"{type(e).__name__}: {e}") from e
            inputs = sample_inputs(size, metadata["mean"], metadata["std"])
            checks = verify(reloaded, student, kind, classifier, teacher, inputs, atol,
                            opts.min_cosine, say, output)
            metadata["verification"] = summary(checks, atol, opts.min_cosine)
        if spec.settle:
            spec.settle(job, tmp, output)
        if spec.metadata == "folder":
            atomic_write_json(os.path.join(tmp, OPEN_CLIP_METADATA), metadata)
        if side:
            atomic_write_json(tmp_side, metadata)
    say(f"wrote {output}" + (f" and {side}" if side else ""))
    if fmt == "hf-hub":
        if opts.push_to_hub:
            metadata["pushed_to"] = hub.push(output, opts.repo_id, opts.private, say)
        else:
            say(f"publish it with: huggingface-cli upload {opts.repo_id} {output} (or "
                f"uta export ... --push-to-hub); load it with "
                f'open_clip.create_model_and_transforms("hf-hub:{opts.repo_id}")')
    return ExportResult(output, fmt, kind, exporter, metadata, spec.metadata_file(output), checks)


def _model_card(opts: ExportOptions, meta: dict, metadata: dict, teacher) -> str:
    """hf-hub's README.md: the checkpoint, the export, zero-shot figures and the command."""
    rows = hub.zeroshot_rows(meta, opts.zeroshot_json)
    command = opts.command or (f"uta export --ckpt {opts.ckpt} --format hf-hub --output "
                               f"{opts.output} --repo-id {opts.repo_id}")
    return hub.model_card(opts.repo_id, meta, metadata, teacher.identity.model, rows, command,
                          opts.license)
