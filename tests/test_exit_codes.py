"""Exit codes mean one thing each: 2 input the user can fix, 1 with the out-of-memory message
when memory runs out (model building included), 1 with the traceback for anything unexpected.

The model builders catch the errors a bad file or config raises, by name; each is tested here
with the failure injected into the library call it wraps."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import open_clip
import open_clip.factory
import pytest
import torch
from conftest import cli, tiny_overrides

from uta_cli.errors import UtaUsageError
from uta_cli.models import open_clip_folder, release
from uta_cli.models.teacher import clip_from_file, load_clip

OOM = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def _raise(error):
    def fail(*args, **kwargs):
        raise error
    return fail


def _folder_loader(monkeypatch, folder):
    """load_folder down to its open_clip call (the folder checks are tested in test_export)."""
    monkeypatch.setattr(open_clip_folder, "read_folder", lambda f: {})
    monkeypatch.setattr(open_clip_folder, "read_config", lambda f: {})
    monkeypatch.setattr(open_clip_folder, "_trunk_dir", lambda f, c: f)
    monkeypatch.setattr(open_clip_folder, "_loadable", lambda f, t: contextlib.nullcontext(f))
    return lambda: open_clip_folder.load_folder(folder)


# (where, the library call to break, how to reach it)
def _sites(tiny_clip_dir, tmp_path, monkeypatch):
    weights = os.path.join(tiny_clip_dir, "open_clip_model.safetensors")
    return {
        "teacher folder": (open_clip, "create_model",
                           lambda: load_clip(f"local-dir:{tiny_clip_dir}", "")),
        "teacher weights file": (open_clip.factory, "load_state_dict",
                                 lambda: clip_from_file("ViT-B-16", weights)),
        "released file": (torch, "load", lambda: release.read_state(weights)),
        "exported folder": (open_clip, "create_model", _folder_loader(monkeypatch, tmp_path)),
    }


SITES = ["teacher folder", "teacher weights file", "released file", "exported folder"]


@pytest.mark.parametrize("site", SITES)
def test_model_builders_refuse_bad_input_but_pass_memory_and_bugs_through(
        site, tiny_clip_dir, tmp_path, monkeypatch):
    module, name, build = _sites(tiny_clip_dir, tmp_path, monkeypatch)[site]
    # what a damaged file or a config that does not build raises: a usage error (exit 2)
    for bad in (RuntimeError("Error(s) in loading state_dict: size mismatch"),
                ValueError("header too small"), OSError("No such file")):
        monkeypatch.setattr(module, name, _raise(bad))
        with pytest.raises(UtaUsageError):
            build()
    # out of memory keeps its type, for the command line's out-of-memory message (exit 1) ...
    monkeypatch.setattr(module, name, _raise(OOM))
    with pytest.raises(torch.OutOfMemoryError):
        build()
    host = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB")
    monkeypatch.setattr(module, name, _raise(host))
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        build()
    # ... and a bug is not the user's input: it keeps its traceback
    monkeypatch.setattr(module, name, _raise(AttributeError("'NoneType' has no attribute 'x'")))
    with pytest.raises(AttributeError):
        build()


def test_out_of_memory_while_building_the_teacher_is_exit_1_naming_the_knobs(
        tmp_path, tiny_clip_dir, monkeypatch):
    monkeypatch.setattr(open_clip, "create_model", _raise(OOM))
    args = ["pretrain", "demo", "--output-dir", tmp_path]
    for s in tiny_overrides(tiny_clip_dir, steps=2):
        args += ["--set", s]
    result = cli(*args)
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "out of memory" in text and "Traceback" not in text
    for knob in ("data.batch_size", "train.precision=bf16", "train.grad_checkpointing=true"):
        assert knob in text, text


def test_an_unexpected_error_is_exit_1_with_its_traceback(tmp_path, tiny_clip_dir):
    """The real entry point (python -m uta_cli), with a bug injected into model building."""
    code = ("import sys, open_clip\n"
            "def bug(*a, **k):\n"
            "    raise ZeroDivisionError('injected bug')\n"
            "open_clip.create_model = bug\n"
            "from uta_cli.app import main\n"
            "sys.argv = ['uta'] + sys.argv[1:]\n"
            "main()\n")
    args = ["pretrain", "demo", "--output-dir", str(tmp_path)]
    for s in tiny_overrides(tiny_clip_dir, steps=2):
        args += ["--set", s]
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" in out.stderr and "ZeroDivisionError: injected bug" in out.stderr
