"""What may differ between a checkpoint and the run that resumes from it.

A resumed run must be the run that was started: same recipe, same launch. `check_resume` compares
the resolved recipe and the launch (number of processes, batch, accumulation) with what the
checkpoint recorded, and the teacher by what it is rather than where it lies: its weights
(the whole-file SHA-256 where both sides have it, else the cheap fingerprint) and its
architecture (open_clip config, input size, weights layout), so moved weights still resume but
another architecture on the same file does not. Any difference is a usage error naming the keys,
unless the user allows it explicitly with `--allow-changes KEY[,KEY]`, which only the keys of
SAFE_CHANGES accept (they change how a run goes on, not what it has learned so far); `teacher`
accepts any change of the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from uta_cli.errors import UtaUsageError
from uta_cli.recipe import Recipe, recipe_to_dict

TEACHER = "teacher"  # --allow-changes teacher: another teacher (weights or architecture)
# The teacher's architecture as its identity records it, compared on resume.
TEACHER_ARCHITECTURE = ("model_cfg", "image_size", "weights_layout")
# Keys a user may change on resume with --allow-changes (a key ending in "." covers a section).
SAFE_CHANGES = ("name", "optim.lr", "optim.min_lr", "optim.weight_decay", "optim.grad_clip",
                "schedule.steps", "schedule.epochs", "schedule.warmup_steps",
                "schedule.warmup_epochs", "train.precision", "train.log_every",
                "train.checkpoint_every", "train.keep_checkpoints", "train.val_every",
                "train.report_to", "train.grad_checkpointing", "train.compile", "train.sharding",
                "data.num_workers", "data.decode", "data.val_source", "data.val_samples", "eval.",
                TEACHER)
# Keys added after runs were written whose default is not what those runs did: a checkpoint
# without the key is compared with this value instead of the default (so `--set
# data.shuffle_buffer=0` resumes a tar-shard run started before the sample shuffle existed).
ADDED_KEYS = {"data.shuffle_buffer": 0}
# Never compared: where the run is written; the teacher is compared by fingerprint instead.
_IGNORED = ("train.output_dir",)
_TEACHER_LOCATION = ("teacher.model", "teacher.weights")


@dataclass
class ResumeChanges:
    """What a resume accepted: {key: [old, new]} and the numbers of processes."""

    changes: dict[str, list[Any]] = field(default_factory=dict)
    world_size: tuple[int, int] = (1, 1)

    def record(self) -> dict:
        out: dict[str, Any] = {}
        if self.changes:
            out["changes"] = self.changes
        if self.world_size[0] != self.world_size[1]:
            out["world_size"] = list(self.world_size)
        return out

    def describe(self) -> list[str]:
        """Lines for the log: each accepted change, and how the epoch continues."""
        lines = [f"  changed on resume: {key} {was!r} -> {now!r}"
                 for key, (was, now) in self.changes.items()]
        if self.world_size[0] != self.world_size[1]:
            lines.append(f"  {self.world_size[0]} -> {self.world_size[1]} processes with the "
                         f"same global batch: the epoch's samples continue where they stopped.")
        elif {"data.batch_size", "train.grad_accum"} & set(self.changes):
            lines.append("  the same global batch: the epoch's samples continue where they "
                         "stopped.")
        return lines


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def parse_allow_changes(values: list[str] | tuple[str, ...] | str) -> list[str]:
    """--allow-changes a,b --allow-changes c -> [a, b, c]; unsafe keys are a usage error."""
    if isinstance(values, str):
        values = [values]
    keys = [k.strip() for v in values for k in v.split(",") if k.strip()]
    unsafe = [k for k in keys if not _is_safe(k)]
    if unsafe:
        raise UtaUsageError(f"--allow-changes cannot allow {', '.join(unsafe)}: changing it "
                            f"mid-run makes the resumed run a different run. Start a new run "
                            f"(--resume never, or another --output-dir). Keys that may change "
                            f"on resume: {', '.join(SAFE_CHANGES)} (a key ending in '.' is a "
                            f"whole section).")
    return keys


def _is_safe(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE_CHANGES) or \
        key.startswith(TEACHER + ".")  # every teacher key: --allow-changes teacher


def teacher_differences(old: dict, new: dict) -> dict[str, list[Any]] | None:
    """What differs between two recorded teachers, as {"teacher.<what>": [old, new]}; None
    where they cannot be compared by content (a checkpoint without a weights fingerprint): the
    recipe's teacher.model and teacher.weights are compared then.

    Weights: by the whole-file SHA-256 where both sides have it, else by the cheap fingerprint
    (checkpoints written before the SHA-256, compared as they always were). Architecture: the
    open_clip config (flattened, so the message names e.g. quick_gelu), the input size and the
    weights layout, each where the checkpoint recorded it."""
    fp_old, fp_new = old.get("weights_fingerprint"), new.get("weights_fingerprint")
    if not (fp_old and fp_new):
        return None
    diffs: dict[str, list[Any]] = {}
    sha_old, sha_new = old.get("weights_sha256"), new.get("weights_sha256")
    if sha_old and sha_new:
        if sha_old != sha_new:
            diffs["teacher.weights_sha256"] = [sha_old, sha_new]
    elif fp_old != fp_new:
        diffs["teacher.weights_fingerprint"] = [fp_old, fp_new]
    for key in TEACHER_ARCHITECTURE:
        if key not in old or key not in new or old[key] == new[key]:
            continue
        if isinstance(old[key], dict) and isinstance(new[key], dict):
            a, b = flatten(old[key]), flatten(new[key])
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    diffs[f"teacher.{key}.{k}"] = [a.get(k, "(unset)"), b.get(k, "(unset)")]
        else:
            diffs[f"teacher.{key}"] = [old[key], new[key]]
    return diffs


def _allowed(key: str, allow: list[str]) -> bool:
    return any(key == a or key.startswith(a if a.endswith(".") else a + ".") for a in allow)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_resume(*, source: str, old_recipe: dict, new_recipe: dict, old_teacher: dict | None,
                 new_teacher: dict | None, old_launch: dict, new_launch: dict,
                 allow: list[str], world_change_problem: str = "") -> ResumeChanges:
    """Raise UtaUsageError on any difference that is not allowed; return what was accepted.

    old_launch/new_launch: {"world_size", "batch_size", "grad_accum"}. Another number of
    processes, batch or accumulation is accepted when the global batch (batch x processes x
    accumulation) is kept and the data allows it (`world_change_problem` empty): each step then
    takes the same samples of the epoch. The data's problem refuses another data.num_workers
    too, even when allowed: on tar shards mid-epoch the workers deal the shards.
    """
    ignored = set(_IGNORED)
    diffs = teacher_differences(old_teacher or {}, new_teacher or {})
    if diffs is not None:
        ignored |= set(_TEACHER_LOCATION)  # the same weights may have moved
    else:
        diffs = {}
    old, new = flatten(old_recipe), flatten(new_recipe)
    # A key the checkpoint's recipe lacks was added since; that run used its default (the
    # variants' keys, e.g. align.*, default to what every run did before they existed), or
    # the value of ADDED_KEYS where the default is new behaviour.
    defaults = {**flatten(recipe_to_dict(Recipe())), **ADDED_KEYS} if old_recipe else {}
    for key in sorted(set(old) | set(new)):
        was = old.get(key, defaults.get(key, "(unset)"))
        if key not in ignored and was != new.get(key):
            diffs[key] = [was, new.get(key, "(unset)")]

    world = (int(old_launch["world_size"]), int(new_launch["world_size"]))
    problems: list[str] = []
    if "data.num_workers" in diffs and world_change_problem:
        problems.append(world_change_problem)
    launch = ("world_size", "batch_size", "grad_accum")
    if any(old_launch[k] != new_launch[k] for k in launch):
        g_old = old_launch["world_size"] * old_launch["batch_size"] * old_launch["grad_accum"]
        g_new = new_launch["world_size"] * new_launch["batch_size"] * new_launch["grad_accum"]
        if g_old != g_new:
            problems.append(
                f"the checkpoint ran on {world[0]} process(es) with a global batch of {g_old} "
                f"(data.batch_size {old_launch['batch_size']} x {world[0]} processes x "
                f"train.grad_accum {old_launch['grad_accum']}); this launch has {world[1]} "
                f"giving {g_new}. Keep the global batch: set data.batch_size and "
                f"train.grad_accum so that batch x {world[1]} x grad_accum = {g_old}")
        elif world_change_problem:
            problems.append(world_change_problem)
        else:  # the global batch is kept: each step still takes the next g samples of the epoch
            allow = [*allow, "data.batch_size", "train.grad_accum"]
    refused = {k: v for k, v in diffs.items() if not _allowed(k, allow)}
    if refused or problems:
        lines = [f"  {k}: {_short(v[0])} -> {_short(v[1])}" for k, v in refused.items()]
        lines += [f"  {p}" for p in dict.fromkeys(problems)]
        keys = list(dict.fromkeys(TEACHER if _allowed(k, [TEACHER]) else k
                                  for k in refused if _is_safe(k)))
        hint = (f" If the change is intended, allow it: --allow-changes {','.join(keys)}."
                if keys and len(keys) == len(refused) and not problems else "")
        raise UtaUsageError(
            f"Cannot resume from {source}: this launch differs from the one that wrote it, and a "
            f"resumed run would silently be a different run:\n" + "\n".join(lines) +
            f"\nStart a new run instead (--resume never in this directory, or another "
            f"--output-dir).{hint} Keys that may change on resume with --allow-changes: "
            f"{', '.join(SAFE_CHANGES)}.")
    return ResumeChanges(changes=diffs, world_size=world)
