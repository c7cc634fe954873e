"""CPU inference throughput of the exported student: onnxruntime vs TorchScript vs eager PyTorch.

Same model, same inputs, measured in one run, at batch 1 and 32; prints images/s and ratios to
eager. The model is an EVA-02-style student with RoPE (random weights: speed does not depend on
them).

    python benchmarks/export.py                    # ViT-S/16-sized Eva at 224 px
    python benchmarks/export.py --width 768 --depth 12 --heads 12   # B/16
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from uta_cli.export.formats import ExportModule, export_onnx, export_torchscript, load_runner
from uta_cli.models.student import UTAStudent
from uta_cli.recipe import StudentConfig


def throughput(run, x: torch.Tensor, seconds: float) -> float:
    for _ in range(3):  # warm-up: TorchScript's profiling executor optimises after a few runs
        run(x)
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        t = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t)
    return x.shape[0] / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = StudentConfig(family="eva", image_size=args.image_size, patch_size=16,
                        width=args.width, depth=args.depth, heads=args.heads,
                        mlp_ratio=2.6666666667)
    module = ExportModule(UTAStudent(cfg, embed_dim=512).eval(), "embedding").eval()
    example = torch.randn(2, 3, args.image_size, args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, ts_path = os.path.join(tmp, "m.onnx"), os.path.join(tmp, "m.ts")
        exporter = export_onnx(module, example, onnx_path, {}, None, say=lambda s: None)
        export_torchscript(module, example, ts_path)

        def eager(x):
            with torch.inference_mode():
                return module(x)

        runners = {"eager PyTorch": eager, f"onnxruntime ({exporter})": load_runner("onnx",
                                                                                    onnx_path),
                   "TorchScript": load_runner("torchscript", ts_path)}
        print(f"Eva student {args.width}x{args.depth} at {args.image_size}px, embedding output, "
              f"{torch.get_num_threads()} threads")
        print(f"{'runtime':28} {'batch':>5} {'img/s':>9} {'vs eager':>9}")
        for batch in (1, 32):
            x = torch.randn(batch, 3, args.image_size, args.image_size)
            base = None
            for name, run in runners.items():
                ips = throughput(run, x, args.seconds)
                base = base or ips
                print(f"{name:28} {batch:>5} {ips:>9.1f} {ips / base:>8.2f}x")


if __name__ == "__main__":
    main()
