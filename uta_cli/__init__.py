"""uta: Unmasked Token Alignment as a command-line toolkit and an importable core.

The Python API, for notebooks and scripts (docs/python-api.md):

    model = uta_cli.load_model("runs/demo")        # any checkpoint `uta zeroshot --ckpt` takes
    model.encode_image(...), model.encode_text(...), model.preprocess, model.tokenizer
    recipe = uta_cli.load_recipe("demo", ["schedule.steps=100"])
    uta_cli.pretrain(recipe), uta_cli.finetune(recipe), uta_cli.zeroshot(ZeroShotOptions(...)),
    uta_cli.export_model(ExportOptions(...)), uta_cli.convert_release(path, output)

Each name is imported on first use (a module-level __getattr__), so `import uta_cli` and
`uta --help` load neither torch nor open_clip. The package's modules live in its wings
(workflows, tasks, train, evaluate, export, loading, data, models, masks): docs/layers.md.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> (module, attribute). The workflows' functions are named so that none shadows a wing
# (uta_cli.export is the export wing; the function is export_model).
_API = {
    "load_model": ("uta_cli.loading.clip_model", "load_clip_model"),
    "UTAModel": ("uta_cli.loading.clip_model", "UTAModel"),
    "load_recipe": ("uta_cli.recipe", "load_recipe"),
    "pretrain": ("uta_cli.workflows.pretrain", "run_pretrain"),
    "finetune": ("uta_cli.workflows.finetune", "run_finetune"),
    "zeroshot": ("uta_cli.workflows.zeroshot", "run_zeroshot"),
    "ZeroShotOptions": ("uta_cli.workflows.zeroshot", "ZeroShotOptions"),
    "export_model": ("uta_cli.workflows.export", "export_checkpoint"),
    "ExportOptions": ("uta_cli.workflows.export", "ExportOptions"),
    "convert_release": ("uta_cli.workflows.convert", "convert_release"),
    "inspect_masks": ("uta_cli.workflows.inspect_mask", "inspect_masks"),
    "dry_run": ("uta_cli.workflows.dryrun", "dry_run"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'uta_cli' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
