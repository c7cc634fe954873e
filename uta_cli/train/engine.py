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
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from uta_cli import checkpoint as ckpt
from uta_cli.errors import (
    OutOfMemory,
    TrainingDiverged,
    TrainingInterrupted,
    UtaUsageError,
    is_out_of_memory,
)
from uta_cli.io import json_safe
from uta_cli.progress import StepProgress, metric_text
from uta_cli.train.data_wait import DataWaitWatch
from uta_cli.train.resume_guard import ResumeChanges, check_resume, flatten, parse_allow_changes
from uta_cli.train.run_files import RunFiles
from uta_cli.train.run_state import Run, Window, digest_u64, reduce_means, weights_digest
from uta_cli.train.setup import EngineConfig
from uta_cli.train.sharded_state import load_training_weights
from uta_cli.train.sharding import clip_grad_norm, is_sharded, micro_step
from uta_cli.train.tracking import open_trackers

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
    #   begin_step(step, total)  before each optimizer step; a returned record (with a console
    #       `message`) marks a phase starting there and is logged (the unmasked finish)
    #   save_extra(folder) / load_extra(folder)  state beside the weights (EMA weights), written
    #       into every checkpoint by the main process and read back on resume; by every process
    #       when the model is sharded and the task's `saves_on_every_rank` is true (it gathers)
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


class Engine:
    def __init__(self, cfg: EngineConfig, accelerator: Accelerator, run_dir: str):
        self.cfg = cfg
        self.acc = accelerator
        self.run_dir = run_dir
        self.files = RunFiles(cfg, accelerator, run_dir)
        self.ckpt_root = self.files.ckpt_root
        self.metrics_path = self.files.metrics_path
        self._stop_requested = False
        self.best: dict | None = None  # {"metric", "value", "step"} of checkpoints/best
        self.eval_note = ""  # the latest evaluate_at result, appended to the progress line
        self.trackers = None  # train.report_to (tensorboard, wandb, ...), main process only
        # Seconds spent in training steps (validation and checkpoint writing excluded), carried
        # over a resume; logged as train_s: the wall-clock axis for comparing runs.
        self.train_s = 0.0

    def log_metrics(self, record: dict) -> None:
        if self.acc.is_main_process:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(json_safe(record)) + "\n")
            if self.trackers is not None:
                self.trackers.log(record)

    def _on_sigterm(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self._stop_requested = True

    def close(self) -> None:
        """Finish the trackers (a wandb run is complete on disk only once finished). Workflows
        call it after their last record, which may come after fit (the demo's zero-shot)."""
        if self.trackers is not None:
            self.trackers.finish()
            self.trackers = None

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self, task: Task, resume: str = "auto", label: str = "train",
            allow_changes: Sequence[str] = ()) -> dict[str, Any]:
        """Train `task` to the end of its schedule. `allow_changes`: recipe keys that may differ
        from the checkpoint's on resume (resume_guard.SAFE_CHANGES)."""
        run = self._begin(task, resume, label, parse_allow_changes(list(allow_changes)))
        previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            if self.cfg.val_at_start and run.step == 0:
                self._validate(task, run.model, 0, run.steps_per_epoch, run.progress)
            while run.step < run.total:
                self._train_epoch(task, run)
        except Exception as e:
            if is_out_of_memory(e):
                raise self._out_of_memory(e, run.step, run.last_saved) from None
            raise
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
            run.progress.close()
        return self._end(task, run)

    def _train_epoch(self, task: Task, run: Run) -> None:
        """The optimizer steps of one epoch, from wherever the run stands in it."""
        # A DataLoader iterator draws its base seed from the global generator. A resumed run
        # creates one mid-epoch where an uninterrupted run did not, so keep that draw off the
        # global stream: dropout and drop path then continue identically.
        cpu_rng = torch.get_rng_state()
        batches: Iterator[dict] = iter(task.train_batches(
            run.epoch, (run.step - run.epoch * run.steps_per_epoch) * self.cfg.grad_accum))
        torch.set_rng_state(cpu_rng)
        end = min(run.total, (run.epoch + 1) * run.steps_per_epoch)
        while run.step < end:
            t_step = time.perf_counter()
            if not self._optimizer_step(task, run, batches):
                log.info("epoch %d ended early (skipped images); moving on", run.epoch)
                break
            self._after_optimizer_step(task, run, t_step)
        run.epoch += 1

    def _optimizer_step(self, task: Task, run: Run, batches: Iterator[dict]) -> bool:
        """Accumulate grad_accum micro-batches, clip, step. False if the epoch's data ran out."""
        cfg, acc, model, optimizer = self.cfg, self.acc, run.model, run.optimizer
        torch.manual_seed(step_seed(cfg.seed, acc.process_index, run.step))
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr_at(run.step, run.total, run.warmup, cfg.lr, cfg.min_lr) * \
                param_group.get("lr_scale", 1.0)
        phase = run.begin_step(run.step, run.total) if run.begin_step is not None else None
        if phase:  # a task's phase starts here (the unmasked finish): say so, and log it
            run.progress.print(phase.pop("message"))
            self.log_metrics(phase)
        for micro in range(cfg.grad_accum):
            t0 = time.perf_counter()
            batch = next(batches, None)
            run.window.data_wait += time.perf_counter() - t0
            if batch is None:
                optimizer.zero_grad(set_to_none=True)
                return False
            run.skipped += int(batch.get("num_skipped", 0))
            if "sample_id" in batch:
                run.window.samples += len(batch["sample_id"])
                run.sample_digest = (run.sample_digest + digest_u64(batch["sample_id"])) \
                    & ((1 << 63) - 1)
            last_micro = micro == cfg.grad_accum - 1
            with micro_step(model, acc, last_micro):
                out = task.training_step(model, batch)
                acc.backward(out["loss"] / cfg.grad_accum)
            run.nonfinite |= ~torch.isfinite(out["loss"].detach())
            for k, v in out.items():
                run.window.add(k, v)
        # The norm before clipping, logged beside the loss: spikes show here first.
        # inf = measure without clipping.
        norm = clip_grad_norm(model, acc, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if norm is not None:
            run.window.add("grad_norm", norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        run.step += 1
        if run.after_step is not None:
            run.after_step(acc.unwrap_model(model), run.step)
        return True

    def _after_optimizer_step(self, task: Task, run: Run, t_step: float) -> None:
        """Log, validate, evaluate and checkpoint on their cadences; stop on SIGTERM."""
        cfg, step, total = self.cfg, run.step, run.total
        stop = self._stop_requested
        if self.acc.num_processes > 1:
            flag = torch.tensor([float(stop)], device=self.acc.device)
            stop = bool(self.acc.reduce(flag, reduction="sum").item() > 0)
        is_log = step % cfg.log_every == 0 or step == total
        is_ckpt = (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0) \
            or step == total or stop
        if is_log or is_ckpt:
            self._check_finite(run.nonfinite, step, run.last_saved)
        if is_log:
            self._log_window(run, t_step)
        else:
            run.progress.update(step, "", log_line=False)
        self.train_s += time.perf_counter() - t_step
        if cfg.val_every > 0 and step % cfg.val_every == 0 and step < total:
            self._validate(task, run.model, step, run.steps_per_epoch, run.progress)
        if step < total:
            self._task_eval(task, run.model, step, run.steps_per_epoch, run.progress, False)
        if is_ckpt:
            self.files.save(task, run.model, run.optimizer, step, run.epoch)
            run.last_saved = step
        if stop:
            raise TrainingInterrupted(
                f"Stopped by SIGTERM at step {step}; checkpoint saved in "
                f"{self.ckpt_root}. Run the same command again to resume.")

    def _log_window(self, run: Run, t_step: float) -> None:
        """One metrics record and progress line for the window that ends at this step."""
        window = run.window
        elapsed = time.perf_counter() - window.started
        means = reduce_means(self.acc, window.sums, window.counts)
        wait = run.data_wait.window(window.data_wait, elapsed, run.step)  # the slowest process
        images = window.samples * self.acc.num_processes
        record = {"step": run.step, "epoch": round(run.step / run.steps_per_epoch, 4),
                  "lr": run.optimizer.param_groups[0]["lr"], **means,
                  "images_per_s": round(images / max(elapsed, 1e-9), 2),
                  "data_wait_frac": wait,
                  "skipped_images": run.skipped,
                  "train_s": round(self.train_s + time.perf_counter() - t_step, 3)}
        self.log_metrics(record)
        run.progress.update(run.step, f"loss {means.get('loss', float('nan')):.4f}  "
                            f"{_rate(record['images_per_s'])} img/s  data {wait:.0%}"
                            f"{self.eval_note}", log_line=True)
        warning = run.data_wait.warning(wait)
        if warning and self.acc.is_main_process:
            log.warning(warning)
        run.window = Window()

    # -- before and after the loop --------------------------------------------------------------
    def _begin(self, task: Task, resume: str, label: str, allow_changes) -> Run:
        """The schedule, the optimizer, the resumed state if any, the prepared model, trackers
        and the progress display: everything the loop starts from."""
        cfg, acc = self.cfg, self.acc
        steps_per_epoch, total, warmup = self._schedule(task)
        model = task.model
        # fused AdamW: one kernel for all parameters (7x faster than foreach on CPU, measured)
        optimizer = torch.optim.AdamW(task.param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                      betas=tuple(cfg.betas), eps=cfg.eps, fused=True)
        source = self.files.resume_source(resume)
        state, accepted, start_step = {}, None, 0
        if source is not None:
            state, accepted = self._load_resumed(task, source, model, optimizer,
                                                 steps_per_epoch, allow_changes)
            start_step = int(state["step"])
        self.files.write_config(source is not None, start_step)
        if not is_sharded(model):  # (a sharded model stays out of DDP: train/sharding.py)
            model, optimizer = acc.prepare(model, optimizer)
        if source is not None:
            self._restore_process_state(source, state, accepted, start_step, steps_per_epoch)
        elif acc.is_main_process and os.path.exists(self.metrics_path):
            os.remove(self.metrics_path)  # a fresh run starts a fresh log
        task.setup(acc)
        if source is not None and getattr(task, "load_extra", None) is not None:
            task.load_extra(source)
        if cfg.best_metric and acc.is_main_process:
            if source is not None:
                self.best = self.files.load_best()
            else:  # a fresh run competes with itself only, as it starts a fresh log
                shutil.rmtree(self.files.best_dir, ignore_errors=True)
        model.train()
        if acc.is_main_process:  # every record of metrics.jsonl also goes to train.report_to
            self.trackers = open_trackers(cfg.recipe, self.run_dir)
        quiet = logging.getLogger("uta_cli").getEffectiveLevel() > logging.WARNING  # -q
        progress = StepProgress(acc.is_main_process and not quiet, total, start_step, label)
        if source is not None:
            for line in [f"Resumed from {source} at step {start_step}.", *accepted.describe()]:
                progress.print(line)
        return Run(model=model, optimizer=optimizer, steps_per_epoch=steps_per_epoch,
                   total=total, warmup=warmup, source=source, step=start_step,
                   epoch=start_step // steps_per_epoch, progress=progress,
                   last_saved=start_step if source is not None else -1,
                   after_step=getattr(task, "after_optimizer_step", None),
                   begin_step=getattr(task, "begin_step", None),
                   nonfinite=torch.zeros((), device=acc.device, dtype=torch.bool),
                   data_wait=DataWaitWatch(acc.device, cfg.recipe))

    def _schedule(self, task: Task) -> tuple[int, int, int]:
        """(optimizer steps per epoch, total steps, warm-up steps) of this launch."""
        cfg = self.cfg
        steps_per_epoch = task.steps_per_epoch(self.acc.num_processes,
                                               cfg.batch_size * cfg.grad_accum)
        if steps_per_epoch < 1:
            raise UtaUsageError("The dataset is smaller than one global batch (batch_size x "
                                "processes x grad_accum). Lower data.batch_size or add images.")
        total = cfg.steps if cfg.steps > 0 else math.ceil(cfg.epochs * steps_per_epoch)
        if total < 1:
            raise UtaUsageError("Set schedule.steps or schedule.epochs to a positive value.")
        return steps_per_epoch, total, cfg.warmup_steps or round(cfg.warmup_epochs *
                                                                  steps_per_epoch)

    def _load_resumed(self, task: Task, source: str, model: nn.Module, optimizer,
                      steps_per_epoch: int, allow_changes) -> tuple[dict, ResumeChanges]:
        """Check the checkpoint against this run, then load its weights and optimizer state."""
        meta = ckpt.load_meta(source)
        if meta.get("task") != task.name:
            raise UtaUsageError(f"Cannot resume a '{task.name}' run from {source}, a "
                                f"'{meta.get('task')}' checkpoint. Use another --output-dir "
                                f"or --resume never.")
        state = ckpt.load_training_state(source)
        accepted = self._check_resume(task, source, meta, state, int(state["step"]),
                                      steps_per_epoch, allow_changes)
        try:  # whichever way the checkpoint and this run are distributed (ddp, fsdp)
            load_training_weights(model, optimizer, source, state)
        except RuntimeError as e:  # same task, another model (the recipe changed)
            first = str(e).strip().splitlines()
            raise UtaUsageError(
                f"Cannot resume from {source}: its weights do not fit this recipe's model "
                f"({first[1].strip() if len(first) > 1 else first[0][:200]}). Use another "
                f"--output-dir, or --resume never to start over.") from None
        return state, accepted

    def _restore_process_state(self, source: str, state: dict, accepted: ResumeChanges,
                               start_step: int, steps_per_epoch: int) -> None:
        """After prepare: the grad scaler, this rank's RNG, the metrics log cut back to the
        checkpoint, and a record of what the resume accepted."""
        acc = self.acc
        if acc.scaler is not None and "grad_scaler" in state:
            acc.scaler.load_state_dict(state["grad_scaler"])
        rng = ckpt.load_rng(source, acc.process_index)
        if rng is not None:
            ckpt.set_rng_state(rng)
        train_s = self.files.truncate_metrics(start_step)
        if train_s is not None:
            self.train_s = train_s
        if accepted.record():
            self.log_metrics({"event": "resume", "step": start_step,
                              "epoch": round(start_step / steps_per_epoch, 4),
                              "from": source, **accepted.record()})

    def _check_resume(self, task: Task, source: str, meta: dict, state: dict, step: int,
                      steps_per_epoch: int, allow_changes) -> ResumeChanges:
        """Refuse (exit 2) a resume whose recipe or launch differs from the checkpoint's,
        except for what --allow-changes names; see resume_guard."""
        cfg = self.cfg
        old_recipe = flatten(meta.get("recipe") or {})
        old_launch = {"world_size": int(state.get("world_size", self.acc.num_processes)),
                      "batch_size": int(state.get("batch_size", old_recipe.get(
                          "data.batch_size", cfg.batch_size))),
                      "grad_accum": int(state.get("grad_accum", old_recipe.get(
                          "train.grad_accum", cfg.grad_accum)))}
        new_launch = {"world_size": self.acc.num_processes, "batch_size": cfg.batch_size,
                      "grad_accum": cfg.grad_accum}
        problem = getattr(task, "world_change_problem", None)
        in_epoch = (step % steps_per_epoch) * cfg.grad_accum
        return check_resume(
            source=source, old_recipe=meta.get("recipe") or {}, new_recipe=cfg.recipe,
            old_teacher=meta.get("teacher"), new_teacher=task.checkpoint_meta().get("teacher"),
            old_launch=old_launch, new_launch=new_launch, allow=list(allow_changes),
            world_change_problem=problem(in_epoch) if problem is not None else "")

    def _end(self, task: Task, run: Run) -> dict[str, Any]:
        """The final validation and evaluation, and the end record with per-rank digests."""
        acc, step = self.acc, run.step
        try:
            val = self._validate(task, run.model, step, run.steps_per_epoch, run.progress)
        except Exception as e:
            if is_out_of_memory(e):
                raise self._out_of_memory(e, step, run.last_saved,
                                          "the final validation") from None
            raise
        self._task_eval(task, run.model, step, run.steps_per_epoch, run.progress, True)
        digests = gather_object([{"weights": weights_digest(acc.unwrap_model(run.model)),
                                  "samples_digest": run.sample_digest}])
        self.log_metrics({"event": "end", "step": step,
                          "epoch": round(step / run.steps_per_epoch, 4),
                          "rank_weights": [d["weights"] for d in digests],
                          "rank_samples_digest": [d["samples_digest"] for d in digests]})
        return {"step": step, "model": acc.unwrap_model(run.model), "val": val,
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
            shown = "  ".join(f"{k} {metric_text(v)}" for k, v in result.items()
                              if isinstance(v, float))
            self.eval_note = f"  {shown}"
            progress.print(f"{getattr(task, 'eval_event', 'eval')} at step {step}: {shown}")
        return result

    def _validate(self, task: Task, model: nn.Module, step: int, steps_per_epoch: int,
                  progress: StepProgress) -> dict[str, float]:
        result: dict[str, float] = {}
        sharded = is_sharded(model)  # its forwards are collectives: every process validates
        on_every_rank = getattr(task, "validates_on_every_rank", False) or sharded
        if on_every_rank or self.acc.is_main_process:
            result = task.validate(self.acc.unwrap_model(model))
        better = None  # the new best value, decided by the main process
        if self.acc.is_main_process:
            if result:
                self.log_metrics({"event": "val", "step": step,
                                  "epoch": round(step / steps_per_epoch, 4),
                                  "train_s": round(self.train_s, 3), **result})
                progress.print("validation: " + "  ".join(f"{k} {metric_text(v)}" for k, v in
                                                         result.items()))
            metric = self.cfg.best_metric
            if metric and metric in result:
                value = float(result[metric])
                best = self.best["value"] if self.best else None
                if best is None or (value > best if self.cfg.best_mode == "max" else value < best):
                    better = value
        if sharded and self.cfg.best_metric:
            better = gather_object([better])[0]  # rank 0's decision, on every process
        if better is not None and (sharded or self.acc.is_main_process):
            metric = self.cfg.best_metric
            self.best = {"metric": metric, "value": better, "step": step}
            self.files.save_best(task, model, step, step // steps_per_epoch, self.best)
            self.log_metrics({"event": "best", "step": step,
                              "epoch": step // steps_per_epoch, metric: better})
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
