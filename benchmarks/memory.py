"""GPU memory of a pre-training recipe, computed from parameter and activation counts (no GPU).

What one training process holds:
  student   fp32 weights + fp32 gradients + AdamW's two fp32 moments = 16 bytes a parameter,
            plus DDP's gradient buckets (another 4 bytes a parameter) on more than one GPU
  teacher   the frozen CLIP cast to bf16 (2 bytes a parameter; `train.precision: bf16`)
  saved activations of the student's forward (bf16 autocast, the kept tokens only): counted by
            running the real blocks at the recipe's width and token count on the CPU and
            summing the tensors autograd saves for backward, at 1 and 2 blocks and at batch 1
            and 2, so that the per-block, per-sample and fixed parts separate exactly
The teacher's forward runs without grad, so its activations are transient (one block at a
time) and left out, as are the CUDA context and allocator fragmentation (add ~2-4 GiB).

    python benchmarks/memory.py vitg14            # the recipe's batch
    python benchmarks/memory.py vitl14 --batch 64
"""

from __future__ import annotations

import argparse
import dataclasses

import open_clip
import torch

from uta_cli.masks.generate import num_visible
from uta_cli.models.student import UTAStudent
from uta_cli.recipe import load_recipe

GIB = 2**30


def saved_bytes(student: UTAStudent, batch: int, keep: int) -> int:
    """Bytes of the tensors autograd saves in one forward (bf16 autocast), parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in student.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    size = student.cfg.image_size
    x = torch.randn(batch, 3, size, size)
    keep_idx = torch.stack([torch.randperm(student.num_patches)[:keep] for _ in range(batch)])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        out = student(x, keep_idx)
    del out
    return sum(seen.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--batch", type=int, default=0, help="per GPU (default: the recipe's)")
    args = ap.parse_args()
    recipe = load_recipe(args.recipe)
    cfg = recipe.student
    batch = args.batch or recipe.data.batch_size
    torch.manual_seed(0)

    teacher_cfg = open_clip.get_model_config(recipe.teacher.model)
    with torch.device("meta"):
        teacher = open_clip.create_model(recipe.teacher.model, pretrained=None, device="meta")
        full = UTAStudent(cfg, int(teacher_cfg["embed_dim"]))
    n_student = sum(p.numel() for p in full.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters())
    n_teacher_visual = sum(p.numel() for p in teacher.visual.parameters())

    # every sample keeps exactly this many patch tokens (dense batches)
    keep = num_visible(full.num_patches, recipe.mask.ratio)

    measured = {}
    for depth in (1, 2):
        small = UTAStudent(dataclasses.replace(cfg, depth=depth, drop_path=0.0),
                           int(teacher_cfg["embed_dim"])).train()
        for b in (1, 2):
            measured[depth, b] = saved_bytes(small, b, keep)
    per_block_sample = (measured[2, 2] - measured[2, 1]) - (measured[1, 2] - measured[1, 1])
    per_sample_rest = (measured[1, 2] - measured[1, 1]) - per_block_sample
    fixed_block = (measured[2, 1] - measured[1, 1]) - per_block_sample  # bf16 weight copies
    fixed_rest = measured[1, 1] - per_block_sample - per_sample_rest - fixed_block
    activations = batch * (cfg.depth * per_block_sample + per_sample_rest)
    casts = cfg.depth * fixed_block + fixed_rest

    rows = [
        ("student weights + grads + AdamW (16 B/param)", 16 * n_student),
        ("DDP gradient buckets (4 B/param, multi-GPU)", 4 * n_student),
        ("bf16 weight copies held for backward", casts),
        (f"saved activations, batch {batch} x {1 + keep} tokens", activations),
        ("teacher weights, bf16 (2 B/param)", 2 * n_teacher),
    ]
    total = sum(v for _, v in rows)
    print(f"recipe {args.recipe}: student {cfg.family} w{cfg.width} d{cfg.depth} "
          f"p{cfg.patch_size} {cfg.image_size}px, {n_student / 1e6:.1f}M params; teacher "
          f"{recipe.teacher.model}, {n_teacher / 1e6:.1f}M params ({n_teacher_visual / 1e6:.1f}M "
          f"image tower); {keep}/{full.num_patches} patches kept")
    print(f"saved activations per block and sample: {per_block_sample / 2**20:.2f} MiB")
    for name, value in rows:
        print(f"  {name:<52} {value / GIB:7.2f} GiB")
    print(f"  {'total per GPU (computed; add CUDA context)':<52} {total / GIB:7.2f} GiB")


if __name__ == "__main__":
    main()
