"""Experiment trackers through Accelerate's tracker classes (train.report_to).

metrics.jsonl is always written; each record also goes to every tracker named in the recipe:
training steps under train/, validation under val/, zero-shot under zeroshot/, the best value
under best/, at the record's step. The resolved recipe is logged once as hyper-parameters,
flattened to dotted keys with scalar values (what TensorBoard's hparams accept).
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import logging
import math
import os
from typing import Any

from uta_cli.errors import UtaUsageError

log = logging.getLogger(__name__)

# tracker -> the module it needs (and the extra of the same name that installs it)
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}
# metrics.jsonl event -> tracker namespace; records of other events (end, resume) are not sent
NAMESPACES = {None: "train", "val": "val", "zeroshot": "zeroshot", "best": "best",
              "eval": "eval"}


def requested(recipe: dict) -> list[str]:
    names = [n for n in (recipe.get("train", {}).get("report_to") or []) if n != "none"]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise UtaUsageError(f"train.report_to: unknown tracker(s) {', '.join(unknown)}; choose "
                            f"from {', '.join(TRACKERS)} or none.")
    return list(dict.fromkeys(names))


def check_installed(names: list[str]) -> None:
    missing = [n for n in names if importlib.util.find_spec(TRACKERS[n]) is None]
    if missing:
        extras = ",".join(missing)
        raise UtaUsageError(f"train.report_to names {', '.join(missing)}, which is not "
                            f"installed. Install the extra: pip install 'uta-cli[{extras}]', or "
                            f"remove it (--set train.report_to=[]).")


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 0.001}; lists and mappings as JSON text."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value) and \
                not name.endswith("timm_kwargs"):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif value is None:
            flat[name] = ""
        else:
            flat[name] = json.dumps(value)
    return flat


def scalars(record: dict) -> tuple[str | None, dict[str, float]]:
    """The namespace and the numeric values of one metrics.jsonl record."""
    event = record.get("event")
    if event not in NAMESPACES:
        return None, {}
    space = NAMESPACES[event]
    # A NaN metric is meaningless (top-5 of fewer than five classes): trackers get no point
    # for it rather than a NaN that plots as a gap or breaks their summaries.
    values = {f"{space}/{k}": float(v) for k, v in record.items()
              if k not in ("step", "event") and isinstance(v, (int, float))
              and not isinstance(v, bool) and math.isfinite(v)}
    return space, values


class Trackers:
    """Accelerate's trackers for one run, started with the run's hyper-parameters."""

    def __init__(self, names: list[str], run_dir: str, run_name: str, hparams: dict):
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        self.trackers = []
        for name in names:
            cls = LOGGER_TYPE_TO_CLASS[name]
            if name == "tensorboard":
                tracker = cls(run_name, os.path.join(run_dir, "tensorboard"))
            else:  # wandb; WANDB_MODE=offline keeps it on disk, in the run directory
                tracker = cls(run_name, dir=run_dir, name=os.path.basename(run_dir))
            tracker.start()
            tracker.store_init_configuration(hparams)
            self.trackers.append(tracker)
        atexit.register(self.finish)

    def log(self, record: dict) -> None:
        _, values = scalars(record)
        if not values:
            return
        for tracker in self.trackers:
            tracker.log(values, step=int(record.get("step", 0)))
            writer = getattr(tracker, "writer", None)
            if writer is not None:  # TensorBoard: on disk at once, readable while training
                writer.flush()

    def finish(self) -> None:
        for tracker in self.trackers:
            try:
                tracker.finish()
            except Exception as e:  # a tracker's shutdown must not hide the run's result
                log.warning("tracker %s did not finish cleanly: %s", tracker.name, e)
        self.trackers = []


def open_trackers(recipe: dict, run_dir: str) -> Trackers | None:
    names = requested(recipe)
    if not names:
        return None
    check_installed(names)
    return Trackers(names, run_dir, recipe.get("name") or "uta", flatten(recipe))
