"""Exported open_clip folders as models: a UTA student (timm image tower) plus its text tower.

Two layouts are written by `uta export` and `uta convert`:

    local-dir   open_clip_config.json names its image tower "local-dir:<abs>/timm_trunk", the
                folder timm reads (config.json: architecture + model_args). timm resolves that
                path against the working directory, so a moved folder must be re-pointed
                (`uta repoint FOLDER`) before open_clip can load it.
    hf-hub      a Hugging Face model repository: open_clip_config.json names the tower
                "hf-hub:ORG/NAME", whose config.json sits at the top of the same repository
                (beside model.safetensors, the timm weights). Nothing names a local path.

Loading rebuilds the UTAStudent from the timm config and refuses a tower that the student's own
builder would not make with the same arguments, so every command treats the folder exactly like
the checkpoint it came from.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from unittest import mock

import torch
from safetensors.torch import save_file
from torch import nn

from uta_cli.errors import BAD_CONFIG, UtaUsageError, bad_input
from uta_cli.io import atomic_write_json
from uta_cli.models import student as student_module
from uta_cli.models.student import UTAStudent
from uta_cli.models.teacher import CLIPTeacher, TeacherIdentity, file_fingerprint
from uta_cli.recipe import StudentConfig

CONFIG = "open_clip_config.json"
WEIGHTS = "open_clip_model.safetensors"
TRUNK_DIR = "timm_trunk"  # the local-dir layout's timm folder
EXPORT_METADATA = "uta_export.json"
# build_trunk's fixed arguments: the rest of timm's model_args are the recipe's timm_kwargs
_COMMON = {"img_size": "image_size", "patch_size": "patch_size", "embed_dim": "width",
           "depth": "depth", "num_heads": "heads", "mlp_ratio": "mlp_ratio",
           "drop_path_rate": "drop_path"}
_ALWAYS = ("num_classes", "global_pool")
_EVA_DEFAULTS = {"swiglu_mlp": True, "scale_mlp": True, "qkv_fused": False, "qkv_bias": True,
                 "use_rot_pos_emb": True, "use_abs_pos_emb": True}
# Registered timm architectures whose entrypoints set only arguments every UTA trunk overrides
# (patch_size, embed_dim, depth, num_heads, mlp_ratio), so `model_args` fully decides the model.
TIMM_ARCH = {"eva": "eva_giant_patch14_224", "vit": "vit_base_patch16_224"}


def repoint_command(folder: str) -> str:
    return f"uta repoint {folder}"


def is_open_clip_folder(path: str) -> bool:
    """An open_clip folder (config + weights) that is not a uta checkpoint."""
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))
            and not os.path.isfile(os.path.join(path, "meta.json")))


def read_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise UtaUsageError(f"Cannot read {path}: {e}") from None
    if not isinstance(cfg, dict) or "model_cfg" not in cfg:
        raise UtaUsageError(f"{path} is not an open_clip config (no model_cfg).")
    return cfg


def tower_name(cfg: dict) -> str:
    return str((cfg["model_cfg"].get("vision_cfg") or {}).get("timm_model_name") or "")


def local_tower_name(folder: str) -> str:
    return "local-dir:" + os.path.join(os.path.abspath(folder), TRUNK_DIR)


def check_location(folder: str) -> None:
    """A local-dir folder must name its own timm_trunk; a moved one names the old place."""
    name = tower_name(read_config(folder))
    if not name.startswith("local-dir:") or name == local_tower_name(folder):
        return
    old = name[len("local-dir:"):]
    parent = os.path.dirname(os.path.abspath(folder))
    if os.path.basename(os.path.abspath(folder)) == "open_clip" and \
            os.path.isfile(os.path.join(parent, "meta.json")):
        folder = parent  # a `uta convert` output: re-point the whole checkpoint
    raise UtaUsageError(
        f"The open_clip folder {folder} was moved: its image tower is still named by its old "
        f"path ({old}), which open_clip and timm resolve as an absolute path. Re-point it "
        f"once with: {repoint_command(folder)}")


def repoint(folder: str) -> list[str]:
    """Make a moved local-dir folder (or a `uta convert` output holding one in open_clip/)
    name itself again; returns what changed (empty when nothing had to)."""
    folder = os.path.abspath(folder)
    changes: list[str] = []
    converted = os.path.isfile(os.path.join(folder, "meta.json")) and \
        os.path.isfile(os.path.join(folder, "open_clip", CONFIG))
    oc = os.path.join(folder, "open_clip") if converted else folder
    if not os.path.isfile(os.path.join(oc, CONFIG)):
        raise UtaUsageError(f"{folder} is not an open_clip folder (no {CONFIG}) nor a "
                            f"`uta convert` output (meta.json + open_clip/).")
    cfg = read_config(oc)
    name = tower_name(cfg)
    if name.startswith("hf-hub:"):
        raise UtaUsageError(f"{oc} names its image tower {name}: a Hugging Face layout has no "
                            f"local path to re-point. Load it through the hub cache.")
    if not name.startswith("local-dir:"):
        raise UtaUsageError(f"{oc} is not a uta open_clip export: its image tower is "
                            f"{name or 'not a timm tower'}, not a local-dir: timm folder.")
    if not os.path.isfile(os.path.join(oc, TRUNK_DIR, "config.json")):
        raise UtaUsageError(f"{oc} has no {TRUNK_DIR}/config.json: the timm tower's config is "
                            f"missing, so there is nothing to point at. Export it again.")
    want = local_tower_name(oc)
    if name != want:
        cfg["model_cfg"]["vision_cfg"]["timm_model_name"] = want
        atomic_write_json(os.path.join(oc, CONFIG), cfg)
        changes.append(f"{CONFIG}: image tower {name} -> {want}")
    md_path = os.path.join(oc, EXPORT_METADATA)
    if os.path.isfile(md_path):
        with open(md_path, encoding="utf-8") as f:
            md = json.load(f)
        if md.get("open_clip_model") not in (None, "local-dir:" + oc):
            md["open_clip_model"] = "local-dir:" + oc
            atomic_write_json(md_path, md)
            changes.append(f"{EXPORT_METADATA}: open_clip_model -> local-dir:{oc}")
    if converted:  # the converted checkpoint's teacher is its own open_clip/ folder
        old_oc = os.path.dirname(name[len("local-dir:"):])
        renames = {name: want, "local-dir:" + old_oc: "local-dir:" + oc}
        meta_path = os.path.join(folder, "meta.json")
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        found: list[str] = []

        def swap(node, where: str):
            if isinstance(node, dict):
                return {k: swap(v, f"{where}.{k}" if where else k) for k, v in node.items()}
            if isinstance(node, list):
                return [swap(v, where) for v in node]
            if isinstance(node, str) and node in renames and renames[node] != node:
                found.append(f"meta.json: {where} {node} -> {renames[node]}")
                return renames[node]
            return node

        meta = swap(meta, "")
        if found:
            atomic_write_json(meta_path, meta)
            changes += found
    return changes


def capture_trunk_kwargs(cfg) -> tuple[str, dict]:
    """(family, the exact keyword arguments build_trunk passes to timm's Eva/VisionTransformer).

    Captured by intercepting the constructor rather than restated here, so the export cannot drift
    from how training builds the student.
    """
    captured: dict = {}

    class _Captured(Exception):
        pass

    def record(family: str):
        def ctor(**kwargs):
            captured.update(family=family, kwargs=kwargs)
            raise _Captured

        return ctor

    with mock.patch.object(student_module, "Eva", record("eva")), \
            mock.patch.object(student_module, "VisionTransformer", record("vit")):
        try:
            student_module.build_trunk(cfg)
        except _Captured:
            pass
    if not captured:
        raise RuntimeError("could not read the student's timm arguments from build_trunk")
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in captured["kwargs"].items()}
    try:
        json.dumps(kwargs)
    except TypeError as e:
        raise UtaUsageError(f"The student's timm_kwargs are not JSON-serialisable ({e}); the "
                            f"open-clip format must write them into a config file.") from None
    return captured["family"], kwargs


def student_config_from_timm(trunk_cfg: dict, where: str) -> StudentConfig:
    """The StudentConfig whose build_trunk gives exactly these timm model_args."""
    family = {v: k for k, v in TIMM_ARCH.items()}.get(trunk_cfg.get("architecture"))
    args = dict(trunk_cfg.get("model_args") or {})
    if family is None or not all(k in args for k in _COMMON):
        raise UtaUsageError(f"{where} is not a UTA student tower (architecture "
                            f"{trunk_cfg.get('architecture')!r}); only folders written by "
                            f"`uta export` or `uta convert` can be loaded as a student.")
    fields = {field: args[key] for key, field in _COMMON.items()}
    extra = {k: v for k, v in args.items() if k not in _COMMON and k not in _ALWAYS
             and not (family == "eva" and _EVA_DEFAULTS.get(k, object()) == v)}
    cfg = StudentConfig(family=family, timm_kwargs=extra, **fields)
    rebuilt = capture_trunk_kwargs(cfg)[1]
    for d in (rebuilt, args):
        d.pop("num_classes", None)
    if rebuilt != args:
        diff = sorted(k for k in set(rebuilt) | set(args) if rebuilt.get(k) != args.get(k))
        raise UtaUsageError(f"{where}: the timm tower's arguments do not rebuild as a UTA "
                            f"student (differ in {', '.join(diff)}).")
    return cfg


@contextlib.contextmanager
def _loadable(folder: str, trunk_dir: str) -> Iterator[str]:
    """A folder open_clip can load here: the folder itself (local-dir layout), or for the hub
    layout a temporary one whose config names the tower by its local path, weights linked."""
    if trunk_dir == os.path.join(folder, TRUNK_DIR):
        yield folder
        return
    tmp = tempfile.mkdtemp(prefix="uta-open-clip-")
    try:
        cfg = read_config(folder)
        cfg["model_cfg"]["vision_cfg"]["timm_model_name"] = "local-dir:" + trunk_dir
        with open(os.path.join(tmp, CONFIG), "w", encoding="utf-8") as f:
            json.dump(cfg, f)
        os.symlink(os.path.join(folder, WEIGHTS), os.path.join(tmp, WEIGHTS))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _trunk_dir(folder: str, cfg: dict) -> str:
    """Where the folder's timm tower config lives (refused unless it is a UTA student's)."""
    name = tower_name(cfg)
    if not os.path.isfile(os.path.join(folder, WEIGHTS)):
        raise UtaUsageError(f"{folder} holds no {WEIGHTS}: not a complete open_clip export.")
    if name.startswith("local-dir:"):
        check_location(folder)
        return name[len("local-dir:"):]
    if name.startswith("hf-hub:") and os.path.isfile(os.path.join(folder, "config.json")):
        return folder  # the hub layout: timm's config at the top of the repository
    raise UtaUsageError(f"{folder} is an open_clip folder whose image tower "
                        f"({name or 'native open_clip'}) is not a UTA student saved beside "
                        f"it; only folders written by `uta export` or `uta convert` load.")


def read_folder(folder: str) -> dict:
    """The checkpoint-like meta of an exported folder, checked without building a model."""
    folder = os.path.abspath(folder)
    cfg = read_config(folder)
    name = tower_name(cfg)
    with open(os.path.join(_trunk_dir(folder, cfg), "config.json"), encoding="utf-8") as f:
        student_cfg = student_config_from_timm(json.load(f), folder)
    embed_dim = int(cfg["model_cfg"].get("embed_dim", 0))
    pp = dict(cfg.get("preprocess_cfg") or {})
    size = pp.get("size", student_cfg.image_size)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    preprocess = {"size": size, "mean": [float(m) for m in pp.get("mean", [0.5] * 3)],
                  "std": [float(s) for s in pp.get("std", [0.5] * 3)],
                  "interpolation": str(pp.get("interpolation", "bicubic"))}
    identity = TeacherIdentity(
        model="local-dir:" + folder, weights="local-dir:" + folder,
        weights_fingerprint=file_fingerprint(os.path.join(folder, WEIGHTS)),
        embed_dim=embed_dim, image_size=size, mean=preprocess["mean"],
        std=preprocess["std"], interpolation=preprocess["interpolation"],
        model_cfg=cfg["model_cfg"])
    exported = {}
    md_path = os.path.join(folder, EXPORT_METADATA)
    if os.path.isfile(md_path):
        with open(md_path, encoding="utf-8") as f:
            exported = json.load(f)
    return {"format": "open-clip-folder", "task": "uta-alignment",
            "step": exported.get("checkpoint_step"),
            "student": dataclasses.asdict(student_cfg), "embed_dim": embed_dim,
            "student_preprocess": preprocess, "teacher": identity.to_dict(),
            "open_clip_folder": {"layout": "hf-hub" if name.startswith("hf-hub:") else
                                 "local-dir", "image_tower": name,
                                 "exported_from": exported.get("checkpoint_hash")},
            "checkpoint_dir": folder}


def load_folder(folder: str):
    """(UTAStudent, CLIPTeacher over the folder's CLIP, checkpoint-like meta). The student
    shares its modules with the CLIP's image tower, so nothing is held twice."""
    import open_clip

    folder = os.path.abspath(folder)
    meta = read_folder(folder)
    with _loadable(folder, _trunk_dir(folder, read_config(folder))) as path:
        try:
            clip = open_clip.create_model("local-dir:" + path)
        except BAD_CONFIG as e:  # open_clip and timm raise assorted types for bad folders
            raise UtaUsageError(f"open_clip cannot load {folder}: {type(e).__name__}: "
                                f"{bad_input(e)}") from None
    visual = clip.visual
    proj = getattr(getattr(visual, "head", None), "proj", None)
    if not isinstance(proj, torch.nn.Linear) or proj.bias is None:
        raise UtaUsageError(f"{folder}: the image tower has no linear projection with bias "
                            f"(timm_proj: linear, timm_proj_bias: true); not a UTA export.")
    if proj.out_features != meta["embed_dim"]:
        raise UtaUsageError(f"{folder}: the image tower projects to {proj.out_features} "
                            f"dimensions, its config's embed_dim is {meta['embed_dim']}.")
    with torch.device("meta"):  # the modules come from the loaded CLIP
        student = UTAStudent(StudentConfig(**meta["student"]), proj.out_features)
    student.trunk, student.head = visual.trunk, proj
    text = CLIPTeacher(clip, TeacherIdentity(**meta["teacher"]))  # tokenizer: the text_cfg
    return student.eval(), text, meta


# -- writing the local-dir layout (uta export, uta convert) ------------------------------------
def timm_trunk_config(student: nn.Module, metadata: dict) -> dict:
    """timm's local-dir config.json (its push_to_hf layout) for the student's trunk."""
    family, kwargs = capture_trunk_kwargs(student.cfg)
    kwargs["num_classes"] = 0  # the projection is open_clip's head.proj
    size = metadata["input_size"][1]
    return {
        "architecture": TIMM_ARCH[family],
        "num_classes": 0,
        "num_features": int(student.cfg.width),
        "model_args": kwargs,
        "pretrained_cfg": {
            "input_size": [3, size, size], "fixed_input_size": True,
            "interpolation": metadata["interpolation"], "crop_pct": 1.0, "crop_mode": "center",
            "mean": metadata["mean"], "std": metadata["std"], "num_classes": 0,
        },
    }


def open_clip_config(teacher_model_cfg: dict, metadata: dict, trunk_dir: str) -> dict:
    model_cfg = copy.deepcopy(teacher_model_cfg)
    model_cfg["vision_cfg"] = {
        "timm_model_name": "local-dir:" + os.path.abspath(trunk_dir),
        "timm_model_pretrained": False,
        "timm_pool": "token",  # the CLS token after the trunk's final norm
        "timm_proj": "linear",
        "timm_proj_bias": True,  # the student's head is nn.Linear with bias
        "image_size": metadata["input_size"][1],
    }
    size = metadata["input_size"][1]
    return {"model_cfg": model_cfg,
            "preprocess_cfg": {"size": size, "mean": metadata["mean"], "std": metadata["std"],
                               "interpolation": metadata["interpolation"],
                               "resize_mode": "shortest"}}


def open_clip_state_dict(student: nn.Module, clip: nn.Module) -> dict[str, torch.Tensor]:
    """Student as `visual` (trunk + head.proj), every other tensor from the teacher CLIP."""
    state = {k: v for k, v in clip.state_dict().items() if not k.startswith("visual.")}
    state.update({f"visual.trunk.{k}": v for k, v in student.trunk.state_dict().items()})
    state["visual.head.proj.weight"] = student.head.weight
    state["visual.head.proj.bias"] = student.head.bias
    return {k: v.detach().float().contiguous().cpu() if v.is_floating_point() else
            v.detach().contiguous().cpu() for k, v in state.items()}


def export_open_clip(student: nn.Module, teacher, folder: str, metadata: dict) -> str:
    """Write the folder with timm_model_name pointing at `folder` itself (the temp path during
    verification; `point_open_clip_at` re-points it before the rename)."""
    os.makedirs(folder)
    trunk_dir = os.path.join(folder, "timm_trunk")
    os.makedirs(trunk_dir)
    atomic_write_json(os.path.join(trunk_dir, "config.json"), timm_trunk_config(student, metadata))
    atomic_write_json(os.path.join(folder, "open_clip_config.json"),
                open_clip_config(teacher.identity.model_cfg, metadata, trunk_dir))
    save_file(open_clip_state_dict(student, teacher.clip),
              os.path.join(folder, "open_clip_model.safetensors"))
    return "open_clip timm tower"


def point_open_clip_at(folder: str, final: str) -> None:
    """Re-point vision_cfg.timm_model_name from the temp folder to the final one (absolute: timm
    resolves local-dir paths against the working directory)."""
    path = os.path.join(folder, "open_clip_config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["model_cfg"]["vision_cfg"]["timm_model_name"] = \
        "local-dir:" + os.path.join(os.path.abspath(final), "timm_trunk")
    atomic_write_json(path, cfg)


def load_open_clip(path: str) -> tuple[nn.Module, Callable]:
    """An exported folder as any open_clip user loads it: no plugin, just `local-dir:`."""
    import open_clip

    check_location(path)  # a moved folder: name the repair, not timm's missing-file error
    model, _, _ = open_clip.create_model_and_transforms("local-dir:" + path)
    return model.eval(), open_clip.get_tokenizer("local-dir:" + path)
