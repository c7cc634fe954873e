"""The UTA task: align the student's visible tokens (and CLS) with the frozen teacher's tokens."""

from __future__ import annotations

import dataclasses

import torch
from accelerate import Accelerator
from torch import nn

from uta_cli.data import Source, View, normalize
from uta_cli.losses import gather_targets, token_alignment_loss
from uta_cli.models.student import UTAStudent
from uta_cli.models.teacher import CLIPTeacher
from uta_cli.recipe import Recipe
from uta_cli.tasks.common import decay_groups


def use_compile(setting: str | bool, device: torch.device) -> bool:
    """train.compile resolved for this device: "auto" compiles on CUDA only."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def alignment_loss(pred: torch.Tensor, teacher_tokens: torch.Tensor,
                   keep_idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """The student's tokens against the teacher's at the same (visible) positions."""
    return token_alignment_loss(pred, gather_targets(teacher_tokens, keep_idx))


class AlignmentTask:
    name = "uta-alignment"

    def __init__(self, recipe: Recipe, student: UTAStudent, teacher: CLIPTeacher, source: Source,
                 val_source: Source | None, views: dict[str, View], grid_note: str):
        self.recipe = recipe
        self.model = student
        self.teacher = teacher
        self.source = source
        self.val_source = val_source
        self.views = views  # "student" and "teacher": one crop, two normalisations
        self.grid_note = grid_note
        self.device = torch.device("cpu")
        self.accelerator: Accelerator | None = None
        self.compiled = False  # train.compile, resolved in setup
        self._teacher_tokens = self._alignment_loss = None

    def setup(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.device = accelerator.device
        self.teacher.to(accelerator.device, self.recipe.train.precision)
        self.compiled = use_compile(self.recipe.train.compile, self.device)
        if self.compiled:
            # In place: the module's call is compiled, its state-dict keys stay as they are (no
            # `_orig_mod.`), so checkpoints, resume and export do not know about it. Validation
            # calls `forward` directly and stays eager (other batch sizes, no grad: no recompiles).
            self.model.compile(dynamic=False)
            self._teacher_tokens = torch.compile(self.teacher.tokens, dynamic=False)
            self._alignment_loss = torch.compile(alignment_loss, dynamic=False)

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        return decay_groups(model, weight_decay)

    def steps_per_epoch(self, world_size: int, global_micro_batch: int) -> int:
        return self.source.steps_per_epoch(world_size, global_micro_batch)

    def world_change_problem(self, skip: int) -> str:
        """Why this run cannot continue mid-epoch with another number of processes or batch
        size ("" if it can): tar shards are dealt to processes (and loader workers) whole, and
        workers take turns batch by batch, so the rest of the epoch would differ."""
        if self.source.iterable and skip > 0:
            return ("tar shards are dealt to processes and loader workers shard by shard, and "
                    "the workers take turns batch by batch, so another number of processes or "
                    "batch size would read another rest of this epoch; resume with the "
                    "checkpoint's processes and data.batch_size (a change is fine from a "
                    "checkpoint at an epoch boundary)")
        return ""

    def train_batches(self, epoch: int, skip: int):
        return self.source.batches(epoch, skip)

    def _loss(self, student, batch: dict, train: bool = False) -> dict[str, torch.Tensor]:
        keep = batch["keep_idx"].to(self.device, non_blocking=True)
        teacher_in = normalize(batch["teacher"].to(self.device, non_blocking=True),
                               self.views["teacher"])
        student_in = normalize(batch["student"].to(self.device, non_blocking=True),
                               self.views["student"])
        teacher_tokens = self._teacher_tokens if train and self.compiled else self.teacher.tokens
        loss = self._alignment_loss if train and self.compiled else alignment_loss
        return loss(student(student_in, keep), teacher_tokens(teacher_in), keep)

    def training_step(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        if "student" not in batch:  # every image of this batch was unreadable
            zero = sum(p.sum() for p in model.parameters()) * 0.0
            return {"loss": zero}
        return self._loss(model, batch, train=True)

    # The engine calls validate on every process: each reads its share of the validation set
    # and the sums are reduced, so no process waits at a barrier while one reads everything.
    validates_on_every_rank = True
    metric_names = ("loss", "cls_cos", "patch_cos")

    @torch.no_grad()
    def validate(self, model: nn.Module) -> dict[str, float]:
        """Alignment loss on held-out images, centre crop, fixed masks (keyed by the pixels), one
        pass sharded across processes; per-image means, so batching and sharding change nothing
        but rounding."""
        if self.val_source is None:
            return {}
        model.eval()
        totals = torch.zeros(len(self.metric_names) + 1, dtype=torch.float64)
        autocast = self.accelerator.autocast() if self.accelerator else torch.no_grad()
        with autocast:
            for batch in self.val_source.one_pass():
                if "student" not in batch:
                    continue
                out = self._loss(model.forward, batch)  # eager even when training is compiled
                n = len(batch["student"])
                totals += torch.tensor([float(out[k]) * n for k in self.metric_names] + [n],
                                       dtype=torch.float64)
        model.train()
        acc = self.accelerator
        if acc is not None and acc.num_processes > 1:
            totals = acc.reduce(totals.to(acc.device), reduction="sum").cpu()
        n = float(totals[-1])
        if n == 0:
            return {}
        return {f"val_{k}": float(v) / n for k, v in zip(self.metric_names, totals[:-1])}

    def checkpoint_meta(self) -> dict:
        return {"student": dataclasses.asdict(self.recipe.student),
                "embed_dim": self.model.embed_dim,
                "teacher": self.teacher.identity.to_dict(),
                "teacher_input_size": self.teacher.image_size,
                "grid_match": self.recipe.teacher.grid_match,
                "mask": dataclasses.asdict(self.recipe.mask),
                "student_preprocess": {"size": self.recipe.student.image_size,
                                       "mean": self.recipe.data.mean, "std": self.recipe.data.std,
                                       "interpolation": "bicubic",
                                       "resize_mode": "shortest"}}
