"""Image-text contrastive training with open_clip's ClipLoss: one task for two uses.

- The demo teacher (demo_teacher.py): an open_clip CLIP trained from scratch on the demo captions.
- Contrastive tuning (`uta finetune`, task: contrastive): the UTA student as the image tower of a
  copy of its teacher's CLIP, with the teacher's text tower tuned or locked (docs/method.md §7).
  `uta_clip` builds that model; `uta_cli.loading.model.tuned_clip_from_checkpoint` reads its
  checkpoints back.

Features are gathered across processes with gradients (open_clip's ClipLoss), so N processes
compute the loss of the global batch. The learned logit scale is clamped at 100, as open_clip.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from accelerate import Accelerator
from open_clip.loss import ClipLoss
from torch import nn

from uta_cli.data.pipeline import Source, View, normalize
from uta_cli.tasks.common import decay_groups


class StudentImageTower(nn.Module):
    """The UTA student as an open_clip image tower: images -> CLS embedding in the joint space."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.student.encode_image(images)


def uta_clip(clip: nn.Module, student: nn.Module, text_locked: bool) -> nn.Module:
    """A copy of `clip` (the teacher's) with the student as its image tower.

    The teacher's own image tower is not copied. Locked: the text tower is frozen (LiT-style)
    and only the student and the logit scale train.
    """
    teacher_visual = clip.visual
    clip.visual = nn.Identity()  # keep the (possibly large) teacher image tower out of the copy
    try:
        model = copy.deepcopy(clip)
    finally:
        clip.visual = teacher_visual
    model.visual = StudentImageTower(student)
    model.train().requires_grad_(True)
    if text_locked:
        model.lock_text_tower()  # open_clip's own: embeddings, transformer, ln_final, projection
    return model


class ContrastiveTask:
    def __init__(self, clip: nn.Module, tokenizer, source: Source, image_view: View,
                 validate_fn: Callable[[nn.Module], dict] | None = None,
                 meta: dict | None = None, name: str = "clip-contrastive",
                 validates_on_every_rank: bool = False):
        self.name = name  # "clip-contrastive" (demo teacher) or "uta-contrastive" (tuning)
        # True: validate_fn reads this process's share and reduces (the engine calls it on
        # every process); False: the main process validates alone.
        self.validates_on_every_rank = validates_on_every_rank
        self.model = clip
        self.tokenizer = tokenizer
        self.source = source
        self.image_view = image_view
        self.validate_fn = validate_fn
        self.meta = meta or {}
        self.device = torch.device("cpu")
        self.world = 1
        self.loss: ClipLoss | None = None
        self._tokens: dict[str, torch.Tensor] = {}  # captions repeat; tokenise each once

    def setup(self, accelerator: Accelerator) -> None:
        self.device = accelerator.device
        self.world = accelerator.num_processes
        self.loss = ClipLoss(local_loss=False, gather_with_grad=True, cache_labels=True,
                             rank=accelerator.process_index, world_size=accelerator.num_processes)

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        return decay_groups(model, weight_decay, no_decay_names=("logit_scale",))

    def steps_per_epoch(self, world_size: int, global_micro_batch: int) -> int:
        return self.source.steps_per_epoch(world_size, global_micro_batch)

    def train_batches(self, epoch: int, skip: int):
        return self.source.batches(epoch, skip)

    def world_change_problem(self, skip: int) -> str:
        """What a resume with another launch would change mid-epoch (the resume guard)."""
        return self.source.order_change_problem(skip)

    def _pairs(self, batch: dict) -> tuple[torch.Tensor, list[str]]:
        """Images and captions of the usable pairs. Samples without a caption are dropped, and
        with several processes every rank keeps the smallest rank's count, because the features
        are all-gathered (equal shapes) and each pair must stay matched."""
        if self.image_view.name not in batch:
            images, captions = None, []
        else:
            images, captions = batch[self.image_view.name], list(batch["caption"])
            keep = [i for i, c in enumerate(captions) if c]
            if len(keep) < len(captions):
                images, captions = images[keep], [captions[i] for i in keep]
        n = len(captions)
        if self.world > 1:
            count = torch.tensor([n], device=self.device)
            dist.all_reduce(count, op=dist.ReduceOp.MIN)
            n = int(count.item())
        if images is None or n == 0:
            return torch.zeros(0), []
        return images[:n], captions[:n]

    def training_step(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        with torch.no_grad():  # as open_clip's trainer: temperature capped at 100
            self.model.logit_scale.clamp_(0, math.log(100))
        images, captions = self._pairs(batch)
        if not captions:  # nothing usable anywhere: a zero loss that still reaches every param
            return {"loss": sum(p.sum() for p in model.parameters()) * 0.0}
        images = normalize(images.to(self.device, non_blocking=True), self.image_view)
        text = self.tokenize(captions).to(self.device, non_blocking=True)
        image_features, text_features, logit_scale = model(images, text)[:3]
        loss = self.loss(image_features, text_features, logit_scale)
        return {"loss": loss, "logit_scale": logit_scale.detach()}

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        new = [c for c in dict.fromkeys(captions) if c not in self._tokens]
        if new:
            if len(self._tokens) > 100_000:  # a real caption corpus: don't grow without bound
                self._tokens.clear()
            self._tokens.update(zip(new, self.tokenizer(new)))
        return torch.stack([self._tokens[c] for c in captions])

    def validate(self, model: nn.Module) -> dict[str, float]:
        return self.validate_fn(model) if self.validate_fn else {}

    def checkpoint_meta(self) -> dict:
        return self.meta
