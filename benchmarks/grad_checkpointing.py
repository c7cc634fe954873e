"""Peak memory of one student training step (forward, loss, backward) with and without
activation checkpointing (`train.grad_checkpointing`), at B/16 and L/14 sizes.

    python benchmarks/grad_checkpointing.py --check   # B/16 and L/14, batch 32 (a few minutes)
    python benchmarks/grad_checkpointing.py --configs b16 --batch 64 --precision bf16

Method: torch's own memory tracker (`torch.distributed._tools.mem_tracker.MemTracker`, a
dispatch mode that adds up the bytes of every tensor storage while it is alive) over one step
run on fake tensors (`FakeTensorMode`): shapes, dtypes and lifetimes are those of a real step,
but nothing is computed or allocated, so L/14 at batch 32 is measured on a laptop in seconds.
What it counts is what a caching allocator must hold at the step's peak, without allocator
fragmentation or kernel workspaces. `--check` first compares the fake count with the same tracker
on real tensors for a small model (fp32: equal to the byte; bf16: within 1%).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from uta_cli.losses import token_alignment_loss
from uta_cli.models.student import UTAStudent
from uta_cli.recipe import StudentConfig

EVA = dict(family="eva", image_size=224, mlp_ratio=2.6666666667,
           timm_kwargs={"ref_feat_shape": [16, 16]})
CONFIGS = {  # the students of recipes/vitb16.yaml and recipes/vitl14.yaml; teacher embed dim
    "b16": (StudentConfig(patch_size=16, width=768, depth=12, heads=12, **EVA), 768),
    "l14": (StudentConfig(patch_size=14, width=1024, depth=24, heads=16, **EVA), 1024),
    "small": (StudentConfig(family="eva", image_size=64, patch_size=8, width=96, depth=4,
                            heads=2, mlp_ratio=2.6666666667), 64),
}


def step_peak(name: str, batch: int, ratio: float, checkpointing: bool, precision: str,
              fake: bool = True) -> dict[str, float]:
    """Peak bytes of one forward + loss + backward, split into the weights and the rest."""
    cfg, embed_dim = CONFIGS[name]
    torch.manual_seed(0)
    model = UTAStudent(cfg, embed_dim).train()  # real weights; the step runs on fake inputs
    model.set_grad_checkpointing(checkpointing)
    n = model.num_patches
    keep = torch.stack([torch.randperm(n)[: n - round(n * ratio)] for _ in range(batch)])
    mode = FakeTensorMode() if fake else torch.no_grad()
    with mode:
        if fake:  # weights on fake tensors too (real ones would be copied into fake at each use)
            for module in model.modules():
                for key, p in module._parameters.items():
                    if p is not None:
                        module._parameters[key] = torch.nn.Parameter(mode.from_tensor(p))
                for key, b in module._buffers.items():
                    if b is not None:
                        module._buffers[key] = mode.from_tensor(b)
            keep = mode.from_tensor(keep)
        torch.set_grad_enabled(True)
        images = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
        target = torch.randn(batch, 1 + keep.shape[1], embed_dim)
        tracker = MemTracker()
        tracker.track_external(model)
        amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        with tracker:
            with amp:
                loss = token_alignment_loss(model(images, keep), target)["loss"]
            loss.backward()
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    weights = sum(v for k, v in peak.items() if str(k).endswith(("PARAM", "BUFFER")))
    total = peak["Total"]
    return {"total": total, "weights": weights, "step": total - weights,
            "visible": keep.shape[1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="b16,l14")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ratio", type=float, default=0.5, help="mask ratio (tokens dropped)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--check", action="store_true",
                    help="first check fake against real tensors on a small model")
    args = ap.parse_args()
    mib = 2**20
    if args.check:
        for ck in (False, True):
            fake = step_peak("small", 8, args.ratio, ck, args.precision, fake=True)["step"]
            real = step_peak("small", 8, args.ratio, ck, args.precision, fake=False)["step"]
            print(f"check small, checkpointing={ck}: fake {fake / mib:.2f} MiB, real "
                  f"{real / mib:.2f} MiB")
            # exact in fp32; under bf16 autocast the weight-cast cache differs by a few KiB
            assert abs(fake - real) <= 0.01 * real, "fake and real tensors disagree"
    print(f"batch {args.batch}, mask ratio {args.ratio}, {args.precision}; MiB beyond the "
          f"weights at the step's peak (activations, temporaries, gradients)")
    print(f"{'config':6} {'visible':>7} {'plain':>9} {'checkpointed':>12} {'saving':>7} "
          f"{'weights':>8}")
    for name in args.configs.split(","):
        t = time.perf_counter()
        plain = step_peak(name, args.batch, args.ratio, False, args.precision)
        ck = step_peak(name, args.batch, args.ratio, True, args.precision)
        saving = 1 - ck["step"] / plain["step"]
        print(f"{name:6} {plain['visible']:>7} {plain['step'] / mib:>9.0f} "
              f"{ck['step'] / mib:>12.0f} {saving:>7.1%} {plain['weights'] / mib:>8.0f}"
              f"   ({time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
