"""`uta export --format hf-hub`: the repository placed in a Hugging Face cache loads by name,
offline, in plain open_clip and plain timm (a fresh process with HF_HUB_OFFLINE=1 and
HF_HOME / HF_HUB_CACHE pointing at it) and gives the student's encode_image; the model card;
--push-to-hub offline and (faked) online; a moved `uta convert` output and its repair."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import cli as conftest_cli
from conftest import tiny_overrides
from test_release import TINY, make_state

from uta_cli.loading.model import student_from_checkpoint, teacher_from_meta

REPO = "uta-tests/tiny-student"


def flat(result) -> str:
    """The output with rich's line wrapping undone (it wraps at the terminal width)."""
    return " ".join(result.output.split())


def cli(*args):
    return conftest_cli(*args, env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_clip_dir) -> str:
    """A real two-step pre-training run (Eva student, 40 px: its own size, not the teacher's)
    with the demo zero-shot evaluation at the end (in metrics.jsonl, for the model card).
    In-process: a fresh interpreter would add its start-up to the suite."""
    from accelerate.state import AcceleratorState
    from rich.console import Console

    from uta_cli.recipe import load_recipe
    from uta_cli.workflows.pretrain import run_pretrain

    run_dir = tmp_path_factory.mktemp("hub_run") / "run"
    recipe = load_recipe("demo", tiny_overrides(tiny_clip_dir, steps=2, **{
        "train.checkpoint_every": 2, "student.image_size": 40, "eval.zeroshot": "demo"}))
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        run_pretrain(recipe, output_dir=str(run_dir), resume="never",
                     console=Console(quiet=True))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return str(run_dir)


LOADER = r"""
import json, sys, torch, open_clip, timm
repo, inputs, out = sys.argv[1:]
x = torch.load(inputs)
model, _, preprocess = open_clip.create_model_and_transforms("hf-hub:" + repo)
tok = open_clip.get_tokenizer("hf-hub:" + repo)
trunk = timm.create_model("hf-hub:" + repo, pretrained=True)
model.eval(); trunk.eval()
with torch.no_grad():
    res = {"open_clip": model.encode_image(x, normalize=True),
           "timm": trunk(x),
           "text": model.encode_text(tok(["a photo of a red circle."]))}
torch.save(res, out)
json.dump({"size": preprocess.transforms[0].size,
           "input_size": list(trunk.pretrained_cfg["input_size"])}, sys.stdout)
"""


def place_like_huggingface_hub(folder, hf_home) -> str:
    """models--ORG--NAME/snapshots/<rev>/ with the files, refs/main naming <rev>."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / ("models--" + REPO.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    return str(hf_home / "hub")


def test_hub_layout_loads_offline_in_open_clip_and_timm(run, tmp_path):
    report = tmp_path / "demo.json"
    zs = cli("zeroshot", "--ckpt", run, "--dataset", "demo", "--workers", 0, "--output-json",
             report, "--precision", "fp32")
    assert zs.exit_code == 0, zs.output
    out = tmp_path / "hub" / "tiny"
    result = cli("export", "--ckpt", run, "--format", "hf-hub", "--output", out,
                 "--repo-id", REPO, "--zeroshot-json", report, "--license", "apache-2.0")
    assert result.exit_code == 0, result.output
    assert "timm.create_model" in flat(result) and "FAIL" not in result.output
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors",
                                       "open_clip_config.json", "open_clip_model.safetensors",
                                       "uta_export.json"]
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["vision_cfg"]["timm_model_name"] == f"hf-hub:{REPO}"
    for name in ("open_clip_config.json", "config.json"):  # nothing names a local path
        assert str(tmp_path) not in (out / name).read_text() and "local-dir" not in \
            (out / name).read_text()

    hf_home = tmp_path / "hf"
    cache = place_like_huggingface_hub(out, hf_home)
    student, meta = student_from_checkpoint(run)
    x = torch.randn(3, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(hf_home), HF_HUB_CACHE=cache)
    env.pop("HF_HUB_ENABLE_HF_TRANSFER", None)
    proc = subprocess.run([sys.executable, "-c", LOADER, REPO, str(tmp_path / "x.pt"),
                           str(tmp_path / "got.pt")], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "got.pt")
    info = json.loads(proc.stdout)
    with torch.no_grad():
        want = student.encode_image(x)
    assert (got["open_clip"] - F.normalize(want, dim=-1)).abs().max().item() < 1e-5
    assert (got["timm"] - want).abs().max().item() < 1e-5  # timm's forward: the embedding
    assert info["size"] == 40 and info["input_size"] == [3, 40, 40]
    teacher = teacher_from_meta(meta)
    with torch.no_grad():
        t = teacher.clip.encode_text(teacher.tokenizer(["a photo of a red circle."]))
    assert torch.equal(got["text"], t)

    # uta itself takes the downloaded repository folder as a checkpoint
    emb = tmp_path / "e.npy"
    img = tmp_path / "img.png"
    from PIL import Image

    Image.new("RGB", (52, 40), (200, 30, 60)).save(img)
    assert cli("embed", "--ckpt", out, img, "--output", emb, "--precision", "fp32",
               "--workers", 0).exit_code == 0
    assert cli("embed", "--ckpt", run, img, "--output", tmp_path / "r.npy", "--precision",
               "fp32", "--workers", 0).exit_code == 0
    import numpy as np

    assert np.abs(np.load(emb) - np.load(tmp_path / "r.npy")).max() < 1e-5

    # the model card: front matter, recipe, teacher, data, zero-shot figures, the command
    card = (out / "README.md").read_text()
    zs_report = json.loads(report.read_text())
    assert card.startswith("---\nlicense: apache-2.0\nlibrary_name: open_clip\n")
    assert "Recipe: `demo`" in card and "checkpoint step 2" in card
    assert "Teacher: `local-dir:" in card and str(tmp_path) not in card.split("```yaml")[0]
    assert "Data: `demo`" in card and "reversed-block" in card
    assert f"| demo | zeroshot_classification | {100 * zs_report['acc1']:.2f} |" in card
    assert "metrics.jsonl, step 2" in card  # the run's own end-of-training evaluation
    assert (f"uta export --ckpt {run} --format hf-hub --output {out} --repo-id {REPO} "
            f"--zeroshot-json {report} --license apache-2.0") in card
    assert f'create_model_and_transforms("hf-hub:{REPO}")' in card
    assert f"--model hf-hub:{REPO}" in card  # CLIP_benchmark


def test_push_to_hub_refused_offline_and_uploads_online(run, tmp_path, monkeypatch):
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = cli("export", "--ckpt", run, "--format", "hf-hub", "--output", tmp_path / "a",
                 "--repo-id", REPO, "--push-to-hub")
    assert result.exit_code == 2 and "HF_HUB_OFFLINE" in flat(result)
    assert "huggingface-cli upload" in flat(result) and not (tmp_path / "a").exists()

    calls = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(
        ("create", repo_id, kw.get("private"))) or f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(
        ("upload", kw["repo_id"], sorted(os.listdir(kw["folder_path"])))))
    result = cli("export", "--ckpt", run, "--format", "hf-hub", "--output", tmp_path / "b",
                 "--repo-id", REPO, "--push-to-hub", "--private", "--no-verify")
    assert result.exit_code == 0, result.output
    assert calls[0] == ("create", REPO, True) and calls[1][:2] == ("upload", REPO)
    assert "open_clip_model.safetensors" in calls[1][2] and "README.md" in calls[1][2]

    def refuse(self, **kw):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(HfApi, "upload_folder", refuse)
    result = cli("export", "--ckpt", run, "--format", "hf-hub", "--output", tmp_path / "c",
                 "--repo-id", REPO, "--push-to-hub", "--no-verify")
    assert result.exit_code == 2 and "no route to host" in flat(result)
    assert (tmp_path / "c" / "README.md").exists()  # the folder stays, to upload later


@pytest.mark.parametrize("args, needle", [
    (["--format", "hf-hub"], "--repo-id"),
    (["--format", "hf-hub", "--repo-id", "no-slash"], "ORG/NAME"),
    (["--format", "hf-hub", "--repo-id", "a/b", "--output-kind", "tokens"], "CLIP model"),
    (["--format", "open-clip", "--repo-id", "a/b"], "hf-hub only"),
    (["--format", "hf-hub", "--repo-id", "a/b", "--zeroshot-json", "/no/such.json"],
     "--zeroshot-json"),
])
def test_hub_usage_errors_exit_2(run, tmp_path, args, needle):
    result = cli("export", "--ckpt", run, "--output", tmp_path / "o", *args)
    assert result.exit_code == 2, result.output
    assert needle in flat(result) and not (tmp_path / "o").exists()


def test_moved_convert_output_names_repoint_and_works_after_it(tmp_path):
    rel = tmp_path / "uta_tiny.pt"
    torch.save(make_state(TINY), rel)
    out = tmp_path / "conv"
    assert cli("convert", "--from", "uta-release", rel, "--output", out).exit_code == 0
    moved = tmp_path / "elsewhere" / "conv"
    moved.parent.mkdir()
    shutil.move(out, moved)
    img = tmp_path / "img.png"
    from PIL import Image

    Image.new("RGB", (40, 30), (10, 120, 200)).save(img)
    for ckpt in (moved, moved / "open_clip"):
        result = cli("classify", "--ckpt", ckpt, img, "--labels", "a,b")
        assert result.exit_code == 2, result.output
        assert f"utarepoint{moved}" in "".join(result.output.split()), result.output
    result = cli("repoint", moved)
    assert result.exit_code == 0 and "meta.json: teacher.model" in flat(result), result.output
    for ckpt in (moved, moved / "open_clip"):
        result = cli("classify", "--ckpt", ckpt, img, "--labels", "a,b", "--json")
        assert result.exit_code == 0, result.output
    assert cli("repoint", tmp_path / "nothing").exit_code == 2
