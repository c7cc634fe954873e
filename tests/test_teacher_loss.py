"""Teacher targets in the joint space, grid matching, loading errors, and the loss."""

from __future__ import annotations

import pytest
import torch
from conftest import write_clip_folder

from uta_cli.errors import UtaUsageError
from uta_cli.losses import gather_targets, token_alignment_loss
from uta_cli.models.teacher import load_teacher


def test_cls_target_equals_encode_image(tiny_clip_dir):
    teacher = load_teacher(f"local-dir:{tiny_clip_dir}", "")
    x = torch.randn(3, 3, 32, 32)
    tokens = teacher.tokens(x)
    assert tokens.shape == (3, 1 + 16, 32)
    torch.testing.assert_close(tokens[:, 0], teacher.clip.encode_image(x), rtol=0, atol=1e-5)


def test_patch_targets_are_projected_open_clip_tokens(tiny_clip_dir):
    teacher = load_teacher(f"local-dir:{tiny_clip_dir}", "")
    visual = teacher.clip.visual
    x = torch.randn(2, 3, 32, 32)
    visual.output_tokens = True
    with torch.no_grad():
        _, unprojected = visual(x)  # open_clip returns tokens after ln_post, unprojected
    visual.output_tokens = False
    torch.testing.assert_close(teacher.tokens(x)[:, 1:], unprojected @ visual.proj,
                               rtol=0, atol=1e-5)


def test_teacher_is_frozen_and_kept_out_of_modules(tiny_clip_dir):
    teacher = load_teacher(f"local-dir:{tiny_clip_dir}", "")
    assert not any(p.requires_grad for p in teacher.clip.parameters())
    assert not teacher.clip.training
    assert not isinstance(teacher, torch.nn.Module)  # cannot end up in prepare() or a state_dict


@pytest.mark.parametrize("policy", ["resize", "interpolate"])
def test_grid_matching_gives_the_student_grid(tmp_path, policy):
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 28, "layers": 1, "width": 32, "head_width": 16,
                          "patch_size": 7},
           "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 1,
                        "layers": 1}}
    teacher = load_teacher("local-dir:" + write_clip_folder(tmp_path / "p7", cfg), "")
    assert teacher.grid_size == (4, 4)
    note = teacher.match_grid((2, 2), policy)  # e.g. a p16 student on a 2x2 grid
    size = teacher.image_size
    out = teacher.tokens(torch.randn(2, 3, size, size))
    assert out.shape == (2, 1 + 4, 16)
    assert ("resized" in note) == (policy == "resize")
    if policy == "resize":  # the same crop at patch 7 x grid 2 = 14 px; CLS still = encode_image
        assert size == 14
        x = torch.randn(2, 3, 14, 14)
        torch.testing.assert_close(teacher.tokens(x)[:, 0], teacher.clip.encode_image(x),
                                   rtol=0, atol=1e-5)
    else:
        assert size == 28


def test_grid_mismatch_error_policy(tiny_clip_dir):
    teacher = load_teacher(f"local-dir:{tiny_clip_dir}", "")
    with pytest.raises(UtaUsageError, match="grid_match"):
        teacher.match_grid((2, 2), "error")


def test_missing_teacher_weights_shows_the_set_to_use():
    with pytest.raises(UtaUsageError, match=r"--set teacher.weights="):
        load_teacher("ViT-B-16", "")


def test_folder_without_weights_is_an_error(tmp_path, tiny_clip_dir):
    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(open(f"{tiny_clip_dir}/open_clip_config.json")
                                                  .read())
    with pytest.raises(UtaUsageError, match="open_clip_model.safetensors"):
        load_teacher(f"local-dir:{folder}", "")


def test_unknown_tag_is_an_error():
    with pytest.raises(UtaUsageError, match="neither a file"):
        load_teacher("ViT-B-16", "no-such-tag")


def test_loss_is_minimal_when_tokens_agree():
    torch.manual_seed(0)
    target = torch.randn(4, 9, 16)
    same = token_alignment_loss(target * 3.0, target)  # cosine ignores scale
    assert same["loss"].item() == pytest.approx(0.0, abs=1e-6)
    assert same["cls_cos"].item() == pytest.approx(1.0, abs=1e-6)
    noisy = token_alignment_loss(target + 0.5 * torch.randn_like(target), target)
    opposite = token_alignment_loss(-target, target)
    assert 0.0 < noisy["loss"].item() < opposite["loss"].item()
    assert opposite["loss"].item() == pytest.approx(2.0, abs=1e-5)


def test_loss_in_fp32_from_bf16_inputs():
    target = torch.randn(2, 5, 8)
    out = token_alignment_loss(target.bfloat16(), target)
    assert out["loss"].dtype == torch.float32


def test_gather_targets_picks_cls_and_kept_positions():
    teacher = torch.arange(2 * 5 * 1, dtype=torch.float32).view(2, 5, 1)  # CLS + 4 patches
    keep = torch.tensor([[0, 2], [1, 3]])
    got = gather_targets(teacher, keep)[..., 0]
    assert got.tolist() == [[0, 1, 3], [5, 7, 9]]  # patch p sits at token 1 + p
