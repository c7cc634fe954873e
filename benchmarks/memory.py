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

`train.grad_checkpointing` keeps only each block's input (the fp32 residual stream, batch x
tokens x width x 4 bytes a block) plus the activations of the one block being recomputed.

`train.sharding: fsdp` on N GPUs (FSDP2, bf16 parameters, fp32 reduction):
  student   the 16 bytes a parameter split over N GPUs; no DDP buckets
  gathered  the bf16 weights of the root (patch embedding, head: kept whole) and of two blocks
            (the one running and the one prefetched), plus one block's gradients in bf16 and
            fp32 for its reduce-scatter; the bf16 weight copies of the other blocks are freed
            after their forward and gathered again for their backward
  teacher   replicated in bf16, as with DDP; activations as with DDP (the same batch per GPU)

    python benchmarks/memory.py vitg14                    # the recipe's batch, 8 and 32 GPUs
    python benchmarks/memory.py vitb16 vitl14 vitg14 --gpus 8,32 --batch 64
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


def report(name: str, batch_arg: int, gpus: list[int]) -> list[tuple[str, str, float]]:
    """Print one recipe's breakdown; return (recipe, column, GiB) totals for the summary."""
    recipe = load_recipe(name)
    cfg = recipe.student
    batch = batch_arg or recipe.data.batch_size
    torch.manual_seed(0)

    teacher_cfg = open_clip.get_model_config(recipe.teacher.model)
    with torch.device("meta"):
        teacher = open_clip.create_model(recipe.teacher.model, pretrained=None, device="meta")
        full = UTAStudent(cfg, int(teacher_cfg["embed_dim"]))
    n_student = sum(p.numel() for p in full.parameters())
    n_block = sum(p.numel() for p in full.trunk.blocks[0].parameters())
    n_root = n_student - cfg.depth * n_block  # what fully_shard on the root keeps gathered
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
    # checkpointed: each block's fp32 input, one block's own activations, the rest
    checkpointed = batch * (cfg.depth * (1 + keep) * cfg.width * 4 + per_block_sample
                            + per_sample_rest)
    casts = cfg.depth * fixed_block + fixed_rest
    teacher_bytes = 2 * n_teacher

    ddp = {"student weights + grads + AdamW (16 B/param)": 16 * n_student,
           "DDP gradient buckets (4 B/param)": 4 * n_student,
           "bf16 weight copies held for backward": casts}
    columns = {"DDP": ddp}
    for n in gpus:
        columns[f"FSDP x{n}"] = {
            "student weights + grads + AdamW (16 B/param)": 16 * n_student / n,
            "DDP gradient buckets (4 B/param)": 0,
            "bf16 weight copies held for backward": 0,
            "FSDP gathered root + 2 blocks (bf16), 1 block grads": 2 * n_root + 2 * 2 * n_block
            + (2 + 4) * n_block}
    rows = list(dict.fromkeys(k for c in columns.values() for k in c))
    print(f"recipe {name}: student {cfg.family} w{cfg.width} d{cfg.depth} "
          f"p{cfg.patch_size} {cfg.image_size}px, {n_student / 1e6:.1f}M params; teacher "
          f"{recipe.teacher.model}, {n_teacher / 1e6:.1f}M params ({n_teacher_visual / 1e6:.1f}M "
          f"image tower); {keep}/{full.num_patches} patches kept; batch {batch} per GPU")
    print(f"saved activations per block and sample: {per_block_sample / 2**20:.2f} MiB")
    width = 54
    print(f"  {'GiB per GPU':<{width}}" + "".join(f"{c:>11}" for c in columns))
    for row in rows:
        print(f"  {row:<{width}}" + "".join(f"{c.get(row, 0) / GIB:11.2f}"
                                           for c in columns.values()))
    common = [(f"saved activations, batch {batch} x {1 + keep} tokens", activations),
              ("  with train.grad_checkpointing", checkpointed),
              ("teacher weights, bf16 (2 B/param)", teacher_bytes)]
    for row, value in common:
        print(f"  {row:<{width}}" + f"{value / GIB:11.2f}" * len(columns))
    totals = []
    for label, act in (("total per GPU (add CUDA context)", activations),
                       ("  with train.grad_checkpointing", checkpointed)):
        values = [sum(c.values()) + act + teacher_bytes for c in columns.values()]
        print(f"  {label:<{width}}" + "".join(f"{v / GIB:11.2f}" for v in values))
        ac = "checkpointing" if act is checkpointed else "plain"
        totals += [(name, f"{col} {ac}", v / GIB) for col, v in zip(columns, values)]
    print()
    return totals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--batch", type=int, default=0, help="per GPU (default: the recipe's)")
    ap.add_argument("--gpus", default="8,32", help="FSDP columns: numbers of GPUs sharing "
                                                   "the student (default 8,32)")
    args = ap.parse_args()
    gpus = [int(g) for g in args.gpus.split(",") if g.strip()]
    totals = [t for name in args.recipes for t in report(name, args.batch, gpus)]
    if len(args.recipes) > 1:  # the summary: one row per recipe, GiB per GPU
        cols = list(dict.fromkeys(c for _, c, _ in totals))
        print("| recipe | " + " | ".join(cols) + " |")
        print("|---" * (len(cols) + 1) + "|")
        for name in args.recipes:
            got = {c: v for r, c, v in totals if r == name}
            print(f"| {name} | " + " | ".join(f"{got[c]:.1f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
