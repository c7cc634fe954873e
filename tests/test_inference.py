"""`uta embed` and `uta classify` on a short real pre-training run (the zero-shot tests' fixture):
embeddings against encode_image on open_clip's own preprocessing, labels against `uta zeroshot`,
every checkpoint kind (run, released file, exported open_clip folder), bad input."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import cli as conftest_cli
from conftest import tiny_overrides, write_clip_folder
from PIL import Image
from safetensors.torch import load_file
from test_release import TINY, make_state
from test_zeroshot import CLASSES, TEMPLATES, write_varied_images

from uta_cli.loading.model import student_from_checkpoint
from uta_cli.models import release as R


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A real (short) pre-training run, in-process, whose student differs from its teacher in
    size and normalisation (48 px, mean/std 0.5), plus a class folder and a templates file."""
    from accelerate.state import AcceleratorState
    from rich.console import Console

    from uta_cli.recipe import load_recipe
    from uta_cli.workflows.pretrain import run_pretrain

    root = tmp_path_factory.mktemp("infer")
    clip_dir = write_clip_folder(root / "clip", seed=2)
    recipe = load_recipe("demo", tiny_overrides(clip_dir, steps=3, **{
        "student.image_size": 48, "data.mean": "[0.5,0.5,0.5]", "data.std": "[0.5,0.5,0.5]"}))
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        run_pretrain(recipe, output_dir=str(root / "run"), resume="never",
                     console=Console(quiet=True))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    write_varied_images(root / "images", 6)
    (root / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return {"run": str(root / "run"), "data": str(root / "images"),
            "templates": str(root / "templates.txt")}


def flat(result) -> str:
    """The output with rich's line wrapping undone (it wraps at the terminal width)."""
    return " ".join(result.output.split())


def cli(*args):
    return conftest_cli(*args, env={"COLUMNS": "200"})


def odd_images(folder, sizes=((53, 37), (41, 64), (48, 48), (90, 31))) -> list[str]:
    """Non-square PNGs of odd sizes with structure (a gradient plus noise)."""
    rng = np.random.default_rng(5)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, (w, h) in enumerate(sizes):
        ramp = np.linspace(0, 1, w)[None, :, None] * rng.uniform(0, 1, (1, 1, 3))
        img = np.clip(ramp + rng.normal(0, 0.2, (h, w, 3)), 0, 1)
        path = os.path.join(folder, f"img{i}.png")
        Image.fromarray((img * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def reference_embeddings(student, meta, paths) -> torch.Tensor:
    """open_clip's own eval transform on the recorded preprocessing, then encode_image."""
    sp = meta["student_preprocess"]
    tf = open_clip.image_transform(sp["size"], is_train=False, mean=sp["mean"], std=sp["std"],
                                   interpolation="bicubic")
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return F.normalize(student.encode_image(x), dim=-1)


def test_embed_matches_encode_image_in_both_formats(setup, tmp_path):
    paths = odd_images(tmp_path / "imgs")
    out = tmp_path / "emb.safetensors"
    # files in a chosen order, batch 3 over 4 images: the order and the batching must hold
    order = [paths[2], paths[0], paths[3], paths[1]]
    result = cli("embed", "--ckpt", setup["run"], *order, "--output", out, "--batch-size", 3,
                 "--precision", "fp32", "--workers", 0)
    assert result.exit_code == 0, result.output
    emb = load_file(out)["embeddings"]
    student, meta = student_from_checkpoint(setup["run"])
    want = reference_embeddings(student, meta, order)
    assert emb.shape == (4, meta["embed_dim"]) and emb.dtype == torch.float32
    assert (emb - want).abs().max().item() < 1e-5
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)
    listed = (tmp_path / "emb.files.txt").read_text().splitlines()
    assert listed == [os.path.abspath(p) for p in order]

    # a folder (sorted, recursive), as .npy, with an unreadable file skipped and named
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    npy = tmp_path / "all.npy"
    result = cli("embed", "--ckpt", setup["run"], "--dir", tmp_path / "imgs", "--output", npy,
                 "--precision", "fp32", "--workers", 0)
    assert result.exit_code == 0, result.output
    assert "broken.png" in flat(result) and "skipped 1" in flat(result)
    arr = np.load(npy)
    listed = (tmp_path / "all.files.txt").read_text().splitlines()
    assert [os.path.basename(p) for p in listed] == [f"img{i}.png" for i in range(4)]
    assert np.abs(arr - reference_embeddings(student, meta, paths).numpy()).max() < 1e-5


def test_classify_names_the_right_class_as_often_as_zeroshot(setup, tmp_path):
    csv_path = tmp_path / "pc.csv"
    zs = cli("zeroshot", "--ckpt", setup["run"], "--dataset", setup["data"], "--templates",
             setup["templates"], "--precision", "fp32", "--per-class", csv_path, "--workers", 0)
    assert zs.exit_code == 0, zs.output
    rows = [line.split(",") for line in csv_path.read_text().strip().splitlines()[1:]]
    zs_top1 = [int(r[3]) for r in rows]

    folders = sorted(CLASSES)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(c.replace("_", " ") for c in folders) + "\n")
    result = cli("classify", "--ckpt", setup["run"], "--dir", setup["data"], "--classnames",
                 names, "--templates", setup["templates"], "--json", "--top-k", 3,
                 "--precision", "fp32")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert len(out["results"]) == 36 and out["skipped"] == []
    hits = [0] * len(folders)
    predicted = set()
    for r in out["results"]:
        truth = os.path.basename(os.path.dirname(r["file"])).replace("_", " ")
        preds = r["predictions"]
        assert len(preds) == 3 and preds[0]["probability"] >= preds[1]["probability"]
        predicted.add(preds[0]["label"])
        hits[folders.index(truth.replace(" ", "_"))] += preds[0]["label"] == truth
    assert hits == zs_top1
    assert len(predicted) >= 2  # the comparison is not vacuous

    # probabilities: softmax of 100 x cosine over all labels (top-k of them shown)
    r = out["results"][0]["predictions"]
    assert r[0]["probability"] / r[1]["probability"] == pytest.approx(
        np.exp(100 * (r[0]["cosine"] - r[1]["cosine"])), rel=1e-4)

    # the human-readable form lists the file and its labels
    text = cli("classify", "--ckpt", setup["run"], os.path.join(setup["data"], "cat", "000.png"),
               "--labels", "cat,big dog,fish", "--top-k", 2, "--precision", "fp32")
    assert text.exit_code == 0, text.output
    lines = text.stdout.strip().splitlines()
    assert lines[0].endswith("000.png") and len(lines) == 3 and "%" in lines[1]


def test_open_clip_folder_and_release_file_are_accepted(setup, tmp_path):
    paths = odd_images(tmp_path / "imgs", sizes=((45, 33), (30, 50)))
    oc = tmp_path / "oc"
    result = cli("export", "--ckpt", setup["run"], "--format", "open-clip", "--output", oc)
    assert result.exit_code == 0, result.output
    embs = {}
    for name, ckpt in (("run", setup["run"]), ("folder", oc)):
        out = tmp_path / f"{name}.safetensors"
        result = cli("embed", "--ckpt", ckpt, *paths, "--output", out, "--precision", "fp32",
                     "--workers", 0)
        assert result.exit_code == 0, result.output
        embs[name] = load_file(out)["embeddings"]
    assert (embs["run"] - embs["folder"]).abs().max().item() < 1e-5
    args = [*paths, "--labels", "cat,big dog,fish,tree", "--json", "--precision", "fp32"]
    a = json.loads(cli("classify", "--ckpt", setup["run"], *args).stdout)["results"]
    b = json.loads(cli("classify", "--ckpt", oc, *args).stdout)["results"]
    assert [[p["label"] for p in r["predictions"]] for r in a] == \
        [[p["label"] for p in r["predictions"]] for r in b]

    # moved: refused with the repair named; re-pointed: loads in uta and in plain open_clip
    moved = tmp_path / "moved" / "oc"
    os.makedirs(moved.parent)
    shutil.move(oc, moved)
    result = cli("embed", "--ckpt", moved, *paths, "--output", tmp_path / "m.npy")
    assert result.exit_code == 2, result.output
    # rich folds long lines (and paths) at the terminal width
    assert f"utarepoint{moved}" in "".join(result.output.split())
    result = cli("repoint", moved)
    assert result.exit_code == 0 and "open_clip loads it" in flat(result), result.output
    model = open_clip.create_model(f"local-dir:{moved}").eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        a_emb = model.encode_image(x, normalize=True)
        b_emb = F.normalize(student_from_checkpoint(setup["run"])[0].encode_image(x), dim=-1)
    assert (a_emb - b_emb).abs().max().item() < 1e-5
    assert "already points at itself" in cli("repoint", moved).output

    # a released uta_*.pt file: its own vision and text towers
    rel_path = tmp_path / "uta_tiny.pt"
    torch.save(make_state(TINY), rel_path)
    out = tmp_path / "rel.npy"
    result = cli("embed", "--ckpt", rel_path, *paths, "--output", out, "--precision", "fp32",
                 "--workers", 0)
    assert result.exit_code == 0, result.output
    rel = R.load_release(str(rel_path))
    want = reference_embeddings(rel.student, rel.meta, paths)
    assert np.abs(np.load(out) - want.numpy()).max() < 1e-5
    result = cli("classify", "--ckpt", rel_path, paths[0], "--labels", "a,b,c", "--json")
    assert result.exit_code == 0, result.output
    probs = [p["probability"] for p in json.loads(result.stdout)["results"][0]["predictions"]]
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)


def test_bad_input_is_exit_2_with_the_problem_named(setup, tmp_path):
    img = odd_images(tmp_path / "imgs", sizes=((20, 30),))[0]
    run = setup["run"]
    cases = [
        (["embed", "--ckpt", run, img, "--output", tmp_path / "e.pt"], ".safetensors or .npy"),
        (["embed", "--ckpt", run, "--output", tmp_path / "e.npy"], "--dir"),
        (["embed", "--ckpt", run, tmp_path / "imgs", "--output", tmp_path / "e.npy"], "--dir"),
        (["embed", "--ckpt", run, tmp_path / "nope.png", "--output", tmp_path / "e.npy"],
         "not found"),
        (["embed", "--ckpt", tmp_path / "norun", img, "--output", tmp_path / "e.npy"],
         "norun"),
        (["classify", "--ckpt", run, img], "--labels"),
        (["classify", "--ckpt", run, img, "--labels", "cat"], "at least two"),
        (["classify", "--ckpt", run, img, "--labels", "cat,cat"], "repeats"),
        (["classify", "--ckpt", run, img, "--labels", "a,b", "--top-k", 0], "--top-k"),
        (["classify", "--ckpt", run, img, "--labels", "a,b", "--device", "cuda:7"], "cuda"),
    ]
    for args, needle in cases:
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert needle in flat(result) and "Traceback" not in result.output, (args, result.output)
    (tmp_path / "exists.npy").write_bytes(b"")
    result = cli("embed", "--ckpt", run, img, "--output", tmp_path / "exists.npy")
    assert result.exit_code == 2 and "--force" in flat(result)
