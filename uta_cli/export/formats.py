"""The formats `uta export` writes, one record each in REGISTRY: how to write the artefact, how a
deployment stack loads it back (for verification), and where its metadata goes.

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
it after a move (models/open_clip_folder.py). The hf-hub format is hub.py's repository layout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from uta_cli.errors import UtaUsageError
from uta_cli.export import hub as hub
from uta_cli.io import remove
from uta_cli.models.open_clip_folder import EXPORT_METADATA as OPEN_CLIP_METADATA
from uta_cli.models.open_clip_folder import (
    export_open_clip,
    load_open_clip,
    open_clip_config,
    point_open_clip_at,
    read_config,
    timm_trunk_config,
    tower_name,
)

KINDS = ("embedding", "tokens", "classifier")
OUTPUT_NAMES = {"embedding": "embedding", "tokens": "tokens", "classifier": "logits"}
INPUT_NAME = "images"
LOGIT_SCALE = 100.0  # as uta_cli.evaluate.zeroshot.evaluate and CLIP's zero-shot protocol
ONNX_INSTALL_HINT = 'pip install "uta-cli[onnx]"'
# protobuf cannot serialise a single ModelProto over 2 GiB; external data would need a second file
# whose name is baked into the graph, which defeats the temp-and-rename write.
ONNX_MAX_BYTES = 2 * 1024**3 - 64 * 1024**2

Runner = Callable[[torch.Tensor], torch.Tensor]


class ExportFailed(RuntimeError):
    """The exporter itself failed (exit 1); nothing was left at the output path."""


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


@dataclass
class ExportJob:
    """What a format's writer is given."""

    student: nn.Module
    module: ExportModule  # the single-input graph (onnx, torchscript, pt2)
    example: torch.Tensor  # a preprocessed batch to trace with
    metadata: dict  # a writer adds what it learns (onnx: exporter, opset)
    teacher: object = None  # the text tower's owner (open-clip, hf-hub): .clip, .identity
    opset: int | None = None  # onnx
    repo_id: str = ""  # hf-hub
    model_card: str = ""  # hf-hub: README.md
    say: Callable[[str], None] = print


@dataclass
class Reloaded:
    """An artefact loaded back: `image` computes the exported output kind from images (a CLIP
    format's normalised embedding); a CLIP format also gives its model and tokenizer for the
    text checks; `also` names other loaders of the same artefact, checked on images too."""

    image: Runner
    clip: nn.Module | None = None
    tokenizer: Callable | None = None
    also: dict[str, Runner] = field(default_factory=dict)


@dataclass(frozen=True)
class ExportFormat:
    """One format: how to write it, how to load it back, where its metadata goes."""

    name: str
    write: Callable[[ExportJob, str], str]  # the artefact at a (temporary) path -> exporter used
    load: Callable[[str], Reloaded]  # as a deployment stack loads it
    metadata: str  # "model-props" (inside the file), "folder" (uta_export.json), "beside" (.json)
    whole_clip: bool = False  # a CLIP model (encode_image / encode_text): the embedding only
    check: Callable[[ExportJob], None] | None = None  # refusals once the model is known
    # before the move into place: record (and point the artefact at) its final path
    settle: Callable[[ExportJob, str, str], None] | None = None

    def side_file(self, output: str) -> str | None:
        """The metadata file beside the artefact, for formats that keep it there."""
        return output + ".json" if self.metadata == "beside" else None

    def metadata_file(self, output: str) -> str | None:
        """Where the metadata can be read once exported (None: inside the model file)."""
        if self.metadata == "folder":
            return os.path.join(output, OPEN_CLIP_METADATA)
        return self.side_file(output)


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


def _no_grad(module: Callable) -> Runner:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return run


# -- onnx ------------------------------------------------------------------------------------------
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


def _onnx_fits(job: ExportJob) -> None:
    nbytes = sum(t.numel() * t.element_size() for t in
                 list(job.module.parameters()) + list(job.module.buffers()))
    if nbytes > ONNX_MAX_BYTES:
        raise UtaUsageError(f"The model holds {nbytes / 2**30:.1f} GiB of weights; a single "
                            f"ONNX file is limited to 2 GiB. Use --format pt2 or torchscript.")


def _load_onnx(path: str) -> Reloaded:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return Reloaded(lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0]))


# -- torchscript and torch.export ------------------------------------------------------------------
def export_torchscript(module: ExportModule, example: torch.Tensor, path: str) -> str:
    with _quiet_export(), torch.no_grad():
        traced = torch.jit.trace(module, (example,), check_trace=False)
        torch.jit.save(traced, path)
    return "torch.jit.trace"


def _load_torchscript(path: str) -> Reloaded:
    with _quiet_export():
        return Reloaded(_no_grad(torch.jit.load(path, map_location="cpu").eval()))


def export_pt2(module: ExportModule, example: torch.Tensor, path: str) -> str:
    batch = torch.export.Dim("batch")
    with _quiet_export():
        program = torch.export.export(module, (example,),
                                      dynamic_shapes={INPUT_NAME: {0: batch}})
        with open(path, "wb") as f:  # a file object: torch warns on paths not ending in .pt2
            torch.export.save(program, f)
    return "torch.export"


def _load_pt2(path: str) -> Reloaded:
    with open(path, "rb") as f:
        return Reloaded(_no_grad(torch.export.load(f).module()))


# -- open_clip folders -----------------------------------------------------------------------------
def _clip(model: nn.Module, tokenizer: Callable, **also: Runner) -> Reloaded:
    return Reloaded(_no_grad(lambda x: model.encode_image(x, normalize=True)), model, tokenizer,
                    also)


def _load_open_clip(path: str) -> Reloaded:
    return _clip(*load_open_clip(path))


def _settle_open_clip(job: ExportJob, path: str, final: str) -> None:
    point_open_clip_at(path, final)
    job.metadata.update(open_clip_model="local-dir:" + final, relocatable=False,
                        note="timm_model_name holds this folder's absolute path; after "
                             "moving the folder run: uta repoint FOLDER")


def export_hf_hub(job: ExportJob, folder: str) -> str:
    """The Hugging Face repository layout (hub.py) for job.repo_id, with its model card."""
    oc_cfg = open_clip_config(job.teacher.identity.model_cfg, job.metadata, folder)
    hub.write_hub_folder(folder, job.repo_id, job.student, job.teacher.clip, oc_cfg,
                         timm_trunk_config(job.student, job.metadata), job.model_card)
    return "huggingface hub layout (open_clip + timm)"


def _load_hf_hub(folder: str) -> Reloaded:
    """By the name the folder records (hf-hub:ORG/NAME), through a Hugging Face cache, offline;
    timm alone too: its forward is the (unnormalised) embedding."""
    repo_id = tower_name(read_config(folder))[len("hf-hub:"):]
    model, tokenizer, timm_model = hub.load_through_cache(folder, repo_id)
    return _clip(model, tokenizer, **{
        "timm.create_model": _no_grad(lambda x: F.normalize(timm_model(x), dim=-1))})


def _settle_hf_hub(job: ExportJob, path: str, final: str) -> None:
    job.metadata.update(open_clip_model="hf-hub:" + job.repo_id, relocatable=True)


# -- the registry ----------------------------------------------------------------------------------
REGISTRY: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("onnx", lambda job, path: export_onnx(job.module, job.example, path, job.metadata,
                                                       job.opset, job.say),
                 _load_onnx, "model-props", check=_onnx_fits),
    ExportFormat("torchscript", lambda job, path: export_torchscript(job.module, job.example, path),
                 _load_torchscript, "beside"),
    ExportFormat("pt2", lambda job, path: export_pt2(job.module, job.example, path),
                 _load_pt2, "beside"),
    ExportFormat("open-clip", lambda job, path: export_open_clip(job.student, job.teacher, path,
                                                                 job.metadata),
                 _load_open_clip, "folder", whole_clip=True, settle=_settle_open_clip),
    ExportFormat("hf-hub", export_hf_hub, _load_hf_hub, "folder", whole_clip=True,
                 settle=_settle_hf_hub),
)}
FORMATS = tuple(REGISTRY)
CLIP_FORMATS = tuple(name for name, f in REGISTRY.items() if f.whole_clip)


def load_runner(fmt: str, path: str) -> Runner:
    """The artefact at `path` loaded back the way a deployment stack loads it: images -> output."""
    return REGISTRY[fmt].load(path).image
