"""`uta zeroshot` against a plain open_clip loop, measured side by side in one run.

1. Image pass on the same CLIP model and the same JPEGs (ImageNet-sized): uta's evaluation loop
   (what `uta zeroshot --teacher` runs for the teacher: decoding and uint8 crops in loader
   workers, normalised per batch, weights cast for the chosen precision, top-k kept per sample)
   against the loop one writes with open_clip and torchvision (CLIP_benchmark's): open_clip's
   preprocess in an ImageFolder, its `build_zero_shot_classifier`, `encode_image`. Per
   precision; the top-1 agreement between the two is printed beside the speed.
2. Class weights on the same text tower and prompts: uta's builder with trimmed context (each
   text forward only as long as its longest prompt, prompts sorted by length) and with full
   context, against open_clip's `build_zero_shot_classifier` (10 classes per forward, all 77
   positions); the 1000-class time projected from a few classes spread over ImageNet's, for
   each text tower named (ViT-B-16, EVA02-L-14 by default); and loading from uta's cache.
3. The student's precision paths on this device (fp32, bf16 autocast, bf16 weights): the
   measurement behind `--precision auto`.

    python benchmarks/zeroshot.py                    # minutes on 2 CPUs: 10 classes x 80
    python benchmarks/zeroshot.py --model ViT-B-16 --images 1000 --precisions fp32,bf16
    python benchmarks/zeroshot.py --skip throughput,precision --classes 4   # class weights only

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

from uta_cli.data.pipeline import EvalTransform
from uta_cli.evaluate.class_weights import (
    classifier_cache_key,
    load_cached_classifier,
    save_cached_classifier,
)
from uta_cli.evaluate.datasets import resolve_dataset
from uta_cli.evaluate.encoders import Encoder, eval_view, resolve_precision
from uta_cli.evaluate.per_process import classify_shard, merge_classification, shard_loader
from uta_cli.evaluate.zeroshot import TextEncoder, build_classifier
from uta_cli.models.student import UTAStudent
from uta_cli.models.teacher import load_teacher
from uta_cli.recipe import StudentConfig

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


IMAGE_HW = (375, 500)  # the most common ImageNet validation image size


def write_images(folder: str, n: int, classes: int) -> list[str]:
    """JPEGs (decoding and resizing cost what they cost on real data), coloured + noise."""
    rng = np.random.default_rng(0)
    names = [f"class_{c:03d}" for c in range(classes)]
    for i in range(n):
        d = os.path.join(folder, names[i % classes])
        os.makedirs(d, exist_ok=True)
        img = rng.uniform(0, 1, (1, 1, 3)) + rng.normal(0, 0.2, (*IMAGE_HW, 3))
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(
            os.path.join(d, f"{i:05d}.jpg"), quality=90)
    return names


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


# ------------------------------------------------------------------------------ 1. throughput


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the loader workers, which a
    non-persistent DataLoader joins at the end of its pass)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def shared_classifier(clip_dir: str, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """open_clip's fp32 class weights, given to both loops: the image pass is what is compared
    (class weights are part 2), and equal weights make the predictions comparable."""
    model = open_clip.create_model("local-dir:" + clip_dir).eval()
    tokenizer = open_clip.get_tokenizer("local-dir:" + clip_dir)
    with torch.no_grad():
        return open_clip.build_zero_shot_classifier(
            model, tokenizer, classnames, [t.replace("{c}", "{}") for t in templates]).float()


def plain_loop(clip_dir: str, data: str, classifier: torch.Tensor, batch: int, workers: int,
               precision: str) -> tuple[float, float, torch.Tensor]:
    """What one writes with open_clip and torchvision (CLIP_benchmark's loop; bf16 as weights,
    since autocast re-casts frozen weights every call on CPU). Returns (wall s, cpu s, top-1)."""
    import torchvision

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + clip_dir)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model.eval().to(dtype)
    dataset = torchvision.datasets.ImageFolder(data, transform=preprocess)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers)
    t0, c0 = time.perf_counter(), cpu_seconds()
    preds = []
    with torch.no_grad():
        for images, _ in loader:
            emb = F.normalize(model.encode_image(images.to(dtype)).float(), dim=-1)
            preds.append((100.0 * emb @ classifier).argmax(dim=-1))
    return time.perf_counter() - t0, cpu_seconds() - c0, torch.cat(preds)


def uta_loop(clip_dir: str, data: str, classifier: torch.Tensor, batch: int, workers: int,
             precision: str) -> tuple[float, float, torch.Tensor]:
    """uta zeroshot's loop for the teacher (class weights given, as above)."""
    device = torch.device("cpu")
    teacher = load_teacher("local-dir:" + clip_dir, "").to(device, precision)
    ident = teacher.identity
    encoder = Encoder("teacher", ident.model, ident.model,
                      eval_view("teacher", teacher.image_size, ident.mean, ident.std,
                            ident.interpolation), teacher.encode_image, teacher)
    evalset = resolve_dataset(data)
    transform = EvalTransform([encoder.view])
    console = Console(quiet=True)
    t0, c0 = time.perf_counter(), cpu_seconds()
    loader, total = shard_loader(evalset, transform, 0, 1, batch, workers, pin=False)
    part = classify_shard(loader, total, [encoder], {"teacher": classifier}, device, console,
                          False)
    del loader  # its workers are done: their CPU time is counted
    merge_classification([part], ["teacher"], len(evalset.classnames))  # what the CLI does next
    return (time.perf_counter() - t0, cpu_seconds() - c0,
            part["predictions"]["teacher"].topk[:, 0])


# ------------------------------------------------------------------------- 2. class weights

# A stand-in image tower: only the text tower is measured.
TINY_VISION = {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16}


def text_tower(model: str, precision: str) -> tuple[torch.nn.Module, object]:
    """open_clip's `model` with its real text tower (random weights) and a tiny image tower."""
    cfg = open_clip.get_model_config(model)
    cls = open_clip.CustomTextCLIP if cfg.get("custom_text") else open_clip.CLIP
    torch.manual_seed(0)
    clip = cls(embed_dim=cfg["embed_dim"], vision_cfg=TINY_VISION, text_cfg=cfg["text_cfg"],
               quick_gelu=cfg.get("quick_gelu", False)).eval().requires_grad_(False)
    return clip.to(torch.bfloat16 if precision == "bf16" else torch.float32), \
        open_clip.get_tokenizer(model)


def spread_classnames(n: int) -> list[str]:
    """n ImageNet class names spread over the list (their prompt lengths as the whole set's)."""
    names = list(open_clip.IMAGENET_CLASSNAMES)
    return [names[i * len(names) // n] for i in range(n)]


BUILDERS = ("uta, trimmed context", "uta, full context", "open_clip build_zero_shot_classifier")


def class_weights(model: str, classes: int, templates: list[str], precision: str,
                  sides: tuple[str, ...], repeats: int) -> dict:
    """Seconds of each builder in `sides` on the same tower and prompts (best of `repeats`,
    interleaved, after a warm-up), the largest difference from open_clip's weights, and the
    cache's load time."""
    clip, tokenizer = text_tower(model, precision)

    def build(name: str, names: list[str], templates: list[str]) -> torch.Tensor:
        if name == BUILDERS[2]:
            return open_clip.build_zero_shot_classifier(
                clip, tokenizer, names, [t.replace("{c}", "{}") for t in templates],
                num_classes_per_batch=10).float()
        context = "trimmed" if name == BUILDERS[0] else "full"
        return build_classifier(TextEncoder(clip, context), tokenizer, names, templates)

    names = spread_classnames(classes)
    seconds: dict[str, float] = {}
    cpu_seconds: dict[str, float] = {}
    weights: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name in sides:  # warm-up: first calls pay for kernel selection and allocations
            build(name, names[:1], templates[:4])
        for _ in range(repeats):
            for name in sides:
                cpu = time.process_time()
                sec, weights[name] = timed(lambda name=name: build(name, names, templates))
                cpu = time.process_time() - cpu
                seconds[name] = min(sec, seconds.get(name, float("inf")))
                cpu_seconds[name] = min(cpu, cpu_seconds.get(name, float("inf")))
    ref = weights.get("open_clip build_zero_shot_classifier")
    diff = {k: (w - ref).abs().max().item() for k, w in weights.items()} if ref is not None \
        else {}
    out = {"seconds": seconds, "cpu_seconds": cpu_seconds, "max_abs_diff_vs_open_clip": diff,
           "note": TextEncoder(clip, "trimmed").note, "prompts": classes * len(templates)}
    with tempfile.TemporaryDirectory() as cache:
        w = next(iter(weights.values()))
        key = classifier_cache_key({"weights_fingerprint": "bench"}, names, templates, precision,
                                   text_context="trimmed")
        save_cached_classifier(cache, key, w, {})
        out["cache load"], _ = timed(lambda: load_cached_classifier(cache, key, len(names)))
    return out


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
    p.add_argument("--model", default="small", help="image pass: small (a 6-layer ViT at 96 px) "
                   "or an open_clip model name, e.g. ViT-B-16")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--image-classes", type=int, default=10)
    p.add_argument("--precisions", default="auto", help="image pass: comma list of fp32, bf16, "
                   "auto (what --precision auto picks here)")
    p.add_argument("--text-towers", default="ViT-B-16,EVA02-L-14", help="class weights: open_clip "
                   "models whose text towers are measured (random weights); the first is also "
                   "run through open_clip's builder, side by side")
    p.add_argument("--classes", type=int, default=10, help="class weights: ImageNet classes "
                   "spread over the 1000 (projected to 1000 linearly)")
    p.add_argument("--templates", type=int, default=80, help="class weights: OpenAI "
                   "templates used (up to 80)")
    p.add_argument("--text-precision", default="auto", help="class weights: fp32, bf16 or auto")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=max(0, min(8, (os.cpu_count() or 1) - 1)))
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs per side; best kept")
    p.add_argument("--skip", default="", help="comma list of parts to skip: throughput,build,"
                   "precision")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    all_templates = [t("{c}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES]
    cpu = torch.device("cpu")
    auto = resolve_precision("auto", cpu)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, cpu capability {torch.backends.cpu.get_cpu_capability()}; "
          f"uta precision auto -> {auto}")
    with tempfile.TemporaryDirectory() as tmp:
        if "throughput" not in skip:
            clip_dir = write_clip(os.path.join(tmp, "clip"), args.model)
            data = os.path.join(tmp, "images")
            write_images(data, args.images, args.image_classes)
            names = [f"class {c:03d}" for c in range(args.image_classes)]
            classifier = shared_classifier(clip_dir, names, all_templates[:8])
            sides = {}
            for prec in dict.fromkeys(auto if q == "auto" else q
                                      for q in args.precisions.split(",")):
                sides[f"plain open_clip loop ({prec})"] = (prec, lambda prec=prec: plain_loop(
                    clip_dir, data, classifier, args.batch, args.workers, prec))
                sides[f"uta zeroshot loop ({prec})"] = (prec, lambda prec=prec: uta_loop(
                    clip_dir, data, classifier, args.batch, args.workers, prec))
            best: dict[str, tuple[float, float, torch.Tensor]] = {}
            for _ in range(args.repeats):  # interleaved, so drifting machine load hits all
                for name, (_, fn) in sides.items():
                    seconds, cpu, preds = fn()
                    if name in best:
                        seconds, cpu = min(seconds, best[name][0]), min(cpu, best[name][1])
                    best[name] = (seconds, cpu, preds)
            size = SMALL_CLIP["vision_cfg"]["image_size"] if args.model == "small" else \
                open_clip.get_model_config(args.model)["vision_cfg"]["image_size"]
            print(f"\n1. Image pass: {args.images} JPEGs ({IMAGE_HW[1]}x{IMAGE_HW[0]}), "
                  f"{args.model} at {size} px, batch {args.batch}, {args.workers} workers, "
                  f"best of {args.repeats}")
            print("   images/s: by wall time; per cpu s: by the CPU time of the process and its "
                  "loader workers (steadier when other jobs share the cores)")
            print(f"   {'path':30s} {'images/s':>9s} {'vs plain':>9s} {'per cpu s':>10s} "
                  f"{'vs plain':>9s} {'top-1 agreement':>16s}")
            for name, (seconds, cpu, preds) in best.items():
                base_s, base_cpu, base_pred = best[f"plain open_clip loop ({sides[name][0]})"]
                agree = (preds == base_pred).float().mean().item()
                print(f"   {name:30s} {args.images / seconds:9.1f} {base_s / seconds:8.2f}x "
                      f"{args.images / cpu:10.1f} {base_cpu / cpu:8.2f}x {agree:16.4f}")
        if "build" not in skip:
            templates = all_templates[:args.templates]
            prec = auto if args.text_precision == "auto" else args.text_precision
            towers = [t for t in args.text_towers.split(",") if t]
            print(f"\n2. Class weights: {args.classes} ImageNet classes (spread over the 1000) "
                  f"x {len(templates)} templates, random-weight text towers, {prec} weights, "
                  f"best of {args.repeats}; 1000-class time projected linearly")
            print("   wall: elapsed seconds; cpu: seconds of CPU this process got (steadier "
                  "when other jobs share the cores)")
            print(f"   {'text tower':11s} {'builder':38s} {'wall s':>8s} {'ratio':>6s} "
                  f"{'cpu s':>8s} {'ratio':>6s} {'1000x' + str(len(templates)) + ' wall':>14s} "
                  f"{'(cpu)':>9s} {'max |diff|':>10s}")
            for i, tower in enumerate(towers):
                sides = BUILDERS if i == 0 else BUILDERS[:1]
                r = class_weights(tower, args.classes, templates, prec, sides, args.repeats)
                ref, ref_cpu = (r[k].get(BUILDERS[2]) for k in ("seconds", "cpu_seconds"))
                for name, sec in r["seconds"].items():
                    cpu = r["cpu_seconds"][name]
                    ratios = f"{sec / ref:5.2f}x {cpu:8.2f} {cpu / ref_cpu:5.2f}x" if ref \
                        else f"{'':6s} {cpu:8.2f} {'':6s}"
                    diff = r["max_abs_diff_vs_open_clip"].get(name)
                    print(f"   {tower:11s} {name:38s} {sec:8.2f} {ratios} "
                          f"{sec * 1000 / args.classes / 60:10.1f} min "
                          f"{cpu * 1000 / args.classes / 60:5.1f} min "
                          + (f"{diff:10.1e}" if diff is not None else ""))
                print(f"   {tower:11s} {'(' + r['note'] + ')'}")
            print(f"   cache load of the weights: {r['cache load'] * 1000:.1f} ms")
        if "precision" not in skip:
            r = student_precisions(96 if args.model == "small" else 224, 3, 16)
            print("\n3. Student (EVA-style, width 384, depth 6) images/s by precision path:")
            for name, ips in r.items():
                print(f"   {name:34s} {ips:9.1f} {ips / r['fp32']:8.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
