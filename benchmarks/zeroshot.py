"""`uta zeroshot` against a plain open_clip loop, measured side by side in one run.

1. Image throughput on the same CLIP model and the same JPEGs: uta's evaluation loop (what
   `uta zeroshot --teacher` runs for the teacher: uint8 crops from a multi-worker loader,
   normalised per batch, weights cast for the chosen precision, top-k kept per sample) against
   the loop one writes with open_clip: its own preprocess in a torchvision ImageFolder, its
   `build_zero_shot_classifier`, `encode_image`, fp32 (CLIP_benchmark's amp is CUDA-only).
   Top-1 agreement between the two is printed beside the speed.
2. Building the classifier: uta's batched builder (all templates of many classes per text
   forward) against one class at a time (open_clip's legacy builder) and against open_clip's
   default (10 classes per forward); and loading it back from uta's disk cache.
3. The student's precision paths on this device (fp32, bf16 autocast, bf16 weights): the
   measurement behind `--precision auto`.

    python benchmarks/zeroshot.py                                  # 1000 x 80, minutes on 2 CPUs
    python benchmarks/zeroshot.py --classes 100 --templates 80 --images 256       # about a minute
    python benchmarks/zeroshot.py --model ViT-B-16 --images 64     # the real architecture

Models have random weights (only speed and agreement are measured); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console
from safetensors.torch import save_file

from uta_cli.data import EvalTransform
from uta_cli.evaluation import (
    Encoder,
    classify_shard,
    eval_view,
    merge_classification,
    resolve_dataset,
    resolve_precision,
    shard_loader,
)
from uta_cli.models.student import UTAStudent
from uta_cli.models.teacher import load_teacher
from uta_cli.recipe import StudentConfig
from uta_cli.zeroshot import (
    build_classifier,
    classifier_cache_key,
    load_cached_classifier,
    save_cached_classifier,
)

SMALL_CLIP = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 96, "layers": 6, "width": 384, "head_width": 64,
                   "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2,
                 "layers": 2},
}


def write_clip(folder: str, model: str) -> str:
    """A random-weight CLIP as an open_clip local-dir folder, so both sides load the same file."""
    torch.manual_seed(0)
    if model == "small":
        cfg, clip = SMALL_CLIP, open_clip.CLIP(**SMALL_CLIP)
    else:
        cfg, clip = open_clip.get_model_config(model), open_clip.create_model(model)
    size = cfg["vision_cfg"]["image_size"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": cfg, "preprocess_cfg": {
            "size": size, "mean": list(open_clip.OPENAI_DATASET_MEAN),
            "std": list(open_clip.OPENAI_DATASET_STD), "interpolation": "bicubic"}}, f)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()},
              os.path.join(folder, "open_clip_model.safetensors"))
    return folder


def write_images(folder: str, n: int, classes: int, size: int = 256) -> list[str]:
    """JPEGs (decoding and resizing cost what they cost on real data), coloured + noise."""
    rng = np.random.default_rng(0)
    names = [f"class_{c:03d}" for c in range(classes)]
    for i in range(n):
        d = os.path.join(folder, names[i % classes])
        os.makedirs(d, exist_ok=True)
        img = rng.uniform(0, 1, (1, 1, 3)) + rng.normal(0, 0.2, (size, size + 64, 3))
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(
            os.path.join(d, f"{i:05d}.jpg"), quality=90)
    return names


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


# ------------------------------------------------------------------------------ 1. throughput


def plain_loop(clip_dir: str, data: str, classnames: list[str], templates: list[str],
               batch: int, workers: int) -> tuple[float, torch.Tensor, int]:
    """What one writes with open_clip and torchvision. Returns (seconds, top-1 per image, n)."""
    import torchvision

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + clip_dir)
    model.eval()
    tokenizer = open_clip.get_tokenizer("local-dir:" + clip_dir)
    classifier = open_clip.build_zero_shot_classifier(
        model, tokenizer, classnames, [t.replace("{c}", "{}") for t in templates])
    dataset = torchvision.datasets.ImageFolder(data, transform=preprocess)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers)
    t0 = time.perf_counter()
    preds = []
    with torch.no_grad():
        for images, _ in loader:
            emb = F.normalize(model.encode_image(images), dim=-1)
            preds.append((100.0 * emb @ classifier).argmax(dim=-1))
    return time.perf_counter() - t0, torch.cat(preds), len(dataset)


def uta_loop(clip_dir: str, data: str, templates: list[str], batch: int, workers: int,
             precision: str) -> tuple[float, torch.Tensor, int]:
    """uta zeroshot's loop for the teacher (classifier built outside the timing, as above)."""
    device = torch.device("cpu")
    teacher = load_teacher("local-dir:" + clip_dir, "").to(device, precision)
    ident = teacher.identity
    encoder = Encoder("teacher", ident.model, ident.model,
                      eval_view("teacher", teacher.image_size, ident.mean, ident.std,
                            ident.interpolation), teacher.encode_image, teacher)
    evalset = resolve_dataset(data)
    classifier = build_classifier(teacher.clip.encode_text, teacher.tokenizer,
                                  evalset.classnames, templates, device)
    transform = EvalTransform([encoder.view])
    console = Console(quiet=True)
    t0 = time.perf_counter()
    loader, total = shard_loader(evalset, transform, 0, 1, batch, workers, pin=False)
    part = classify_shard(loader, total, [encoder], {"teacher": classifier}, device, console,
                          False)
    seconds = time.perf_counter() - t0
    merge_classification([part], ["teacher"], len(evalset.classnames))  # what the CLI does next
    return seconds, part["predictions"]["teacher"].topk[:, 0], len(evalset.index)


# ------------------------------------------------------------------------- 2. classifier build


def classifier_builds(clip_dir: str, classes: int, templates: list[str]) -> dict:
    model = open_clip.create_model("local-dir:" + clip_dir).eval()
    tokenizer = open_clip.get_tokenizer("local-dir:" + clip_dir)
    names = list(open_clip.IMAGENET_CLASSNAMES)[:classes] if classes <= 1000 else \
        [f"class {i}" for i in range(classes)]
    fmt = [t.replace("{c}", "{}") for t in templates]
    out = {}
    out["uta batched"], w_uta = timed(lambda: build_classifier(
        model.encode_text, tokenizer, names, templates))
    out["open_clip (10 classes/forward)"], w_oc = timed(lambda: open_clip.
                                                          build_zero_shot_classifier(
                                                              model, tokenizer, names, fmt))
    out["one class at a time"], w_one = timed(lambda: open_clip.
                                              build_zero_shot_classifier_legacy(
                                                  model, tokenizer, names, fmt))
    with tempfile.TemporaryDirectory() as cache:
        key = classifier_cache_key({"weights_fingerprint": "bench"}, names, templates, "float32")
        save_cached_classifier(cache, key, w_uta, {})
        out["uta cache load"], cached = timed(lambda: load_cached_classifier(cache, key,
                                                                              len(names)))
    diff = max((w_uta - w_one).abs().max().item(), (w_uta - w_oc).abs().max().item(),
               (w_uta - cached).abs().max().item())
    return {"seconds": out, "max_abs_diff": diff, "shape": list(w_uta.shape)}


# --------------------------------------------------------------------- 3. student precisions


def student_precisions(size: int, iters: int, batch: int, rounds: int = 3) -> dict:
    cfg = StudentConfig(family="eva", image_size=size, patch_size=16, width=384, depth=6,
                        heads=6, mlp_ratio=2.6666666667)
    x = torch.randn(batch, 3, size, size)
    student = UTAStudent(cfg, 256).eval().requires_grad_(False)
    bf16 = UTAStudent(cfg, 256).eval().requires_grad_(False).to(torch.bfloat16)

    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return student.encode_image(x)

    paths = {"fp32": lambda: student.encode_image(x), "bf16 autocast": autocast,
             "bf16 weights": lambda: bf16.encode_image(x.to(torch.bfloat16))}
    out = {name: 0.0 for name in paths}
    with torch.inference_mode():
        for fn in paths.values():
            fn()  # warm-up
        for _ in range(rounds):  # interleaved rounds, best kept: the machine's load drifts
            for name, fn in paths.items():
                t = time.perf_counter()
                for _ in range(iters):
                    fn()
                out[name] = max(out[name], batch * iters / (time.perf_counter() - t))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small", help="small (a 6-layer ViT at 96 px, 2-layer "
                   "text tower at context 77) or an open_clip model name, e.g. ViT-B-16")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--image-classes", type=int, default=10)
    p.add_argument("--classes", type=int, default=1000, help="classifier build: class count")
    p.add_argument("--templates", type=int, default=80, help="classifier build: OpenAI "
                   "templates used (up to 80)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=max(0, min(8, (os.cpu_count() or 1) - 1)))
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs per side; best kept")
    p.add_argument("--skip", default="", help="comma list of parts to skip: throughput,build,"
                   "precision")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    all_templates = [t("{c}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, cpu capability {torch.backends.cpu.get_cpu_capability()}; "
          f"uta precision auto -> {resolve_precision('auto', torch.device('cpu'))}")
    with tempfile.TemporaryDirectory() as tmp:
        clip_dir = write_clip(os.path.join(tmp, "clip"), args.model)
        if "throughput" not in skip:
            data = os.path.join(tmp, "images")
            write_images(data, args.images, args.image_classes)
            templates = all_templates[:8]
            auto = resolve_precision("auto", torch.device("cpu"))
            sides = {
                "plain open_clip loop (fp32)": lambda: plain_loop(
                    clip_dir, data, [f"class {c:03d}" for c in range(args.image_classes)],
                    templates, args.batch, args.workers),
                f"uta zeroshot loop (auto = {auto})": lambda: uta_loop(
                    clip_dir, data, templates, args.batch, args.workers, auto),
            }
            if auto != "bf16":  # show what forcing bf16 costs here
                sides["uta zeroshot loop (bf16)"] = lambda: uta_loop(
                    clip_dir, data, templates, args.batch, args.workers, "bf16")
            best: dict[str, tuple[float, torch.Tensor]] = {}
            for _ in range(args.repeats):  # interleaved, so drifting machine load hits all
                for name, fn in sides.items():
                    seconds, preds, _ = fn()
                    if name not in best or seconds < best[name][0]:
                        best[name] = (seconds, preds)
            base_s, base_pred = best["plain open_clip loop (fp32)"]
            print(f"\n1. Image throughput: {args.images} JPEGs (256x320), {args.model} at "
                  f"{SMALL_CLIP['vision_cfg']['image_size'] if args.model == 'small' else ''}"
                  f" px, batch {args.batch}, {args.workers} workers, best of {args.repeats}")
            print(f"   {'path':34s} {'images/s':>9s} {'vs plain':>9s} {'top-1 agreement':>16s}")
            for name, (seconds, preds) in best.items():
                agree = (preds == base_pred).float().mean().item()
                print(f"   {name:34s} {args.images / seconds:9.1f} {base_s / seconds:8.2f}x "
                      f"{agree:16.4f}")
        if "build" not in skip:
            templates = all_templates[:args.templates]
            r = classifier_builds(clip_dir, args.classes, templates)
            s = r["seconds"]
            one = s["one class at a time"]
            print(f"\n2. Classifier build: {args.classes} classes x {len(templates)} templates "
                  f"-> {tuple(r['shape'])}, max |difference| {r['max_abs_diff']:.1e}")
            print(f"   {'builder':34s} {'seconds':>9s} {'speed-up vs one class at a time':>32s}")
            for name, sec in s.items():
                print(f"   {name:34s} {sec:9.4f} {one / sec:31.1f}x")
        if "precision" not in skip:
            r = student_precisions(96 if args.model == "small" else 224, 3, 16)
            print("\n3. Student (EVA-style, width 384, depth 6) images/s by precision path:")
            for name, ips in r.items():
                print(f"   {name:34s} {ips:9.1f} {ips / r['fp32']:8.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
