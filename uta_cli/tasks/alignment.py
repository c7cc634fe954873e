"""Pre-training against a frozen CLIP teacher, one task for the three objectives compared:

- uta: the student sees the visible tokens only; CLS and visible tokens are aligned (UTA).
- mim: every token enters, the masked ones as a learned [MASK] embedding; the masked tokens are
  aligned (masked image modelling with a CLIP teacher, as EVA-02).
- fd: every token enters unmasked and every token is aligned (feature distillation).

Same student, teacher, data, masks and schedule; only what enters the student and which tokens
are scored differ.
"""

from __future__ import annotations

import dataclasses

import torch
from accelerate import Accelerator
from torch import nn

from uta_cli.checkpoint import TASK_NAMES
from uta_cli.data.pipeline import Source, View, normalize
from uta_cli.evaluate.lockstep import CountingCall, even_out_forwards, is_sharded, stand_in_forward
from uta_cli.losses import (
    gather_targets,
    masked_token_loss,
    mean_over_layers,
    normalize_targets,
    token_alignment_loss,
)
from uta_cli.masks.generate import attention_keep, num_visible
from uta_cli.models.student import LAYER_HEADS, MASK_TOKEN, UTAStudent
from uta_cli.models.teacher import CLIPTeacher
from uta_cli.recipe import Recipe
from uta_cli.tasks.common import decay_groups
from uta_cli.train.sharding import eager_call

OBJECTIVES = tuple(TASK_NAMES)  # TASK_NAMES: objective -> the task name its checkpoints carry


def masked_from_keep(keep_idx: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(B, K) visible positions -> (B, N) bool, True = masked: the complement of the kept set."""
    mask = torch.ones(keep_idx.shape[0], num_patches, dtype=torch.bool, device=keep_idx.device)
    return mask.scatter(1, keep_idx, False)


def objective_loss(objective: str, model: nn.Module, student_in: torch.Tensor,
                   teacher_tokens: torch.Tensor, keep_idx: torch.Tensor | None,
                   num_patches: int) -> dict[str, torch.Tensor]:
    """One objective's forward and loss. teacher_tokens: (B, 1 + N, E) on the whole image, or
    (L, B, 1 + N, E) for several teacher blocks (the student's heads in the same order; the loss
    is the mean over blocks). keep_idx: (B, K) visible positions (unused by fd); None for uta is
    the unmasked finish: every token enters and is aligned."""
    layered = teacher_tokens.dim() == 4
    heads = {"all_heads": True} if layered else {}
    if objective == "uta":
        if keep_idx is None:
            pred = model(student_in, **heads)
            score = token_alignment_loss
        else:
            pred = model(student_in, keep_idx, **heads)

            def score(p, t):
                return token_alignment_loss(p, gather_targets(t, keep_idx))
    elif objective == "mim":
        mask = masked_from_keep(keep_idx, num_patches)
        pred = model(student_in, mask=mask, **heads)

        def score(p, t):
            return masked_token_loss(p, t, mask)
    elif objective == "fd":
        pred, score = model(student_in, **heads), token_alignment_loss
    else:
        raise ValueError(f"unknown objective {objective!r}; expected one of "
                         f"{', '.join(OBJECTIVES)}")
    if not layered:
        return score(pred, teacher_tokens)
    return mean_over_layers([score(p, t) for p, t in zip(pred, teacher_tokens)])


def use_compile(setting: str | bool, device: torch.device) -> bool:
    """train.compile resolved for this device: "auto" compiles on CUDA only."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def alignment_loss(pred: torch.Tensor, teacher_tokens: torch.Tensor,
                   keep_idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """The student's tokens against the teacher's at the same (visible) positions."""
    return token_alignment_loss(pred, gather_targets(teacher_tokens, keep_idx))


class AlignmentTask:
    def __init__(self, recipe: Recipe, student: UTAStudent, teacher: CLIPTeacher, source: Source,
                 val_source: Source | None, views: dict[str, View], grid_note: str,
                 zeroshot=None):
        self.recipe = recipe
        self.objective = recipe.objective
        self.name = TASK_NAMES[self.objective]
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
        # The variants (docs/method.md): teacher blocks aligned, target norm, attention masks
        self.layers = tuple(teacher.resolve_layers(recipe.align.teacher_layers))
        self.target_norm = recipe.align.target_norm
        self.attention_masks = recipe.mask.strategy == "attention" and self.objective != "fd"
        self.num_keep = num_visible(student.num_patches, recipe.mask.ratio)
        self.unmasked_steps = recipe.schedule.unmasked_steps
        self.unmasked = False  # in the unmasked finish (begin_step)
        # eval.zeroshot while training: an eval_training.TrainingZeroShot, or None
        self.zeroshot = zeroshot

    def setup(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.device = accelerator.device
        self.teacher.to(accelerator.device, self.recipe.train.precision)
        self.compiled = use_compile(self.recipe.train.compile, self.device)
        if self.compiled and not is_sharded(self.model):  # (sharded: blocks compiled first)
            # In place: the module's call is compiled, its state-dict keys stay as they are (no
            # `_orig_mod.`), so checkpoints, resume and export do not know about it. Validation
            # calls `forward` directly and stays eager (other batch sizes, no grad: no recompiles).
            self.model.compile(dynamic=False)
            self._teacher_tokens = torch.compile(self.teacher.tokens, dynamic=False)
            self._alignment_loss = torch.compile(alignment_loss, dynamic=False)
        if self.zeroshot is not None:  # the class weights, once, on the teacher's device
            self.zeroshot.setup(self.teacher, accelerator)

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        return decay_groups(model, weight_decay, no_decay_names=(MASK_TOKEN,))

    def steps_per_epoch(self, world_size: int, global_micro_batch: int) -> int:
        return self.source.steps_per_epoch(world_size, global_micro_batch)

    def world_change_problem(self, skip: int) -> str:
        """Why this run cannot continue mid-epoch with another number of processes, loader
        workers or batch size ("" if it can): Source.order_change_problem."""
        return self.source.order_change_problem(skip)

    def train_batches(self, epoch: int, skip: int):
        return self.source.batches(epoch, skip)

    def _inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(student input, teacher input, visible positions), normalised, on the device."""
        keep = batch.get("keep_idx")
        keep = keep.to(self.device, non_blocking=True) if keep is not None else None
        teacher_in = normalize(batch["teacher"].to(self.device, non_blocking=True),
                               self.views["teacher"])
        student_in = normalize(batch["student"].to(self.device, non_blocking=True),
                               self.views["student"])
        return student_in, teacher_in, keep

    def begin_step(self, step: int, total: int) -> dict | None:
        """Called by the engine before each optimizer step (`step` = steps done): enters the
        unmasked finish at step total - schedule.unmasked_steps. Returns a metrics record with a
        `message` for the console when the phase starts (or is resumed into), else None."""
        now = self.unmasked_steps > 0 and step >= total - self.unmasked_steps
        started = now and not self.unmasked
        self.unmasked = now
        if not started:
            return None
        first = max(0, total - self.unmasked_steps)
        return {"event": "unmasked_finish", "step": step, "steps": self.unmasked_steps,
                "message": f"unmasked finish: steps {first + 1}-{total} run with every token "
                           f"visible (schedule.unmasked_steps = {self.unmasked_steps})"}

    def _targets(self, teacher_in: torch.Tensor, compiled: bool, attention: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(targets, the last block's raw targets, CLS-to-patch attention or None). targets is
        (B, 1 + N, E) for one teacher block, (L, B, 1 + N, E) for several, after target_norm."""
        if len(self.layers) == 1 and not attention:
            raw = (self._teacher_tokens if compiled else self.teacher.tokens)(teacher_in)
            return normalize_targets(raw, self.target_norm), raw, None
        tokens, attn = self.teacher.targets(teacher_in, self.layers, cls_attention=attention)
        targets = normalize_targets(tokens, self.target_norm)
        return (targets[0] if len(self.layers) == 1 else targets), tokens[-1], attn

    def _keep(self, batch: dict, keep, attention) -> torch.Tensor | None:
        if attention is None:
            return keep
        return attention_keep(attention, batch["mask_noise"], self.num_keep,
                              self.recipe.mask.attention_temperature)

    def _loss(self, student, batch: dict, train: bool = False) -> dict[str, torch.Tensor]:
        student_in, teacher_in, keep = self._inputs(batch)
        compiled = train and self.compiled
        unmasked = train and self.unmasked
        targets, _, attention = self._targets(teacher_in, compiled,
                                              self.attention_masks and not unmasked)
        keep = None if unmasked else self._keep(batch, keep, attention)
        if self.objective == "uta" and compiled and targets.dim() == 3 and keep is not None:
            return self._alignment_loss(student(student_in, keep), targets, keep)
        return objective_loss(self.objective, student, student_in, targets, keep,
                              self.model.num_patches)

    def training_step(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        if "student" not in batch:  # every image of this batch was unreadable
            if is_sharded(model):  # its forward and backward are collectives: run them
                size = self.recipe.student.image_size
                out = model(torch.zeros(1, 3, size, size, device=self.device))
                return {"loss": out.float().sum() * 0.0}
            zero = sum(p.sum() for p in model.parameters()) * 0.0
            return {"loss": zero}
        return self._loss(model, batch, train=True)

    # The engine calls validate on every process: each reads its share of the validation set
    # and the sums are reduced, so no process waits at a barrier while one reads everything.
    validates_on_every_rank = True
    # the objective's own loss, then every token on the whole unmasked image (_val_losses)
    metric_names = ("loss", "cls_cos", "patch_cos", "full_loss", "full_cls_cos", "full_patch_cos")

    def _val_losses(self, student, batch: dict) -> dict[str, torch.Tensor]:
        """The objective's own loss, plus the alignment of every token on the whole unmasked
        image (full_*): what zero-shot and fine-tuning see, comparable across objectives."""
        student_in, teacher_in, keep = self._inputs(batch)
        targets, raw, attention = self._targets(teacher_in, False, self.attention_masks)
        keep = self._keep(batch, keep, attention)
        out = objective_loss(self.objective, student, student_in, targets, keep,
                             self.model.num_patches)
        # full_*: the last head against the raw last-block targets, comparable across variants
        plain = targets.dim() == 3 and self.target_norm == "none"
        full = out if self.objective == "fd" and plain else \
            token_alignment_loss(student(student_in), raw)
        out.update({f"full_{k}": v for k, v in full.items()})
        return out

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
        student = CountingCall(eager_call(model))  # eager even if training compiles
        with autocast:
            for batch in self.val_source.one_pass():
                if "student" not in batch:
                    continue
                out = self._val_losses(student, batch)
                n = len(batch["student"])
                totals += torch.tensor([float(out[k]) * n for k in self.metric_names] + [n],
                                       dtype=torch.float64)
            if is_sharded(model):  # every process runs as many (collective) forwards
                even_out_forwards(student.calls, stand_in_forward(
                    model, self.recipe.student.image_size, self.device), self.device)
        model.train()
        acc = self.accelerator
        if acc is not None and acc.num_processes > 1:
            totals = acc.reduce(totals.to(acc.device), reduction="sum").cpu()
        n = float(totals[-1])
        if n == 0:
            return {}
        return {f"val_{k}": float(v) / n for k, v in zip(self.metric_names, totals[:-1])}

    eval_event = "zeroshot"

    def evaluate_at(self, model: nn.Module, step: int, final: bool) -> dict:
        """Zero-shot accuracy at eval.zeroshot_every steps and at the end; every rank reads
        its share. {} when none is due."""
        if self.zeroshot is None or not self.zeroshot.due(step, final):
            return {}
        return {"dataset": self.zeroshot.evalset.name,
                **self.zeroshot(model, self.accelerator, self.accelerator.autocast)}

    def checkpoint_meta(self) -> dict:
        return {"objective": self.objective,
                "student": dataclasses.asdict(self.recipe.student),
                "embed_dim": self.model.embed_dim,
                "teacher": self.teacher.identity.to_dict(),
                "teacher_input_size": self.teacher.image_size,
                "grid_match": self.recipe.teacher.grid_match,
                "mask": dataclasses.asdict(self.recipe.mask),
                # the variants; zero-shot and export use `head` (the last block's) alone
                "align": {"target_norm": self.target_norm, "teacher_layers": list(self.layers),
                          "inference_head": "head",
                          "training_only": [LAYER_HEADS + "*"] if len(self.layers) > 1 else []},
                "unmasked_steps": self.unmasked_steps,
                "student_preprocess": {"size": self.recipe.student.image_size,
                                       "mean": self.recipe.data.mean, "std": self.recipe.data.std,
                                       "interpolation": "bicubic",
                                       "resize_mode": "shortest"}}
