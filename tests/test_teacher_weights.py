"""Teacher weight files as people download them: open_clip files and BAAI's native EVA-CLIP
files (converted on load), told apart from released UTA files; strict loading by name."""

from __future__ import annotations

import json

import open_clip
import pytest
import timm
import torch
from eva_teachers import SHRUNK_NAMES, register_shrunk_model, to_eva_clip_native
from safetensors.torch import save_file
from timm.models.eva import checkpoint_filter_fn

from uta_cli.errors import UtaUsageError
from uta_cli.models import release
from uta_cli.models.eva_clip import file_layout
from uta_cli.models.teacher import load_teacher


@pytest.fixture(scope="module")
def eva(tmp_path_factory):
    """A random EVA02-L-14 (shrunk: 2 narrow blocks of the same trunk), its open_clip state and
    the same weights written in BAAI's native layout."""
    root = tmp_path_factory.mktemp("eva_weights")
    name = register_shrunk_model("EVA02-L-14", root / "configs")
    torch.manual_seed(0)
    clip = open_clip.create_model(name)
    with torch.no_grad():  # give every tensor a value the loader could get wrong
        for p in clip.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    state = {k: v.clone() for k, v in clip.state_dict().items()}
    native = to_eva_clip_native(clip)
    torch.save(native, root / "EVA02_CLIP_L_psz14_s4B.pt")
    torch.save(state, root / "open_clip_pytorch_model.bin")
    save_file({k: v.contiguous() for k, v in state.items()}, root / "open_clip_model.safetensors")
    return {"root": root, "name": name, "clip": clip.eval(), "state": state, "native": native}


def test_native_layout_is_the_eva_clip_code_names(eva):
    native = eva["native"]
    assert file_layout(native) == "eva-clip"
    assert {"visual.blocks.0.attn.q_bias", "visual.blocks.0.attn.inner_attn_ln.weight",
            "visual.blocks.0.mlp.w1.weight", "visual.blocks.0.mlp.ffn_ln.weight",
            "visual.blocks.1.attn.rope.freqs_cos", "visual.rope.freqs_sin", "text.text_projection",
            "logit_scale", "visual.head.weight"} <= set(native)
    assert not any(k.startswith("visual.trunk.") for k in native)
    assert file_layout(eva["state"]) == "open_clip"


def test_native_eva_clip_file_round_trips_to_the_open_clip_model(eva):
    teacher = load_teacher(eva["name"], str(eva["root"] / "EVA02_CLIP_L_psz14_s4B.pt"))
    assert teacher.identity.weights_layout == "eva-clip"
    got = teacher.clip.state_dict()
    assert set(got) == set(eva["state"])
    for k, v in eva["state"].items():
        assert torch.equal(got[k], v), k
    x = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(teacher.clip.encode_image(x), eva["clip"].encode_image(x),
                               rtol=0, atol=0)
    torch.testing.assert_close(teacher.tokens(x)[:, 0], eva["clip"].encode_image(x),
                               rtol=1e-5, atol=1e-5)


def test_native_image_side_matches_timm_loading_the_same_file(eva):
    # timm's own path for EVA-CLIP files: load_checkpoint with the EVA checkpoint filter
    # (prefix 'visual.', q/v bias and MLP renames, RoPE tables dropped), strict: the reference
    # for our conversion of the image side.
    ref = timm.create_model(SHRUNK_NAMES["eva02_large_patch14_clip_224"], num_classes=768)
    timm.models.load_checkpoint(ref, str(eva["root"] / "EVA02_CLIP_L_psz14_s4B.pt"),
                                strict=True, filter_fn=checkpoint_filter_fn)
    teacher = load_teacher(eva["name"], str(eva["root"] / "EVA02_CLIP_L_psz14_s4B.pt"))
    mine = teacher.clip.visual.trunk.state_dict()
    theirs = ref.state_dict()
    assert set(mine) == set(theirs)
    for k in theirs:
        assert torch.equal(mine[k], theirs[k]), k


@pytest.mark.parametrize("fname", ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"])
def test_open_clip_files_load_unchanged(eva, fname):
    teacher = load_teacher(eva["name"], str(eva["root"] / fname))
    assert teacher.identity.weights_layout == "open_clip"
    got = teacher.clip.state_dict()
    assert all(torch.equal(got[k], v) for k, v in eva["state"].items())


def test_bad_native_file_names_missing_unexpected_and_wrong_shape_keys(eva, tmp_path):
    bad = dict(eva["native"])
    del bad["visual.blocks.1.attn.q_bias"]
    bad["visual.extra_thing"] = torch.zeros(3)
    bad["text.text_projection"] = torch.zeros(5, 5)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(UtaUsageError) as err:
        load_teacher(eva["name"], str(tmp_path / "bad.pt"))
    msg = str(err.value)
    assert "eva-clip layout" in msg and "strict load refused" in msg
    assert "missing keys: visual.trunk.blocks.1.attn.q_proj.bias" in msg
    assert "unexpected keys: visual.trunk.extra_thing" in msg
    assert "text.text_projection (5, 5)" in msg


def test_native_eva_clip_file_is_not_taken_for_a_uta_release(eva):
    path = str(eva["root"] / "EVA02_CLIP_L_psz14_s4B.pt")
    assert release.resolve_format(path) == "uta-release"  # a single file: read_state decides
    with pytest.raises(UtaUsageError, match="native EVA-CLIP checkpoint .*inner_attn_ln.*"
                                            "teacher.weights="):
        release.read_state(path)
    assert not release.is_uta_release(path)


def test_uta_release_layout_as_teacher_weights_is_named(eva, tmp_path):
    # a released UTA file: the same outline, SwiGLU blocks without the inner attention LN
    like_release = {k: v for k, v in eva["native"].items() if "inner_attn_ln" not in k}
    assert file_layout(like_release) == "uta-release"
    torch.save(like_release, tmp_path / "uta_large_p14_336.pt")
    with pytest.raises(UtaUsageError, match="is a released UTA file"):
        load_teacher(eva["name"], str(tmp_path / "uta_large_p14_336.pt"))


def test_hf_hub_model_from_the_offline_cache(tmp_path, monkeypatch, tiny_clip_dir):
    # the Hugging Face cache layout: models--org--name/{refs/main, snapshots/<rev>/files}
    import shutil

    repo = tmp_path / "hub" / "models--someone--tiny-clip"
    shutil.copytree(tiny_clip_dir, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    teacher = load_teacher("hf-hub:someone/tiny-clip", "")
    assert teacher.identity.model == f"local-dir:{repo / 'snapshots' / 'abc123'}"
    with pytest.raises(UtaUsageError, match="not in the local Hugging Face cache"):
        load_teacher("hf-hub:someone/not-downloaded", "")


def test_pretraining_against_the_native_file_equals_the_open_clip_file(eva, tmp_path):
    """Two steps of `uta pretrain` against the same EVA teacher saved in both layouts: the same
    losses and the same student, bit for bit."""
    from accelerate.state import AcceleratorState
    from conftest import write_images
    from safetensors.torch import load_file

    from uta_cli import checkpoint as ckpt
    from uta_cli.recipe import load_recipe
    from uta_cli.workflows.pretrain import run_pretrain

    write_images(tmp_path / "imgs", 4, size=48)
    results = []
    for fname in ("open_clip_pytorch_model.bin", "EVA02_CLIP_L_psz14_s4B.pt"):
        AcceleratorState._reset_state(reset_partial_state=True)
        sets = {"data.source": str(tmp_path / "imgs"), "data.batch_size": 2,
                "data.num_workers": 0, "teacher.model": eva["name"],
                "teacher.weights": str(eva["root"] / fname), "student.image_size": 224,
                "student.patch_size": 16, "student.width": 32, "student.depth": 1,
                "student.heads": 2, "schedule.steps": 2, "schedule.warmup_steps": 1,
                "train.precision": "fp32", "train.log_every": 1, "train.checkpoint_every": 2}
        run = tmp_path / fname
        run_pretrain(load_recipe("vitb16", [f"{k}={v}" for k, v in sets.items()]),
                     output_dir=str(run), resume="never")
        folder = ckpt.latest_checkpoint(str(run))
        with open(run / "metrics.jsonl") as f:
            losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
        results.append((losses, load_file(f"{folder}/model.safetensors"),
                        ckpt.load_meta(folder)["teacher"]["weights_layout"]))
    (loss_a, w_a, layout_a), (loss_b, w_b, layout_b) = results
    assert (layout_a, layout_b) == ("open_clip", "eva-clip")
    assert len(loss_a) >= 2 and loss_a == loss_b
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)


def test_native_eva02_e_file_round_trips(tmp_path):
    """EVA02-E-14-plus (vitl14's teacher): fused qkv with q/v bias, plain fc1/fc2 MLP, post-norm,
    no RoPE -- the other native EVA-CLIP block layout."""
    name = register_shrunk_model("EVA02-E-14-plus", tmp_path / "configs")
    torch.manual_seed(1)
    clip = open_clip.create_model(name).eval()
    native = to_eva_clip_native(clip)
    assert file_layout(native) == "eva-clip"
    assert {"visual.blocks.0.attn.qkv.weight", "visual.blocks.0.attn.q_bias",
            "visual.blocks.0.mlp.fc1.weight"} <= set(native)
    torch.save(native, tmp_path / "EVA02_CLIP_E_psz14_plus_s9B.pt")
    teacher = load_teacher(name, str(tmp_path / "EVA02_CLIP_E_psz14_plus_s9B.pt"))
    assert teacher.identity.weights_layout == "eva-clip"
    got = teacher.clip.state_dict()
    assert all(torch.equal(got[k], v) for k, v in clip.state_dict().items())
    with pytest.raises(UtaUsageError, match="native EVA-CLIP checkpoint .*mlp.fc1"):
        release.read_state(str(tmp_path / "EVA02_CLIP_E_psz14_plus_s9B.pt"))
