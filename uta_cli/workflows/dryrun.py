"""What a recipe will do, checked without training: `uta recipes` and `--dry-run`.

The resolved recipe (every default filled) as YAML, ready to save and edit; the built-in
recipes with one line each; and for `uta pretrain/finetune --dry-run` a summary of data,
teacher, student and run directory in which every path is checked for reachability (nothing
is downloaded, no weights are loaded).
"""

# The uta_cli modules that need torch are imported inside the functions that use them, so that
# `uta recipes` (and `uta pretrain --help`) answer without importing torch (~1 s).

from __future__ import annotations

import importlib.resources
import json
import os

import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from uta_cli.errors import UtaUsageError
from uta_cli.recipe import Recipe, builtin_recipe_names, recipe_to_dict


def recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


def catalogue() -> list[tuple[str, str, str]]:
    """(name, task, first comment line) for every built-in recipe."""
    root = importlib.resources.files("uta_cli.recipes")
    rows = []
    for name in builtin_recipe_names():
        text = (root / f"{name}.yaml").read_text()
        comments = [line.lstrip("# ").rstrip() for line in text.splitlines()
                    if line.startswith("#")]
        task = (yaml.safe_load(text) or {}).get("task", "pretrain")
        rows.append((name, task, comments[0] if comments else ""))
    return rows


def _exists(url: str) -> bool:
    from uta_cli.io import url_to_fs

    try:
        fs, path = url_to_fs(url)
        return fs.exists(path)
    except (UtaUsageError, OSError):
        return False


def describe_data(source: str, fmt: str, key: str, recipe: Recipe) -> str:
    """What `source` holds, or UtaUsageError when it cannot be reached."""
    from uta_cli.data.pipeline import detect_format

    if source == "demo":
        return (f"generated demo images ({recipe.demo.train_images} train, "
                f"{recipe.demo.val_images} held out)")
    kind = detect_format(source, fmt)
    if kind == "tar":
        from uta_cli.data.shards import expand_shard_urls

        shards = expand_shard_urls(source)
        missing = [s for s in shards[:1] + shards[-1:] if not _exists(s)]
        if not shards or missing:
            raise UtaUsageError(f"{key} {source}: shard {missing[0] if missing else source} is "
                                f"not reachable.")
        return f"{len(shards)} tar shards ({shards[0]} ...)"
    if source.endswith((".csv", ".tsv", ".json", ".jsonl")):  # image-caption pairs
        if not _exists(source):
            raise UtaUsageError(f"{key} {source} is not reachable (no such file).")
        return f"image-caption pairs file {source}"
    from uta_cli.data.folders import index_image_folder

    index = index_image_folder(source)
    classes = f", {len(index.classes)} class folders" if index.classes else ", flat"
    return f"{len(index)} images{classes}"


def describe_teacher(recipe: Recipe) -> tuple[str, int | None]:
    """(what and where the teacher is, its embedding size when known without loading it)."""
    model, weights = recipe.teacher.model, recipe.teacher.weights
    if weights == "demo":
        from uta_cli.data.demo import demo_teacher_folder

        folder = demo_teacher_folder(recipe.demo)
        state = f"cached in {folder}" if os.path.isdir(folder) else \
            f"not cached yet: trained first ({recipe.demo.teacher_steps} steps), then cached"
        model, where = "local-dir:" + folder, state
        cfg_file = os.path.join(folder, "open_clip_config.json")
        embed = json.load(open(cfg_file))["model_cfg"]["embed_dim"] \
            if os.path.isfile(cfg_file) else None
        return f"demo CLIP, {where}", embed
    import open_clip

    from uta_cli.models.teacher import _missing_weights_error, _weights_file_in_dir

    folder = model[len("local-dir:"):] if model.startswith("local-dir:") else \
        weights if weights and os.path.isdir(weights) else None
    if folder is not None:
        cfg_file = os.path.join(folder, "open_clip_config.json")
        if not os.path.isfile(cfg_file) or _weights_file_in_dir(folder) is None:
            raise UtaUsageError(f"Teacher folder {folder} must hold open_clip_config.json and "
                                f"open_clip_model.safetensors (an open_clip 'local-dir:' folder).")
        with open(cfg_file) as f:
            embed = json.load(f).get("model_cfg", {}).get("embed_dim")
        return f"{model} (folder {folder})", embed
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise UtaUsageError(f"Unknown open_clip model '{model}' for teacher.model. Known CLIP "
                            f"models include ViT-B-16, ViT-L-14, EVA02-B-16, EVA02-L-14; or use "
                            f"'local-dir:/path'.")
    if not weights:
        raise _missing_weights_error(model)
    if os.path.isfile(weights):
        where = f"file {weights} ({os.path.getsize(weights) / 1e9:.2f} GB)"
    elif any(c in weights for c in "/\\:") or weights.endswith((".pt", ".bin", ".safetensors")):
        raise UtaUsageError(f"teacher.weights {weights} does not exist.")
    elif weights in open_clip.list_pretrained_tags_by_model(model):
        where = f"hub tag {weights} (downloaded on first use: needs network)"
    else:
        raise UtaUsageError(f"teacher.weights {weights!r} is neither a file nor a hub tag of "
                            f"{model} ({', '.join(open_clip.list_pretrained_tags_by_model(model))}"
                            f").")
    return f"{model}, {where}", cfg.get("embed_dim")


def describe_student(recipe: Recipe, embed_dim: int | None) -> str:
    s, m = recipe.student, recipe.mask
    grid = s.image_size // s.patch_size
    kept = grid * grid - round(m.ratio * grid * grid)
    text = (f"{s.family} {s.width}x{s.depth} ({s.heads} heads) p{s.patch_size} @ {s.image_size}"
            f"px: {grid}x{grid} patches, {kept} kept + CLS ({m.strategy}, ratio {m.ratio})")
    if embed_dim:
        import torch

        from uta_cli.models.student import UTAStudent

        with torch.device("meta"):
            n = sum(p.numel() for p in UTAStudent(s, int(embed_dim)).parameters())
        text += f"; {n / 1e6:.1f}M parameters with the head to {embed_dim}-d"
    if s.init:
        if not os.path.exists(s.init):
            raise UtaUsageError(f"student.init {s.init} does not exist.")
        text += f"; initialised from {s.init}"
    return text


def describe_run_dir(recipe: Recipe, output_dir: str, resume: str) -> str:
    from uta_cli import checkpoint as ckpt

    run_dir = output_dir or recipe.train.output_dir or os.path.join("runs", recipe.name)
    if resume == "never" or not os.path.isdir(run_dir):
        return f"{run_dir} (a fresh run)"
    if resume != "auto":
        folder = ckpt.resolve_checkpoint(resume)
        return f"{run_dir}, resuming from {folder} (step {ckpt.load_meta(folder).get('step')})"
    found = ckpt.latest_checkpoint(run_dir)
    if found is None:
        return f"{run_dir} (a fresh run)"
    return f"{run_dir}, resuming from {found} (step {ckpt.load_meta(found).get('step')})"


def dry_run(recipe: Recipe, output_dir: str = "", resume: str = "auto",
            console: Console | None = None) -> dict[str, str]:
    """Print the resolved recipe and what it would train on; raise on anything unreachable."""
    console = console or Console()
    rows = {"data": describe_data(recipe.data.source, recipe.data.format, "data.source", recipe)}
    if recipe.data.val_source:
        rows["validation"] = describe_data(recipe.data.val_source, "auto", "data.val_source",
                                           recipe)
    if recipe.task == "pretrain":
        rows["teacher"], embed_dim = describe_teacher(recipe)
        rows["student"] = describe_student(recipe, embed_dim)
    else:
        init = recipe.init
        if init and not init.startswith(("timm:", "open_clip:")) and not os.path.exists(init):
            raise UtaUsageError(f"init {init} does not exist.")
        rows["init"] = init or "random (the student section)"
    from uta_cli.train import tracking as tracking

    trackers = tracking.requested(recipe_to_dict(recipe))
    tracking.check_installed(trackers)
    rows["trackers"] = ", ".join(["metrics.jsonl", *trackers])
    s = recipe.schedule
    rows["schedule"] = (f"{s.steps} steps" if s.steps else f"{s.epochs} epochs") + \
        f", batch {recipe.data.batch_size} per process x {recipe.train.grad_accum} accumulation"
    rows["run directory"] = describe_run_dir(recipe, output_dir, resume)
    console.print(recipe_yaml(recipe), markup=False, highlight=False, soft_wrap=True)
    table = Table(title=f"dry run: {recipe.name} ({recipe.task})", show_header=False, box=None)
    for k, v in rows.items():
        table.add_row(k, escape(v))
    console.print(table)
    console.print("Everything above is reachable; nothing was trained.", highlight=False)
    return rows
