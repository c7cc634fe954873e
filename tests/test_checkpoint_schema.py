"""Checkpoint metadata versions: a checkpoint of the first versioned format (stored in
tests/data/checkpoint_v1, written by a 1-step `uta pretrain` of a tiny student against the tiny
CLIP of conftest.write_clip_folder) keeps loading, fields it lacks get their documented default,
and a newer schema is refused with the fix."""

from __future__ import annotations

import json
import pathlib
import shutil
import types

import pytest
import torch
from conftest import write_clip_folder
from safetensors.torch import load_file

from uta_cli import checkpoint as ckpt
from uta_cli.errors import UtaUsageError
from uta_cli.loading.model import load_model, student_from_checkpoint, teacher_from_meta
from uta_cli.train.run_files import RunFiles

V1 = pathlib.Path(__file__).parent / "data" / "checkpoint_v1"


def _copy(tmp_path) -> pathlib.Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(V1, folder)
    return folder


def _edit_meta(folder: pathlib.Path, change) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    change(meta)
    (folder / "meta.json").write_text(json.dumps(meta))


def test_todays_checkpoint_loads_with_its_weights():
    raw = json.loads((V1 / "meta.json").read_text())
    assert "meta_schema" not in raw  # written before the field existed
    student, meta = student_from_checkpoint(str(V1))
    assert meta["meta_schema"] == 1 and meta["objective"] == "uta"
    assert student.cfg.width == raw["student"]["width"] == 32
    stored = load_file(str(V1 / "model.safetensors"))
    for name, value in student.state_dict().items():
        assert torch.equal(value, stored[name]), name
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        emb = student.encode_image(x)
    assert emb.shape == (2, raw["embed_dim"]) and torch.isfinite(emb).all()


def test_todays_checkpoint_finds_its_teacher_again(tmp_path):
    # the same tiny CLIP, written again: same bytes, so the recorded fingerprint matches
    clip = write_clip_folder(tmp_path / "clip")
    teacher = teacher_from_meta(ckpt.load_meta(str(V1)), clip)
    assert teacher.identity.embed_dim == 32


def test_a_field_missing_from_an_older_run_gets_its_default(tmp_path):
    folder = _copy(tmp_path)
    _edit_meta(folder, lambda m: m.pop("objective"))
    assert ckpt.load_meta(str(folder))["objective"] == ckpt.META_DEFAULTS["objective"] == "uta"
    _edit_meta(folder, lambda m: m.update(objective="mim"))
    assert ckpt.load_meta(str(folder))["objective"] == "mim"  # a recorded value wins


@pytest.mark.parametrize("schema", [ckpt.META_SCHEMA + 1, 0, "1"])
def test_an_unknown_schema_is_refused_with_the_fix(tmp_path, schema):
    folder = _copy(tmp_path)
    _edit_meta(folder, lambda m: m.update(meta_schema=schema))
    with pytest.raises(UtaUsageError, match="meta_schema.*Upgrade uta"):
        student_from_checkpoint(str(folder))


def test_the_engine_writes_the_current_schema(tmp_path):
    task = types.SimpleNamespace(name="uta-align", checkpoint_meta=lambda: {"embed_dim": 8})
    files = types.SimpleNamespace(cfg=types.SimpleNamespace(recipe={"name": "x"}))
    RunFiles.write_meta_and_extra(files, task, str(tmp_path), step=3, epoch=0)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["meta_schema"] == ckpt.META_SCHEMA and meta["step"] == 3


def test_load_model_types_a_plain_checkpoint(tmp_path):
    loaded = load_model(str(V1))
    assert loaded.source == "checkpoint" and loaded.text is None
    assert loaded.meta["checkpoint_dir"] == str(V1)
    # no text of its own: the recorded teacher's, found where it lives now
    text = loaded.text_tower(write_clip_folder(tmp_path / "clip"))
    assert text.identity.weights_fingerprint == loaded.meta["teacher"]["weights_fingerprint"]
