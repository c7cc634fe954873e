"""Image-text contrastive training of an open_clip CLIP with open_clip's ClipLoss.

Used to build the demo teacher; `uta finetune` (task: contrastive) reuses it. Features are
gathered across processes (with gradients) when distributed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from accelerate import Accelerator
from open_clip.loss import ClipLoss
from torch import nn

from uta_cli.data import Source, View, normalize
from uta_cli.tasks.common import decay_groups


class ContrastiveTask:
    name = "clip-contrastive"

    def __init__(self, clip: nn.Module, tokenizer, source: Source, image_view: View,
                 validate_fn: Callable[[nn.Module], dict] | None = None,
                 meta: dict | None = None):
        self.model = clip
        self.tokenizer = tokenizer
        self.source = source
        self.image_view = image_view
        self.validate_fn = validate_fn
        self.meta = meta or {}
        self.device = torch.device("cpu")
        self.loss: ClipLoss | None = None
        self._tokens: dict[str, torch.Tensor] = {}  # captions repeat; tokenise each once

    def setup(self, accelerator: Accelerator) -> None:
        self.device = accelerator.device
        self.loss = ClipLoss(local_loss=False, gather_with_grad=True, cache_labels=True,
                             rank=accelerator.process_index, world_size=accelerator.num_processes)

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        return decay_groups(model, weight_decay, no_decay_names=("logit_scale",))

    def steps_per_epoch(self, world_size: int, global_micro_batch: int) -> int:
        return self.source.steps_per_epoch(world_size, global_micro_batch)

    def train_batches(self, epoch: int, skip: int):
        return self.source.batches(epoch, skip)

    def training_step(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        with torch.no_grad():  # as open_clip's trainer: temperature capped at 100
            self.model.logit_scale.clamp_(0, math.log(100))
        images = normalize(batch[self.image_view.name].to(self.device, non_blocking=True),
                           self.image_view)
        text = self.tokenize(list(batch["caption"])).to(self.device, non_blocking=True)
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
