"""The one training loop. It knows nothing of UTA: it runs any `Task` (alignment, contrastive,
classification) with Accelerate precision and distribution, gradient accumulation and clipping,
AdamW with a warm-up cosine schedule, metrics.jsonl, rich progress, atomic step-named checkpoints,
`--resume auto`, SIGTERM checkpointing and a non-finite loss guard.

Data is sharded by the task's loaders themselves (per rank, by sample index), never through
`accelerator.prepare`, and the schedule is driven here from the step count; dropout and drop
path are seeded per optimizer step from (seed, rank, step). So resuming at step s reproduces
exactly what an uninterrupted run would have done from step s. A resume that would silently
change the run (another recipe or launch) is refused unless allowed (resume_guard).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from uta_cli import __version__
from uta_cli import checkpoint as ckpt
from uta_cli.errors import (
    OutOfMemory,
    TrainingDiverged,
    TrainingInterrupted,
    UtaUsageError,
    is_out_of_memory,
)
from uta_cli.io import atomic_path, atomic_write_json, atomic_write_text
from uta_cli.outputs import mirror_of
from uta_cli.progress import StepProgress
from uta_cli.resume_guard import ResumeChanges, check_resume, flatten, parse_allow_changes
from uta_cli.run_setup import EngineConfig
from uta_cli.tracking import open_trackers

log = logging.getLogger(__name__)


class Task(Protocol):
    """What differs between trainers. The engine calls only these."""

    name: str
    model: nn.Module                          # the trainable module (prepared by Accelerate)

    def setup(self, accelerator: Accelerator) -> None: ...          # move frozen parts to device
    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]: ...
    def steps_per_epoch(self, world_size: int, batch_size: int) -> int: ...
    def train_batches(self, epoch: int, skip: int) -> Iterable[dict]: ...
    def training_step(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]: ...
    def validate(self, model: nn.Module) -> dict[str, float]: ...  # {} when there is nothing
    def checkpoint_meta(self) -> dict: ...

    # Optional, looked up with getattr (a task without them behaves as before):
    #   after_optimizer_step(model, step)  the unwrapped model after each optimizer step (EMA)
    #   save_extra(folder) / load_extra(folder)  state beside the weights (EMA weights), written
    #       into every checkpoint by the main process and read back on resume
    #   evaluate_at(model, step, final)  an evaluation on the task's own cadence (pre-training:
    #       zero-shot accuracy), called on every rank after each step and once at the end; a
    #       non-empty result is logged as event `task.eval_event` and shown on the progress line


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from `peak` down to `floor`."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of dropout and drop path for one optimizer step of one process: different on
    every rank (rows of different ranks get independent masks), and a pure function of the step
    (a resumed run, on any number of processes, draws what an uninterrupted one would)."""
    h = hashlib.blake2b(f"{seed}/{rank}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _digest_u64(values: torch.Tensor) -> int:
    """Order-independent digest of sample ids (sum of per-id hashes mod 2**63)."""
    ids = values.to(torch.int64).cpu()
    mixed = (ids * 0x9E3779B97F4A7C15) ^ (ids >> 17)
    return int(mixed.sum().item()) & ((1 << 63) - 1)


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Engine:
    def __init__(self, cfg: EngineConfig, accelerator: Accelerator, run_dir: str):
        self.cfg = cfg
        self.acc = accelerator
        self.run_dir = run_dir
        self.ckpt_root = os.path.join(run_dir, "checkpoints")
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        self._stop_requested = False
        self.best: dict | None = None  # {"metric", "value", "step"} of checkpoints/best
        self.eval_note = ""  # the latest evaluate_at result, appended to the progress line
        self.trackers = None  # train.report_to (tensorboard, wandb, ...), main process only
        # Seconds spent in training steps (validation and checkpoint writing excluded), carried
        # over a resume; logged as train_s: the wall-clock axis for comparing runs.
        self.train_s = 0.0

    # -- bookkeeping -----------------------------------------------------------------------------
    def log_metrics(self, record: dict) -> None:
        if self.acc.is_main_process:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.trackers is not None:
                self.trackers.log(record)

    def _truncate_metrics(self, step: int) -> None:
        """After a resume, drop records that the interrupted run wrote past its checkpoint."""
        if not (self.acc.is_main_process and os.path.isfile(self.metrics_path)):
            return
        with open(self.metrics_path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        kept = [r for r in records if r.get("step", 0) <= step and r.get("event") != "end"]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        self.train_s = max([r["train_s"] for r in kept if "train_s" in r], default=0.0)

    def _on_sigterm(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self._stop_requested = True

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self, task: Task, model: nn.Module, optimizer, step: int, epoch: int) -> str:
        acc = self.acc
        tmp = None
        if acc.is_main_process:
            os.makedirs(self.ckpt_root, exist_ok=True)
            tmp = ckpt.begin(self.ckpt_root, step)
        tmp = gather_object([tmp])[0] if acc.num_processes > 1 else tmp
        torch.save(ckpt.rng_state(), os.path.join(tmp, f"rng_rank{acc.process_index}.pt"))
        final = ""
        if acc.is_main_process:
            ckpt.write_weights(tmp, acc.unwrap_model(model).state_dict())
            state = {"step": step, "epoch": epoch, "optimizer": optimizer.state_dict(),
                     "world_size": acc.num_processes, "batch_size": self.cfg.batch_size,
                     "grad_accum": self.cfg.grad_accum}
            if acc.scaler is not None:
                state["grad_scaler"] = acc.scaler.state_dict()
            torch.save(state, os.path.join(tmp, "training_state.pt"))
            self._write_meta_and_extra(task, tmp, step, epoch)
        acc.wait_for_everyone()
        if acc.is_main_process:
            final = ckpt.commit(self.ckpt_root, tmp, step, self.cfg.keep_checkpoints)
        acc.wait_for_everyone()
        return final

    def _write_meta_and_extra(self, task: Task, folder: str, step: int, epoch: int,
                              **extra_meta: Any) -> None:
        meta = {"uta_version": __version__, "meta_schema": ckpt.META_SCHEMA, "step": step,
                "epoch": epoch, "task": task.name, "recipe": self.cfg.recipe,
                **task.checkpoint_meta(), **extra_meta}
        atomic_write_json(os.path.join(folder, "meta.json"), meta, final_newline=False)
        save_extra = getattr(task, "save_extra", None)
        if save_extra is not None:
            save_extra(folder)

    @property
    def best_dir(self) -> str:
        return os.path.join(self.ckpt_root, "best")

    def _load_best(self) -> dict | None:
        """The recorded best of this run directory (a resumed run keeps competing with it)."""
        for folder in (self.best_dir, self.best_dir + ".old"):  # .old: a swap cut short
            if os.path.isfile(os.path.join(folder, "meta.json")):
                best = ckpt.load_meta(folder).get("best")
                if best and best.get("metric") == self.cfg.best_metric:
                    return best
        return None

    def _save_best(self, task: Task, model: nn.Module, step: int, epoch: int,
                   value: float) -> None:
        """Main process only: weights, extra state and meta (no optimizer state: the best
        checkpoint is for evaluation and export, resuming uses the step-named ones)."""
        self.best = {"metric": self.cfg.best_metric, "value": value, "step": step}
        os.makedirs(self.ckpt_root, exist_ok=True)
        # Directories cannot be replaced in one rename: the old one is moved aside first, so
        # that some complete best checkpoint exists at every moment (_load_best reads either).
        with atomic_path(self.best_dir, aside=self.best_dir + ".old") as tmp:
            os.makedirs(tmp)
            ckpt.write_weights(tmp, self.acc.unwrap_model(model).state_dict())
            self._write_meta_and_extra(task, tmp, step, epoch, best=self.best)

        mirror = mirror_of(self.run_dir)
        if mirror is not None:  # a run directory at a URL
            mirror.push_best(self.best_dir)
        self.log_metrics({"event": "best", "step": step, "epoch": epoch,
                          self.cfg.best_metric: value})

    def _resume_from(self, resume: str) -> str | None:
        if resume == "never":
            return None
        if resume == "auto":
            return ckpt.latest_checkpoint(self.run_dir)
        return ckpt.resolve_checkpoint(resume)

    # -- the loop --------------------------------------------------------------------------------
    def _check_resume(self, task: Task, source: str, meta: dict, state: dict, step: int,
                      steps_per_epoch: int, allow_changes) -> ResumeChanges:
        """Refuse (exit 2) a resume whose recipe or launch differs from the checkpoint's,
        except for what --allow-changes names; see resume_guard."""
        cfg = self.cfg
        old_recipe = meta.get("recipe") or {}
        old_world = int(state.get("world_size", self.acc.num_processes))
        old_launch = {"world_size": old_world,
                      "batch_size": int(state.get("batch_size", flatten(old_recipe).get(
                          "data.batch_size", cfg.batch_size))),
                      "grad_accum": int(state.get("grad_accum", flatten(old_recipe).get(
                          "train.grad_accum", cfg.grad_accum)))}
        new_launch = {"world_size": self.acc.num_processes, "batch_size": cfg.batch_size,
                      "grad_accum": cfg.grad_accum}
        problem = getattr(task, "world_change_problem", None)
        in_epoch = (step % steps_per_epoch) * cfg.grad_accum
        return check_resume(
            source=source, old_recipe=old_recipe, new_recipe=cfg.recipe,
            old_teacher=meta.get("teacher"), new_teacher=task.checkpoint_meta().get("teacher"),
            old_launch=old_launch, new_launch=new_launch,
            allow=list(allow_changes),
            world_change_problem=problem(in_epoch) if problem is not None else "")

    def _write_config(self, resumed: bool, step: int) -> None:
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

    def close(self) -> None:
        """Finish the trackers (a wandb run is complete on disk only once finished). Workflows
        call it after their last record, which may come after fit (the demo's zero-shot)."""
        if self.trackers is not None:
            self.trackers.finish()
            self.trackers = None

    def fit(self, task: Task, resume: str = "auto", label: str = "train",
            allow_changes: Sequence[str] = ()) -> dict[str, Any]:
        """Train `task` to the end of its schedule. `allow_changes`: recipe keys that may differ
        from the checkpoint's on resume (resume_guard.SAFE_CHANGES)."""
        cfg, acc = self.cfg, self.acc
        allow_changes = parse_allow_changes(list(allow_changes))
        world = acc.num_processes
        steps_per_epoch = task.steps_per_epoch(world, cfg.batch_size * cfg.grad_accum)
        if steps_per_epoch < 1:
            raise UtaUsageError("The dataset is smaller than one global batch (batch_size x "
                                "processes x grad_accum). Lower data.batch_size or add images.")
        total = cfg.steps if cfg.steps > 0 else math.ceil(cfg.epochs * steps_per_epoch)
        if total < 1:
            raise UtaUsageError("Set schedule.steps or schedule.epochs to a positive value.")
        warmup = cfg.warmup_steps or round(cfg.warmup_epochs * steps_per_epoch)

        model = task.model
        # fused AdamW: one kernel for all parameters (7x faster than foreach on CPU, measured)
        optimizer = torch.optim.AdamW(task.param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                      betas=tuple(cfg.betas), eps=cfg.eps, fused=True)
        start_step = 0
        source = self._resume_from(resume)
        if source is not None:
            meta = ckpt.load_meta(source)
            if meta.get("task") != task.name:
                raise UtaUsageError(f"Cannot resume a '{task.name}' run from {source}, a "
                                    f"'{meta.get('task')}' checkpoint. Use another --output-dir "
                                    f"or --resume never.")
            state = ckpt.load_training_state(source)
            accepted = self._check_resume(task, source, meta, state, int(state["step"]),
                                          steps_per_epoch, allow_changes)
            try:
                model.load_state_dict(ckpt.load_weights(source))
            except RuntimeError as e:  # same task, another model (the recipe changed)
                first = str(e).strip().splitlines()
                raise UtaUsageError(
                    f"Cannot resume from {source}: its weights do not fit this recipe's model "
                    f"({first[1].strip() if len(first) > 1 else first[0][:200]}). Use another "
                    f"--output-dir, or --resume never to start over.") from None
            optimizer.load_state_dict(state["optimizer"])
            start_step = int(state["step"])
        self._write_config(source is not None, start_step)
        model, optimizer = acc.prepare(model, optimizer)
        if source is not None:
            if acc.scaler is not None and "grad_scaler" in state:
                acc.scaler.load_state_dict(state["grad_scaler"])
            rng = ckpt.load_rng(source, acc.process_index)
            if rng is not None:
                ckpt.set_rng_state(rng)
            self._truncate_metrics(start_step)
            if accepted.record():
                self.log_metrics({"event": "resume", "step": start_step,
                                  "epoch": round(start_step / steps_per_epoch, 4),
                                  "from": source, **accepted.record()})
        elif acc.is_main_process and os.path.exists(self.metrics_path):
            os.remove(self.metrics_path)  # a fresh run starts a fresh log
        task.setup(acc)
        if source is not None and getattr(task, "load_extra", None) is not None:
            task.load_extra(source)
        if cfg.best_metric and acc.is_main_process:
            if source is not None:
                self.best = self._load_best()
            else:  # a fresh run competes with itself only, as it starts a fresh log
                shutil.rmtree(self.best_dir, ignore_errors=True)
        model.train()
        if acc.is_main_process:  # every record of metrics.jsonl also goes to train.report_to

            self.trackers = open_trackers(cfg.recipe, self.run_dir)

        quiet = logging.getLogger("uta_cli").getEffectiveLevel() > logging.WARNING  # -q
        progress = StepProgress(acc.is_main_process and not quiet, total, start_step, label)
        if source is not None:
            progress.print(f"Resumed from {source} at step {start_step}.")
            for key, (was, now) in accepted.changes.items():
                progress.print(f"  changed on resume: {key} {was!r} -> {now!r}")
            if accepted.world_size[0] != accepted.world_size[1]:
                progress.print(f"  {accepted.world_size[0]} -> {accepted.world_size[1]} "
                               f"processes with the same global batch: the epoch's samples "
                               f"continue where they stopped.")
            elif {"data.batch_size", "train.grad_accum"} & set(accepted.changes):
                progress.print("  the same global batch: the epoch's samples continue where "
                               "they stopped.")
        previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        step = start_step
        epoch = step // steps_per_epoch
        nonfinite = torch.zeros((), device=acc.device, dtype=torch.bool)
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}  # micro-steps that reported each metric
        samples = 0
        skipped = 0
        sample_digest = 0
        data_wait = 0.0
        t_window = time.perf_counter()
        last_saved = start_step if source is not None else -1
        after_step = getattr(task, "after_optimizer_step", None)
        try:
            if cfg.val_at_start and start_step == 0:
                self._validate(task, model, 0, steps_per_epoch, progress)
            while step < total:
                # A DataLoader iterator draws its base seed from the global generator. A resumed
                # run creates one mid-epoch where an uninterrupted run did not, so keep that draw
                # off the global stream: dropout and drop path then continue identically.
                cpu_rng = torch.get_rng_state()
                batches: Iterator[dict] = iter(task.train_batches(
                    epoch, (step - epoch * steps_per_epoch) * cfg.grad_accum))
                torch.set_rng_state(cpu_rng)
                exhausted = False
                while step < total and step < (epoch + 1) * steps_per_epoch:
                    t_step = time.perf_counter()
                    torch.manual_seed(step_seed(cfg.seed, acc.process_index, step))
                    for param_group in optimizer.param_groups:
                        param_group["lr"] = lr_at(step, total, warmup, cfg.lr, cfg.min_lr) * \
                            param_group.get("lr_scale", 1.0)
                    for micro in range(cfg.grad_accum):
                        t0 = time.perf_counter()
                        batch = next(batches, None)
                        data_wait += time.perf_counter() - t0
                        if batch is None:
                            exhausted = True
                            break
                        skipped += int(batch.get("num_skipped", 0))
                        if "sample_id" in batch:
                            samples += len(batch["sample_id"])
                            sample_digest = (sample_digest + _digest_u64(batch["sample_id"])) \
                                & ((1 << 63) - 1)
                        last_micro = micro == cfg.grad_accum - 1
                        with acc.no_sync(model) if not last_micro else contextlib.nullcontext():
                            out = task.training_step(model, batch)
                            acc.backward(out["loss"] / cfg.grad_accum)
                        nonfinite |= ~torch.isfinite(out["loss"].detach())
                        for k, v in out.items():
                            sums[k] = sums.get(k, 0.0) + v.detach().float()
                            counts[k] = counts.get(k, 0) + 1
                    if exhausted:
                        optimizer.zero_grad(set_to_none=True)
                        break
                    # The norm before clipping, logged beside the loss: spikes show here
                    # first. inf = measure without clipping.
                    norm = acc.clip_grad_norm_(model.parameters(),
                                               cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                    if norm is not None:
                        sums["grad_norm"] = sums.get("grad_norm", 0.0) + norm.detach().float()
                        counts["grad_norm"] = counts.get("grad_norm", 0) + 1
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    if after_step is not None:
                        after_step(acc.unwrap_model(model), step)

                    stop = self._stop_requested
                    if world > 1:
                        flag = torch.tensor([float(stop)], device=acc.device)
                        stop = bool(acc.reduce(flag, reduction="sum").item() > 0)
                    is_log = step % cfg.log_every == 0 or step == total
                    is_ckpt = (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0) \
                        or step == total or stop
                    if is_log or is_ckpt:
                        self._check_finite(nonfinite, step, last_saved)
                    if is_log:
                        elapsed = time.perf_counter() - t_window
                        means = self._reduce_means(sums, counts)
                        images = samples * world
                        record = {"step": step, "epoch": round(step / steps_per_epoch, 4),
                                  "lr": optimizer.param_groups[0]["lr"], **means,
                                  "images_per_s": round(images / max(elapsed, 1e-9), 2),
                                  "data_wait_frac": round(data_wait / max(elapsed, 1e-9), 4),
                                  "skipped_images": skipped,
                                  "train_s": round(self.train_s + time.perf_counter() - t_step, 3)}
                        self.log_metrics(record)
                        progress.update(step, f"loss {means.get('loss', float('nan')):.4f}  "
                                        f"{_rate(record['images_per_s'])} img/s"
                                        f"{self.eval_note}", log_line=True)
                        sums, counts, samples, data_wait = {}, {}, 0, 0.0
                        t_window = time.perf_counter()
                    else:
                        progress.update(step, "", log_line=False)
                    self.train_s += time.perf_counter() - t_step
                    if cfg.val_every > 0 and step % cfg.val_every == 0 and step < total:
                        self._validate(task, model, step, steps_per_epoch, progress)
                    if step < total:
                        self._task_eval(task, model, step, steps_per_epoch, progress, False)
                    if is_ckpt:
                        self.save(task, model, optimizer, step, epoch)
                        last_saved = step
                    if stop:
                        raise TrainingInterrupted(
                            f"Stopped by SIGTERM at step {step}; checkpoint saved in "
                            f"{self.ckpt_root}. Run the same command again to resume.")
                if exhausted and step < (epoch + 1) * steps_per_epoch:
                    log.info("epoch %d ended early (skipped images); moving on", epoch)
                epoch += 1
        except Exception as e:
            if is_out_of_memory(e):
                raise self._out_of_memory(e, step, last_saved) from None
            raise
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
            progress.close()

        try:
            val = self._validate(task, model, step, steps_per_epoch, progress)
        except Exception as e:
            if is_out_of_memory(e):
                raise self._out_of_memory(e, step, last_saved, "the final validation") from None
            raise
        self._task_eval(task, model, step, steps_per_epoch, progress, True)
        digests = gather_object([{"weights": weights_digest(acc.unwrap_model(model)),
                                  "samples_digest": sample_digest}])
        self.log_metrics({"event": "end", "step": step, "epoch": round(step / steps_per_epoch, 4),
                          "rank_weights": [d["weights"] for d in digests],
                          "rank_samples_digest": [d["samples_digest"] for d in digests]})
        return {"step": step, "model": acc.unwrap_model(model), "val": val,
                "checkpoint": ckpt.latest_checkpoint(self.run_dir), "best": self.best}

    def _task_eval(self, task: Task, model: nn.Module, step: int, steps_per_epoch: int,
                   progress: StepProgress, final: bool) -> dict:
        evaluate = getattr(task, "evaluate_at", None)
        if evaluate is None:
            return {}
        result = evaluate(self.acc.unwrap_model(model), step, final)
        if result and self.acc.is_main_process:
            self.log_metrics({"event": getattr(task, "eval_event", "eval"), "step": step,
                              "epoch": round(step / steps_per_epoch, 4),
                              "train_s": round(self.train_s, 3), **result})
            shown = "  ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float))
            self.eval_note = f"  {shown}"
            progress.print(f"{getattr(task, 'eval_event', 'eval')} at step {step}: {shown}")
        return result

    def _validate(self, task: Task, model: nn.Module, step: int, steps_per_epoch: int,
                  progress: StepProgress) -> dict[str, float]:
        result: dict[str, float] = {}
        on_every_rank = getattr(task, "validates_on_every_rank", False)
        if on_every_rank or self.acc.is_main_process:
            result = task.validate(self.acc.unwrap_model(model))
        if self.acc.is_main_process:
            if result:
                self.log_metrics({"event": "val", "step": step,
                                  "epoch": round(step / steps_per_epoch, 4),
                                  "train_s": round(self.train_s, 3), **result})
                progress.print("validation: " + "  ".join(f"{k} {v:.4f}" for k, v in
                                                         result.items()))
            metric = self.cfg.best_metric
            if metric and metric in result:
                value = float(result[metric])
                best = self.best["value"] if self.best else None
                if best is None or (value > best if self.cfg.best_mode == "max" else value < best):
                    self._save_best(task, model, step, step // steps_per_epoch, value)
        self.acc.wait_for_everyone()
        return result

    def _out_of_memory(self, error: BaseException, step: int, last_saved: int,
                       where: str = "") -> OutOfMemory:
        cfg = self.cfg
        kind = "GPU" if type(error).__name__ == "OutOfMemoryError" and \
            torch.cuda.is_available() else "host"
        kept = (f"The last good checkpoint (step {last_saved}) is intact in {self.ckpt_root}."
                if last_saved >= 0 else "No checkpoint was written.")
        smaller = max(1, cfg.batch_size // 2)
        return OutOfMemory(
            f"Out of {kind} memory in {where or f'training step {step + 1}'} with "
            f"data.batch_size={cfg.batch_size} per process and train.grad_accum="
            f"{cfg.grad_accum}. {kept} Lower the batch and raise the accumulation to keep the "
            f"same global batch (--set data.batch_size={smaller} --set train.grad_accum="
            f"{cfg.grad_accum * max(1, cfg.batch_size // smaller)}), then run the same command "
            f"to resume.")

    def _reduce_means(self, sums: dict[str, torch.Tensor], counts: dict[str, int]
                      ) -> dict[str, float]:
        """Means over all processes' micro-steps. Every process reduces the same keys (the union
        of what any process logged), so one whose window held only unreadable images (and so
        reported only `loss`) cannot leave the others in mismatched all-reduces."""
        keys = sorted(sums)
        if self.acc.num_processes > 1:
            keys = sorted(set().union(*gather_object([keys])))
        if not keys:
            return {}
        zero = torch.zeros((), device=self.acc.device)
        vec = torch.stack([sums.get(k, zero).float().reshape(()) for k in keys] +
                          [torch.tensor(float(counts.get(k, 0)), device=self.acc.device)
                           for k in keys])
        if self.acc.num_processes > 1:
            vec = self.acc.reduce(vec, reduction="sum")
        vec = vec.double().cpu()
        n = len(keys)
        return {k: float(vec[i] / vec[n + i]) for i, k in enumerate(keys) if vec[n + i] > 0}

    def _check_finite(self, nonfinite: torch.Tensor, step: int, last_saved: int) -> None:
        flag = nonfinite.float().reshape(1)
        if self.acc.num_processes > 1:
            flag = self.acc.reduce(flag, reduction="sum")
        if flag.item() > 0:
            where = (f"The last good checkpoint (step {last_saved}) is intact in "
                     f"{self.ckpt_root}." if last_saved >= 0 else "No checkpoint was written.")
            raise TrainingDiverged(
                f"The loss became NaN or infinite at or before step {step}. {where} Lower "
                f"optim.lr, raise optim.warmup, or use train.precision=bf16 instead of fp16, "
                f"then resume with the same command plus --allow-changes naming what you "
                f"changed (e.g. --allow-changes optim.lr).")


def _rate(per_s: float) -> str:
    """Whole numbers, but two significant digits below 10 (a big model on a CPU: 0.21)."""
    return f"{per_s:.0f}" if per_s >= 10 else f"{per_s:.2g}"
