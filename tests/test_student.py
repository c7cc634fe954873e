"""The kept-token student forward against timm's own forward and an independent RoPE path."""

from __future__ import annotations

import pytest
import torch

from uta_cli.models.student import UTAStudent
from uta_cli.recipe import StudentConfig


def tiny(family: str) -> UTAStudent:
    torch.manual_seed(0)
    cfg = StudentConfig(family=family, image_size=32, patch_size=8, width=32, depth=2, heads=2,
                        mlp_ratio=2.0)
    return UTAStudent(cfg, embed_dim=24).eval()


@pytest.mark.parametrize("family", ["eva", "vit"])
def test_keep_all_tokens_equals_timm_forward(family):
    model = tiny(family)
    x = torch.randn(3, 3, 32, 32)
    keep_all = torch.arange(16).expand(3, 16)
    with torch.no_grad():
        ours = model.forward_tokens(x, keep_all)
        no_keep = model.forward_tokens(x)
        timm_out = model.trunk.forward_features(x)
    torch.testing.assert_close(ours, timm_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(no_keep, timm_out, rtol=0, atol=1e-6)
    # the head maps every token to the teacher's embed_dim; CLS is the image embedding
    assert model(x).shape == (3, 17, 24)
    torch.testing.assert_close(model.encode_image(x), model.head(timm_out[:, 0]))


def test_eva_kept_tokens_use_rope_at_kept_positions():
    """Each sample's kept-token output equals a single-sample run with rope = table[keep]."""
    model = tiny("eva")
    trunk = model.trunk
    x = torch.randn(2, 3, 32, 32)
    keep = torch.tensor([[0, 3, 5, 6, 9, 10, 12, 15], [1, 2, 4, 7, 8, 11, 13, 14]])
    with torch.no_grad():
        batched = model.forward_tokens(x, keep)
        table = trunk.rope.get_embed()  # (N, dim), row-major over the grid
        for i in range(2):
            tokens, _ = trunk._pos_embed(trunk.patch_embed(x[i:i + 1]))
            kept = torch.cat([tokens[:, :1], tokens[:, 1:][:, keep[i]]], dim=1)
            rope = table[keep[i]]
            for blk in trunk.blocks:
                kept = blk(kept, rope=rope)
            torch.testing.assert_close(batched[i:i + 1], trunk.norm(kept), rtol=0, atol=1e-5)


def test_dropping_tokens_changes_nothing_for_other_samples_and_keeps_cls():
    model = tiny("vit")
    x = torch.randn(2, 3, 32, 32)
    keep = torch.stack([torch.arange(0, 16, 2), torch.arange(1, 16, 2)])
    with torch.no_grad():
        both = model(x, keep)
        first = model(x[:1], keep[:1])
    assert both.shape == (2, 9, 24)  # CLS + 8 visible tokens
    torch.testing.assert_close(both[:1], first, rtol=0, atol=1e-6)
    # the visible set matters: another mask gives other tokens
    with torch.no_grad():
        other = model(x[:1], keep[1:])
    assert not torch.allclose(first, other)


def test_eva_student_has_release_style_blocks():
    model = tiny("eva")
    names = {n for n, _ in model.named_parameters()}
    # separate q/k/v projections with q and v bias, no k bias (uta-release-format)
    assert {"trunk.blocks.0.attn.q_proj.bias", "trunk.blocks.0.attn.v_proj.bias"} <= names
    assert "trunk.blocks.0.attn.k_proj.bias" not in names
    assert any("mlp.norm" in n for n in names)  # SwiGLU sub-LN
    assert model.trunk.rope is not None


@pytest.mark.parametrize("family", ["eva", "vit"])
def test_grad_checkpointing_gives_the_same_gradients(family):
    """Recomputed blocks (kept tokens, per-sample RoPE, drop path) give the plain gradients."""
    torch.manual_seed(0)
    cfg = StudentConfig(family=family, image_size=32, patch_size=8, width=32, depth=3, heads=2,
                        mlp_ratio=2.0, drop_path=0.2)  # drop path: the recompute must redraw it
    model = UTAStudent(cfg, embed_dim=24).train()
    x = torch.randn(4, 3, 32, 32)
    keep = torch.stack([torch.randperm(16)[:7] for _ in range(4)])
    target = torch.randn(4, 8, 24)

    def grads(checkpointed: bool):
        model.set_grad_checkpointing(checkpointed)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same drop-path draws for both runs
        loss = (model(x, keep) - target).pow(2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_loss, plain = grads(False)
    ckpt_loss, ckpt = grads(True)
    assert model.trunk.grad_checkpointing
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=0, atol=1e-6)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    # and it does recompute: with checkpointing, fewer tensors are saved for the backward pass
    saved = {False: [], True: []}
    for flag in (False, True):
        model.set_grad_checkpointing(flag)
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t, out=saved[flag]: out.append(t) or t, lambda t: t):
            model(x, keep).sum()
    assert len(saved[True]) < len(saved[False]) / 2
