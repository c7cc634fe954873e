"""The frozen CLIP teacher: per-token targets in the joint space (docs/method.md §1, §2).

open_clip never projects its token outputs, so the projection is applied here to every token:
`tokens @ visual.proj` for native open_clip ViTs, and timm's head for timm-trunk towers (EVA02-*).
The CLS target is computed through the model's own pooling path, so it equals `encode_image`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field

import open_clip
import torch
import torch.nn.functional as F
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer as OpenClipViT
from timm.layers import resample_abs_pos_embed
from torch import nn

from uta_cli.errors import BAD_CONFIG, BAD_FILE, UtaUsageError, bad_input
from uta_cli.models.attention import attention_problem, cls_patch_attention
from uta_cli.models.eva_clip import eva_clip_to_open_clip, file_layout, strict_load
from uta_cli.models.fingerprint import whole_file_sha256

log = logging.getLogger(__name__)


@dataclass
class TeacherIdentity:
    """What a checkpoint records so that evaluation can rebuild, or refuse, the same teacher."""

    model: str
    weights: str
    weights_fingerprint: str
    embed_dim: int
    image_size: int
    mean: list[float]
    std: list[float]
    interpolation: str
    model_cfg: dict = field(default_factory=dict)
    weights_layout: str = "open_clip"  # or "eva-clip": BAAI's native file, converted on load
    # open_clip's eval resize (shortest | longest | squash); runs recorded before it load as
    # "shortest", open_clip's default.
    resize_mode: str = "shortest"
    # SHA-256 of the whole weights file ("sha256:<hex>"; models/fingerprint.py); "" for a hub
    # tag and in runs recorded before it, which are compared by weights_fingerprint alone.
    weights_sha256: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def file_fingerprint(path: str) -> str:
    """A cheap content fingerprint: size plus SHA-256 of the first and last MiB."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return f"{size}:{h.hexdigest()[:32]}"


def _weights_file_in_dir(folder: str) -> str | None:
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin",
                 "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def _missing_weights_error(model: str) -> UtaUsageError:
    tags = open_clip.list_pretrained_tags_by_model(model) if not model.startswith("local-") else []
    tag_hint = f" or a hub tag ({', '.join(tags)}; needs network)" if tags else ""
    return UtaUsageError(
        f"teacher.weights is not set for teacher '{model}'. Pass a local weights file or an "
        f"open_clip folder{tag_hint}, e.g. --set teacher.weights=/models/{model}.safetensors")


def load_clip(model: str, weights: str) -> tuple[nn.Module, TeacherIdentity]:
    """Build an open_clip CLIP from a local-dir folder, a weights file, a hub tag, or an
    `hf-hub:org/name` model already in the local Hugging Face cache."""
    if model.startswith("hf-hub:"):
        model = "local-dir:" + hf_cache_folder(model[len("hf-hub:"):])
    if model.startswith("local-dir:"):
        folder, weights = model[len("local-dir:"):], model
    elif weights and os.path.isdir(weights):
        folder = weights
    else:
        folder = None
    layout = "open_clip"
    if folder is not None:
        cfg_path = os.path.join(folder, "open_clip_config.json")
        wfile = _weights_file_in_dir(folder)
        if not os.path.isfile(cfg_path) or wfile is None:
            raise UtaUsageError(
                f"Teacher folder {folder} must hold open_clip_config.json and "
                f"open_clip_model.safetensors (an open_clip 'local-dir:' folder).")
        with open(cfg_path) as f:
            model_cfg = json.load(f).get("model_cfg", {})
        name = model = "local-dir:" + folder
        try:
            clip = open_clip.create_model(name)
        except BAD_CONFIG as e:  # open_clip raises assorted types for bad folders
            raise UtaUsageError(f"Cannot load the teacher from {folder}: {bad_input(e)}"
                                ) from None
        fingerprint, sha256 = file_fingerprint(wfile), whole_file_sha256(wfile)
    else:
        if open_clip.get_model_config(model) is None:
            raise UtaUsageError(
                f"Unknown open_clip model '{model}' for teacher.model. Known CLIP models include "
                f"ViT-B-16, ViT-L-14, EVA02-B-16, EVA02-L-14; or use 'local-dir:/path'.")
        if not weights:
            raise _missing_weights_error(model)
        model_cfg = open_clip.get_model_config(model)
        if os.path.isfile(weights):
            fingerprint, sha256 = file_fingerprint(weights), whole_file_sha256(weights)
            clip, layout = clip_from_file(model, weights)
        elif weights in open_clip.list_pretrained_tags_by_model(model):
            fingerprint, sha256 = f"tag:{model}:{weights}", ""
            try:
                clip = open_clip.create_model(model, pretrained=weights)
            except (OSError, ValueError, RuntimeError) as e:  # offline, not found, damaged
                raise UtaUsageError(f"Cannot load teacher '{model}' with weights '{weights}': "
                                    f"{bad_input(e)}. Offline? Use a local weights file instead "
                                    f"of a hub tag.") from None
        else:
            raise UtaUsageError(
                f"teacher.weights '{weights}' is neither a file, a folder, nor a known tag of "
                f"'{model}'. Check the path, or use one of the tags "
                f"{open_clip.list_pretrained_tags_by_model(model)} (needs network).")
    pp = getattr(clip.visual, "preprocess_cfg", {}) or {}
    size = pp.get("size", clip.visual.image_size)
    size = size[0] if isinstance(size, (tuple, list)) else size
    identity = TeacherIdentity(
        model=model, weights=weights, weights_fingerprint=fingerprint,
        embed_dim=int(_embed_dim(clip, model_cfg)), image_size=int(size),
        mean=[float(m) for m in pp.get("mean", open_clip.OPENAI_DATASET_MEAN)],
        std=[float(s) for s in pp.get("std", open_clip.OPENAI_DATASET_STD)],
        interpolation=str(pp.get("interpolation", "bicubic")), model_cfg=model_cfg,
        weights_layout=layout, resize_mode=str(pp.get("resize_mode") or "shortest"),
        weights_sha256=sha256)
    return clip, identity


def hf_cache_folder(repo_id: str) -> str:
    """The cached snapshot of a Hugging Face hub repository (offline: never downloads)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (OSError, ValueError) as e:  # not cached (an OSError), or a malformed name
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UtaUsageError(
            f"teacher.model hf-hub:{repo_id} is not in the local Hugging Face cache ({first}). "
            f"Download it once with network (huggingface-cli download {repo_id}), or pass its "
            f"folder: --set teacher.model=local-dir:/path/to/folder.") from None


def clip_from_file(model: str, path: str) -> tuple[nn.Module, str]:
    """open_clip model `model` with the weights of one file, and the layout detected in it:
    'open_clip' (open_clip_pytorch_model.bin, .safetensors, open_clip training checkpoints) or
    'eva-clip' (BAAI's native EVA-CLIP files, converted). Strict: every key is named that is
    missing, unexpected or of the wrong shape."""
    from open_clip.factory import convert_state_dict, load_state_dict
    from open_clip.model import (
        convert_to_custom_text_state_dict,
        resize_pos_embed,
        resize_text_pos_embed,
    )

    try:
        state = load_state_dict(path)  # safetensors or torch (weights_only); unwraps
    except BAD_FILE as e:
        first = (str(bad_input(e)).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UtaUsageError(f"Cannot read the teacher weights {path} ({type(e).__name__}: "
                            f"{first}). Is it a complete open_clip or EVA-CLIP weights file?"
                            ) from None
    layout = file_layout(state)
    if layout == "uta-release":
        raise UtaUsageError(
            f"{path} is a released UTA file (detected: a UTA student with SwiGLU blocks and its "
            f"text tower), not the weights of teacher '{model}'. Give the teacher's CLIP weights "
            f"as teacher.weights; a released UTA file is used as student.init, init or --ckpt.")
    logging.disable(logging.WARNING)  # open_clip warns "no pretrained weights": loaded below
    try:
        clip = open_clip.create_model(model)  # random init, replaced entirely below
    finally:
        logging.disable(logging.NOTSET)
    what = f"Teacher weights {path} ({layout} layout) do not fit teacher.model '{model}'"
    if layout == "eva-clip":
        state = eva_clip_to_open_clip(state, clip)
    else:  # open_clip's own fix-ups of its checkpoints (factory.load_checkpoint)
        layout = "open_clip"
        state = convert_state_dict(clip, state)
        if "positional_embedding" in state and not hasattr(clip, "positional_embedding"):
            state = convert_to_custom_text_state_dict(state)
        scale = state.get("logit_scale")
        if scale is not None and scale.ndim != clip.logit_scale.ndim:
            state["logit_scale"] = scale.reshape(clip.logit_scale.shape)
        resize_pos_embed(state, clip)
        resize_text_pos_embed(state, clip)
    strict_load(clip, state, what)
    log.info("teacher weights %s: %s layout", path, layout)
    return clip, layout


def _embed_dim(clip: nn.Module, model_cfg: dict | None = None) -> int:
    """The joint-space width: the config's embed_dim (every open_clip config has one), else the
    text projection's output width (CLIP keeps it on the model, CustomTextCLIP on `text`)."""
    if model_cfg and model_cfg.get("embed_dim"):
        return int(model_cfg["embed_dim"])
    text = getattr(clip, "text", clip)
    proj = getattr(text, "text_projection", None)
    if proj is not None:
        return proj.shape[1] if isinstance(proj, torch.Tensor) else proj.out_features
    return clip.visual.output_dim


def token_tower_problem(visual: nn.Module) -> str:
    """Why an open_clip image tower cannot give UTA's per-token targets ('' when it can).

    UTA aligns a CLS token (the image embedding) and patch tokens; a tower qualifies when its
    image embedding IS its CLS token after the last block. Attention-pool (SigLIP's `map`,
    CoCa), mean-pool and convolutional towers have no such token: refused rather than given
    targets of our own invention.
    """
    if isinstance(visual, OpenClipViT):
        if visual.attn_pool is not None:
            return "its image embedding is an attention pool over the tokens, not a CLS token"
        if visual.pool_type != "tok":
            return f"its image embedding is '{visual.pool_type}' pooling, not a CLS token"
        return ""
    if isinstance(visual, TimmModel):
        trunk = visual.trunk
        if not hasattr(trunk, "patch_embed") or not hasattr(trunk, "num_prefix_tokens"):
            return (f"its timm trunk {type(trunk).__name__} is not a ViT: it has no patch "
                    f"tokens (a convolutional or hierarchical network)")
        if "pool" in visual.head._modules or getattr(trunk, "attn_pool", None) is not None:
            return "its image embedding is an attention pool over the tokens, not a CLS token"
        if trunk.num_prefix_tokens < 1 or getattr(trunk, "global_pool", "") != "token":
            return (f"its image embedding is '{getattr(trunk, 'global_pool', '')}' pooling of "
                    f"the tokens, not a CLS token")
        return ""
    return (f"its image tower is a {type(visual).__name__} (a convolutional network) with no "
            f"patch tokens")


def teacher_tokenizer(model: str):
    """open_clip's tokenizer for the model; Hugging Face tokenizers (SigLIP, multilingual
    CLIPs) need `transformers` and the tokenizer files, which offline is a usage error."""
    try:
        return open_clip.get_tokenizer(model)
    except ImportError as e:
        raise UtaUsageError(f"The tokenizer of teacher '{model}' needs the Python package "
                            f"`transformers` ({e}). pip install transformers.") from None
    except OSError as e:  # Hugging Face: files not in the local cache and no network
        raise UtaUsageError(f"The tokenizer files of teacher '{model}' are not available "
                            f"offline ({str(e).splitlines()[0]}). Download them once with "
                            f"network (they are cached in ~/.cache/huggingface).") from None


class CLIPTeacher:
    """A frozen open_clip CLIP that returns per-token targets (B, 1 + N, embed_dim), CLS first.

    Deliberately not an nn.Module attribute of anything trained, so it never enters
    `accelerator.prepare`, DDP or a checkpoint.
    """

    def __init__(self, clip: nn.Module, identity: TeacherIdentity):
        problem = token_tower_problem(clip.visual)
        if problem:
            raise UtaUsageError(
                f"Teacher '{identity.model}' cannot be a UTA teacher: {problem}. UTA needs a "
                f"ViT whose CLS token is the image embedding: an open_clip ViT-* (CLIP) or "
                f"EVA02-* / EVA01-* (EVA-CLIP) model.")
        self.clip = clip.eval().requires_grad_(False)
        # The text tower and tokenizer give the zero-shot classifier (zeroshot.py).
        self.tokenizer = teacher_tokenizer(identity.model)
        self.identity = identity
        self.visual = clip.visual
        self.kind = "native" if isinstance(self.visual, OpenClipViT) else "timm"
        self.embed_dim = identity.embed_dim
        # Set when the text tower's weights are not the teacher's own (a contrastive-tuning
        # checkpoint's): the classifier cache keys on it, as the identity cannot tell them apart.
        self.text_fingerprint = ""
        self.dtype = torch.float32
        self.device = torch.device("cpu")
        self.token_resample: tuple[int, int] | None = None

    # -- geometry --------------------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        if self.kind == "native":
            return self.visual.patch_size[0]
        return self.visual.trunk.patch_embed.patch_size[0]

    @property
    def grid_size(self) -> tuple[int, int]:
        if self.kind == "native":
            return tuple(self.visual.grid_size)
        return tuple(self.visual.trunk.patch_embed.grid_size)

    @property
    def image_size(self) -> int:
        return self.patch_size * self.grid_size[0]

    def match_grid(self, student_grid: tuple[int, int], policy: str) -> str:
        """Make the teacher's token grid equal the student's; return a line for the log."""
        grid = self.grid_size
        if tuple(student_grid) == grid:
            return f"teacher grid {grid[0]}x{grid[1]} equals the student's; no matching needed"
        if policy == "error":
            raise UtaUsageError(
                f"Teacher grid {grid} differs from the student grid {tuple(student_grid)}. Set "
                f"teacher.grid_match to 'resize' or 'interpolate', or change student.image_size.")
        if policy == "interpolate":
            self.token_resample = tuple(student_grid)
            return (f"teacher runs at {self.image_size}px ({grid[0]}x{grid[1]} tokens); its token "
                    f"grid is resampled bilinearly to the student's {student_grid[0]}x"
                    f"{student_grid[1]}")
        new_size = (student_grid[0] * self.patch_size, student_grid[1] * self.patch_size)
        if self.kind == "native":
            v = self.visual
            pos = resample_abs_pos_embed(v.positional_embedding.data[None], new_size=student_grid,
                                         old_size=grid, num_prefix_tokens=1)[0]
            v.positional_embedding = nn.Parameter(pos, requires_grad=False)
            v.grid_size, v.image_size = tuple(student_grid), new_size
        else:
            self.visual.set_input_size(new_size)
        return (f"teacher sees the same crop resized to {new_size[0]}px so that its patch "
                f"{self.patch_size} gives the student's {student_grid[0]}x{student_grid[1]} grid "
                f"(positional embeddings resampled from {grid[0]}x{grid[1]})")

    # -- execution -------------------------------------------------------------------------------
    def to(self, device: torch.device, precision: str) -> CLIPTeacher:
        """Move and cast. Low precision casts the WEIGHTS: autocast around a frozen open_clip
        ViT on CPU re-copies the attention in-projection every call (3.4x slower, measured)."""
        self.device = torch.device(device)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        if self.device.type == "cpu" and self.dtype == torch.float16:
            self.dtype = torch.float32  # fp16 matmuls are unsupported or slow on CPU
        self.clip.to(device=self.device, dtype=self.dtype)
        return self

    def _autocast(self):
        if self.device.type == "cuda" and self.dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()

    @property
    def depth(self) -> int:
        """Number of transformer blocks of the image tower."""
        if self.kind == "native":
            return len(self.visual.transformer.resblocks)
        return len(self.visual.trunk.blocks)

    def _blocks(self) -> nn.ModuleList:
        return self.visual.transformer.resblocks if self.kind == "native" else \
            self.visual.trunk.blocks

    def resolve_layers(self, layers) -> list[int]:
        """Block indices (negative from the end) -> sorted, distinct, in [0, depth); the last
        block must be among them (its head is the one zero-shot and export use)."""
        depth = self.depth
        bad = [i for i in layers if not -depth <= int(i) < depth]
        if bad or not layers:
            raise UtaUsageError(
                f"align.teacher_layers = {list(layers)} names no block or a block outside the "
                f"teacher's {depth} (valid: 0..{depth - 1}, or -1..-{depth} from the end). Use "
                f"e.g. [-2, -1] for the last two.")
        resolved = sorted({int(i) % depth for i in layers})
        if resolved[-1] != depth - 1:
            raise UtaUsageError(
                f"align.teacher_layers = {list(layers)} leaves out the teacher's last block "
                f"(-1). Its targets train the head that zero-shot and export use; add -1, e.g. "
                f"{[*layers, -1]}.")
        return resolved

    def attention_problem(self) -> str:
        """Why mask.strategy attention cannot read this tower's last attention ('' if it can)."""
        return attention_problem(self._blocks()[-1].attn, self.kind)

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Joint-space targets (B, 1 + N, embed_dim) in fp32: CLS (= encode_image) then patches."""
        return self.targets(images)[0][-1]

    @torch.no_grad()
    def targets(self, images: torch.Tensor, layers: tuple[int, ...] = (),
                cls_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Targets of several blocks and, optionally, the last block's CLS-to-patch attention.

        layers: resolved block indices (resolve_layers), ascending; () = the last block only.
        Returns tokens (L, B, 1 + N, embed_dim) in fp32, each block's output tokens through the
        maps the last block's take (final norm, projection), and attention (B, N) in fp32, heads
        averaged, on the student's grid, renormalised over the patches (or None). One forward:
        blocks other than the last are read by forward hooks, the attention row by a hook on the
        last block's attention input.
        """
        last = self.depth - 1
        layers = tuple(layers) or (last,)
        images = images.to(self.device, self.dtype, non_blocking=True)
        blocks = self._blocks()
        seen: dict[int, torch.Tensor] = {}
        captured: dict[str, object] = {}
        hooks = []
        for i in layers[:-1] if layers[-1] == last else layers:
            hooks.append(blocks[i].register_forward_hook(
                lambda _m, _a, out, i=i: seen.__setitem__(i, out)))
        if cls_attention:
            hooks.append(blocks[last].attn.register_forward_pre_hook(
                lambda _m, args, kwargs: captured.update(args=args, kwargs=kwargs),
                with_kwargs=True))
        try:
            with self._autocast():
                if self.kind == "native":
                    v = self.visual
                    x = v.transformer(v._embeds(images))
                    outs = [self._native_project(seen[i]) for i in layers[:-1]] + \
                        [self._native_project(x)]
                else:
                    trunk = self.visual.trunk
                    feats = trunk.forward_features(images)  # ends with the trunk's final norm
                    outs = [self._timm_project(trunk.norm(seen[i])) for i in layers[:-1]] + \
                        [self._timm_project(feats)]
                attention = cls_patch_attention(blocks[last].attn, captured, self.kind) \
                    if cls_attention else None
        finally:
            for h in hooks:
                h.remove()
        tokens = torch.stack([self._on_student_grid(cls, patches) for cls, patches in outs])
        if attention is not None:
            attention = self.resample_grid(attention.float().unsqueeze(-1))[..., 0].clamp_min(0)
            attention = attention / attention.sum(dim=1, keepdim=True).clamp_min(1e-30)
        return tokens, attention

    def _native_project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.visual
        pooled, patches = v._pool(x)
        if v.final_ln_after_pool:
            patches = v.ln_post(patches)
        return pooled @ v.proj, patches @ v.proj

    def _timm_project(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        trunk = self.visual.trunk
        cls = self.visual.head(trunk.forward_head(feats))  # = encode_image
        return cls, self.project_timm_tokens(feats[:, trunk.num_prefix_tokens:])

    def resample_grid(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, C) on the teacher's grid -> on the student's (teacher.grid_match interpolate:
        bilinear, antialiased); unchanged when the grids match."""
        if self.token_resample is None:
            return patches
        b, n, e = patches.shape
        gh, gw = self.grid_size
        grid = patches.transpose(1, 2).reshape(b, e, gh, gw)
        grid = F.interpolate(grid, size=self.token_resample, mode="bilinear",
                             align_corners=False, antialias=True)
        return grid.flatten(2).transpose(1, 2)

    def _on_student_grid(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        patches = self.resample_grid(patches.float())
        return torch.cat([cls.float().unsqueeze(1), patches], dim=1)

    def project_timm_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Last-layer trunk tokens (B, N, C) -> joint space through the maps the CLS token takes
        after pooling: the trunk's fc_norm, its head (open_clip sizes it to embed_dim when the
        tower has no projection of its own, as EVA02-*) and the tower's projection head."""
        trunk = self.visual.trunk
        return self.visual.head(trunk.head(trunk.head_drop(trunk.fc_norm(tokens))))

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, self.dtype)
        with self._autocast():
            return self.clip.encode_image(images).float()


def load_teacher(model: str, weights: str) -> CLIPTeacher:
    clip, identity = load_clip(model, weights)
    return CLIPTeacher(clip, identity)


