"""The Python API (docs/python-api.md): the page's example runs as written, uta_cli.load_model
matches open_clip's preprocess and the teacher's text tower, and the lazy names resolve."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
from conftest import tiny_overrides
from PIL import Image

import uta_cli
from uta_cli.recipe import load_recipe
from uta_cli.workflows.pretrain import run_pretrain

DOC = pathlib.Path(__file__).parents[1] / "docs" / "python-api.md"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_clip_dir):
    root = tmp_path_factory.mktemp("api")
    recipe = load_recipe("demo", tiny_overrides(tiny_clip_dir, steps=3))
    run_pretrain(recipe, output_dir=str(root / "runs" / "demo"), resume="never")
    return root


def _odd_image(path, size=(53, 37), seed=1):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def test_the_pages_first_example_runs_as_written(tiny_run, monkeypatch, capsys):
    block = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)[0]
    _odd_image(tiny_run / "image.png")
    monkeypatch.chdir(tiny_run)
    scope: dict = {}
    exec(compile(block, str(DOC), "exec"), scope)
    probs = scope["probs"]
    assert probs.shape == (1, 2) and torch.allclose(probs.sum(-1), torch.ones(1))
    assert "tensor(" in capsys.readouterr().out


def test_load_model_is_the_student_and_teacher_of_the_checkpoint(tiny_run, tiny_clip_dir):
    model = uta_cli.load_model(str(tiny_run / "runs" / "demo"))
    assert isinstance(model, uta_cli.UTAModel)
    # preprocess equals open_clip's eval transform on a non-square, odd-sized image
    _odd_image(tiny_run / "odd.png", (71, 45), seed=3)
    image = Image.open(tiny_run / "odd.png")
    reference = open_clip.image_transform(32, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
                                          std=open_clip.OPENAI_DATASET_STD)
    x = model.preprocess(image)
    assert torch.equal(x, reference(image))
    # the image side is the student's CLS embedding; the text side is the teacher's CLIP
    emb = model.encode_image(x[None])
    assert torch.allclose(emb, model.student.encode_image(x[None]).float())
    assert torch.allclose(model.encode_image(x[None], normalize=True).norm(dim=-1),
                          torch.ones(1))
    clip, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tiny_clip_dir}")
    tokens = model.tokenizer(["a red circle", "a photo of a blue square"])
    with torch.no_grad():
        assert torch.allclose(model.encode_text(tokens), clip.encode_text(tokens), atol=1e-6)


def test_api_names_do_not_shadow_wings_and_import_lazily():
    import uta_cli.export as wing

    assert uta_cli.export is wing and wing.__path__  # the wing, a package, not the function
    assert callable(uta_cli.export_model) and uta_cli.export_model.__doc__
    for name in ("pretrain", "finetune", "zeroshot", "load_recipe", "convert_release"):
        assert callable(getattr(uta_cli, name)) and getattr(uta_cli, name).__doc__, name
    assert {"load_model", "export_model", "pretrain"} <= set(dir(uta_cli))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        uta_cli.nope  # noqa: B018
    code = ("import sys, uta_cli\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip')))\n"
            "uta_cli.load_recipe\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "False"]
