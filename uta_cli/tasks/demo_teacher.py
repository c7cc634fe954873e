"""The embedded demo's teacher: a small CLIP trained contrastively on the generated demo data.

It is trained on the same engine as everything else, the first time it is needed, and cached in
the user's cache directory as an open_clip `local-dir:` folder (config + safetensors), so that it
loads through the same teacher path as any real CLIP. An interrupted build resumes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import open_clip
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_file

from uta_cli.data.demo import (
    CLASSNAMES,
    IMAGE_SIZE,
    TEACHER_MODEL_CFG,
    TEMPLATES,
    DemoSplit,
    demo_splits,
    demo_teacher_folder,
)
from uta_cli.data.pipeline import (
    ArrayImageDataset,
    EvalTransform,
    MaskCollator,
    Source,
    TrainTransform,
    View,
)
from uta_cli.evaluate.class_weights import zeroshot_accuracy
from uta_cli.io import atomic_path
from uta_cli.recipe import DemoConfig
from uta_cli.tasks.contrastive import ContrastiveTask
from uta_cli.train.engine import Engine
from uta_cli.train.setup import EngineConfig

TEACHER_PREPROCESS = {"size": IMAGE_SIZE, "mean": list(open_clip.OPENAI_DATASET_MEAN),
                      "std": list(open_clip.OPENAI_DATASET_STD), "interpolation": "bicubic",
                      "resize_mode": "shortest"}


def teacher_view() -> View:
    return View("image", IMAGE_SIZE, tuple(TEACHER_PREPROCESS["mean"]),
                tuple(TEACHER_PREPROCESS["std"]))


def eval_batches(split: DemoSplit, views: list[View], batch_size: int = 500):
    """Held-out demo images through the zero-shot transform, in order."""
    dataset = ArrayImageDataset(split.images, split.labels, EvalTransform(views))
    source = Source(dataset, dataset.transform, MaskCollator(None, (1, 1), 0), batch_size,
                    num_workers=0, seed=0, rank=0, world=1, shuffle=False, drop_last=False)
    return source.batches(epoch=0)


def zeroshot_demo(encode_image, clip: torch.nn.Module, tokenizer, split: DemoSplit,
                  views: list[View], view_name: str, device: torch.device) -> dict:
    """Zero-shot accuracy on held-out demo images, the class weights through `clip`'s
    encode_text over the full context (the demo's reported numbers were measured so)."""
    view = next(v for v in views if v.name == view_name)
    return zeroshot_accuracy(clip, tokenizer, CLASSNAMES, TEMPLATES, eval_batches(split, views),
                             view, device, "full", encode_image)


def ensure_demo_teacher(cfg: DemoConfig, accelerator: Accelerator, say=print) -> str:
    """Path of the cached demo teacher folder; trains it first if needed (all ranks join)."""
    final = demo_teacher_folder(cfg)
    if os.path.isfile(os.path.join(final, "open_clip_model.safetensors")):
        return final
    say(f"Building the demo teacher (once; cached in {final}): a small CLIP trained "
        f"contrastively on generated shapes for {cfg.teacher_steps} steps.")
    set_seed(cfg.data_seed)
    clip = open_clip.CLIP(**TEACHER_MODEL_CFG)
    tokenizer = open_clip.SimpleTokenizer(
        context_length=TEACHER_MODEL_CFG["text_cfg"]["context_length"])
    train, val = demo_splits(cfg.train_images, cfg.val_images, cfg.data_seed)
    view = teacher_view()
    transform = TrainTransform([view], crop_scale=(0.8, 1.0), hflip=True, seed=cfg.data_seed)
    source = Source(ArrayImageDataset(train.images, train.labels, transform, train.captions),
                    transform, MaskCollator(None, (1, 1), cfg.data_seed), cfg.teacher_batch_size,
                    num_workers=1, seed=cfg.data_seed, rank=accelerator.process_index,
                    world=accelerator.num_processes)

    def validate(model: torch.nn.Module) -> dict:
        model.eval()
        result = zeroshot_demo(model.encode_image, model, tokenizer, val, [view], "image",
                               accelerator.device)
        model.train()
        return {"zeroshot_acc1": result["acc1"]}

    task = ContrastiveTask(clip, tokenizer, source, view, validate,
                           meta={"clip_model_cfg": TEACHER_MODEL_CFG})
    engine_cfg = EngineConfig(
        seed=cfg.data_seed, precision="fp32", batch_size=cfg.teacher_batch_size, lr=cfg.teacher_lr,
        min_lr=cfg.teacher_lr * 0.01, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6,
        grad_clip=1.0, steps=cfg.teacher_steps, warmup_steps=min(50, cfg.teacher_steps // 10),
        log_every=50, checkpoint_every=200, keep_checkpoints=1)
    build_dir = os.path.join(os.path.dirname(final), ".build-" + os.path.basename(final))
    os.makedirs(build_dir, exist_ok=True)
    result = Engine(engine_cfg, accelerator, build_dir).fit(task, resume="auto",
                                                            label="demo teacher")
    if accelerator.is_main_process:
        with atomic_path(final) as tmp:
            os.makedirs(tmp)
            with open(os.path.join(tmp, "open_clip_config.json"), "w") as f:
                json.dump({"model_cfg": TEACHER_MODEL_CFG, "preprocess_cfg": TEACHER_PREPROCESS},
                          f, indent=1)
            state = {k: v.contiguous() for k, v in result["model"].state_dict().items()}
            save_file(state, os.path.join(tmp, "open_clip_model.safetensors"))
            with open(os.path.join(tmp, "demo_teacher.json"), "w") as f:
                json.dump({"steps": result["step"], "heldout": result["val"],
                           "demo": dataclasses.asdict(cfg)}, f, indent=1)
        shutil.rmtree(build_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
