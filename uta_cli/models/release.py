"""The authors' released UTA checkpoints (uta_{base_p16_224,large_p14_336,giant_p14_336}.pt).

The format is described in docs/release-format.md: a torch.save'd flat mapping with
`visual.*` (an EVA-02-style ViT: separate q/k/v with q and v bias, SwiGLU with sub-LN, 2-D RoPE on
a 16x16 reference grid, no inner attention LN), `text.*` (an open_clip TextTransformer with GELU)
and `logit_scale`. The vision tower becomes a `UTAStudent` (timm `Eva` + head), the text tower the
zero-shot text encoder. Loading is strict: every key is consumed or knowingly dropped (the 1 +
depth copies of the RoPE table, after checking them against the formula).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import zipfile
from dataclasses import dataclass

import open_clip
import torch
from open_clip.transformer import TextTransformer
from torch import nn

from uta_cli.errors import BAD_FILE, UtaUsageError, bad_input
from uta_cli.models.eva_clip import EVA_CLIP_MARKS, file_layout
from uta_cli.models.student import UTAStudent
from uta_cli.models.teacher import TeacherIdentity, file_fingerprint
from uta_cli.recipe import StudentConfig

FORMATS = ("auto", "uta", "uta-release")
SIGNATURE = "visual.blocks.0.attn.q_bias"
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
ROPE_REF_GRID = 16  # the authors' `pt` default: coordinates rescaled to a 16x16 grid
ROPE_ATOL = 1e-4  # stored float32 tables vs the formula recomputed here
TEXT_HEAD_DIM = 64  # not inferable from shapes; 16 heads of 64 at width 1024 (spec §5)
# vision names in the release -> timm Eva names (spec §8); all others are unchanged
_RENAMES = ((".attn.q_bias", ".attn.q_proj.bias"), (".attn.v_bias", ".attn.v_proj.bias"),
            (".mlp.w1.", ".mlp.fc1_g."), (".mlp.w2.", ".mlp.fc1_x."),
            (".mlp.ffn_ln.", ".mlp.norm."), (".mlp.w3.", ".mlp.fc2."))
KNOWN_NAMES = {(224, 16, 768, 12): "uta_base_p16_224", (336, 14, 1024, 24): "uta_large_p14_336",
               (336, 14, 1408, 40): "uta_giant_p14_336"}


@dataclass(frozen=True)
class ReleaseArch:
    """Architecture read from the key shapes (the three releases, or reduced copies of them)."""

    image_size: int
    patch_size: int
    width: int
    depth: int
    heads: int
    mlp_hidden: int
    embed_dim: int
    text_context: int
    text_vocab: int
    text_width: int
    text_layers: int
    text_heads: int
    text_dim: int

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def name(self) -> str:
        key = (self.image_size, self.patch_size, self.width, self.depth)
        return KNOWN_NAMES.get(key, f"uta_w{self.width}_d{self.depth}_p{self.patch_size}_"
                                    f"{self.image_size}")

    def student_config(self) -> StudentConfig:
        # mlp_ratio = H / W; int(W * ratio) must give H back (large: 2730 = int(1024 * 2.6667))
        ratio = self.mlp_hidden / self.width
        if int(self.width * ratio) != self.mlp_hidden:
            ratio = math.nextafter(ratio, math.inf)
        return StudentConfig(family="eva", image_size=self.image_size,
                             patch_size=self.patch_size, width=self.width, depth=self.depth,
                             heads=self.heads, mlp_ratio=ratio, drop_path=0.0,
                             timm_kwargs={"ref_feat_shape": [ROPE_REF_GRID, ROPE_REF_GRID]})

    def text_cfg(self) -> dict:
        """open_clip text_cfg (CLIPTextCfg fields) of the released text tower."""
        return {"context_length": self.text_context, "vocab_size": self.text_vocab,
                "width": self.text_width, "heads": self.text_heads, "layers": self.text_layers}

    def open_clip_model_cfg(self) -> dict:
        """open_clip model_cfg of the release as a plain CLIP (text keys at the top level, as
        open_clip's CLIP and CLIP_benchmark expect); the open_clip export fills in vision_cfg
        (a timm tower)."""
        return {"embed_dim": self.embed_dim, "quick_gelu": False, "vision_cfg": {},
                "text_cfg": self.text_cfg()}


def expected_shapes(a: ReleaseArch) -> dict[str, tuple[int, ...]]:
    """Every key of a strict load of the release class, with its shape (spec §2)."""
    w, g, p, hd, h = a.width, a.grid, a.patch_size, a.head_dim, a.mlp_hidden
    rope = (g * g, hd)
    s: dict[str, tuple[int, ...]] = {
        "logit_scale": (), "visual.cls_token": (1, 1, w), "visual.pos_embed": (1, 1 + g * g, w),
        "visual.patch_embed.proj.weight": (w, 3, p, p), "visual.patch_embed.proj.bias": (w,),
        "visual.rope.freqs_cos": rope, "visual.rope.freqs_sin": rope,
        "visual.norm.weight": (w,), "visual.norm.bias": (w,),
        "visual.head.weight": (a.embed_dim, w), "visual.head.bias": (a.embed_dim,)}
    for i in range(a.depth):
        b = f"visual.blocks.{i}."
        s.update({b + "norm1.weight": (w,), b + "norm1.bias": (w,), b + "attn.q_bias": (w,),
                  b + "attn.v_bias": (w,), b + "attn.q_proj.weight": (w, w),
                  b + "attn.k_proj.weight": (w, w), b + "attn.v_proj.weight": (w, w),
                  b + "attn.proj.weight": (w, w), b + "attn.proj.bias": (w,),
                  b + "attn.rope.freqs_cos": rope, b + "attn.rope.freqs_sin": rope,
                  b + "norm2.weight": (w,), b + "norm2.bias": (w,),
                  b + "mlp.w1.weight": (h, w), b + "mlp.w1.bias": (h,),
                  b + "mlp.w2.weight": (h, w), b + "mlp.w2.bias": (h,),
                  b + "mlp.ffn_ln.weight": (h,), b + "mlp.ffn_ln.bias": (h,),
                  b + "mlp.w3.weight": (w, h), b + "mlp.w3.bias": (w,)})
    tw = a.text_width
    s.update({"text.positional_embedding": (a.text_context, tw),
              "text.text_projection": (tw, a.text_dim),
              "text.token_embedding.weight": (a.text_vocab, tw),
              "text.ln_final.weight": (tw,), "text.ln_final.bias": (tw,)})
    for i in range(a.text_layers):
        b = f"text.transformer.resblocks.{i}."
        s.update({b + "ln_1.weight": (tw,), b + "ln_1.bias": (tw,),
                  b + "attn.in_proj_weight": (3 * tw, tw), b + "attn.in_proj_bias": (3 * tw,),
                  b + "attn.out_proj.weight": (tw, tw), b + "attn.out_proj.bias": (tw,),
                  b + "ln_2.weight": (tw,), b + "ln_2.bias": (tw,),
                  b + "mlp.c_fc.weight": (4 * tw, tw), b + "mlp.c_fc.bias": (4 * tw,),
                  b + "mlp.c_proj.weight": (tw, 4 * tw), b + "mlp.c_proj.bias": (tw,)})
    return s


def _listing(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# -- reading ---------------------------------------------------------------------------------------
def read_state(path: str) -> dict[str, torch.Tensor]:
    """The file's flat mapping, loaded with weights_only=True (memory-mapped when possible)."""
    if not os.path.isfile(path):
        raise UtaUsageError(f"Released checkpoint not found: {path}")
    mmap = zipfile.is_zipfile(path)  # torch's zip format; legacy pickles cannot be mmapped
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except BAD_FILE as e:  # truncated zips, arbitrary pickles, unsafe globals: all unreadable
        first = str(bad_input(e)).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UtaUsageError(f"{path} is not a readable UTA release: torch.load(weights_only=True) "
                            f"failed ({type(e).__name__}: {first[:200]}). The file may be "
                            f"truncated (re-download it) or not a torch checkpoint.") from None
    if not isinstance(state, dict) or not state or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UtaUsageError(f"{path} is not a UTA release: expected a flat mapping of names to "
                            f"tensors, got {type(state).__name__}.")
    if SIGNATURE not in state or "logit_scale" not in state or \
            not any(k.startswith("text.") for k in state):
        wrapped = [k for k in ("state_dict", "model", "module") if k in state]
        hint = f" It holds a '{wrapped[0]}' entry; unwrap it first." if wrapped else ""
        raise UtaUsageError(f"{path} is not a UTA release (no {SIGNATURE}, text.* and "
                            f"logit_scale keys; first keys: {_listing(list(state)[:6], 6)}).{hint}")
    if file_layout(state) == "eva-clip":  # the same outline as a release, a different network
        raise UtaUsageError(
            f"{path} is a native EVA-CLIP checkpoint (detected: BAAI layout with "
            f"{next(k for k in EVA_CLIP_MARKS if k in state)}), not a released UTA file. Use it "
            f"as a teacher: --set teacher.model=EVA02-L-14 (the matching EVA02-* model) --set "
            f"teacher.weights={path}.")
    return state


def is_uta_release(path: str) -> bool:
    """Cheap detection: a torch.save'd mapping with the release's key signature."""
    if not os.path.isfile(path):
        return False
    try:
        read_state(path)
    except UtaUsageError:
        return False
    return True


def resolve_format(path: str, fmt: str = "auto") -> str:
    """'uta' (a checkpoint folder or run directory) or 'uta-release' (a released file)."""
    if fmt not in FORMATS:
        raise UtaUsageError(f"--ckpt-format {fmt!r} is not one of: {', '.join(FORMATS)}.")
    if fmt == "auto":
        # a single file can only be a release; read_state explains what is wrong otherwise
        return "uta-release" if os.path.isfile(path) else "uta"
    if fmt == "uta-release" and not os.path.isfile(path):
        raise UtaUsageError(f"--ckpt-format uta-release needs a released .pt file; {path} is "
                            f"not a file.")
    return fmt


def _count(state: dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def infer_arch(state: dict[str, torch.Tensor], path: str) -> ReleaseArch:
    """The architecture from the key shapes; then every key must match it exactly (strict)."""
    need = ["visual.cls_token", "visual.pos_embed", "visual.patch_embed.proj.weight",
            "visual.rope.freqs_cos", "visual.head.weight", "visual.blocks.0.mlp.w1.weight",
            "text.positional_embedding", "text.token_embedding.weight", "text.text_projection"]
    missing = [k for k in need if k not in state]
    if missing:
        raise UtaUsageError(f"{path} is not a complete UTA release: missing {_listing(missing)}.")
    try:
        w = state["visual.cls_token"].shape[-1]
        p = state["visual.patch_embed.proj.weight"].shape[-1]
        g = math.isqrt(state["visual.pos_embed"].shape[1] - 1)
        hd = state["visual.rope.freqs_cos"].shape[-1]
        tw = state["text.positional_embedding"].shape[1]
        arch = ReleaseArch(
            image_size=g * p, patch_size=p, width=w,
            depth=_count(state, r"visual\.blocks\.(\d+)\."),
            heads=w // hd, mlp_hidden=state["visual.blocks.0.mlp.w1.weight"].shape[0],
            embed_dim=state["visual.head.weight"].shape[0],
            text_context=state["text.positional_embedding"].shape[0],
            text_vocab=state["text.token_embedding.weight"].shape[0], text_width=tw,
            text_layers=_count(state, r"text\.transformer\.resblocks\.(\d+)\."),
            text_heads=max(1, tw // TEXT_HEAD_DIM), text_dim=state["text.text_projection"].shape[1])
    except (IndexError, ZeroDivisionError, ValueError) as e:
        raise UtaUsageError(f"{path} has malformed UTA release shapes ({e}).") from None
    if arch.heads * hd != w or hd % 4:
        raise UtaUsageError(f"{path}: RoPE head dim {hd} does not divide width {w} into heads.")
    want = expected_shapes(arch)
    unexpected = set(state) - set(want)
    missing = set(want) - set(state)
    wrong = [f"{k} {tuple(state[k].shape)} != {want[k]}" for k in want
             if k in state and tuple(state[k].shape) != want[k]]
    if unexpected or missing or wrong:
        parts = []
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected)}")
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if wrong:
            parts.append(f"wrong shapes: {_listing(wrong, 6)}")
        raise UtaUsageError(f"{path} does not match the UTA release format of {arch.name} "
                            f"(strict load refused): {'; '.join(parts)}.")
    return arch


# -- RoPE ------------------------------------------------------------------------------------------
def rope_tables(grid: int, head_dim: int, ref: int = ROPE_REF_GRID) -> tuple[torch.Tensor, ...]:
    """(freqs_cos, freqs_sin), each (grid*grid, head_dim), float32 (spec §4): rows first half,
    columns second half, each frequency repeated on two adjacent dims."""
    d = head_dim // 2
    omega = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)  # nf = d / 2 frequencies
    t = torch.arange(grid).float() / grid * ref
    ang = (t[:, None] * omega[None]).repeat_interleave(2, dim=-1)  # (G, d), interleaved pairs
    rows = ang[:, None, :].expand(grid, grid, d)
    cols = ang[None, :, :].expand(grid, grid, d)
    theta = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)
    return torch.cos(theta), torch.sin(theta)


def check_rope(state: dict[str, torch.Tensor], arch: ReleaseArch, path: str) -> float:
    """Every stored copy of the RoPE table against the formula; returns the max deviation."""
    cos, sin = rope_tables(arch.grid, arch.head_dim)
    worst, bad = 0.0, []
    for k in (k for k in state if k.endswith(("rope.freqs_cos", "rope.freqs_sin"))):
        ref = cos if k.endswith("cos") else sin
        dev = (state[k].float() - ref).abs().max().item()
        worst = max(worst, dev)
        if not dev <= ROPE_ATOL:  # also catches NaN
            bad.append(f"{k} (max |diff| {dev:.3g})")
    if bad:
        raise UtaUsageError(f"{path}: stored RoPE tables differ from the UTA formula (16x16 "
                            f"reference grid, interleaved pairs): {_listing(bad, 4)}.")
    return worst


def vision_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`visual.*` renamed onto UTAStudent (trunk = timm Eva, head); RoPE buffers dropped."""
    out = {}
    for k, v in state.items():
        if not k.startswith("visual.") or ".rope." in k or k.startswith("visual.rope."):
            continue
        name = k[len("visual."):]
        if name.startswith("head."):
            out[name] = v
            continue
        for old, new in _RENAMES:
            name = name.replace(old, new)
        out["trunk." + name] = v
    return out


# -- models ----------------------------------------------------------------------------------------
class ReleaseTextCLIP(nn.Module):
    """The released text tower (+ logit_scale) laid out exactly as open_clip's `CLIP` text side
    (same attribute and key names, its own `encode_text`), without an image tower. The release's
    `text.X` is `X` here."""

    def __init__(self, arch: ReleaseArch):
        super().__init__()
        text = TextTransformer(
            context_length=arch.text_context, vocab_size=arch.text_vocab, width=arch.text_width,
            heads=arch.text_heads, layers=arch.text_layers, output_dim=arch.text_dim,
            act_layer=nn.GELU)
        # as open_clip.model.CLIP.__init__ does
        self.transformer = text.transformer
        self.context_length = text.context_length
        self.vocab_size = text.vocab_size
        self.token_embedding = text.token_embedding
        self.positional_embedding = text.positional_embedding
        self.ln_final = text.ln_final
        self.text_projection = text.text_projection
        self.text_pool_type = text.pool_type
        self.text_eos_id = text.eos_id
        self.register_buffer("attn_mask", text.attn_mask, persistent=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

        # the image side is attached by contrastive tuning (tasks.contrastive.uta_clip); with
        # these open_clip CLIP attributes, CLIP's forward and lock_text_tower work unchanged
        self.visual = nn.Identity()
        self.output_dict = False
        self.logit_bias = None

    encode_text = open_clip.model.CLIP.encode_text  # argmax pooling, ln_final, x @ projection
    encode_image = open_clip.model.CLIP.encode_image
    forward = open_clip.model.CLIP.forward
    lock_text_tower = open_clip.model.CLIP.lock_text_tower


class ReleaseTextTower:
    """The release's own text tower, used where a uta checkpoint uses its CLIP teacher for text
    (the zero-shot classifier, open_clip export). It has no image side."""

    kind = "release"

    def __init__(self, clip: ReleaseTextCLIP, identity: TeacherIdentity):
        self.clip = clip.eval().requires_grad_(False)
        self.identity = identity
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=clip.context_length)
        self.embed_dim = identity.embed_dim
        self.text_fingerprint = ""  # as CLIPTeacher.text_fingerprint (set once tuned)
        self.dtype = torch.float32
        self.device = torch.device("cpu")

    @property
    def image_size(self) -> int:
        return self.identity.image_size

    def to(self, device: torch.device, precision: str) -> ReleaseTextTower:
        """As CLIPTeacher.to: low precision casts the weights (fp16 stays fp32 on CPU)."""
        self.device = torch.device(device)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        if self.device.type == "cpu" and self.dtype == torch.float16:
            self.dtype = torch.float32
        self.clip.to(device=self.device, dtype=self.dtype)
        return self

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        raise UtaUsageError("A released UTA file has no separate CLIP teacher image tower.")


@dataclass
class ReleasedModel:
    student: UTAStudent | None  # None once a fine-tuning run has taken its weights
    text_tower: ReleaseTextTower
    meta: dict
    arch: ReleaseArch


def release_meta(path: str, arch: ReleaseArch, fingerprint: str, logit_scale: float,
                 rope_dev: float) -> dict:
    """A uta checkpoint's meta.json shape for a release (JSON-serialisable)."""
    preprocess = {"size": arch.image_size, "mean": OPENAI_MEAN, "std": OPENAI_STD,
                  "interpolation": "bicubic"}
    identity = TeacherIdentity(
        model=f"uta-release:{arch.name}", weights=os.path.abspath(path),
        weights_fingerprint=fingerprint, embed_dim=arch.text_dim, image_size=arch.image_size,
        mean=OPENAI_MEAN, std=OPENAI_STD, interpolation="bicubic",
        model_cfg=arch.open_clip_model_cfg())
    return {
        "format": "uta-release", "task": "uta-alignment", "step": None,
        "student": dataclasses.asdict(arch.student_config()), "embed_dim": arch.embed_dim,
        "student_preprocess": preprocess, "teacher": identity.to_dict(),
        "release": {"path": os.path.abspath(path), "name": arch.name,
                    "fingerprint": fingerprint, "logit_scale": logit_scale,
                    "rope_max_abs_diff": rope_dev, "text_cfg": arch.text_cfg()},
        "checkpoint_dir": os.path.abspath(path),
    }


def read_release(path: str) -> tuple[dict[str, torch.Tensor], ReleaseArch, dict]:
    """Validate a release without building models: (state, arch, meta)."""
    state = read_state(path)
    arch = infer_arch(state, path)
    rope_dev = check_rope(state, arch, path)
    meta = release_meta(path, arch, file_fingerprint(path), float(state["logit_scale"]), rope_dev)
    return state, arch, meta


def build_student(state: dict[str, torch.Tensor], arch: ReleaseArch, path: str) -> UTAStudent:
    student = UTAStudent(arch.student_config(), arch.embed_dim)
    # timm recomputes RoPE from the same formula; make sure it is the table the release used
    cos, sin = rope_tables(arch.grid, arch.head_dim)
    got = student.trunk.rope.get_embed()  # [sin | cos]
    if not torch.allclose(got, torch.cat([sin, cos], -1), atol=ROPE_ATOL):
        raise UtaUsageError(f"{path}: this timm version computes a different RoPE table; "
                            f"the release cannot be run faithfully.")
    _strict_load(student, vision_state(state), path, "vision tower")
    return student.eval()


def _strict_load(module: nn.Module, state: dict, path: str, what: str) -> None:
    result = module.load_state_dict(state, strict=False)  # report, then refuse anything off
    if result.missing_keys or result.unexpected_keys:
        raise UtaUsageError(f"{path}: the {what} does not load strictly: missing "
                            f"{_listing(result.missing_keys) or 'none'}; unexpected "
                            f"{_listing(result.unexpected_keys) or 'none'}.")


def _text_tower(state: dict, arch: ReleaseArch, meta: dict, path: str) -> ReleaseTextTower:
    text = ReleaseTextCLIP(arch)
    text_state = {k[len("text."):] if k.startswith("text.") else k: v
                  for k, v in state.items() if not k.startswith("visual.")}
    _strict_load(text, text_state, path, "text tower")
    return ReleaseTextTower(text, TeacherIdentity(**meta["teacher"]))


def load_release(path: str) -> ReleasedModel:
    """The student (vision tower + head), the text tower and a checkpoint-like meta."""
    state, arch, meta = read_release(path)
    student = build_student(state, arch, path)
    return ReleasedModel(student, _text_tower(state, arch, meta, path), meta, arch)


def text_tower_from_meta(recorded: dict, weights_override: str = "") -> ReleaseTextTower:
    """The text tower of the released file a checkpoint was tuned from (its meta's `teacher`,
    model uta-release:NAME), refused unless it is the same file. weights_override: where the
    file lives now."""
    path = weights_override or recorded["weights"]
    if not os.path.isfile(path):
        raise UtaUsageError(f"The checkpoint's text tower comes from the released UTA file "
                            f"{path}, which does not exist here. Pass --teacher-weights with "
                            f"its new location.")
    state, arch, meta = read_release(path)
    fingerprint = recorded.get("weights_fingerprint")
    if fingerprint and meta["teacher"]["weights_fingerprint"] != fingerprint:
        raise UtaUsageError(f"Teacher mismatch: the checkpoint was tuned from the released file "
                            f"{recorded['weights']} ({recorded['model']}), but {path} is a "
                            f"different file (fingerprint mismatch). Point --teacher-weights at "
                            f"the release used for tuning.")
    return _text_tower(state, arch, meta, path)
