"""`uta export` (issue 5 acceptance): every format exports and verifies for an Eva (RoPE) and a
plain ViT student; the ONNX classifier agrees with zero-shot evaluation; the open_clip folder loads
with plain open_clip; dynamic batch; metadata; errors; nothing half-written."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_overrides, write_images
from PIL import Image
from typer.testing import CliRunner

import uta_cli.export.formats as formats
import uta_cli.workflows.export as ex
from uta_cli import checkpoint as ckpt
from uta_cli.app import app
from uta_cli.data.pipeline import EvalTransform, View, normalize
from uta_cli.evaluate.zeroshot import build_classifier, evaluate
from uta_cli.loading.model import student_from_checkpoint, teacher_from_meta
from uta_cli.models.student import UTAStudent
from uta_cli.recipe import StudentConfig

runner = CliRunner()
CLASSES = ["red circle", "blue square", "green triangle", "yellow star", "white cross"]
TEMPLATES = ["a photo of a {c}.", "an image of a {c} on a noisy background."]


def _invoke(args: list[str]):
    return runner.invoke(app, ["export", *args], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def eva_ckpt(tmp_path_factory, tiny_clip_dir) -> str:
    """A real (two-step) `uta pretrain` run of a tiny Eva student with RoPE."""
    run_dir = tmp_path_factory.mktemp("eva_run")
    cmd = [sys.executable, "-m", "uta_cli", "pretrain", "demo", "--output-dir", str(run_dir)]
    for s in tiny_overrides(tiny_clip_dir, steps=2, **{"train.checkpoint_every": 2}):
        cmd += ["--set", s]
    env = dict(os.environ, UTA_CACHE_DIR=str(run_dir / "cache"), HF_HUB_OFFLINE="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    return str(run_dir)


@pytest.fixture(scope="module")
def vit_ckpt(tmp_path_factory, eva_ckpt) -> str:
    """The same checkpoint layout for a plain timm ViT student (the Eva run's meta, family vit)."""
    folder = tmp_path_factory.mktemp("vit_ckpt")
    meta = ckpt.load_meta(ckpt.latest_checkpoint(eva_ckpt))
    meta["student"]["family"] = meta["recipe"]["student"]["family"] = "vit"
    torch.manual_seed(1)
    student = UTAStudent(StudentConfig(**meta["student"]), meta["embed_dim"])
    ckpt.write_weights(str(folder), student.state_dict())
    (folder / "meta.json").write_text(json.dumps(meta))
    return str(folder)


@pytest.fixture(params=["eva", "vit"])
def student_ckpt(request, eva_ckpt, vit_ckpt) -> str:
    return {"eva": eva_ckpt, "vit": vit_ckpt}[request.param]


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("prompts")
    (folder / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (folder / "templates.txt").write_text("# one a line\n" + "\n".join(TEMPLATES) + "\n")
    return str(folder / "classes.txt"), str(folder / "templates.txt")


def real_images(folder, meta: dict, n: int = 5) -> torch.Tensor:
    """PNG files through the zero-shot transform (resize, centre crop, normalise)."""
    pp = meta["student_preprocess"]
    view = View("image", pp["size"], tuple(pp["mean"]), tuple(pp["std"]))
    paths = write_images(folder, n, size=40, seed=3)
    transform = EvalTransform([view])
    batch = torch.stack([transform(Image.open(p).convert("RGB"), i)["image"]
                         for i, p in enumerate(paths)])
    return normalize(batch, view)


def weights_hash(ckpt_path: str) -> str:
    data = open(os.path.join(ckpt.resolve_checkpoint(ckpt_path), "model.safetensors"), "rb").read()
    return "sha256:" + hashlib.sha256(data).hexdigest()


def embedding(student, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(student.encode_image(x), dim=-1)


def test_onnx_classifier_agrees_with_zeroshot_and_has_dynamic_batch(
        student_ckpt, prompt_files, tmp_path):
    classes, templates = prompt_files
    out = tmp_path / "zs.onnx"
    result = _invoke(["--ckpt", student_ckpt, "--format", "onnx", "--output-kind", "classifier",
                      "--classnames", classes, "--templates", templates, "--output", str(out)])
    assert result.exit_code == 0, result.output
    # verification ran at batch 1 and 3 on both input kinds, and printed its numbers
    assert result.output.count("max |diff|") == 4 and "cosine" in result.output
    assert "FAIL" not in result.output
    assert sorted(os.listdir(tmp_path)) == ["zs.onnx"]  # no temp or scratch files left

    model = onnx.load(str(out))
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["classnames"]) == CLASSES
    assert json.loads(props["templates"]) == TEMPLATES
    assert props["output_kind"] == "classifier" and props["exporter"] == "dynamo"
    assert json.loads(props["input_size"]) == [3, 32, 32]
    assert json.loads(props["embed_dim"]) == 32
    assert props["checkpoint_hash"] == weights_hash(student_ckpt)
    assert props["uta_version"] and props["interpolation"] == "bicubic"
    assert props["crop"] == "center"
    assert len(json.loads(props["mean"])) == 3 and len(json.loads(props["std"])) == 3
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic: dynamic batch

    student, meta = student_from_checkpoint(student_ckpt)
    images = real_images(tmp_path / "images", meta, n=5)  # batch 5: neither export nor verify size
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    assert logits.shape == (5, len(CLASSES))

    # The zero-shot path of `uta zeroshot`: classifier from the teacher's text tower, then
    # evaluate(); labelled with the ONNX argmax, its top-1 must be exactly 1.
    teacher = teacher_from_meta(meta, tiny_clip_dir_of(meta))
    weights = build_classifier(teacher.clip.encode_text, teacher.tokenizer, CLASSES, TEMPLATES)
    onnx_pred = logits.argmax(dim=-1)
    scores = evaluate(student.encode_image, [(images, onnx_pred)], weights)
    assert scores["acc1"] == 1.0 and scores["num_samples"] == 5
    torch_logits = 100.0 * embedding(student, images) @ weights
    assert (logits - torch_logits).abs().max().item() < 1e-3


def tiny_clip_dir_of(meta: dict) -> str:
    return meta["teacher"]["model"][len("local-dir:"):]


def test_open_clip_folder_loads_with_plain_open_clip(student_ckpt, tmp_path):
    out = tmp_path / "oc"
    result = _invoke(["--ckpt", student_ckpt, "--format", "open-clip", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "text" in result.output and "FAIL" not in result.output
    assert sorted(os.listdir(out)) == ["open_clip_config.json", "open_clip_model.safetensors",
                                       "timm_trunk", "uta_export.json"]
    cfg = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"]
    assert cfg["timm_model_name"] == f"local-dir:{out}/timm_trunk"
    assert (cfg["timm_pool"], cfg["timm_proj"], cfg["timm_proj_bias"]) == ("token", "linear", True)

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    model.eval()
    student, meta = student_from_checkpoint(student_ckpt)
    assert type(model.visual.trunk).__name__ == ("Eva" if student.is_eva else "VisionTransformer")
    images = real_images(tmp_path / "images", meta, n=4)
    with torch.no_grad():
        got = model.encode_image(images, normalize=True)
    want = embedding(student, images)
    assert (got - want).abs().max().item() < 1e-5
    # preprocessing from the folder: the student's size and normalisation
    pil = Image.open(write_images(tmp_path / "pp", 1, size=48)[0]).convert("RGB")
    assert preprocess(pil).shape == (3, 32, 32)
    # the text tower is the teacher's, with its tokenizer
    teacher = teacher_from_meta(meta, tiny_clip_dir_of(meta))
    tok = open_clip.get_tokenizer(f"local-dir:{out}")
    with torch.no_grad():
        a = model.encode_text(tok(["a photo of a red circle."]))
        b = teacher.clip.encode_text(teacher.tokenizer(["a photo of a red circle."]))
    assert torch.equal(a, b)
    md = json.loads((out / "uta_export.json").read_text())
    assert md["checkpoint_hash"] == weights_hash(student_ckpt) and md["exporter"]


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_torchscript_and_pt2_reload_with_dynamic_batch(student_ckpt, fmt, tmp_path):
    # Each family exports a different kind per format, so both formats see both kinds.
    student, meta = student_from_checkpoint(student_ckpt)
    kind = "tokens" if (fmt == "pt2") == student.is_eva else "embedding"
    out = tmp_path / f"model.{fmt}"
    result = ex.export_checkpoint(ex.ExportOptions(ckpt=student_ckpt, format=fmt,
                                                   output=str(out), output_kind=kind),
                                  say=lambda s: None)
    assert len(result.checks) == 4 and all(c.ok for c in result.checks)
    assert {c.batch for c in result.checks} == {1, 3}
    assert sorted(os.listdir(tmp_path)) == sorted([out.name, out.name + ".json"])

    images = real_images(tmp_path / "images", meta, n=5)
    if fmt == "torchscript":
        loaded = torch.jit.load(str(out))
    else:
        loaded = torch.export.load(str(out)).module()
    with torch.no_grad():
        got = loaded(images)
        want = student(images) if kind == "tokens" else embedding(student, images)
    assert got.shape == want.shape
    assert got.shape[0] == 5 and (kind == "embedding" or got.shape[1] == 1 + 16)
    assert (got - want).abs().max().item() < 1e-4
    md = json.loads((tmp_path / (out.name + ".json")).read_text())
    assert md["output_kind"] == kind and md["format"] == fmt
    assert md["checkpoint_hash"] == weights_hash(student_ckpt)
    assert md["input_size"] == [3, 32, 32] and md["embed_dim"] == 32
    assert md["mean"] == meta["student_preprocess"]["mean"]
    assert md["verification"]["max_abs_diff"] <= ex.DEFAULT_ATOL[kind]


def test_onnx_falls_back_to_the_legacy_exporter(eva_ckpt, tmp_path, monkeypatch):
    """The legacy exporter on the Eva (RoPE) student, through the wrapper module."""
    def broken(*args, **kwargs):
        raise RuntimeError("dynamo is unavailable here")

    monkeypatch.setattr(formats, "_export_onnx_dynamo", broken)
    lines: list[str] = []
    out = tmp_path / "legacy.onnx"
    result = ex.export_checkpoint(ex.ExportOptions(ckpt=eva_ckpt, format="onnx", output=str(out)),
                                  say=lines.append)
    assert result.exporter == "legacy" and all(c.ok for c in result.checks)
    assert any("falling back to the legacy exporter" in ln for ln in lines)
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["exporter"] == "legacy" and props["output_kind"] == "embedding"
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 3, 32, 32)
    emb = session.run(None, {"images": x.numpy()})[0]
    assert emb.shape == (4, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
    assert sorted(os.listdir(tmp_path)) == ["legacy.onnx"]


@pytest.mark.parametrize("args,words", [
    # (a misspelt --format or --output-kind: tests/test_cli.py)
    (["--format", "onnx", "--output-kind", "classifier"], ["--classnames"]),
    (["--format", "open-clip", "--output-kind", "tokens"], ["open-clip", "--format onnx"]),
    (["--format", "pt2", "--opset", "17"], ["--opset"]),
    (["--format", "pt2", "--atol", "-1"], ["--atol"]),
])
def test_usage_errors_exit_2_with_a_message(eva_ckpt, tmp_path, args, words):
    result = _invoke(["--ckpt", eva_ckpt, "--output", str(tmp_path / "out"), *args])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "Traceback" not in result.output
    for word in words:
        assert word in result.output
    assert os.listdir(tmp_path) == []


def test_bad_checkpoint_exits_2(tmp_path):
    result = _invoke(["--ckpt", str(tmp_path / "nope"), "--format", "pt2",
                      "--output", str(tmp_path / "m.pt2")])
    assert result.exit_code == 2 and "Checkpoint not found" in result.output


def test_missing_onnx_dependency_names_the_extra(eva_ckpt, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    result = _invoke(["--ckpt", eva_ckpt, "--format", "onnx", "--output", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2, result.output
    assert 'pip install "uta-cli[onnx]"' in result.output and "onnxruntime" in result.output
    assert os.listdir(tmp_path) == []


def test_existing_output_needs_force(eva_ckpt, tmp_path):
    out = tmp_path / "m.torchscript"
    out.write_bytes(b"keep me")
    args = ["--ckpt", eva_ckpt, "--format", "torchscript", "--output", str(out), "--no-verify"]
    result = _invoke(args)
    assert result.exit_code == 2 and "--force" in result.output
    assert out.read_bytes() == b"keep me"
    result = _invoke([*args, "--force"])
    assert result.exit_code == 0, result.output
    assert "max |diff|" not in result.output  # --no-verify
    with pytest.warns(FutureWarning):  # torch.jit.load is deprecated in torch 2.14
        loaded = torch.jit.load(str(out))
    assert loaded(torch.zeros(2, 3, 32, 32)).shape == (2, 32)
    assert sorted(os.listdir(tmp_path)) == ["m.torchscript", "m.torchscript.json"]


def test_failed_export_leaves_nothing_behind(eva_ckpt, tmp_path, monkeypatch):
    def half_write(module, path):
        with open(path, "wb") as f:
            f.write(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr(torch.jit, "save", half_write)
    result = _invoke(["--ckpt", eva_ckpt, "--format", "torchscript",
                      "--output", str(tmp_path / "m.torchscript")])
    assert result.exit_code == 1
    assert "disk full" in result.output and "Traceback" not in result.output
    assert os.listdir(tmp_path) == []


def test_verification_failure_exits_1_and_writes_nothing(eva_ckpt, tmp_path, monkeypatch):
    real = formats.REGISTRY["torchscript"]

    def drifting(path):  # a conversion that drifts numerically
        run = real.load(path).image
        return formats.Reloaded(lambda x: run(x) + 1e-2)

    monkeypatch.setitem(formats.REGISTRY, "torchscript", dataclasses.replace(real, load=drifting))
    out = tmp_path / "m.torchscript"
    result = _invoke(["--ckpt", eva_ckpt, "--format", "torchscript", "--output", str(out)])
    assert result.exit_code == 1, result.output
    assert "Verification failed" in result.output and "FAIL" in result.output
    assert "--no-verify" in result.output
    assert os.listdir(tmp_path) == []
    # the same drift passes when the tolerance allows it
    result = _invoke(["--ckpt", eva_ckpt, "--format", "torchscript", "--output", str(out),
                      "--atol", "0.05", "--min-cosine", "0.9"])
    assert result.exit_code == 0, result.output
    assert out.is_file()


def test_zeroshot_takes_an_exported_open_clip_folder(eva_ckpt, tmp_path):
    """`uta zeroshot --ckpt FOLDER` loads the folder through the same loader as embed/classify:
    the same student on the same preprocessing and text tower, so the same numbers."""
    from conftest import cli

    out = tmp_path / "oc"
    assert _invoke(["--ckpt", eva_ckpt, "--format", "open-clip", "--output", str(out)]
                   ).exit_code == 0
    write_images(tmp_path / "images", 30, size=44, seed=5, classes=[c.replace(" ", "_")
                                                                      for c in CLASSES])
    args = ["--dataset", tmp_path / "images", "--templates", "simple", "--workers", "0",
            "--precision", "fp32", "--cache-dir", "none"]
    reports = []
    for name, ckpt_path in (("ckpt", eva_ckpt), ("folder", out)):
        result = cli("zeroshot", "--ckpt", ckpt_path, *args, "--output-json",
                     tmp_path / f"{name}.json")
        assert result.exit_code == 0, result.output
        reports.append(json.loads((tmp_path / f"{name}.json").read_text()))
    ours, folder = reports
    for key in ("acc1", "acc5", "mean_per_class_recall", "num_samples"):
        assert folder[key] == ours[key], key
    assert folder["preprocess"] == ours["preprocess"]
    # (top-1 of a 2-step student is near chance:) what zeroshot scores with is the same too
    from uta_cli.evaluate.encoders import build_encoders

    built = [build_encoders(str(p), torch.device("cpu"), "fp32", False)[0][0]
             for p in (eva_ckpt, out)]
    assert built[0].view == built[1].view
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert (built[0].encode(x) - built[1].encode(x)).abs().max().item() < 1e-5
    with torch.no_grad():
        a, b = (e.text.clip.encode_text(e.text.tokenizer(["a photo of a red circle."]))
                for e in built)
    assert torch.equal(a, b)
    # the folder holds no teacher image tower to compare with: refused before any model is built
    result = cli("zeroshot", "--ckpt", out, *args, "--teacher")
    assert result.exit_code == 2 and "no teacher to compare with" in " ".join(result.output.split())
