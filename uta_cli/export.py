"""`uta export`: a UTA student as ONNX, TorchScript, torch.export (pt2) or an open_clip folder,
each loaded back and checked against PyTorch before it is put in place.

Output kinds (what the artefact computes from a preprocessed image batch `images`, (B, 3, S, S)):
    embedding   the L2-normalised CLS embedding in the teacher's joint space, (B, D)
    tokens      every token in the joint space, CLS first, not normalised, (B, 1 + N, D)
    classifier  zero-shot logits 100 * cos(image, class), (B, C); the class weights are built from
                --classnames and --templates through the recorded teacher's text tower

The open-clip format: mapping a UTA student onto open_clip's timm image tower
--------------------------------------------------------------------------------
open_clip 3.3 builds a timm tower as `TimmModel(vision_cfg.timm_model_name, pool=timm_pool,
proj=timm_proj, proj_bias=timm_proj_bias)`, and TimmModel calls `timm.create_model(name)` with no
architecture arguments: `CLIPVisionCfg` has no `timm_model_kwargs` field (an unknown vision_cfg key
is a TypeError) and TimmModel forwards only drop_path / patch_drop. So a registered timm name alone
cannot carry a UTA student's own width, depth, SwiGLU or RoPE settings. timm itself, though,
resolves names of the form `local-dir:FOLDER`: FOLDER/config.json names a registered architecture
and `model_args` that override its arguments. The exported folder therefore holds

    open_clip_config.json        model_cfg = the teacher's config with vision_cfg replaced by
                                 {timm_model_name: "local-dir:<abs>/timm_trunk", timm_pool: "token",
                                  timm_proj: "linear", timm_proj_bias: true, image_size: S}
    timm_trunk/config.json       {architecture, model_args: the exact keyword arguments that
                                  build_trunk gives timm, pretrained_cfg: the preprocessing}
    open_clip_model.safetensors  visual.trunk.*     = the student's trunk
                                 visual.head.proj.* = the student's head (Linear width -> D, bias)
                                 everything else    = the teacher (text tower, logit scale)
    uta_export.json              the export metadata

TimmModel's forward is trunk.forward_features (blocks, final norm), CLS pooling, then head.proj:
exactly the student's encode_image, so the mapping is exact, and open_clip loads it with no plugin.
One limit: timm resolves the local-dir path against the working directory, not against the
folder, so open_clip_config.json records the folder's absolute path; `uta repoint FOLDER` rewrites
it after a move (models/open_clip_folder.py).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from uta_cli import __version__
from uta_cli.errors import UtaUsageError
from uta_cli.io import atomic_write_json, remove, replace
from uta_cli.models.open_clip_folder import EXPORT_METADATA as OPEN_CLIP_METADATA
from uta_cli.models.open_clip_folder import (
    export_open_clip,
    load_open_clip,
    open_clip_config,
    point_open_clip_at,
    timm_trunk_config,
)

FORMATS = ("onnx", "torchscript", "pt2", "open-clip", "hf-hub")
CLIP_FORMATS = ("open-clip", "hf-hub")  # whole CLIP models: image tower + text tower
KINDS = ("embedding", "tokens", "classifier")
OUTPUT_NAMES = {"embedding": "embedding", "tokens": "tokens", "classifier": "logits"}
INPUT_NAME = "images"
LOGIT_SCALE = 100.0  # as uta_cli.zeroshot.evaluate and CLIP's zero-shot protocol
# Tolerances on the largest absolute difference, per kind: embeddings are unit vectors, logits are
# 100 * cosine (so 1e-2 there is 1e-4 in cosine units), tokens are unnormalised head outputs.
DEFAULT_ATOL = {"embedding": 1e-4, "tokens": 1e-3, "classifier": 1e-2}
DEFAULT_MIN_COSINE = 0.9999
VERIFY_BATCHES = (1, 3)
ONNX_INSTALL_HINT = 'pip install "uta[onnx]"'
# protobuf cannot serialise a single ModelProto over 2 GiB; external data would need a second file
# whose name is baked into the graph, which defeats the temp-and-rename write.
ONNX_MAX_BYTES = 2 * 1024**3 - 64 * 1024**2

log = logging.getLogger(__name__)


class ExportFailed(RuntimeError):
    """The exporter itself failed (exit 1); nothing was left at the output path."""


class VerificationFailed(RuntimeError):
    """The reloaded artefact does not compute what PyTorch computes (exit 1)."""

    def __init__(self, message: str, checks: list[Check]):
        super().__init__(message)
        self.checks = checks


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
class Check:
    """One comparison of the reloaded artefact with PyTorch."""

    inputs: str
    batch: int
    max_abs_diff: float
    cosine: float  # the smallest per-sample cosine between flattened outputs
    ok: bool
    note: str = ""

    def line(self) -> str:
        status = "ok" if self.ok else "FAIL"
        note = f" ({self.note})" if self.note else ""
        return (f"  {self.inputs:<7} batch {self.batch}: max |diff| {self.max_abs_diff:.3g}, "
                f"cosine {self.cosine:.7f}  {status}{note}")


@dataclass
class ExportResult:
    path: str
    format: str
    output_kind: str
    exporter: str
    metadata: dict
    metadata_path: str | None
    checks: list[Check] = field(default_factory=list)


# -- what is exported ------------------------------------------------------------------------------
class ExportModule(nn.Module):
    """The exported graph: one `forward(images)` around the student.

    Every format wants a single-input module, and the legacy ONNX exporter fails on a bare timm Eva
    (`is_causal` traced as a tensor) unless it is wrapped like this.
    """

    def __init__(self, student: nn.Module, kind: str, classifier: torch.Tensor | None = None):
        super().__init__()
        self.student = student
        self.kind = kind
        if kind == "classifier":
            if classifier is None:
                raise ValueError("the classifier kind needs class weights")
            self.register_buffer("classifier", classifier.detach().float().contiguous())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.kind == "tokens":
            return self.student(images)
        # The head on CLS only: the numbers of head(all tokens)[:, 0] without the other N rows.
        cls = self.student.head(self.student.forward_tokens(images)[:, 0])
        emb = F.normalize(cls, dim=-1)
        if self.kind == "embedding":
            return emb
        return LOGIT_SCALE * emb @ self.classifier


@torch.no_grad()
def reference_outputs(student: nn.Module, kind: str, classifier: torch.Tensor | None,
                      images: torch.Tensor) -> torch.Tensor:
    """What PyTorch computes, through the student's public methods (not ExportModule), so the
    wrapper is checked too."""
    if kind == "tokens":
        return student(images)
    emb = F.normalize(student.encode_image(images), dim=-1)
    return emb if kind == "embedding" else LOGIT_SCALE * emb @ classifier


def sample_inputs(size: int, mean: Sequence[float], std: Sequence[float], seed: int = 0,
                  batches: Sequence[int] = VERIFY_BATCHES) -> list[tuple[str, torch.Tensor]]:
    """Preprocessed inputs: white noise, and smooth image-like pictures (low-frequency colour
    fields plus a ramp and a little grain, in [0, 1], then normalised like real images)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    out = []
    for b in batches:
        out.append(("random", torch.randn(b, 3, size, size, generator=g)))
        coarse = torch.rand(b, 3, 4, 4, generator=g)
        img = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
        ramp = torch.linspace(0, 1, size).view(1, 1, 1, size)
        img = 0.75 * img + 0.25 * ramp + 0.02 * torch.randn(b, 3, size, size, generator=g)
        out.append(("smooth", (img.clamp(0, 1) - m) / s))
    return out


def compare(run: Callable[[torch.Tensor], torch.Tensor],
            reference: Callable[[torch.Tensor], torch.Tensor],
            inputs: list[tuple[str, torch.Tensor]], atol: float, min_cosine: float) -> list[Check]:
    checks = []
    for name, x in inputs:
        want = reference(x).float()
        got = torch.as_tensor(run(x)).float()
        if got.shape != want.shape:
            checks.append(Check(name, len(x), float("inf"), -1.0, False,
                                f"shape {tuple(got.shape)} != {tuple(want.shape)}"))
            continue
        diff = (got - want).abs().max().item()
        cos = F.cosine_similarity(got.flatten(1).double(), want.flatten(1).double(),
                                  dim=-1).min().item()
        checks.append(Check(name, len(x), diff, cos, diff <= atol and cos >= min_cosine))
    return checks


# -- options ---------------------------------------------------------------------------------------
def _choice(value: str, choices: Sequence[str], option: str) -> str:
    if value in choices:
        return value
    near = difflib.get_close_matches(value, choices, n=1)
    hint = f" Did you mean '{near[0]}'?" if near else ""
    raise UtaUsageError(f"Unknown {option} '{value}'. Choose one of: {', '.join(choices)}.{hint}")


def require_onnx(verify: bool) -> None:
    """onnx always; onnxruntime to verify. onnxscript is optional (the legacy exporter is the
    fallback without it)."""
    needed = ["onnx", "onnxruntime"] if verify else ["onnx"]
    missing = []
    for name in needed:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UtaUsageError(
            f"--format onnx needs {' and '.join(missing)}, which is not installed. Install the "
            f"optional ONNX dependencies with: {ONNX_INSTALL_HINT} (or pip install onnx "
            f"onnxruntime onnxscript).")


def check_options(opts: ExportOptions) -> tuple[str, str, float]:
    """Everything that can be refused before a model is loaded; returns (format, kind, atol)."""
    fmt = _choice(opts.format, FORMATS, "--format")
    kind = _choice(opts.output_kind, KINDS, "--output-kind")
    if fmt in CLIP_FORMATS and kind != "embedding":
        raise UtaUsageError(
            f"--format {fmt} exports a CLIP model (encode_image / encode_text), not a "
            f"'{kind}' head. Drop --output-kind, or use --format onnx, torchscript or pt2.")
    if fmt == "hf-hub":
        from uta_cli import hub

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
    for path in (output, metadata_path(fmt, output)):
        if path and os.path.lexists(path) and not opts.force:
            raise UtaUsageError(f"{path} already exists. Pass --force to replace it, or choose "
                                f"another --output.")
    return fmt, kind, atol


def metadata_path(fmt: str, output: str) -> str | None:
    """Where the JSON metadata goes: none for ONNX (metadata_props), inside an open_clip folder,
    beside the file for the others."""
    return None if fmt in ("onnx", *CLIP_FORMATS) else output + ".json"


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
    pp = meta.get("student_preprocess") or {}
    size = int(pp.get("size", student.cfg.image_size))
    md = {
        "format": fmt,
        "output_kind": kind,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAMES[kind],
        "input_size": [3, size, size],
        "input_range": "RGB scaled to [0, 1], then (x - mean) / std per channel",
        "mean": [float(v) for v in pp.get("mean", [])],
        "std": [float(v) for v in pp.get("std", [])],
        "interpolation": pp.get("interpolation", "bicubic"),
        # the zero-shot protocol of uta_cli.data.EvalTransform
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


# -- staging: nothing half-written at the output path ----------------------------------------------
@contextlib.contextmanager
def staged(final: str) -> Iterator[str]:
    """A temp path beside `final` (same filesystem, so the rename is atomic), removed on any
    failure, including Ctrl-C."""
    parent, name = os.path.split(final)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise UtaUsageError(f"Cannot create the output folder {parent}: {e}") from None
    # The name keeps its suffix last: torch.export.load and onnxruntime look at it.
    tmp = os.path.join(parent, f".partial-{os.getpid()}-{name}")
    remove(tmp)
    try:
        yield tmp
    finally:
        # After a commit nothing is left under these names; after a failure this is the cleanup.
        for leftover in (tmp, f"{tmp}.json", f"{tmp}.old"):
            remove(leftover)


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """torch.jit and the legacy exporter emit DeprecationWarnings; tracing warns that an image-size
    assert becomes a constant (true: the input size is fixed); onnxscript's optimiser logs each
    op it does not fold. None of it is actionable for a user, and verification checks the result."""
    onnxscript_log = logging.getLogger("onnxscript")
    level = onnxscript_log.level
    onnxscript_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            yield
    finally:
        onnxscript_log.setLevel(level)


# -- formats ---------------------------------------------------------------------------------------
def _export_onnx_dynamo(module: nn.Module, example: torch.Tensor, opset: int | None,
                        output_name: str):
    import onnxscript  # noqa: F401  the dynamo exporter needs it; ImportError -> legacy

    batch = torch.export.Dim("batch")
    program = torch.onnx.export(module, (example,), dynamo=True, input_names=[INPUT_NAME],
                                output_names=[output_name], opset_version=opset,
                                dynamic_shapes={INPUT_NAME: {0: batch}}, verbose=False)
    return program.model_proto


def _export_onnx_legacy(module: nn.Module, example: torch.Tensor, opset: int | None,
                        output_name: str, scratch: str):
    import onnx

    torch.onnx.export(module, (example,), scratch, dynamo=False, input_names=[INPUT_NAME],
                      output_names=[output_name], opset_version=opset,
                      dynamic_axes={INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}})
    return onnx.load(scratch)


def export_onnx(module: ExportModule, example: torch.Tensor, path: str, metadata: dict,
                opset: int | None, say: Callable[[str], None]) -> str:
    """Dynamo exporter first, the legacy one if it fails; metadata as metadata_props. Returns the
    exporter used."""
    import onnx

    output_name = OUTPUT_NAMES[module.kind]
    scratch = f"{path}.legacy"
    try:
        with _quiet_export():
            try:
                proto = _export_onnx_dynamo(module, example, opset, output_name)
                exporter = "dynamo"
            except Exception as e:  # any dynamo failure: the legacy exporter is the fallback
                text = str(e).strip()
                reason = text.splitlines()[0][:200] if text else type(e).__name__
                say(f"dynamo ONNX exporter failed ({type(e).__name__}: {reason}); "
                    f"falling back to the legacy exporter")
                try:
                    proto = _export_onnx_legacy(module, example, opset, output_name, scratch)
                except Exception as e2:
                    raise ExportFailed(f"Both ONNX exporters failed. dynamo: {reason}. legacy: "
                                       f"{type(e2).__name__}: {e2}") from e2
                exporter = "legacy"
    finally:
        remove(scratch)
    opsets = {o.domain: o.version for o in proto.opset_import}
    props = dict(metadata, exporter=exporter, opset=opsets.get("", opsets.get("ai.onnx")))
    onnx.helper.set_model_props(
        proto, {k: v if isinstance(v, str) else json.dumps(v) for k, v in props.items()})
    onnx.checker.check_model(proto)
    onnx.save_model(proto, path)
    metadata.update(exporter=exporter, opset=props["opset"])
    return exporter


def export_torchscript(module: ExportModule, example: torch.Tensor, path: str) -> str:
    with _quiet_export(), torch.no_grad():
        traced = torch.jit.trace(module, (example,), check_trace=False)
        torch.jit.save(traced, path)
    return "torch.jit.trace"


def export_pt2(module: ExportModule, example: torch.Tensor, path: str) -> str:
    batch = torch.export.Dim("batch")
    with _quiet_export():
        program = torch.export.export(module, (example,),
                                      dynamic_shapes={INPUT_NAME: {0: batch}})
        with open(path, "wb") as f:  # a file object: torch warns on paths not ending in .pt2
            torch.export.save(program, f)
    return "torch.export"


def export_hf_hub(student: nn.Module, teacher, folder: str, metadata: dict, meta: dict,
                  opts: ExportOptions, zeroshot_rows: list[dict]) -> str:
    """The Hugging Face repository layout (hub.py) for opts.repo_id, with its model card."""
    from uta_cli import hub

    oc_cfg = open_clip_config(teacher.identity.model_cfg, metadata, folder)
    command = opts.command or (f"uta export --ckpt {opts.ckpt} --format hf-hub --output "
                               f"{opts.output} --repo-id {opts.repo_id}")
    card = hub.model_card(opts.repo_id, meta, metadata, teacher.identity.model, zeroshot_rows,
                          command, opts.license)
    hub.write_hub_folder(folder, opts.repo_id, student, teacher.clip, oc_cfg,
                         timm_trunk_config(student, metadata), card)
    return "huggingface hub layout (open_clip + timm)"


def load_runner(fmt: str, path: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The artefact loaded back the way a deployment stack loads it."""
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.log_severity_level = 3
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    if fmt == "torchscript":
        with _quiet_export():
            module = torch.jit.load(path, map_location="cpu").eval()
    elif fmt == "pt2":
        with open(path, "rb") as f:
            module = torch.export.load(f).module()
    else:
        return _encode_image(load_open_clip(path)[0])

    def call(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return call


def _encode_image(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.encode_image(x, normalize=True)

    return run


def text_checks(model: nn.Module, tokenizer: Callable, teacher,
                min_cosine: float) -> list[Check]:
    """The open_clip folder's text tower and tokenizer against the teacher's (must be equal)."""
    prompts = ["a photo of a dog.", "a diagram of a red circle.", "itap of a small boat."]
    with torch.no_grad():
        got = model.encode_text(tokenizer(prompts), normalize=True)
        want = teacher.clip.encode_text(teacher.tokenizer(prompts), normalize=True)
    diff = (got - want).abs().max().item()
    cos = F.cosine_similarity(got, want, dim=-1).min().item()
    return [Check("text", len(prompts), diff, cos, diff <= 1e-5 and cos >= min_cosine,
                  "encode_text vs the teacher")]


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
    classnames = templates = None
    if kind == "classifier":
        from uta_cli.zeroshot import read_classnames, resolve_templates

        classnames = read_classnames(opts.classnames)
        templates = resolve_templates(opts.templates)[1]  # the same prompts as `uta zeroshot`
    output = os.path.abspath(opts.output)

    from uta_cli.loading import load_model

    loaded = load_model(opts.ckpt, opts.ckpt_format, opts.teacher_weights)
    student, meta = loaded.student, loaded.meta
    student.requires_grad_(False)
    teacher = classifier = None
    if loaded.text is not None:  # the checkpoint's own text tower (a release has no CLIP teacher)
        teacher = loaded.text
    elif kind == "classifier" or fmt in CLIP_FORMATS:
        from uta_cli.loading import teacher_from_meta

        teacher = teacher_from_meta(meta, opts.teacher_weights or _local_teacher_dir(meta))
    if kind == "classifier":
        from uta_cli.zeroshot import TextEncoder, build_classifier

        say(f"building a zero-shot head: {len(classnames)} classes x {len(templates)} templates "
            f"through {teacher.identity.model}")
        classifier = build_classifier(TextEncoder(teacher.clip, opts.text_context),
                                      teacher.tokenizer, classnames, templates, "cpu")
    module = ExportModule(student, kind, classifier).eval()
    metadata = build_metadata(meta, fmt, kind, student, classnames, templates)
    if fmt == "hf-hub":
        from uta_cli import hub

        zeroshot_rows = hub.zeroshot_rows(meta, opts.zeroshot_json)
        metadata["repo_id"] = opts.repo_id
    size = metadata["input_size"][1]
    if fmt == "onnx":
        nbytes = sum(t.numel() * t.element_size() for t in
                     list(module.parameters()) + list(module.buffers()))
        if nbytes > ONNX_MAX_BYTES:
            raise UtaUsageError(f"The model holds {nbytes / 2**30:.1f} GiB of weights; a single "
                                f"ONNX file is limited to 2 GiB. Use --format pt2 or torchscript.")
    # An image-like example at batch 2, not 1: torch.export specialises a dimension whose
    # example size is 0 or 1, which would fix the batch.
    _, example = sample_inputs(size, metadata["mean"], metadata["std"], seed=1, batches=(2,))[1]

    side = metadata_path(fmt, output)
    with staged(output) as tmp:
        say(f"exporting {kind} ({fmt}) from {meta['checkpoint_dir']}")
        try:
            if fmt == "onnx":
                exporter = export_onnx(module, example, tmp, metadata, opts.opset, say)
            elif fmt == "torchscript":
                exporter = export_torchscript(module, example, tmp)
            elif fmt == "pt2":
                exporter = export_pt2(module, example, tmp)
            elif fmt == "open-clip":
                exporter = export_open_clip(student, teacher, tmp, metadata)
            else:
                exporter = export_hf_hub(student, teacher, tmp, metadata, meta, opts,
                                         zeroshot_rows)
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
                if fmt == "open-clip":  # one load for the image and the text checks
                    oc_model, oc_tokenizer = load_open_clip(tmp)
                    run = _encode_image(oc_model)
                elif fmt == "hf-hub":  # by name, through a Hugging Face cache, offline
                    oc_model, oc_tokenizer, timm_model = hub.load_through_cache(tmp,
                                                                                opts.repo_id)
                    run = _encode_image(oc_model)
                else:
                    run = load_runner(fmt, tmp)
            except Exception as e:
                raise ExportFailed(f"The exported {fmt} artefact does not load back: "
                                   f"{type(e).__name__}: {e}") from e
            inputs = sample_inputs(size, metadata["mean"], metadata["std"])
            ref_kind = "embedding" if fmt in CLIP_FORMATS else kind
            reference = lambda x: reference_outputs(student, ref_kind, classifier, x)  # noqa: E731
            checks = compare(run, reference, inputs, atol, opts.min_cosine)
            if fmt in CLIP_FORMATS:
                checks += text_checks(oc_model, oc_tokenizer, teacher, opts.min_cosine)
            if fmt == "hf-hub":  # timm alone: its forward is the (unnormalised) embedding
                timm_checks = compare(lambda x: F.normalize(timm_model(x), dim=-1), reference,
                                      inputs[:2], atol, opts.min_cosine)
                for c in timm_checks:
                    c.note = "timm.create_model"
                checks += timm_checks
            for c in checks:
                say(c.line())
            bad = [c for c in checks if not c.ok]
            if bad:
                worst = max(bad, key=lambda c: c.max_abs_diff)
                raise VerificationFailed(
                    f"Verification failed on {len(bad)} of {len(checks)} checks (worst: "
                    f"{worst.inputs} batch {worst.batch}, max |diff| {worst.max_abs_diff:.3g}, "
                    f"cosine {worst.cosine:.7f}; tolerances: atol {atol:g}, min cosine "
                    f"{opts.min_cosine:g}). Nothing was written to {output}. Loosen --atol or "
                    f"--min-cosine, or pass --no-verify to keep the artefact unchecked.", checks)
            metadata["verification"] = {
                "atol": atol, "min_cosine": opts.min_cosine,
                "max_abs_diff": max(c.max_abs_diff for c in checks),
                "min_cosine_seen": min(c.cosine for c in checks)}
        if fmt == "open-clip":
            point_open_clip_at(tmp, output)
            metadata.update(open_clip_model="local-dir:" + output, relocatable=False,
                            note="timm_model_name holds this folder's absolute path; after "
                                 "moving the folder run: uta repoint FOLDER")
            atomic_write_json(os.path.join(tmp, OPEN_CLIP_METADATA), metadata)
        if fmt == "hf-hub":
            metadata.update(open_clip_model="hf-hub:" + opts.repo_id, relocatable=True)
            atomic_write_json(os.path.join(tmp, OPEN_CLIP_METADATA), metadata)
        if side:
            atomic_write_json(f"{tmp}.json", metadata)
        replace(tmp, output)  # an old one (--force) goes only after
        if side:
            replace(f"{tmp}.json", side)
    say(f"wrote {output}" + (f" and {side}" if side else ""))
    if fmt in CLIP_FORMATS:
        side = os.path.join(output, OPEN_CLIP_METADATA)
    if fmt == "hf-hub":
        if opts.push_to_hub:
            metadata["pushed_to"] = hub.push(output, opts.repo_id, opts.private, say)
        else:
            say(f"publish it with: huggingface-cli upload {opts.repo_id} {output} (or "
                f"uta export ... --push-to-hub); load it with "
                f'open_clip.create_model_and_transforms("hf-hub:{opts.repo_id}")')
    return ExportResult(output, fmt, kind, exporter, metadata, side, checks)
