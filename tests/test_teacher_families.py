"""Every open_clip image-tower family as a UTA teacher, or a named refusal (exit 2).

EVA-CLIP (open_clip EVA02-*: CustomTextCLIP + timm Eva trunk) is built at random init: EVA02-B-16
at its real size, EVA02-L-14 shrunk to 2 narrow blocks of the same trunk (tests/eva_teachers.py).
"""

from __future__ import annotations

import copy
import json
import os

import open_clip
import pytest
import timm
import torch
from conftest import write_clip_folder
from eva_teachers import SHRUNK_NAMES, shrunk_teacher_folder, write_open_clip_folder
from safetensors.torch import save_file

from uta_cli.errors import UtaUsageError
from uta_cli.models.teacher import CLIPTeacher, TeacherIdentity, load_teacher, teacher_tokenizer


def _teacher(clip, model: str) -> CLIPTeacher:
    cfg = open_clip.get_model_config(model)
    ident = TeacherIdentity(model=model, weights="", weights_fingerprint="",
                            embed_dim=cfg["embed_dim"], image_size=224,
                            mean=list(open_clip.OPENAI_DATASET_MEAN),
                            std=list(open_clip.OPENAI_DATASET_STD), interpolation="bicubic",
                            model_cfg=cfg)
    return CLIPTeacher(clip, ident)


@pytest.fixture(scope="module")
def eva02_b16():
    torch.manual_seed(0)
    return _teacher(open_clip.create_model("EVA02-B-16"), "EVA02-B-16")


def test_eva02_b16_cls_target_is_encode_image_and_patches_take_the_same_maps(eva02_b16):
    t = eva02_b16
    assert t.kind == "timm" and t.embed_dim == 512 and t.grid_size == (14, 14)
    x = torch.randn(2, 3, 224, 224)
    seen = {}  # the trunk's last-layer tokens after its final norm (end of forward_features)
    hook = t.visual.trunk.norm.register_forward_hook(lambda m, i, o: seen.update(feats=o))
    out = t.tokens(x)
    hook.remove()
    assert out.shape == (2, 1 + 196, 512)
    ref = t.clip.encode_image(x)
    torch.testing.assert_close(out[:, 0], ref, rtol=1e-5, atol=1e-5)
    # The patch maps, applied to the CLS token itself, give encode_image: patches and CLS share
    # the trunk's final norm, its head and the tower's projection.
    with torch.no_grad():
        torch.testing.assert_close(t.project_timm_tokens(seen["feats"][:, :1])[:, 0], ref,
                                   rtol=1e-5, atol=1e-5)
    # different images give different patch targets (nothing constant slipped through)
    assert (out[0, 1:] - out[1, 1:]).abs().mean() > 0.1 * out[:, 1:].abs().mean()


def test_native_vit_cls_target_is_encode_image_at_real_structure():
    cfg = {"embed_dim": 64, "vision_cfg": {"image_size": 48, "layers": 2, "width": 96,
                                           "head_width": 32, "patch_size": 16},
           "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 1,
                        "layers": 1}}
    torch.manual_seed(0)
    t = _teacher(open_clip.CLIP(**cfg), "ViT-B-16")
    assert t.kind == "native"
    x = torch.randn(3, 3, 48, 48)
    torch.testing.assert_close(t.tokens(x)[:, 0], t.clip.encode_image(x), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def eva02_l14_dir(tmp_path_factory):
    return shrunk_teacher_folder(tmp_path_factory.mktemp("eva02_l14"), "EVA02-L-14")


def test_eva02_p14_teacher_resized_to_a_p16_student_grid(eva02_l14_dir):
    t = load_teacher(f"local-dir:{eva02_l14_dir}", "")
    assert t.kind == "timm" and t.patch_size == 14 and t.grid_size == (16, 16)
    note = t.match_grid((14, 14), "resize")  # vitb16: 224 px / 16 = 14x14
    assert t.image_size == 196 and t.grid_size == (14, 14) and "196px" in note
    x = torch.randn(2, 3, 196, 196)
    out = t.tokens(x)
    assert out.shape == (2, 1 + 196, 768)
    torch.testing.assert_close(out[:, 0], t.clip.encode_image(x), rtol=1e-5, atol=1e-5)
    # Reference: the same timm trunk built for 196 px from the start, with the resized weights,
    # gives the same features: RoPE and the position embedding follow the new grid.
    ref = timm.create_model(SHRUNK_NAMES["eva02_large_patch14_clip_224"], img_size=196,
                            num_classes=768)
    ref.load_state_dict(t.visual.trunk.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(t.visual.trunk.forward_features(x), ref.forward_features(x),
                                   rtol=1e-5, atol=1e-5)


def test_eva02_p14_teacher_interpolated_to_a_p16_student_grid(eva02_l14_dir):
    t = load_teacher(f"local-dir:{eva02_l14_dir}", "")
    t.match_grid((14, 14), "interpolate")
    assert t.image_size == 224
    x = torch.randn(2, 3, 224, 224)
    out = t.tokens(x)
    assert out.shape == (2, 1 + 196, 768)
    torch.testing.assert_close(out[:, 0], t.clip.encode_image(x), rtol=1e-5, atol=1e-5)


def _tiny_text():
    return {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1}


def _timm_tower(trunk: str, pool: str = "", proj: str = "linear", size: int = 64) -> dict:
    return {"embed_dim": 32, "vision_cfg": {"image_size": size, "timm_model_name": trunk,
                                            "timm_pool": pool, "timm_proj": proj},
            "text_cfg": _tiny_text()}


# Every refused family of the README's teacher table, its open_clip tower structure at a tiny
# size: name -> (open_clip model_cfg, what the refusal says). timm trunks are the real entry
# points, narrowed (tests/eva_teachers.py registers them as <name>_shrunk).
REFUSED = {
    # attention-pool towers
    "ViT-B-16-SigLIP": (_timm_tower(SHRUNK_NAMES["vit_base_patch16_siglip_224"], "map", "none",
                                    32), "attention pool"),
    "ViT-B-16-SigLIP2": (_timm_tower(SHRUNK_NAMES["vit_base_patch16_siglip_224"], "map", "none",
                                     32), "attention pool"),
    "PE-Core-B-16": (_timm_tower(SHRUNK_NAMES["vit_pe_core_base_patch16_224"], "map", "none",
                                 32), "attention pool"),
    "coca_ViT-B-32": ({"embed_dim": 32, "custom_text": True, "vision_cfg": {
        "image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8,
        "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
        "text_cfg": {**_tiny_text(), "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {**_tiny_text(), "attn_pooler_heads": 1}}, "attention pool"),
    # mean-pool towers
    "ViT-bigG-14-CLIPA": ({"embed_dim": 32, "vision_cfg": {
        "image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8,
        "pool_type": "avg", "no_ln_pre": True}, "text_cfg": _tiny_text()}, "'avg' pooling"),
    "vit_medium_patch16_gap_256": (_timm_tower(SHRUNK_NAMES["vit_medium_patch16_gap_256"],
                                               size=32), "'avg' pooling"),
    "MobileCLIP-S1": (_timm_tower(SHRUNK_NAMES["fastvit_mci1"], "avg", "none"), "not a ViT"),
    # convolutional and hierarchical towers
    "RN50": ({"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1],
                                              "width": 16}, "text_cfg": _tiny_text()},
             "ModifiedResNet"),
    "convnext_base": (_timm_tower("convnext_atto"), "not a ViT"),
    "swin_base_patch4_window7_224": (_timm_tower(SHRUNK_NAMES["swin_base_patch4_window7_224"],
                                                 size=224), "not a ViT"),
    "ViTamin-S": (_timm_tower(SHRUNK_NAMES["vitamin_small_224"], size=224), "'avg' pooling"),
}


def _write_refused(folder, cfg: dict) -> str:
    if "multimodal_cfg" in cfg:  # CoCa: open_clip builds it from a custom_text config as well
        torch.manual_seed(0)
        model = open_clip.CoCa(**{k: v for k, v in cfg.items() if k != "custom_text"})
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
            json.dump({"model_cfg": cfg, "preprocess_cfg": {"size": 32}}, f)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  os.path.join(folder, "open_clip_model.safetensors"))
        return str(folder)
    if "timm_model_name" in cfg["vision_cfg"]:
        return write_open_clip_folder(folder, cfg)
    return write_clip_folder(folder, cfg)


@pytest.mark.parametrize("family", list(REFUSED))
def test_refused_teacher_family_is_exit_2_naming_it_without_traceback(tmp_path, family):
    """Through the CLI: exit 2, the teacher's name and why, no traceback, nothing written."""
    from typer.testing import CliRunner

    from uta_cli.app import app

    cfg, why = REFUSED[family]
    folder = _write_refused(tmp_path / family, copy.deepcopy(cfg))
    result = CliRunner().invoke(app, [
        "pretrain", "demo", "--output-dir", str(tmp_path / "run"),
        "--set", f"teacher.model=local-dir:{folder}", "--set", "teacher.weights=",
        "--set", "data.source=demo"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    # The error console wraps at its own width, which may split the long tmp path mid-word:
    # compare with all whitespace removed.
    text = "".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    expected = "".join(f"local-dir:{folder}' cannot be a UTA teacher".split())
    assert expected in text and "".join(why.split()) in text, result.output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_hugging_face_tokenizer_offline_is_a_usage_error_naming_what_is_missing():
    # SigLIP's tokenizer comes from Hugging Face: without `transformers`, or offline without
    # the files in the cache, the teacher cannot tokenize class names.
    with pytest.raises(UtaUsageError, match="ViT-B-16-SigLIP.*(transformers|offline)"):
        teacher_tokenizer("ViT-B-16-SigLIP")


def test_gpu_rehearsal_refuses_without_cuda(monkeypatch, capsys):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_rehearsal.py")
    spec = importlib.util.spec_from_file_location("gpu_rehearsal", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err
