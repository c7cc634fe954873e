"""Typed recipes: YAML validated into dataclasses, with typed `--set a.b=value` overrides.

Every section is a dataclass; unknown keys and wrong types raise `UtaUsageError` (exit 2) naming the
key, the expected type and the nearest valid key. Built-in recipes ship inside the package
(`uta_cli.recipes`), so `uta pretrain vitb16` works after a non-editable install too.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
import yaml

from uta_cli.errors import UtaUsageError


@dataclass
class DataConfig:
    # "demo" (generated shapes), an image folder (local path or fsspec URL; class folders or flat),
    # or tar shards in webdataset layout ("s3://bucket/train-{0000..0999}.tar", a .tar file or a
    # folder of them).
    source: str = "demo"
    format: Literal["auto", "folder", "tar"] = "auto"
    batch_size: int = 64  # per process and per micro-step
    num_workers: int = 4
    # Where training JPEGs are decoded: "cpu" in the loader workers (PIL); "gpu" in the training
    # process on the device (torchvision decode_jpeg, nvJPEG), the workers only reading bytes;
    # "auto": gpu on CUDA for JPEG sources. Pre-training only; validation always decodes on CPU.
    decode: Literal["auto", "cpu", "gpu"] = "auto"
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    hflip: bool = True
    # Student normalisation; the teacher always gets its own (docs/method.md §2).
    mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    # Tar shards have no length; give the number of samples in one pass for epoch-based schedules.
    samples_per_epoch: int = 0
    # Held-out images for the validation alignment loss (same kinds of source as `source`).
    val_source: str = ""
    # At most this many of them, in pre-training and fine-tuning alike; 0 = all. Folders: the
    # first N images; tar shards: the first N samples in shard-list order. One set for any
    # number of processes (docs/data.md).
    val_samples: int = 512
    # Tar-shard training: each loader worker reads `shuffle_interleave` shards at once, one
    # record of each in turn, and draws samples at random from a buffer of this many encoded
    # records; 0 = stored order, shard after shard. Memory: processes x num_workers x buffer x
    # the mean encoded image (400 x 110 KB ImageNet JPEGs = 44 MB a worker, 3.5 GB for 8
    # processes x 10 workers; docs/data.md). Image folders are shuffled by index instead.
    shuffle_buffer: int = 400
    shuffle_interleave: int = 8


@dataclass
class StudentConfig:
    # timm `Eva` (EVA-02 style, 2-D RoPE) or timm `VisionTransformer`
    family: Literal["eva", "vit"] = "eva"
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    # Extra keyword arguments passed to the timm class, e.g. {"qk_norm": true}.
    timm_kwargs: dict = field(default_factory=dict)
    # Initialise from a uta checkpoint (file or run directory); empty = from scratch.
    init: str = ""


@dataclass
class TeacherConfig:
    model: str = "ViT-B-16"  # an open_clip model name, or "local-dir:/path" (config + weights)
    # A local weights file, a folder, a hub tag (network), or "demo" (the cached demo teacher).
    weights: str = ""
    # When the teacher's token grid differs from the student's: "resize" feeds the teacher the
    # same crop at teacher_patch * student_grid pixels (EVA-02's two resolutions of one crop,
    # positional embeddings resampled); "interpolate" runs the teacher at its own size and
    # resamples its token grid bilinearly; "error" refuses.
    grid_match: Literal["resize", "interpolate", "error"] = "resize"


@dataclass
class MaskConfig:
    # "attention": visible tokens drawn in proportion to the teacher's last-layer CLS-to-patch
    # attention (UMT, MILAN, MaskAlign), on the device after the teacher's forward.
    strategy: Literal["random", "block", "reversed-block", "attention"] = "reversed-block"
    ratio: float = 0.5  # fraction of patch tokens dropped [ours; the paper does not say]
    min_block_patches: int = 16
    min_aspect: float = 0.3
    max_tries: int = 10
    # attention only: draw in proportion to attention^(1 / T); 1 = the attention itself (UMT)
    attention_temperature: float = 1.0


@dataclass
class AlignConfig:
    """Variants of the alignment targets (docs/method.md); the defaults are the paper's."""

    # "layernorm": a parameter-free LayerNorm of every teacher token (CLS and patches) before
    # the cosine loss (MaskAlign's `whiten` targets).
    target_norm: Literal["none", "layernorm"] = "none"
    # Teacher blocks whose output tokens are targets (each through the teacher's final norm and
    # projection); the student's last-layer tokens get one linear head per block, the loss is
    # the mean over blocks (MaskAlign, UMT). Must include the last block (-1).
    teacher_layers: list[int] = field(default_factory=lambda: [-1])


@dataclass
class OptimConfig:
    lr: float = 1.5e-3  # peak learning rate, as given (no automatic batch scaling)
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    grad_clip: float = 3.0  # 0 disables clipping


@dataclass
class ScheduleConfig:
    # Length: `steps` (optimizer steps) wins when > 0, else `epochs` passes over the data.
    steps: int = 0
    epochs: float = 0.0
    warmup_steps: int = 0
    warmup_epochs: float = 0.0
    # The last N steps run with every token visible, UTA's loss on all of them (FLIP's unmasked
    # finish); the learning-rate schedule is unchanged. About twice the activation memory at
    # mask ratio 0.5 (docs/pretraining.md). `uta pretrain` only.
    unmasked_steps: int = 0


@dataclass
class TrainConfig:
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    grad_accum: int = 1
    log_every: int = 20
    checkpoint_every: int = 1000  # steps; 0 = only at the end (and on SIGTERM)
    keep_checkpoints: int = 3
    val_every: int = 0  # steps; 0 = only at the end
    output_dir: str = ""  # default: runs/<recipe name>
    # Experiment trackers besides metrics.jsonl (always written): tensorboard, wandb; each an
    # optional extra (pip install 'uta-cli[tensorboard]'). [] or [none] = none. MLflow and aim are
    # not offered: untested here, and their installs pull 54 and 27 packages (a server stack,
    # pandas, pyarrow, RocksDB) into every test environment.
    report_to: list[Literal["tensorboard", "wandb", "none"]] = field(
        default_factory=list)
    # Activation checkpointing: recompute each transformer block in the backward pass instead
    # of storing its activations (less memory for a larger batch, about a third more compute).
    grad_checkpointing: bool = False
    # torch.compile the student's kept-token forward, the alignment loss and the frozen
    # teacher's forward (static shapes: every sample keeps the same number of tokens).
    # "auto": on for CUDA devices only; on CPU the measured gain does not pay for the compile
    # time (docs/performance.md). true / false force it. `uta pretrain` only.
    compile: Literal["auto", True, False] = "auto"
    # ddp: every process holds the whole student, its gradients and AdamW state. fsdp: they are
    # sharded over the processes with PyTorch FSDP2 (per block, then the root); checkpoints add
    # each process's shards (DCP) to the usual files. Needs a run directory every process
    # reaches (docs/performance.md). `uta pretrain` and `uta finetune`.
    sharding: Literal["ddp", "fsdp"] = "ddp"


@dataclass
class EvalConfig:
    # Zero-shot evaluation of the student through the teacher's text tower: "none", "demo"
    # (held-out demo images; at the end also the teacher side by side), or any dataset that
    # `uta zeroshot --dataset` takes (a class folder, tar shards with eval.classnames,
    # "imagenet" with eval.data_dir, ...).
    zeroshot: str = "none"
    # Steps between zero-shot evaluations while training (0 = only at the end). The class
    # weights are built once at the start (and cached); each evaluation is sharded over ranks.
    zeroshot_every: int = 0
    data_dir: str = ""  # what `uta zeroshot --data-dir` takes (imagenet: the folder with val/)
    classnames: str = ""  # a file, one name per line ("" = the dataset's own)
    templates: str = ""  # openai | simple | a file ("" = the dataset's own)
    zeroshot_samples: int = 0  # evaluate on the first N images only (0 = all)


@dataclass
class DemoConfig:
    """The embedded demo: generated data and a small CLIP teacher trained on it
    (demo_teacher.py)."""

    train_images: int = 8000
    val_images: int = 2000
    data_seed: int = 0
    teacher_steps: int = 500
    teacher_batch_size: int = 128
    teacher_lr: float = 2e-3


@dataclass
class FinetuneConfig:
    """`uta finetune` (task: classification or contrastive); `uta pretrain` ignores it.

    Hyper-parameter defaults are neutral (every regulariser off); the shipped recipes set the
    EVA-02 template values (docs/method.md §7). Validation reads data.val_source (the held-out
    demo images for the demo), limited to data.val_samples images (0 = all of them).
    """

    # Weights for a `timm:NAME` or `open_clip:MODEL` init: a local file (or an open_clip folder),
    # or empty for the hub's default weights (needs network).
    init_weights: str = ""
    # Classes: 0 = from the data (class folders, the demo); tar shards need it set.
    num_classes: int = 0
    # Class names (zero-shot head, zero-shot validation): "" = class folder names (underscores as
    # spaces) or the demo's; "imagenet" = open_clip's ImageNet-1k names; or a file, one per line.
    classnames: str = ""
    # Prompt templates: "openai" (80), "simple", a file (one per line, with {c}); the demo data
    # always uses its own.
    templates: str = "openai"
    # Initialise the classifier from the teacher's text embeddings of the class names (in the
    # joint space), so that training starts at the zero-shot accuracy instead of chance.
    zeroshot_head: bool = False
    # Text forwards for class weights: "trimmed" (each only up to its longest prompt; exact for
    # causal, end-of-text pooled CLIP text towers, others use the full context) or "full".
    text_context: str = "trimmed"
    layer_decay: float = 1.0  # lr of layer i: decay^(depth + 1 - i); 1 = off
    label_smoothing: float = 0.0
    mixup: float = 0.0  # mixup alpha (timm Mixup); 0 = off
    cutmix: float = 0.0  # cutmix alpha; 0 = off
    mixup_prob: float = 1.0  # probability of mixing a batch
    mixup_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    randaugment: str = ""  # a timm RandAugment spec, e.g. "rand-m9-mstd0.5-inc1"; "" = off
    ema_decay: float = 0.0  # model EMA (timm ModelEmaV3), evaluated beside the live model; 0 = off
    ema_warmup: bool = False  # timm's EMA decay warm-up (for short runs)
    val_at_start: bool = True  # evaluate before the first step (the zero-shot head's start)
    # The validation metric whose best value is kept in checkpoints/best/: "auto" (val_ema_acc1
    # with EMA, else val_acc1; val_zeroshot_acc1 for contrastive), a metric name, or "" = none.
    best_metric: str = "auto"
    # Contrastive tuning: keep the teacher's text tower frozen (LiT-style) or tune it too.
    text_locked: bool = False


@dataclass
class Recipe:
    name: str = "unnamed"
    seed: int = 0
    # What `uta finetune` trains; `uta pretrain` runs "pretrain" recipes.
    task: Literal["pretrain", "classification", "contrastive"] = "pretrain"
    # What `uta pretrain` optimises (docs/objectives.md): "uta" aligns the visible tokens and CLS;
    # "mim" feeds every token, masked ones as a learned [MASK] embedding, and aligns the masked
    # tokens (EVA-02); "fd" feeds every token unmasked and aligns all of them.
    objective: Literal["uta", "mim", "fd"] = "uta"
    # The starting model of `uta finetune`: a UTA checkpoint or run directory (pre-training or
    # contrastive tuning), a released uta_*.pt file (its own text tower then serves as the
    # teacher's), `timm:NAME` or `open_clip:MODEL` (weights from finetune.init_weights);
    # empty = random init from the student section.
    init: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


# ----------------------------------------------------------------------------------------------
# Validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "a mapping", type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        keys.append(path)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(_all_keys(hints[f.name], path + "."))
    return keys


def _unknown_key_error(path: str) -> UtaUsageError:
    valid = _all_keys(Recipe)
    leaf = path.rsplit(".", 1)[-1]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in valid}
    if leaf in by_leaf:  # a right name in the wrong section, e.g. `optim.ratio`
        close = [by_leaf[leaf]]
    else:
        close = difflib.get_close_matches(path, valid, n=1, cutoff=0.5)
        if not close:
            leaf_close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
            close = [by_leaf[leaf_close[0]]] if leaf_close else []
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return UtaUsageError(f"Unknown recipe key '{path}'.{hint} Valid top-level sections: "
                         f"{', '.join(f.name for f in dataclasses.fields(Recipe))}.")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`, converting where YAML is ambiguous."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        if not isinstance(value, dict):
            raise UtaUsageError(f"Recipe key '{path}' must be a mapping (section), got {value!r}.")
        return _build(tp, value, path + ".")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise UtaUsageError(
                f"Recipe key '{path}' must be {_type_name(tp)}; got {value!r}.{hint}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UtaUsageError(f"Recipe key '{path}' must be {_type_name(tp)}; got {value!r}.")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        # PyYAML reads `1e-3` (no dot) as a string; accept any number spelled as one.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a hub tag or a name that YAML read as a number
    elif tp is dict:
        if isinstance(value, dict):
            return value
    raise UtaUsageError(f"Recipe key '{path}' must be {_type_name(tp)}; got {value!r} "
                        f"({type(value).__name__}).")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise _unknown_key_error(f"{prefix}{key}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


def recipe_from_dict(data: dict) -> Recipe:
    if not isinstance(data, dict):
        raise UtaUsageError("A recipe must be a YAML mapping with sections such as data:, "
                            "student:, teacher:, mask:, optim:, schedule:, train:.")
    return _build(Recipe, data)


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


# ----------------------------------------------------------------------------------------------
# Loading


def builtin_recipe_names() -> list[str]:
    root = importlib.resources.files("uta_cli.recipes")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _read_recipe_text(name_or_path: str) -> tuple[str, str]:
    """Return (text, default name). A bare name resolves to a built-in recipe."""
    root = importlib.resources.files("uta_cli.recipes")
    looks_like_path = any(c in name_or_path for c in "/\\:") or name_or_path.endswith(
        (".yaml", ".yml"))
    if not looks_like_path:
        resource = root / f"{name_or_path}.yaml"
        if resource.is_file():
            return resource.read_text(), name_or_path
        raise UtaUsageError(
            f"No built-in recipe named '{name_or_path}'. Built-in recipes: "
            f"{', '.join(builtin_recipe_names())}; or give a path to a YAML file.")
    try:
        with fsspec.open(name_or_path, "r") as f:
            text = f.read()
    except FileNotFoundError:
        raise UtaUsageError(f"Recipe file not found: {name_or_path}. Check the path, or use a "
                            f"built-in recipe: {', '.join(builtin_recipe_names())}.") from None
    except (OSError, ValueError, ImportError) as e:
        raise UtaUsageError(f"Cannot read recipe {name_or_path}: {e}") from None
    stem = name_or_path.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return text, stem


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UtaUsageError(f"--set expects key=value (for example --set optim.lr=1e-3); "
                            f"got '{text}'.")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # a plain string the YAML parser dislikes, e.g. "a: b"
    return key.split("."), value


def apply_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    """Apply `a.b=value` overrides to the raw mapping; typing happens in recipe_from_dict."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise UtaUsageError(f"--set {text}: '{'.'.join(path[:i + 1])}' is not a section.")
            node = child
        node[path[-1]] = value
    return data


def load_recipe(name_or_path: str | None = None, overrides: typing.Iterable[str] = ()) -> Recipe:
    """Load a built-in recipe by name, or a YAML file (local or fsspec URL); None = `demo`."""
    text, default_name = _read_recipe_text(name_or_path or "demo")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UtaUsageError(f"Recipe {name_or_path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UtaUsageError(f"Recipe {name_or_path} must be a YAML mapping of sections.")
    data.setdefault("name", default_name)
    data = apply_overrides(data, overrides)
    return recipe_from_dict(data)
