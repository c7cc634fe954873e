"""`uta zeroshot` on tiny models: the protocol against an independent computation, the JSON and
CSV, retrieval recall@k, corrupt images, bad inputs, the classifier cache, tar shards, ImageNet
layout, and two processes against one."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import free_port, tiny_overrides, write_clip_folder
from PIL import Image
from typer.testing import CliRunner

from uta_cli.app import app
from uta_cli.data.pipeline import EvalTransform
from uta_cli.errors import UtaUsageError
from uta_cli.evaluate.class_weights import cached_classifier, classifier_cache_key
from uta_cli.evaluate.datasets import parse_captions, resolve_dataset, resolve_eval_templates
from uta_cli.evaluate.encoders import build_encoders, resolve_precision, text_encoder
from uta_cli.evaluate.per_process import (
    classify_shard,
    merge_classification,
    merge_retrieval,
    retrieval_shard,
    shard_loader,
)
from uta_cli.evaluate.zeroshot import (
    build_classifier,
    classification_metrics,
    evaluate,
    resolve_templates,
    retrieval_metrics,
)

CLASSES = ("cat", "big_dog", "fish", "bird", "red_car", "tree")
TEMPLATES = ("a photo of a {c}.", "a {c} in the wild.", "art of the {c}.")
runner = CliRunner()


# ------------------------------------------------------------------------------------ fixtures


def write_varied_images(folder, per_class: int, classes=CLASSES, size: int = 40,
                        seed: int = 0) -> list[str]:
    """Square PNGs: a random solid colour plus noise of random strength. Unlike pure noise they
    spread a random tiny CLIP's predictions over several classes, so accuracy means something."""
    rng = np.random.default_rng(seed)
    paths = []
    for c in classes:
        os.makedirs(os.path.join(folder, c), exist_ok=True)
        for i in range(per_class):
            img = rng.uniform(0, 1, (1, 1, 3)) + rng.normal(0, rng.uniform(0, 0.5),
                                                            (size, size, 3))
            path = os.path.join(folder, c, f"{i:03d}.png")
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)
            paths.append(path)
    return paths


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A real (short) pre-training run against a tiny CLIP teacher, plus a class folder."""
    root = tmp_path_factory.mktemp("zs")
    clip_dir = write_clip_folder(root / "clip", seed=2)
    run_dir = root / "run"
    cmd = [sys.executable, "-m", "uta_cli", "pretrain", "demo", "--output-dir", str(run_dir)]
    # The student's size and normalisation differ from the teacher's (48 px, mean/std 0.5), so
    # each model must get its own recorded preprocessing.
    for s in tiny_overrides(clip_dir, steps=3, **{"student.image_size": 48,
                                                   "data.mean": "[0.5,0.5,0.5]",
                                                   "data.std": "[0.5,0.5,0.5]"}):
        cmd += ["--set", s]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "UTA_CACHE_DIR": str(root / "cache")})
    assert out.returncode == 0, out.stderr[-3000:]
    data = root / "images"
    write_varied_images(data, 6)
    templates = root / "templates.txt"
    templates.write_text("\n".join(TEMPLATES) + "\n\n")
    return {"root": root, "clip": clip_dir, "run": str(run_dir), "data": str(data),
            "templates": str(templates)}


def zs(*args: str):
    result = runner.invoke(app, ["zeroshot", *map(str, args)])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def zs_json(tmp_path, *args: str, name: str = "out.json") -> dict:
    path = tmp_path / name
    result = zs(*args, "--output-json", path, "--workers", "0")
    assert result.exit_code == 0, result.output
    return json.loads(path.read_text())


# -------------------------------------------------------------------- independent computation


def independent_classification(setup, model_fn, transform, classnames, data) -> dict:
    """open_clip's own classifier builder, image transform and encode path; metrics by hand."""
    clip, _, _ = open_clip.create_model_and_transforms("local-dir:" + setup["clip"])
    clip.eval()
    tokenizer = open_clip.get_tokenizer("local-dir:" + setup["clip"])
    weights = open_clip.build_zero_shot_classifier(
        clip, tokenizer, classnames, [t.replace("{c}", "{}") for t in TEMPLATES])
    folders = sorted(os.listdir(data))
    paths = [(os.path.join(data, c, f), i) for i, c in enumerate(folders)
             for f in sorted(os.listdir(os.path.join(data, c)))]
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p, _ in paths])
    labels = np.array([y for _, y in paths])
    with torch.no_grad():
        emb = F.normalize(model_fn(clip, x).float(), dim=-1)
    logits = 100.0 * emb @ weights
    top5 = logits.topk(5, dim=-1).indices.numpy()
    hit1 = top5[:, 0] == labels
    recall = [hit1[labels == c].mean() for c in range(len(folders)) if (labels == c).any()]
    return {"acc1": hit1.mean(), "acc5": (top5 == labels[:, None]).any(1).mean(),
            "mean_per_class_recall": float(np.mean(recall)),
            "predicted": set(top5[:, 0].tolist()),
            "per_class_top1": [int(hit1[labels == c].sum()) for c in range(len(folders))]}


def test_teacher_and_student_match_an_independent_computation_of_the_protocol(setup, tmp_path):
    from uta_cli.loading.model import student_from_checkpoint

    csv_path = tmp_path / "pc.csv"
    out = zs_json(tmp_path, "--ckpt", setup["run"], "--dataset", setup["data"], "--teacher",
                  "--templates", setup["templates"], "--precision", "fp32",
                  "--per-class", csv_path, "--batch-size", "7")
    names = [c.replace("_", " ") for c in sorted(CLASSES)]
    teacher_tf = open_clip.image_transform(32, is_train=False, interpolation="bicubic")
    want_t = independent_classification(setup, lambda m, x: m.encode_image(x), teacher_tf, names,
                                        setup["data"])
    assert len(want_t["predicted"]) >= 2  # the check is not vacuous
    got_t = out["teacher_result"]
    for k in ("acc1", "acc5", "mean_per_class_recall"):
        assert got_t["metrics"][k] == pytest.approx(want_t[k], abs=1e-12), k
    assert got_t["num_samples"] == 36 and got_t["model"] == "local-dir:" + setup["clip"]

    student, meta = student_from_checkpoint(setup["run"])
    sp = meta["student_preprocess"]
    student_tf = open_clip.image_transform(sp["size"], is_train=False, mean=sp["mean"],
                                           std=sp["std"], interpolation="bicubic")
    want_s = independent_classification(setup, lambda m, x: student.encode_image(x), student_tf,
                                        names, setup["data"])
    for k in ("acc1", "acc5", "mean_per_class_recall"):
        assert out["metrics"][k] == pytest.approx(want_s[k], abs=1e-12), k
        assert out[k] == out["metrics"][k]

    rows = [line.split(",") for line in csv_path.read_text().strip().splitlines()]
    assert rows[0][:3] == ["class_index", "classname", "num_samples"]
    assert [r[1] for r in rows[1:]] == names and all(r[2] == "6" for r in rows[1:])
    assert [int(r[3]) for r in rows[1:]] == want_s["per_class_top1"]
    assert [int(r[6]) for r in rows[1:]] == want_t["per_class_top1"]
    assert float(rows[1][4]) == pytest.approx(want_s["per_class_top1"][0] / 6, abs=1e-6)


def test_pretrained_checkpoint_end_to_end_json_has_every_field(setup, tmp_path):
    result = zs("--ckpt", setup["run"], "--dataset", "demo", "--workers", "0",
                "--output-json", tmp_path / "demo.json")
    assert result.exit_code == 0, result.output
    assert "top-1" in result.stdout and "UTA student" in result.stdout
    out = json.loads((tmp_path / "demo.json").read_text())
    # CLIP_benchmark's schema ...
    assert {"dataset", "model", "pretrained", "task", "metrics"} <= set(out)
    assert out["dataset"] == "demo" and out["task"] == "zeroshot_classification"
    assert set(out["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    # ... plus what the report promises (docs/zeroshot.md, Output)
    assert out["num_samples"] == 16  # demo.val_images of the checkpoint's recipe
    assert out["num_classes"] == 16 and out["skipped_images"] == 0
    assert out["checkpoint"]["step"] == 3 and out["checkpoint"]["path"].endswith("step_00000003")
    assert out["pretrained"] == out["checkpoint"]["path"]
    assert out["teacher"]["model"] == "local-dir:" + setup["clip"]
    assert out["teacher"]["weights_fingerprint"] and out["teacher"]["embed_dim"] == 32
    assert out["precision"] in ("fp32", "bf16") and out["precision_requested"] == "auto"
    assert out["image_size"] == 48 and out["preprocess"]["interpolation"] == "bicubic"
    assert out["preprocess"]["mean"] == [0.5, 0.5, 0.5]  # the student's recorded preprocessing
    assert out["templates"]["name"] == "demo" and out["templates"]["count"] == 4
    assert set(out["versions"]) == {"uta", "torch", "open_clip", "timm"}
    assert out["versions"]["open_clip"] == open_clip.__version__
    assert out["classifier"]["cache"] == "built" and "teacher_result" not in out
    assert 0 <= out["acc1"] <= out["acc5"] <= 1


def test_classifier_cache_hit_off_and_key(setup, tmp_path):
    args = ["--ckpt", setup["run"], "--dataset", setup["data"], "--templates", "simple"]
    first = zs_json(tmp_path, *args, name="a.json")
    second = zs_json(tmp_path, *args, name="b.json")
    off = zs_json(tmp_path, *args, "--cache-dir", "none", name="c.json")
    assert (first["classifier"]["cache"], second["classifier"]["cache"],
            off["classifier"]["cache"]) == ("built", "hit", "off")
    assert os.path.isfile(first["classifier"]["path"])
    assert first["metrics"] == second["metrics"] == off["metrics"]
    teacher = {"weights_fingerprint": "1:ab", "model": "local-dir:/x", "model_cfg": {"a": 1}}
    key = classifier_cache_key(teacher, ["a", "b"], ["{c}."], "float32")
    # the key names the cache files: written by earlier versions, they must keep hitting
    assert (key, classifier_cache_key(teacher, ["a", "b"], ["{c}."], "float32", "tuned:1",
                                      "trimmed")) == ("4f6480208c5549fcff62ffe4",
                                                      "b9784cd2fc069a7509bdfc5a")
    assert key == classifier_cache_key({**teacher, "model": "local-dir:/moved"}, ["a", "b"],
                                       ["{c}."], "float32")  # a moved teacher still hits
    for changed in (classifier_cache_key({**teacher, "weights_fingerprint": "2:cd"}, ["a", "b"],
                                         ["{c}."], "float32"),
                    classifier_cache_key(teacher, ["a", "c"], ["{c}."], "float32"),
                    classifier_cache_key(teacher, ["a", "b"], ["x {c}."], "float32"),
                    classifier_cache_key(teacher, ["a", "b"], ["{c}."], "bfloat16")):
        assert changed != key


def test_batched_classifier_equals_one_class_at_a_time_and_evaluate_is_unchanged(setup):
    from uta_cli.models.teacher import load_teacher

    teacher = load_teacher("local-dir:" + setup["clip"], "")
    names = [f"thing {i}" for i in range(11)]
    batched = build_classifier(teacher.clip.encode_text, teacher.tokenizer, names, TEMPLATES,
                               texts_per_batch=8)  # 2 classes per forward, a short last batch
    legacy = open_clip.build_zero_shot_classifier_legacy(
        teacher.clip, teacher.tokenizer, names, [t.replace("{c}", "{}") for t in TEMPLATES])
    torch.testing.assert_close(batched, legacy, rtol=0, atol=1e-5)
    emb = torch.randn(10, 32)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 8])
    got = evaluate(lambda x: x, [(emb[:6], labels[:6]), (emb[6:], labels[6:])], batched)
    top = (F.normalize(emb, dim=-1) @ batched).topk(5).indices
    assert got["acc1"] == pytest.approx((top[:, 0] == labels).float().mean().item())
    assert got["acc5"] == pytest.approx((top == labels[:, None]).any(1).float().mean().item())
    assert got["num_samples"] == 10


# ------------------------------------------------------------------------------------ retrieval


def reference_recall(scores: torch.Tensor, positives: torch.Tensor, k: int) -> float:
    """CLIP_benchmark's recall_at_k (one-hot formulation), then '> 0' and the mean."""
    n, m = scores.shape
    top = torch.topk(scores, k, dim=1)[1]
    onehot = F.one_hot(top, num_classes=m)
    true_pos = (onehot * positives.view(n, 1, m)).sum(dim=(1, 2))
    return ((true_pos / positives.sum(dim=1)) > 0).float().mean().item()


def test_retrieval_recall_on_a_hand_built_case():
    images = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), dim=-1)
    texts = F.normalize(torch.tensor([[1.0, 0.1], [0.9, 0.5], [0.1, 1.0], [0.2, -1.0]]), dim=-1)
    text_image = torch.tensor([0, 1, 1, 2])
    m = retrieval_metrics(images, texts, text_image, ks=(1, 2, 10))
    # texts -> images: t0 and t2 find their image first; t1 and t3 find it second
    assert m["image_retrieval_recall@1"] == 0.5 and m["image_retrieval_recall@2"] == 1.0
    # images -> texts: i0 -> t0 and i1 -> t2 hit at 1; i2's best text is t2 (of i1), then t3
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@2"] == 1.0 and m["text_retrieval_recall@10"] == 1.0
    # random case with 1-3 captions per image, against CLIP_benchmark's formula, chunked
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(13, 8, generator=g), dim=-1)
    text_image = torch.tensor([i for i in range(13) for _ in range(1 + i % 3)])
    texts = F.normalize(images[text_image] + 0.9 * torch.randn(len(text_image), 8, generator=g),
                        dim=-1)
    got = retrieval_metrics(images, texts, text_image, ks=(1, 5, 10), chunk=4)
    scores = texts @ images.T
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(len(texts)), text_image] = True
    for k in (1, 5, 10):
        assert got[f"image_retrieval_recall@{k}"] == pytest.approx(
            reference_recall(scores, positives, k))
        assert got[f"text_retrieval_recall@{k}"] == pytest.approx(
            reference_recall(scores.T, positives.T, k))
    assert 0 < got["image_retrieval_recall@1"] < 1  # not a degenerate case


def write_caption_set(folder, n: int = 7) -> list[tuple[str, list[str]]]:
    paths = write_varied_images(folder / "imgs", n, classes=("x",), seed=3)
    pairs = [(os.path.relpath(p, folder), [f"photo number {i}", f"a picture of item {i * 7}"])
             for i, p in enumerate(paths)]
    pairs[2][1].append("a third caption")
    (folder / "captions.json").write_text(json.dumps(
        [{"image": img, "captions": caps} for img, caps in pairs]))
    rows = ["file_name,caption"] + [f"{img},{c}" for img, caps in pairs for c in caps]
    (folder / "caps.csv").write_text("\n".join(rows) + "\n")
    return pairs


def test_retrieval_cli_matches_independent_computation_json_and_csv(setup, tmp_path):
    pairs = write_caption_set(tmp_path)
    out = zs_json(tmp_path, "--ckpt", setup["run"], "--task", "retrieval", "--dataset", tmp_path,
                  "--teacher", "--precision", "fp32")
    out_csv = zs_json(tmp_path, "--ckpt", setup["run"], "--task", "retrieval", "--dataset",
                      tmp_path / "caps.csv", "--teacher", "--precision", "fp32", name="b.json")
    assert out["task"] == "zeroshot_retrieval" and out["num_samples"] == 7
    assert out["num_texts"] == 15 and out_csv["metrics"] == out["metrics"]
    assert out_csv["teacher_result"]["metrics"] == out["teacher_result"]["metrics"]
    assert set(out["metrics"]) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text")
                                   for k in (1, 5, 10)}
    # independent: open_clip's transform and encoders, CLIP_benchmark's recall formula
    clip, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + setup["clip"])
    clip.eval()
    tokenizer = open_clip.get_tokenizer("local-dir:" + setup["clip"])
    x = torch.stack([preprocess(Image.open(tmp_path / img).convert("RGB")) for img, _ in pairs])
    texts = [c for _, caps in pairs for c in caps]
    text_image = torch.tensor([i for i, (_, caps) in enumerate(pairs) for _ in caps])
    with torch.no_grad():
        img = F.normalize(clip.encode_image(x), dim=-1)
        txt = F.normalize(clip.encode_text(tokenizer(texts)), dim=-1)
    scores = txt @ img.T
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(len(texts)), text_image] = True
    for k in (1, 5, 10):
        assert out["teacher_result"]["metrics"][f"image_retrieval_recall@{k}"] == pytest.approx(
            reference_recall(scores, positives, min(k, 7)))
        assert out["teacher_result"]["metrics"][f"text_retrieval_recall@{k}"] == pytest.approx(
            reference_recall(scores.T, positives.T, k))
    assert out["metrics"]["image_retrieval_recall@10"] == 1.0  # 7 images: all are in the top 10


def test_caption_file_formats():
    want = [("a.jpg", ["one", "two"]), ("b.jpg", ["three"])]
    assert parse_captions(json.dumps({"a.jpg": ["one", "two"], "b.jpg": "three"}), "json",
                          "x") == want
    coco = {"images": [{"id": 5, "file_name": "a.jpg"}, {"id": 9, "file_name": "b.jpg"}],
            "annotations": [{"image_id": 5, "caption": "one"}, {"image_id": 9, "caption": "three"},
                            {"image_id": 5, "caption": "two"}]}
    assert parse_captions(json.dumps(coco), "json", "x") == want
    assert parse_captions("image\ttext\na.jpg\tone\nb.jpg\tthree\na.jpg\ttwo\n", "tsv",
                          "x") == want
    with pytest.raises(UtaUsageError, match="image column"):
        parse_captions("foo,bar\n1,2\n", "csv", "x")
    with pytest.raises(UtaUsageError, match="no caption"):
        parse_captions(json.dumps({"a.jpg": []}), "json", "x")


# -------------------------------------------------------------------------------- robustness


def test_corrupt_images_are_skipped_and_counted(setup, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(setup["data"], data)
    (data / "fish" / "broken.png").write_bytes(b"not an image at all")
    good = (data / "cat" / "000.png").read_bytes()
    (data / "cat" / "truncated.png").write_bytes(good[: len(good) // 3])
    args = ["--ckpt", setup["run"], "--teacher", "--templates", "simple", "--precision", "fp32"]
    result = zs(*args, "--dataset", data, "--workers", "2", "--output-json", tmp_path / "c.json")
    assert result.exit_code == 0, result.output
    out = json.loads((tmp_path / "c.json").read_text())
    clean = zs_json(tmp_path, *args, "--dataset", setup["data"], name="clean.json")
    assert out["skipped_images"] == 2 and clean["skipped_images"] == 0
    assert out["num_samples"] == clean["num_samples"] == 36
    assert out["metrics"] == clean["metrics"]
    assert out["teacher_result"]["metrics"] == clean["teacher_result"]["metrics"]
    # nothing readable at all is an error, not a zero
    bad = tmp_path / "bad"
    os.makedirs(bad / "a")
    (bad / "a" / "x.png").write_bytes(b"junk")
    result = zs(*args, "--dataset", bad, "--workers", "0")
    assert result.exit_code == 2 and "No readable images" in result.stderr


def test_teacher_mismatch_is_exit_2(setup, tmp_path):
    other = write_clip_folder(tmp_path / "other", seed=7)
    result = zs("--ckpt", setup["run"], "--dataset", "demo", "--teacher-weights", other)
    assert result.exit_code == 2, result.output
    assert "Teacher mismatch" in result.stderr and "fingerprint" in result.stderr
    cfg = json.loads((setup["root"] / "clip" / "open_clip_config.json").read_text())["model_cfg"]
    narrow = write_clip_folder(tmp_path / "narrow", {**cfg, "embed_dim": 16})
    result = zs("--ckpt", setup["run"], "--dataset", "demo", "--teacher-weights", narrow)
    assert result.exit_code == 2 and "embed_dim 16 != 32" in result.stderr
    assert "Traceback" not in result.output
    # the same teacher at a new location is accepted
    moved = shutil.copytree(setup["clip"], tmp_path / "moved")
    ok = zs("--ckpt", setup["run"], "--dataset", "demo", "--teacher-weights", moved,
            "--workers", "0")
    assert ok.exit_code == 0, ok.output


def _bad_inputs(setup, tmp):
    root_img = tmp / "root_img"
    shutil.copytree(setup["data"], root_img)
    shutil.copy(root_img / "cat" / "000.png", root_img / "stray.png")
    empty_class = tmp / "empty_class"
    shutil.copytree(setup["data"], empty_class)
    os.makedirs(empty_class / "zebra")
    os.makedirs(tmp / "no_images" / "a")
    names2 = tmp / "names2.txt"
    names2.write_text("one\ntwo\n")
    bad_t = tmp / "bad_templates.txt"
    bad_t.write_text("a photo of a thing\n")
    caps = tmp / "caps.json"
    caps.write_text(json.dumps({"missing.png": ["a caption"]}))
    return [
        (["--dataset", root_img], ["sit directly in the root", "ROOT/<class name>/<image>"]),
        (["--dataset", empty_class], ["without images", "'zebra'"]),
        (["--dataset", tmp / "no_images"], ["No images found"]),
        (["--dataset", tmp / "nope"], ["does not exist"]),
        (["--dataset", "imagenet"], ["--data-dir"]),
        (["--dataset", "imagenet", "--data-dir", setup["data"]], ["not ImageNet-1k wnids",
                                                                   "val/<wnid>/*.JPEG"]),
        (["--dataset", setup["data"], "--data-dir", tmp], ["--data-dir is for"]),
        (["--dataset", str(tmp / "s-{0..1}.tar")], ["do not exist"]),
        (["--dataset", setup["data"], "--classnames", names2], ["lists 2 names", "6 classes"]),
        (["--dataset", setup["data"], "--templates", bad_t], ["has no '{c}'"]),
        (["--dataset", "demo", "--task", "retrieval", "--per-class", tmp / "x.csv"],
         ["--per-class applies"]),
        (["--dataset", caps, "--task", "retrieval"], ["do not exist", "--data-dir"]),
        (["--dataset", setup["data"], "--task", "retrieval"], ["holds no captions.json"]),
        # words are checked by the command line parser (typer draws a box around its message)
        (["--dataset", "demo", "--task", "bogus"], ["'--task'", "'bogus' is not one of"]),
        (["--dataset", "demo", "--precision", "fp16"], ["'--precision'",
                                                        "'fp16' is not one of"]),
        (["--dataset", "demo", "--ckpt", tmp / "no_run"], ["Checkpoint not found"]),
    ]


def test_bad_inputs_are_exit_2_with_the_problem_named(setup, tmp_path):
    for args, needles in _bad_inputs(setup, tmp_path):
        ckpt = [] if "--ckpt" in args else ["--ckpt", setup["run"]]
        result = zs(*ckpt, *args)
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output
        message = " ".join(result.stderr.split())  # rich wraps long lines
        for needle in needles:
            assert needle in message, (args, message)


def test_templates_classnames_and_precision_resolution(setup, tmp_path):
    name, openai = resolve_templates("openai")
    assert name == "openai" and len(openai) == 80 and openai[0] == "a bad photo of a {c}."
    assert resolve_templates("simple") == ("simple", ["a photo of a {c}."])
    assert resolve_templates(setup["templates"])[1] == list(TEMPLATES)  # blank lines dropped
    folder = resolve_dataset(setup["data"])
    assert folder.classnames == ["big dog", "bird", "cat", "fish", "red car", "tree"]
    assert resolve_eval_templates("", folder)[0] == "openai"
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"class {i}" for i in range(6)))
    assert resolve_dataset(setup["data"], classnames_file=str(names)).classnames[5] == "class 5"
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    from uta_cli.evaluate.encoders import native_bf16

    assert resolve_precision("auto", cpu) == ("bf16" if native_bf16(cpu) else "fp32")


def test_bf16_path_agrees_with_fp32(setup, tmp_path):
    cat = os.path.join(setup["data"], "cat")
    images = [Image.open(os.path.join(cat, f)).convert("RGB") for f in sorted(os.listdir(cat))]
    fp32, _, _ = build_encoders(setup["run"], torch.device("cpu"), "fp32", True)
    bf16, teacher, _ = build_encoders(setup["run"], torch.device("cpu"), "bf16", True)
    assert teacher.dtype == torch.bfloat16
    for a, b in zip(fp32, bf16):
        size = a.view.size
        x = torch.stack([torch.from_numpy(np.array(im.resize((size, size)))).permute(2, 0, 1)
                         for im in images]).float() / 255 - 0.45
        cos = F.cosine_similarity(a.encode(x), b.encode(x), dim=-1)
        assert cos.min() > 0.99, (a.role, cos)
    out = zs_json(tmp_path, "--ckpt", setup["run"], "--dataset", setup["data"], "--teacher",
                  "--precision", "bf16", "--templates", "simple")
    assert out["precision"] == "bf16" and out["num_samples"] == 36
    assert 0 <= out["teacher_result"]["acc1"] <= out["teacher_result"]["acc5"] <= 1


# ---------------------------------------------------------------------------- other datasets


def write_tar_shards(folder, images: list[tuple[str, int]], shards: int) -> str:
    os.makedirs(folder, exist_ok=True)
    for s in range(shards):
        with tarfile.open(os.path.join(folder, f"val-{s}.tar"), "w") as tar:
            for i, (path, label) in enumerate(images[s::shards]):
                for name, data in ((f"{s}_{i:04d}.png", open(path, "rb").read()),
                                   (f"{s}_{i:04d}.cls", str(label).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return os.path.join(folder, "val-{0.." + str(shards - 1) + "}.tar")


def test_tar_shards_equal_the_same_images_as_a_folder(setup, tmp_path):
    classes = sorted(os.listdir(setup["data"]))
    images = [(os.path.join(setup["data"], c, f), i) for i, c in enumerate(classes)
              for f in sorted(os.listdir(os.path.join(setup["data"], c)))]
    spec = write_tar_shards(tmp_path / "tars", images, 3)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(c.replace("_", " ") for c in classes) + "\n")
    args = ["--ckpt", setup["run"], "--teacher", "--templates", "simple", "--precision", "fp32"]
    tar = zs_json(tmp_path, *args, "--dataset", spec, "--classnames", names, name="t.json")
    folder = zs_json(tmp_path, *args, "--dataset", setup["data"], name="f.json")
    assert tar["num_samples"] == folder["num_samples"] == 36
    assert tar["metrics"] == folder["metrics"]
    assert tar["teacher_result"]["metrics"] == folder["teacher_result"]["metrics"]
    few = tmp_path / "few.txt"
    few.write_text("a\nb\n")
    result = zs(*args, "--dataset", spec, "--classnames", few, "--workers", "0")
    assert result.exit_code == 2 and "only 2 class names" in " ".join(result.stderr.split())


def test_top5_is_nan_below_five_classes_as_clip_benchmark():
    """CLIP_benchmark's zero-shot rule: top-5 only with at least five classes, else NaN. It is
    the one rule of the linear probe, zero-shot classification, fine-tuning validation and
    zero-shot while training (all go through classification_metrics)."""
    labels = torch.tensor([0, 1, 2, 3, 3])
    topk = torch.tensor([[1, 0, 2, 3], [0, 2, 3, 1], [2, 0, 1, 3], [0, 1, 2, 3], [3, 0, 1, 2]])
    m = classification_metrics(labels, topk, 4)
    assert math.isnan(m["acc5"]) and m["per_class_top5"] == [None] * 4
    assert m["acc1"] == pytest.approx(2 / 5) and m["per_class_top1"] == [0, 0, 1, 1]
    five = classification_metrics(labels, torch.cat([topk, torch.full((5, 1), 4)], 1), 5)
    assert five["acc5"] == 1.0 and five["per_class_top5"] == [1, 1, 1, 2, 0]
    assert math.isnan(evaluate(lambda x: x, [(torch.eye(3), torch.arange(3))],
                               torch.eye(3))["acc5"])


def test_top5_of_three_classes_is_null_in_json_and_na_in_the_table(setup, tmp_path):
    data = tmp_path / "three"
    for c in sorted(os.listdir(setup["data"]))[:3]:
        shutil.copytree(os.path.join(setup["data"], c), data / c)
    result = zs("--ckpt", setup["run"], "--teacher", "--dataset", data, "--templates",
                setup["templates"], "--workers", "0", "--output-json", tmp_path / "o.json",
                "--per-class", tmp_path / "c.csv")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "o.json").read_text()
    assert "NaN" not in text  # strict JSON: null, not a bare NaN
    out = json.loads(text)
    assert out["acc5"] is None and out["metrics"]["acc5"] is None
    assert out["teacher_result"]["acc5"] is None and out["acc1"] is not None
    assert sum("n/a" in line for line in result.stdout.splitlines()) == 2  # student, teacher
    csv_lines = (tmp_path / "c.csv").read_text().splitlines()
    assert "student_top5_correct" in csv_lines[0] and csv_lines[1].endswith(",")  # empty cell


def test_fsspec_urls_give_the_same_result_as_local_paths(setup, tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    for c in CLASSES:
        for f in os.listdir(os.path.join(setup["data"], c)):
            fs.pipe(f"/zs-test/cls/{c}/{f}", open(os.path.join(setup["data"], c, f), "rb").read())
    write_caption_set(tmp_path)
    for rel in ["captions.json", *(f"imgs/x/{f}" for f in os.listdir(tmp_path / "imgs" / "x"))]:
        fs.pipe(f"/zs-test/ret/{rel}", (tmp_path / rel).read_bytes())
    try:
        args = ["--ckpt", setup["run"], "--templates", "simple", "--precision", "fp32"]
        remote = zs_json(tmp_path, *args, "--dataset", "memory://zs-test/cls", name="m.json")
        local = zs_json(tmp_path, *args, "--dataset", setup["data"], name="l.json")
        assert remote["num_samples"] == 36 and remote["metrics"] == local["metrics"]
        args = ["--ckpt", setup["run"], "--task", "retrieval", "--precision", "fp32"]
        remote = zs_json(tmp_path, *args, "--dataset", "memory://zs-test/ret", name="mr.json")
        local = zs_json(tmp_path, *args, "--dataset", tmp_path, name="lr.json")
        assert remote["num_texts"] == 15 and remote["metrics"] == local["metrics"]
    finally:
        fs.rm("/zs-test", recursive=True)


def test_imagenet_layout_uses_openai_names_by_sorted_wnid(setup, tmp_path):
    from timm.data import ImageNetInfo

    wnids = ImageNetInfo("imagenet-1k").label_names()
    tiny = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 30, 200)).save(tiny, "PNG")
    for w in reversed(wnids):  # creation order must not matter
        os.makedirs(tmp_path / "in1k" / "val" / w)
        (tmp_path / "in1k" / "val" / w / "ILSVRC2012_val.JPEG").write_bytes(tiny.getvalue())
    evalset = resolve_dataset("imagenet", data_dir=str(tmp_path / "in1k"))
    assert evalset.classnames == list(open_clip.IMAGENET_CLASSNAMES)
    assert evalset.index.classes == wnids and evalset.index.labels[:3] == [0, 1, 2]
    assert evalset.location.endswith("val")
    out = zs_json(tmp_path, "--ckpt", setup["run"], "--dataset", "imagenet", "--data-dir",
                  tmp_path / "in1k" / "val", "--templates", "simple", "--batch-size", "250")
    assert out["num_classes"] == 1000 and out["num_samples"] == 1000
    assert out["classnames_source"].startswith("openai")
    shutil.rmtree(tmp_path / "in1k" / "val" / wnids[17])
    with pytest.raises(UtaUsageError, match=f"999 of the 1000.*{wnids[17]}"):
        resolve_dataset("imagenet", data_dir=str(tmp_path / "in1k"))


# -------------------------------------------------------------------------------- distribution


def test_shards_merge_to_the_single_process_result(setup, tmp_path):
    """The per-rank loops and the merge, in one process: rank r of 3 read disjoint samples and
    their merged metrics equal one process's (classification and retrieval)."""
    from rich.console import Console

    console = Console(quiet=True)
    cpu = torch.device("cpu")
    encoders, teacher, _ = build_encoders(setup["run"], cpu, "fp32", True)
    transform = EvalTransform([e.view for e in encoders])
    roles = ["student", "teacher"]
    evalset = resolve_dataset(setup["data"])
    classifier, _ = cached_classifier(text_encoder(teacher), teacher.tokenizer,
                                      teacher.identity.to_dict(), evalset.classnames,
                                      list(TEMPLATES), cpu)

    def classify(world):
        parts = [classify_shard(*shard_loader(evalset, transform, r, world, 5, 0, False),
                                encoders, {role: classifier for role in roles}, cpu, console,
                                False)
                 for r in range(world)]
        assert sum(len(p["predictions"]["student"].sample_ids) for p in parts) == 36
        return merge_classification(parts, roles, 6)

    assert classify(3) == classify(1)
    write_caption_set(tmp_path)
    captions = resolve_dataset(str(tmp_path), task="retrieval")

    def retrieve(world):
        parts = [retrieval_shard(*shard_loader(captions, transform, r, world, 3, 0, False),
                                 encoders, captions.captions, cpu, 4, console, False)
                 for r in range(world)]
        return merge_retrieval(parts, roles)

    one, three = retrieve(1), retrieve(3)
    assert one == three and one["teacher"]["num_texts"] == 15


def test_two_processes_equal_one(setup, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(setup["data"], data)
    os.remove(data / "tree" / "005.png")  # 35 images: the ranks get 18 and 17
    (data / "bird" / "zz_broken.png").write_bytes(b"junk")
    args = ["--ckpt", setup["run"], "--dataset", str(data), "--teacher", "--precision", "fp32",
            "--templates", setup["templates"], "--batch-size", "4"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "uta_cli", "zeroshot", *args, "--workers", "0",
           "--output-json", str(tmp_path / "two.json"), "--per-class", str(tmp_path / "two.csv")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    result = zs(*args, "--workers", "0", "--output-json", tmp_path / "one.json",
                "--per-class", tmp_path / "one.csv")
    assert result.exit_code == 0, result.output
    one = json.loads((tmp_path / "one.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["num_samples"] == one["num_samples"] == 35
    assert two["skipped_images"] == one["skipped_images"] == 1
    assert two["metrics"] == one["metrics"]
    assert two["teacher_result"]["metrics"] == one["teacher_result"]["metrics"]
    assert (tmp_path / "two.csv").read_text() == (tmp_path / "one.csv").read_text()
    assert out.stdout.count("Zero-shot classification") == 1  # printed by rank 0 only


# ------------------------------------------------------------------ parity on non-square images


NON_SQUARE = [(53, 37), (37, 53), (41, 40), (40, 41), (97, 75), (75, 97), (33, 60), (60, 33),
              (45, 45)]


def write_non_square_images(folder, per_class: int, seed: int = 3) -> None:
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        os.makedirs(os.path.join(folder, c), exist_ok=True)
        for i in range(per_class):
            w, h = NON_SQUARE[int(rng.integers(len(NON_SQUARE)))]
            y, x = np.mgrid[0:h, 0:w] / max(w, h)
            img = rng.uniform(0, 1, (1, 1, 3)) + rng.uniform(-0.5, 0.5, (1, 1, 3)) * x[..., None] \
                + rng.normal(0, rng.uniform(0, 0.4), (h, w, 3)) * y[..., None]
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(
                os.path.join(folder, c, f"{i:03d}.png"))


def test_non_square_images_give_open_clips_predictions_image_for_image(setup, tmp_path):
    """Per-image top-5 of both models equal a plain open_clip + torchvision loop (ImageFolder,
    the model's own preprocess), on non-square images, with a teacher whose preprocess is
    resize_mode 'longest' and a student recorded as 'squash' with bilinear resampling."""
    import torchvision
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from rich.console import Console

    from uta_cli import checkpoint as ckpt
    from uta_cli.loading.model import student_from_checkpoint

    data = tmp_path / "images"
    write_non_square_images(data, 5)
    # the same teacher weights with another preprocess: the fingerprint still matches
    clip_dir = tmp_path / "clip_longest"
    shutil.copytree(setup["clip"], clip_dir)
    cfg = json.loads((clip_dir / "open_clip_config.json").read_text())
    cfg["preprocess_cfg"]["resize_mode"] = "longest"
    (clip_dir / "open_clip_config.json").write_text(json.dumps(cfg))
    run = tmp_path / "run"
    shutil.copytree(setup["run"], run)
    meta_path = os.path.join(ckpt.resolve_checkpoint(str(run)), "meta.json")
    meta = json.loads(open(meta_path).read())
    assert meta["student_preprocess"]["resize_mode"] == "shortest"  # recorded by pre-training
    assert meta["teacher"]["resize_mode"] == "shortest"
    meta["student_preprocess"].update(resize_mode="squash", interpolation="bilinear")
    open(meta_path, "w").write(json.dumps(meta))

    cpu = torch.device("cpu")
    console = Console(quiet=True)
    encoders, teacher, _ = build_encoders(str(run), cpu, "fp32", True, str(clip_dir))
    assert [e.view.resize_mode for e in encoders] == ["squash", "longest"]
    evalset = resolve_dataset(str(data))
    weights = build_classifier(lambda t: teacher.clip.encode_text(t), teacher.tokenizer,
                               evalset.classnames, list(TEMPLATES))
    part = classify_shard(*shard_loader(evalset, EvalTransform([e.view for e in encoders]), 0, 1,
                                        7, 0, False),
                          encoders, {"student": weights, "teacher": weights}, cpu, console, False)

    clip, _, teacher_preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    clip.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{clip_dir}")
    ref_weights = open_clip.build_zero_shot_classifier(
        clip, tokenizer, evalset.classnames, [t.replace("{c}", "{}") for t in TEMPLATES])
    student, smeta = student_from_checkpoint(str(run))
    sp = smeta["student_preprocess"]
    student_preprocess = image_transform_v2(PreprocessCfg(
        size=sp["size"], mean=sp["mean"], std=sp["std"], interpolation="bilinear",
        resize_mode="squash"), is_train=False)

    for role, preprocess, encode in (("teacher", teacher_preprocess, clip.encode_image),
                                     ("student", student_preprocess, student.encode_image)):
        folder = torchvision.datasets.ImageFolder(str(data), transform=preprocess)
        tops, labels = [], []
        with torch.no_grad():
            for x, y in torch.utils.data.DataLoader(folder, batch_size=7):
                logits = 100.0 * F.normalize(encode(x).float(), dim=-1) @ ref_weights
                tops.append(logits.topk(5, dim=-1).indices)
                labels.append(y)
        want = torch.cat(tops)
        got = part["predictions"][role]
        assert got.sample_ids.tolist() == list(range(len(folder)))  # folder order, no skips
        assert got.labels.tolist() == torch.cat(labels).tolist()
        assert len(set(want[:, 0].tolist())) >= 2, role  # not a constant prediction
        assert torch.equal(got.topk, want), role


# ---------------------------------------------------------------------- class names in a file


def test_classnames_file_in_another_order_is_mapped_by_name(setup, tmp_path):
    """The folder names shuffled: each name still scores its own folder (the same numbers as
    without --classnames), and the run says it mapped them; other names keep the file's order
    and the first pairings are printed."""
    names = [c.replace("_", " ") for c in sorted(CLASSES)]
    shuffled = tmp_path / "shuffled.txt"
    shuffled.write_text("\n".join(reversed(names)) + "\n")
    base = ("--ckpt", setup["run"], "--dataset", setup["data"], "--templates",
            setup["templates"], "--precision", "fp32", "--cache-dir", "none", "--workers", "0")
    plain = zs_json(tmp_path, *base, "--per-class", tmp_path / "plain.csv", name="plain.json")
    result = zs(*base, "--classnames", shuffled, "--output-json", tmp_path / "mapped.json",
                "--per-class", tmp_path / "mapped.csv")
    assert result.exit_code == 0, result.output
    assert "mapped by name" in " ".join(result.output.split())
    mapped = json.loads((tmp_path / "mapped.json").read_text())
    assert mapped["metrics"] == plain["metrics"]
    # per class: the same names in label order, the same hits
    assert (tmp_path / "mapped.csv").read_text() == (tmp_path / "plain.csv").read_text()

    other = tmp_path / "other.txt"
    other.write_text("\n".join(f"thing {i}" for i in range(6)) + "\n")
    result = zs(*base, "--classnames", other)
    out = " ".join(result.output.split())
    assert result.exit_code == 0 and "not the folder names" in out
    assert "'big_dog' -> 'thing 0'" in out and "'bird' -> 'thing 1'" in out
    assert resolve_dataset(setup["data"], classnames_file=str(shuffled)).classnames == names


def test_match_classnames_cases():
    from uta_cli.data.folders import match_classnames

    folders = ["a_b", "c", "d"]
    assert match_classnames(["a b", "c", "d"], folders, "f") == (["a b", "c", "d"], "")
    names, note = match_classnames(["d", "a_b", "c"], folders, "f")
    assert names == ["a_b", "c", "d"] and "mapped by name" in note
    names, note = match_classnames(["x", "y", "z"], folders, "f", shown=2)
    assert names == ["x", "y", "z"] and "'a_b' -> 'x', 'c' -> 'y', ..." in note
    names, note = match_classnames(["c", "c", "d"], folders, "f")  # a duplicate: no mapping
    assert names == ["c", "c", "d"] and "not the folder names" in note


# ------------------------------------------------------------- CLIP_benchmark datasets, variants


def write_wds_layout(root, image_folder, templates=("a photo of a {c}.", "art of the {c}.")):
    """CLIP_benchmark's webdataset layout of a class folder: classnames.txt, templates, test/."""
    classes = sorted(os.listdir(image_folder))
    os.makedirs(root / "test")
    (root / "classnames.txt").write_text("\n".join(c.replace("_", " ") for c in classes) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    items = [(os.path.join(image_folder, c, f), y) for y, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(image_folder, c)))]
    for shard in range(2):
        with tarfile.open(root / "test" / f"{shard}.tar", "w") as tar:
            for i, (path, y) in enumerate(items[shard::2]):
                for ext, data in (("webp", _webp(path)), ("cls", str(y).encode())):
                    info = tarfile.TarInfo(f"s{shard}_{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (root / "test" / "nshards.txt").write_text("2\n")
    return str(root)


def _webp(path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, "WEBP", lossless=True)
    return buf.getvalue()


def test_clip_benchmark_webdataset_layout_and_several_datasets(setup, tmp_path):
    wds = write_wds_layout(tmp_path / "wds_toy", setup["data"])
    base = ["--ckpt", setup["run"], "--precision", "fp32", "--workers", "0", "--cache-dir",
            "none"]
    result = zs(*base, "--dataset", wds, "--dataset", setup["data"], "--teacher",
                "--output", tmp_path / "out" / "{dataset}_{model}.json")
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "the dataset's own" in out and "OpenAI's ImageNet set" in out
    files = sorted(os.listdir(tmp_path / "out"))
    assert files == ["images_student.json", "images_teacher.json", "wds_toy_student.json",
                     "wds_toy_teacher.json"]
    got = {f: json.loads((tmp_path / "out" / f).read_text()) for f in files}
    assert got["wds_toy_student.json"]["templates"]["count"] == 2
    assert got["images_student.json"]["templates"]["name"] == "openai"
    assert got["wds_toy_teacher.json"]["model"] == "local-dir:" + setup["clip"]
    assert "UTA student" in out and "CLIP teacher" in out and "wds_toy" in out  # the summary
    # the same images as a class folder with the same templates give the same numbers
    folder = zs_json(tmp_path, *base[:-4], "--dataset", setup["data"], "--templates",
                     os.path.join(wds, "zeroshot_classification_templates.txt"), "--teacher")
    for f, want in (("wds_toy_student.json", folder), ("wds_toy_teacher.json",
                                                        folder["teacher_result"])):
        assert got[f]["metrics"] == want["metrics"] and got[f]["num_samples"] == 36

    result = zs(*base, "--dataset", wds, "--split", "train")
    assert result.exit_code == 2 and "no split 'train'" in result.output
    # a linear probe fits on the layout's train split by default
    shutil.copytree(os.path.join(wds, "test"), os.path.join(wds, "train"))
    result = zs(*base, "--dataset", wds, "--task", "linear-probe", "--probe-epochs", "2",
                "--output-json", tmp_path / "lp.json")
    assert result.exit_code == 0, result.output
    lp = json.loads((tmp_path / "lp.json").read_text())
    assert lp["train_dataset"] == "wds_toy/train" and lp["probe"]["num_train"] == 36
    result = zs(*base, "--dataset", wds, "--dataset", setup["data"], "--output-json", "x.json")
    assert result.exit_code == 2 and "{dataset}" in result.output


def _png(path, rng, size=(20, 14)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def test_imagenet_variants_have_the_reference_labels(tmp_path):
    from open_clip import IMAGENET_CLASSNAMES
    from timm.data import ImageNetInfo

    wnids = ImageNetInfo("imagenet-1k").label_names()
    rng = np.random.default_rng(0)
    # V2: folders named by class index, inside the archive's own folder; "10" sorts before "2"
    v2 = tmp_path / "v2" / "imagenetv2-matched-frequency-format-val"
    for c in ("0", "2", "10", "999"):
        _png(v2 / c / "a.jpeg", rng)
    s = resolve_dataset("imagenet-v2", str(tmp_path / "v2"))
    got = {os.path.basename(os.path.dirname(f)): y for f, y in zip(s.index.files, s.index.labels)}
    assert got == {"0": 0, "2": 2, "10": 10, "999": 999} and s.classnames[10] == \
        IMAGENET_CLASSNAMES[10]
    # A / R: 200-way over their wnid subset, in wnid order, with the OpenAI names
    subset = wnids[3::5]
    for w in subset:
        _png(tmp_path / "a" / w / "x.jpg", rng)
    s = resolve_dataset("imagenet-a", str(tmp_path / "a"))
    assert len(s.classnames) == 200
    assert s.classnames == [IMAGENET_CLASSNAMES[3 + 5 * i] for i in range(200)]
    assert s.index.labels == list(range(200))
    os.remove(tmp_path / "a" / subset[0] / "x.jpg")
    os.rmdir(tmp_path / "a" / subset[0])
    with pytest.raises(UtaUsageError, match="199 wnid folders"):
        resolve_dataset("imagenet-r", str(tmp_path / "a"))
    # ObjectNet: only the folders mapped to ImageNet, labelled in sorted folder order
    on = tmp_path / "on"
    for folder in ("air_freshener", "alarm_clock", "backpack", "zz_unmapped"):
        _png(on / "objectnet-1.0" / "images" / folder / "1.png", rng)
    (on / "objectnet-1.0" / "mappings").mkdir()
    (on / "objectnet-1.0" / "mappings" / "folder_to_objectnet_label.json").write_text(json.dumps(
        {"air_freshener": "Air freshener", "alarm_clock": "Alarm clock",
         "backpack": "Backpack", "zz_unmapped": "Unmapped"}))
    (on / "objectnet-1.0" / "mappings" / "objectnet_to_imagenet_1k.json").write_text(json.dumps(
        {"Alarm clock": "analog clock; digital clock", "Backpack": "backpack, back pack"}))
    s = resolve_dataset("objectnet", str(on))
    assert s.classnames == ["alarm clock", "backpack"] and s.index.labels == [0, 1]
    assert [os.path.basename(os.path.dirname(f)) for f in s.index.files] == \
        ["alarm_clock", "backpack"]
    with pytest.raises(UtaUsageError, match="needs --data-dir"):
        resolve_dataset("imagenet-sketch")
    # Sketch: all 1000 wnids inside the archive's sketch/ folder, ImageNet-1k's labels
    for w in wnids:
        os.makedirs(tmp_path / "sk" / "sketch" / w)
        (tmp_path / "sk" / "sketch" / w / "1.png").write_bytes(b"")  # indexed, never decoded
    s = resolve_dataset("imagenet-sketch", str(tmp_path / "sk"))
    assert s.classnames == list(IMAGENET_CLASSNAMES) and s.index.labels == list(range(1000))


def test_linear_probe_cli_equals_the_probe_on_open_clip_features(setup, tmp_path):
    out = tmp_path / "lp.json"
    result = zs("--ckpt", setup["run"], "--dataset", setup["data"], "--train-dataset",
                setup["data"], "--task", "linear-probe", "--teacher", "--precision", "fp32",
                "--workers", "0", "--batch-size", "8", "--probe-epochs", "3",
                "--probe-val-proportion", "0.25", "--seed", "1", "--output-json", out)
    assert result.exit_code == 0, result.output
    assert "Linear probe" in result.output
    report = json.loads(out.read_text())
    assert report["task"] == "linear_probe" and report["num_samples"] == 36

    import torchvision

    from uta_cli.evaluate.linear_probe import ProbeConfig, linear_probe

    clip, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + setup["clip"])
    clip.eval()
    folder = torchvision.datasets.ImageFolder(setup["data"], transform=preprocess)
    feats, labels = [], []
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(folder, batch_size=8):
            feats.append(clip.encode_image(x).float())
            labels.append(y)
    x, y = torch.cat(feats), torch.cat(labels)
    want = linear_probe(x, y, x, y, 6, ProbeConfig(epochs=3, batch_size=8,
                                                   val_proportion=0.25, seed=1))
    got = report["teacher_result"]
    for k in ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall"):
        assert got[k] == pytest.approx(want[k], abs=1e-12), k
    assert got["probe"]["weight_decay"] == want["weight_decay"]

    result = zs("--ckpt", setup["run"], "--dataset", setup["data"], "--task", "linear-probe")
    assert result.exit_code == 2 and "--train-dataset" in " ".join(result.output.split())
