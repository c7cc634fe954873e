"""The files of a run directory that the engine writes and reads back: step-named checkpoints
(weights, training state, per-rank RNG, meta.json and a task's extra state), the best
checkpoint, config.yaml per start, and metrics.jsonl trimmed back to a resumed step.

All writes are atomic (a temp name, then a rename), so a run killed at any moment leaves the
previous complete checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from uta_cli import __version__
from uta_cli import checkpoint as ckpt
from uta_cli.io import atomic_path, atomic_write_json, atomic_write_text
from uta_cli.outputs import mirror_of
from uta_cli.train.setup import EngineConfig
from uta_cli.train.sharded_state import check_every_rank_sees, save_sharded
from uta_cli.train.sharding import full_state_dict, is_sharded


class RunFiles:
    """Checkpoints, config and metrics files of one run directory."""

    def __init__(self, cfg: EngineConfig, accelerator: Accelerator, run_dir: str):
        self.cfg = cfg
        self.acc = accelerator
        self.run_dir = run_dir
        self.ckpt_root = os.path.join(run_dir, "checkpoints")
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")

    # -- step-named checkpoints --------------------------------------------------------------------
    def save(self, task, model: nn.Module, optimizer, step: int, epoch: int) -> str:
        """Every rank writes its RNG state (and, sharded, its DCP shards of the weights and
        optimizer state); the main process the weights (a sharded model's gathered), the
        training state and meta.json; then the folder is committed under its step name."""
        acc = self.acc
        sharded = is_sharded(model)
        tmp = None
        if acc.is_main_process:
            os.makedirs(self.ckpt_root, exist_ok=True)
            tmp = ckpt.begin(self.ckpt_root, step)
        if acc.num_processes > 1:
            tmp = gather_object([tmp])[0]
            check_every_rank_sees(tmp, [], "writing the checkpoint")
        torch.save(ckpt.rng_state(), os.path.join(tmp, f"rng_rank{acc.process_index}.pt"))
        weights = None
        if sharded:  # each process's shards (DCP) and the whole weights, gathered to rank 0
            save_sharded(tmp, model, optimizer)
            weights = full_state_dict(model)
        extra_everywhere = sharded and getattr(task, "saves_on_every_rank", False)
        if extra_everywhere:
            task.save_extra(tmp)  # gathers its own sharded state; rank 0 writes
        final = ""
        if acc.is_main_process:
            ckpt.write_weights(tmp, weights if sharded else acc.unwrap_model(model).state_dict())
            state = {"step": step, "epoch": epoch, "world_size": acc.num_processes,
                     "batch_size": self.cfg.batch_size, "grad_accum": self.cfg.grad_accum,
                     "sharding": "fsdp" if sharded else "ddp"}
            if not sharded:  # (sharded: the optimizer state is in the DCP shards)
                state["optimizer"] = optimizer.state_dict()
            if acc.scaler is not None:
                state["grad_scaler"] = acc.scaler.state_dict()
            torch.save(state, os.path.join(tmp, "training_state.pt"))
            self.write_meta_and_extra(task, tmp, step, epoch, extra=not extra_everywhere)
        acc.wait_for_everyone()
        if acc.is_main_process:
            final = ckpt.commit(self.ckpt_root, tmp, step, self.cfg.keep_checkpoints)
        acc.wait_for_everyone()
        return final

    def write_meta_and_extra(self, task, folder: str, step: int, epoch: int,
                             extra: bool = True, **extra_meta: Any) -> None:
        meta = {"uta_version": __version__, "meta_schema": ckpt.META_SCHEMA, "step": step,
                "epoch": epoch, "task": task.name, "recipe": self.cfg.recipe,
                **task.checkpoint_meta(), **extra_meta}
        atomic_write_json(os.path.join(folder, "meta.json"), meta, final_newline=False)
        save_extra = getattr(task, "save_extra", None)
        if save_extra is not None and extra:
            save_extra(folder)

    def resume_source(self, resume: str) -> str | None:
        """The checkpoint `--resume` names: none, this run's newest, or a given one."""
        if resume == "never":
            return None
        if resume == "auto":
            return ckpt.latest_checkpoint(self.run_dir)
        return ckpt.resolve_checkpoint(resume)

    # -- the best checkpoint ---------------------------------------------------------------------
    @property
    def best_dir(self) -> str:
        return os.path.join(self.ckpt_root, "best")

    def load_best(self) -> dict | None:
        """The recorded best of this run directory (a resumed run keeps competing with it)."""
        for folder in (self.best_dir, self.best_dir + ".old"):  # .old: a swap cut short
            if os.path.isfile(os.path.join(folder, "meta.json")):
                best = ckpt.load_meta(folder).get("best")
                if best and best.get("metric") == self.cfg.best_metric:
                    return best
        return None

    def save_best(self, task, model: nn.Module, step: int, epoch: int, best: dict) -> None:
        """Weights, extra state and meta (no optimizer state: the best checkpoint is for
        evaluation and export, resuming uses the step-named ones), written by the main process.
        A sharded model is gathered first, so then every process calls this."""
        sharded = is_sharded(model)
        weights = full_state_dict(model) if sharded else None
        extra_everywhere = sharded and getattr(task, "saves_on_every_rank", False)
        staged = self.best_dir + ".extra"
        if extra_everywhere:  # the task's gathered state, staged beside the best folder
            if self.acc.is_main_process:
                shutil.rmtree(staged, ignore_errors=True)
                os.makedirs(staged)
            self.acc.wait_for_everyone()
            task.save_extra(staged)
        if not self.acc.is_main_process:
            return
        os.makedirs(self.ckpt_root, exist_ok=True)
        # Directories cannot be replaced in one rename: the old one is moved aside first, so
        # that some complete best checkpoint exists at every moment (load_best reads either).
        with atomic_path(self.best_dir, aside=self.best_dir + ".old") as tmp:
            if extra_everywhere:
                os.replace(staged, tmp)
            else:
                os.makedirs(tmp)
            ckpt.write_weights(tmp, weights if sharded else
                               self.acc.unwrap_model(model).state_dict())
            self.write_meta_and_extra(task, tmp, step, epoch, extra=not extra_everywhere,
                                      best=best)
        mirror = mirror_of(self.run_dir)
        if mirror is not None:  # a run directory at a URL
            mirror.push_best(self.best_dir)

    # -- config.yaml and metrics.jsonl -----------------------------------------------------------
    def write_config(self, resumed: bool, step: int) -> None:
        """The resolved recipe of each start: config.yaml for the first, config.<step>.yaml for
        every resume (so config.yaml always describes how the run began)."""
        if not (self.cfg.recipe and self.acc.is_main_process):
            return
        if not resumed:
            for name in os.listdir(self.run_dir):
                if name.startswith("config.") and name.endswith(".yaml") and name != "config.yaml":
                    os.remove(os.path.join(self.run_dir, name))
        text = yaml.safe_dump(self.cfg.recipe, sort_keys=False)
        first = os.path.join(self.run_dir, "config.yaml")
        if resumed:  # (a run started here from another directory's checkpoint has none yet)
            atomic_write_text(os.path.join(self.run_dir, f"config.{step}.yaml"), text)
        if not resumed or not os.path.isfile(first):
            atomic_write_text(first, text)

    def truncate_metrics(self, step: int) -> float | None:
        """After a resume, drop records that the interrupted run wrote past its checkpoint.
        Returns the training seconds recorded up to `step` (None off the main process)."""
        if not (self.acc.is_main_process and os.path.isfile(self.metrics_path)):
            return None
        with open(self.metrics_path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        kept = [r for r in records if r.get("step", 0) <= step and r.get("event") != "end"]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        return max([r["train_s"] for r in kept if "train_s" in r], default=0.0)
