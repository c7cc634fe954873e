"""Classification fine-tuning (docs/method.md §7, the EVA-02 template): a backbone and a head,
trained with layer-wise lr decay, label smoothing, RandAugment, mixup/cutmix and a model EMA.

Every random choice stays a pure function of (seed, epoch, sample id) or of the batch's sample
ids, as in `uta_cli.data.pipeline`: timm's RandAugment and Mixup draw from Python's and
NumPy's global generators, so they run inside `keyed_global_rng`, which seeds both from the key
and restores them afterwards. A resumed run therefore sees the same augmented batches as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.data import Mixup
from timm.data.auto_augment import rand_augment_transform
from timm.models import group_parameters
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3
from torch import nn

from uta_cli.data.folders import collate_skip_none
from uta_cli.data.pipeline import Source, TrainTransform, View, normalize
from uta_cli.errors import UtaUsageError
from uta_cli.evaluate.lockstep import CountingCall, even_out_forwards, stand_in_forward
from uta_cli.evaluate.zeroshot import classification_metrics
from uta_cli.train.sharding import full_state_dict, is_sharded, load_full_state_dict

EMA_FILE = "ema.safetensors"

# Parameter names (relative to the backbone) of the patch embedding and the tokens added before
# the first block, for timm ViT/Eva, open_clip's ViT and open_clip's timm towers.
_STEM = re.compile(r"(?:^|\.)(cls_token|reg_token|pos_embed|patch_embed|rope|conv1|"
                   r"class_embedding|positional_embedding|ln_pre|norm_pre)(?:\.|$)")
_BLOCK = re.compile(r"(?:^|\.)(?:blocks|resblocks)\.(\d+)\.")


# ----------------------------------------------------------------------------------------------
# determinism helpers


def key_seed(*parts: object) -> int:
    """A 32-bit seed from any key (stable across processes, unlike hash())."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


@contextlib.contextmanager
def keyed_global_rng(seed: int) -> Iterator[None]:
    """Run timm code that draws from `random` and `np.random` as a pure function of `seed`,
    leaving both generators as they were (the engine checkpoints them)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class RandAugmentTrainTransform(TrainTransform):
    """TrainTransform's keyed crop and flip, then timm's RandAugment keyed the same way."""

    def __init__(self, view: View, crop_scale: tuple[float, float], hflip: bool, seed: int,
                 randaugment: str = ""):
        super().__init__([view], crop_scale, hflip, seed)
        self.view = view
        self.augment = None
        if randaugment:
            hparams = {"translate_const": int(view.size * 0.45),
                       "img_mean": tuple(round(255 * m) for m in view.mean)}
            try:
                self.augment = rand_augment_transform(randaugment, hparams)
            except (AssertionError, ValueError, KeyError, IndexError) as e:
                raise UtaUsageError(
                    f"finetune.randaugment={randaugment!r} is not a timm RandAugment spec "
                    f"({e}). Use e.g. 'rand-m9-mstd0.5-inc1', or '' to turn it off.") from None

    def __call__(self, img: Image.Image, sample_id: int) -> dict[str, torch.Tensor]:
        out = super().__call__(img, sample_id)
        if self.augment is None:
            return out
        crop = Image.fromarray(out[self.view.name].permute(1, 2, 0).numpy())
        with keyed_global_rng(key_seed("randaugment", self.seed, self.epoch, int(sample_id))):
            crop = self.augment(crop)
        out[self.view.name] = torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()
                                               ).permute(2, 0, 1)
        return out


class KeyedMixup:
    """timm's Mixup/CutMix with its draws keyed by (seed, the batch's sample ids)."""

    def __init__(self, mixup: float, cutmix: float, prob: float, switch_prob: float,
                 label_smoothing: float, num_classes: int, seed: int):
        self.mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob,
                         switch_prob=switch_prob, mode="batch",
                         label_smoothing=label_smoothing, num_classes=num_classes)
        self.seed = seed

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, sample_ids: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed images and soft targets (each row sums to 1). timm mixes a batch with its flip,
        so an odd batch (an unreadable image was dropped) loses its last sample."""
        if len(images) % 2:
            images, labels, sample_ids = images[:-1], labels[:-1], sample_ids[:-1]
        ids = ",".join(str(int(i)) for i in sample_ids)
        with keyed_global_rng(key_seed("mixup", self.seed, ids)):
            return self.mix(images, labels)


# ----------------------------------------------------------------------------------------------
# the model


class ZeroShotHead(nn.Module):
    """Projection into the joint space, L2 normalisation, then a linear classifier whose rows
    start as 100 x the teacher's normalised text embeddings of the class names (WiSE-FT style):
    at step 0 its logits are exactly zero-shot CLIP's."""

    def __init__(self, proj: nn.Module, class_embeddings: torch.Tensor, scale: float = 100.0):
        super().__init__()
        self.proj = proj
        embed_dim, num_classes = class_embeddings.shape
        self.classes = nn.Linear(embed_dim, num_classes)
        with torch.no_grad():
            self.classes.weight.copy_(scale * class_embeddings.T.float())
            self.classes.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classes(F.normalize(self.proj(features), dim=-1))


class ClassificationModel(nn.Module):
    """A backbone that maps images to pooled features, and a head that maps those to logits.

    Layer ids for layer-wise lr decay, as BEiT/EVA: 0 for the patch embedding and the tokens,
    i + 1 for block i, depth + 1 for the head. They come from timm's own `group_matcher` where the
    backbone has one (timm models, UTA students; timm groups the final norm with the last block),
    and from the block index in the parameter name otherwise (open_clip towers, whose final norm
    and projection go with the head).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.trunk = backbone
        self.head = head
        names = [n for n, _ in backbone.named_parameters()]
        if hasattr(backbone, "group_matcher"):
            # timm puts the final norm into the last block's group; the head comes after it
            self._trunk_ids = group_parameters(backbone, backbone.group_matcher(coarse=False),
                                               reverse=True)
            self._head_id = max(self._trunk_ids.values(), default=0) + 1
        else:
            blocks = [int(m.group(1)) for n in names if (m := _BLOCK.search(n))]
            self._head_id = max(blocks, default=-1) + 2  # with the final norm and projection
            self._trunk_ids = {}
            for n in names:
                block = _BLOCK.search(n)
                self._trunk_ids[n] = int(block.group(1)) + 1 if block else \
                    0 if _STEM.search(n) else self._head_id

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(images))

    def layer_id(self, name: str) -> int:
        if name.startswith("trunk."):
            return self._trunk_ids.get(name[len("trunk."):], self._head_id)
        return self._head_id

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:  # noqa: ARG002
        """timm's hook for param_groups_layer_decay (a callable matcher: name -> layer id)."""
        return self.layer_id

    def no_weight_decay(self) -> set[str]:
        names = set()
        if hasattr(self.trunk, "no_weight_decay"):
            names |= {f"trunk.{n}" for n in self.trunk.no_weight_decay()}
        for n, _ in self.named_parameters():  # tokens and position tables: no decay (as timm)
            if re.search(r"(cls_token|reg_token|pos_embed|class_embedding|"
                         r"positional_embedding)$", n):
                names.add(n)
        return names


def layer_decay_groups(model: ClassificationModel, weight_decay: float,
                       layer_decay: float) -> list[dict]:
    """timm's layer-decay groups: `lr_scale` = layer_decay^(depth + 1 - layer id), applied by the
    engine on top of the warm-up cosine lr; no weight decay on 1-d parameters and tokens."""
    return param_groups_layer_decay(model, weight_decay=weight_decay,
                                    no_weight_decay_list=sorted(model.no_weight_decay()),
                                    layer_decay=layer_decay)


# ----------------------------------------------------------------------------------------------
# the task


def eval_loader(dataset, batch_size: int, num_workers: int) -> torch.utils.data.DataLoader:
    """One ordered pass over a map-style or tar-shard dataset (unreadable images skipped)."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        num_workers = min(num_workers, len(getattr(dataset, "shards", [None])))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                       num_workers=num_workers, collate_fn=collate_skip_none)


class ClassificationTask:
    name = "classification"

    def __init__(self, model: ClassificationModel, source: Source, view: View,
                 val_batches: Callable[[], Iterable[dict]] | None, num_classes: int, *,
                 seed: int = 0, layer_decay: float = 1.0, label_smoothing: float = 0.0,
                 mixup: KeyedMixup | None = None, ema_decay: float = 0.0,
                 ema_warmup: bool = False, meta: dict | None = None):
        self.model = model
        self.source = source
        self.view = view
        self.val_batches = val_batches
        self.num_classes = num_classes
        self.seed = seed
        self.layer_decay = layer_decay
        self.label_smoothing = label_smoothing
        self.mixup = mixup
        self.ema_decay = ema_decay
        self.ema_warmup = ema_warmup
        self.ema: ModelEmaV3 | None = None
        self.meta = meta or {}
        self.device = torch.device("cpu")
        self.accelerator: Accelerator | None = None
        self._ema_twin: nn.Module | None = None  # train.sharding=fsdp: the EMA's sharded module

    def shard(self, shard_fn: Callable[[nn.Module], nn.Module]) -> None:
        """train.sharding=fsdp: shard the model, and a copy of it for the EMA (a sharded module
        cannot be deep-copied later, so the copy is made now and sharded the same way)."""
        if self.ema_decay > 0:
            self._ema_twin = shard_fn(copy.deepcopy(self.model).requires_grad_(False))
        shard_fn(self.model)

    def setup(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.device = accelerator.device
        if self.ema_decay > 0:
            # Created after `prepare` (same device as the model) and after a resume has loaded
            # the live weights; `load_extra` then restores the EMA's own weights.
            if self._ema_twin is None:
                self.ema = ModelEmaV3(self.model, decay=self.ema_decay,
                                      use_warmup=self.ema_warmup)
            else:  # timm's EMA (decay, warm-up, update) over the twin, shard by shard; it
                # is built around a stand-in (it deep-copies what it is given) and then given it
                self.ema = ModelEmaV3(nn.Linear(1, 1, device=self.device),
                                      decay=self.ema_decay, use_warmup=self.ema_warmup)
                self.ema.module = self._ema_twin.eval()
                with torch.no_grad():
                    for twin, live in zip(self._ema_twin.state_dict().values(),
                                          self.model.state_dict().values()):
                        twin.copy_(live)
            self.ema.module.requires_grad_(False)

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        return layer_decay_groups(model, weight_decay, self.layer_decay)

    def steps_per_epoch(self, world_size: int, global_micro_batch: int) -> int:
        return self.source.steps_per_epoch(world_size, global_micro_batch)

    def train_batches(self, epoch: int, skip: int):
        return self.source.batches(epoch, skip)

    def world_change_problem(self, skip: int) -> str:
        """What a resume with another launch would change mid-epoch (the resume guard)."""
        return self.source.order_change_problem(skip)

    def training_step(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        if self.view.name not in batch:  # every image of this batch was unreadable
            if is_sharded(model):  # its forward and backward are collectives: run them
                x = torch.zeros(1, 3, self.view.size, self.view.size, device=self.device)
                return {"loss": model(x).float().sum() * 0.0}
            return {"loss": sum(p.sum() for p in model.parameters()) * 0.0}
        labels = batch["label"]
        if (labels < 0).any() or (labels >= self.num_classes).any():
            bad = int(labels[(labels < 0) | (labels >= self.num_classes)][0])
            raise UtaUsageError(
                f"A training sample has label {bad}, outside 0..{self.num_classes - 1}. Tar "
                f"shards need a .cls member (an integer) per sample, and finetune.num_classes "
                f"must cover every label.")
        images = normalize(batch[self.view.name].to(self.device, non_blocking=True), self.view)
        labels = labels.to(self.device, non_blocking=True)
        if self.mixup is not None:
            images, targets = self.mixup(images, labels, batch["sample_id"])
            logits = model(images)
            loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            return {"loss": loss}
        logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        acc1 = (logits.detach().argmax(-1) == labels).float().mean()
        return {"loss": loss, "train_acc1": acc1}

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        if self.ema is not None:
            self.ema.update(model, step=step)

    # The engine calls validate on every process: each reads its share of the validation set
    # (val_batches) and the sums are reduced, as pre-training's validation.
    validates_on_every_rank = True

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Top-1, top-5 and the (unsmoothed) loss of `model` on the validation data: this
        process's share, summed over all processes."""
        was_training = model.training
        model.eval()
        labels, tops, loss_sum = [], [], 0.0
        autocast = self.accelerator.autocast() if self.accelerator else contextlib.nullcontext()
        k = min(5, self.num_classes)
        forward = CountingCall(model)
        with autocast:
            for batch in self.val_batches():
                if self.view.name not in batch:
                    continue
                y = batch["label"].to(self.device)
                logits = forward(normalize(batch[self.view.name].to(self.device), self.view))
                logits = logits.float()
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                tops.append(logits.topk(k, dim=-1).indices.cpu())
                labels.append(y.cpu())
            if is_sharded(model):  # every process runs as many (collective) forwards
                even_out_forwards(forward.calls, stand_in_forward(model, self.view.size,
                                                                  self.device), self.device)
        model.train(was_training)
        hit1 = hit5 = n = 0.0
        if labels:
            m = classification_metrics(torch.cat(labels), torch.cat(tops), self.num_classes)
            n, hit1 = m["num_samples"], sum(m["per_class_top1"])
            hit5 = sum(m["per_class_top5"]) if not math.isnan(m["acc5"]) else math.nan
        # (hits, loss, samples) summed over processes in float64: per-image means, so the
        # sharding changes nothing but rounding
        totals = torch.tensor([hit1, hit5, loss_sum, n], dtype=torch.float64)
        acc = self.accelerator
        if acc is not None and acc.num_processes > 1:
            totals = acc.reduce(totals.to(acc.device), reduction="sum").cpu()
        hit1, hit5, loss, n = totals.tolist()
        if n == 0:
            return {}
        if self.num_classes < 5:  # CLIP_benchmark's rule, whichever process saw no image
            hit5 = math.nan
        return {"acc1": hit1 / n, "acc5": hit5 / n, "loss": loss / n}

    def validate(self, model: nn.Module) -> dict[str, float]:
        if self.val_batches is None:
            return {}
        out = {f"val_{k}": v for k, v in self.evaluate(model).items()}
        if self.ema is not None:
            out.update({f"val_ema_{k}": v for k, v in self.evaluate(self.ema.module).items()})
        return out

    # sharded: save_extra gathers the EMA's shards, so every process calls it
    @property
    def saves_on_every_rank(self) -> bool:
        return self._ema_twin is not None

    def save_extra(self, folder: str) -> None:
        if self.ema is None:
            return
        if self._ema_twin is not None:
            state = full_state_dict(self.ema.module)  # collective; whole on rank 0 only
            if not self.accelerator.is_main_process:
                return
        else:
            state = self.ema.module.state_dict()
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
                  os.path.join(folder, EMA_FILE))

    def load_extra(self, folder: str) -> None:
        if self.ema is not None:
            path = os.path.join(folder, EMA_FILE)
            if not os.path.isfile(path):
                raise UtaUsageError(f"{folder} has no {EMA_FILE}: it was written without "
                                    f"finetune.ema_decay. Resume with the same recipe, or start "
                                    f"a new run (--resume never).")
            state = load_file(path)  # (copied onto the EMA's device by the load)
            if self._ema_twin is not None:
                load_full_state_dict(self.ema.module, state)
            else:
                self.ema.module.load_state_dict(state)

    def checkpoint_meta(self) -> dict:
        return {**self.meta, "ema": self.ema is not None}
