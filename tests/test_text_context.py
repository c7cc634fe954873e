"""Trimmed-context text encoding: class weights built with each text forward cut at its longest
prompt equal the full-context ones (fp32) for every tower kind that allows it (open_clip CLIP,
an EVA02 CustomTextCLIP, the released UTA text tower); towers where positions after the prompt
matter keep the full context; the choice reaches the cache key, the JSON and the table."""

from __future__ import annotations

import json
import os

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from uta_cli.app import app
from uta_cli.errors import UtaUsageError
from uta_cli.evaluate import zeroshot as Z
from uta_cli.evaluate.class_weights import cached_classifier, classifier_cache_key
from uta_cli.models import release as R

# Names of very different token lengths (1 to 9 word pieces), so sorted batches differ in length.
CLASSNAMES = ["tench", "great white shark", "American black bear", "Granny Smith",
              "German Shorthaired Pointer", "spotted salamander", "Lakeland Terrier",
              "African rock python", "toilet paper", "dishwasher"]
TEMPLATES = Z.template_strings(open_clip.OPENAI_IMAGENET_TEMPLATES)[::8]  # 10 of the 80
TINY_VISION = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16}
RELEASE = R.ReleaseArch(image_size=32, patch_size=8, width=64, depth=2, heads=2, mlp_hidden=170,
                        embed_dim=48, text_context=77, text_vocab=49408, text_width=64,
                        text_layers=2, text_heads=2, text_dim=48)
runner = CliRunner()


def shrunk_text_cfg(model: str) -> dict:
    """open_clip's own text config of `model`, at 2 layers of width 64."""
    return {**open_clip.get_model_config(model)["text_cfg"], "width": 64, "heads": 2,
            "layers": 2}


def clip_tower() -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip.CLIP(embed_dim=48, vision_cfg=TINY_VISION,
                          text_cfg=shrunk_text_cfg("ViT-B-16")).eval()


def eva02_tower() -> torch.nn.Module:
    cfg = open_clip.get_model_config("EVA02-B-16")
    assert cfg.get("custom_text")  # EVA02 models are CustomTextCLIPs: the tower is clip.text
    torch.manual_seed(1)
    return open_clip.CustomTextCLIP(embed_dim=48, vision_cfg=TINY_VISION,
                                    text_cfg=shrunk_text_cfg("EVA02-B-16")).eval()


def release_tower() -> torch.nn.Module:
    torch.manual_seed(2)
    clip = R.ReleaseTextCLIP(RELEASE)
    with torch.no_grad():  # ReleaseTextCLIP leaves init to the loaded state: fill it here
        for p in clip.parameters():
            p.normal_(0, 0.1)
    return clip.eval()


TOWERS = {"open_clip CLIP (ViT-B-16 text)": clip_tower, "EVA02-B-16 text": eva02_tower,
          "released UTA text": release_tower}


def forward_shapes(clip: torch.nn.Module) -> tuple[list[tuple[int, int]], object]:
    """(prompts, sequence length) of every text-transformer forward, via a hook."""
    tower = getattr(clip, "text", clip)
    seen: list[tuple[int, int]] = []
    handle = tower.transformer.register_forward_hook(
        lambda m, a, o: seen.append(tuple(a[0].shape[:2])))
    return seen, handle


@pytest.mark.parametrize("name", list(TOWERS))
def test_trimmed_class_weights_equal_full_context(name, monkeypatch):
    clip = TOWERS[name]()
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    monkeypatch.setattr(Z, "TRIMMED_TOKENS_PER_FORWARD", 160)  # several forwards per batch
    trimmed = Z.TextEncoder(clip, "trimmed")
    full = Z.TextEncoder(clip, "full")
    assert (trimmed.context, full.context) == ("trimmed", "full")
    assert "end-of-text" in trimmed.note and "requested" in full.note

    seen, handle = forward_shapes(clip)
    got = Z.build_classifier(trimmed, tokenizer, CLASSNAMES, TEMPLATES, texts_per_batch=30)
    handle.remove()
    want = Z.build_classifier(clip.encode_text, tokenizer, CLASSNAMES, TEMPLATES)
    assert got.shape == want.shape == (48, len(CLASSNAMES))
    assert (got - want).abs().max().item() < 1e-5
    # it really trimmed: every forward stops at its own longest prompt, and prompts were sorted
    ids = tokenizer([Z.render_template(t, c) for c in CLASSNAMES for t in TEMPLATES])
    lengths = (ids.argmax(dim=-1) + 1).tolist()
    seq = [n for _, n in seen]
    assert max(seq) == max(lengths) < 77 and min(seq) < max(seq)
    assert sum(b for b, _ in seen) == len(lengths)  # each prompt once
    assert len(seen) > 4 and all(b * n <= 160 for b, n in seen)  # 4 class batches, split
    # per prompt, in the caller's order, against the tower's own encode_text
    with torch.no_grad():
        emb = Z.encode_texts(trimmed, ids)
        assert (emb - clip.encode_text(ids)).abs().max().item() < 1e-5
        # the full path is the tower's encode_text, bit for bit
        assert torch.equal(Z.encode_texts(full, ids), clip.encode_text(ids).float())


def text_transformer_clip(**text) -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip.CustomTextCLIP(embed_dim=48, vision_cfg=TINY_VISION,
                                    text_cfg={**shrunk_text_cfg("ViT-B-16"), **text}).eval()


@pytest.mark.parametrize("text, reason", [
    ({"no_causal_mask": True, "pool_type": "last"}, "'last'"),  # SigLIP-style
    ({"no_causal_mask": True, "pool_type": "argmax"}, "bidirectionally"),
    ({"pool_type": "first"}, "'first'"),
    ({"embed_cls": True}, "class token"),  # CoCa-style
])
def test_towers_whose_result_depends_on_later_positions_keep_the_full_context(text, reason):
    clip = text_transformer_clip(**text)
    enc = Z.TextEncoder(clip, "trimmed")
    assert enc.context == "full" and reason in enc.note, enc.note
    ids = open_clip.get_tokenizer("ViT-B-16")(["a photo of a dog.", "a cat."])
    seen, handle = forward_shapes(clip)
    with torch.no_grad():
        assert torch.equal(enc(ids), clip.encode_text(ids).float())
    handle.remove()
    assert {n for _, n in seen} == {77 + int(bool(text.get("embed_cls")))}


def test_other_text_towers_keep_the_full_context():
    class HFLike(torch.nn.Module):  # e.g. open_clip's HFTextEncoder: not a TextTransformer
        def forward(self, ids):
            return ids.float()

    clip = torch.nn.Module()
    clip.text = HFLike()
    enc = Z.TextEncoder(clip)
    assert enc.context == "full" and "HFLike" in enc.note
    with pytest.raises(UtaUsageError, match="trimmed"):
        Z.TextEncoder(clip, "short")


def test_cache_key_depends_on_the_text_context():
    teacher = {"weights_fingerprint": "1:ab", "model": "ViT-B-16"}
    keys = {classifier_cache_key(teacher, ["a"], ["{c}."], "float32", text_context=c)
            for c in Z.TEXT_CONTEXTS}
    assert len(keys) == 2


@pytest.fixture(scope="module")
def release_and_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("tc")
    clip = release_tower()
    state = {f"text.{k}": v for k, v in clip.state_dict().items() if k != "logit_scale"}
    g = torch.Generator().manual_seed(3)
    for k, shape in R.expected_shapes(RELEASE).items():
        if k.startswith("visual."):
            state[k] = torch.randn(shape, generator=g) * 0.1
    cos, sin = R.rope_tables(RELEASE.grid, RELEASE.head_dim)
    for k in state:
        if k.endswith("freqs_cos"):
            state[k] = cos.clone()
        elif k.endswith("freqs_sin"):
            state[k] = sin.clone()
    state["logit_scale"] = torch.tensor(4.6052)
    path = str(root / "uta_tiny.pt")
    torch.save(state, path)
    rng = np.random.default_rng(0)
    for c in ("great_white_shark", "tench", "African_rock_python"):
        os.makedirs(root / "images" / c)
        for i in range(2):
            img = rng.uniform(0, 1, (1, 1, 3)) + rng.normal(0, 0.3, (36, 44, 3))
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(
                root / "images" / c / f"{i}.png")
    return path, str(root / "images")


def zeroshot(ckpt, images, out, cache, *extra):
    result = runner.invoke(app, ["zeroshot", "--ckpt", ckpt, "--dataset", images,
                                 "--workers", "0", "--precision", "fp32", "--cache-dir",
                                 str(cache), "--output-json", str(out), *extra])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text()), result.output


def test_zeroshot_reports_caches_and_keys_the_text_context(release_and_images, tmp_path):
    ckpt, images = release_and_images
    cache = tmp_path / "cache"
    first, table = zeroshot(ckpt, images, tmp_path / "a.json", cache)
    assert first["classifier"]["cache"] == "built"
    assert first["classifier"]["text_context"] == "trimmed"
    assert first["text_context"]["used"] == "trimmed" and "text context trimmed" in table
    again, _ = zeroshot(ckpt, images, tmp_path / "b.json", cache)
    assert again["classifier"]["cache"] == "hit" and again["acc1"] == first["acc1"]
    full, table = zeroshot(ckpt, images, tmp_path / "c.json", cache, "--text-context", "full")
    assert full["classifier"]["cache"] == "built" and "text context full" in table
    assert full["classifier"]["path"] != first["classifier"]["path"]
    w_trim = load_file(first["classifier"]["path"])["classifier"]
    w_full = load_file(full["classifier"]["path"])["classifier"]
    assert (w_trim - w_full).abs().max().item() < 1e-5
    assert (full["acc1"], full["acc5"]) == (first["acc1"], first["acc5"])
    result = runner.invoke(app, ["zeroshot", "--ckpt", ckpt, "--dataset", images,
                                 "--text-context", "half"])
    assert result.exit_code == 2 and "--text-context" in result.output


def test_cached_class_weights_and_export_take_the_text_context(tmp_path):
    """The one cached-classifier function (the fine-tuning zero-shot head's, `uta zeroshot`'s):
    one cache entry per text context, hit on the second call, off without a cache folder."""
    from uta_cli.models.teacher import TeacherIdentity
    from uta_cli.workflows.export import ExportOptions, check_options

    clip, tokenizer = clip_tower(), open_clip.get_tokenizer("ViT-B-16")
    ident = TeacherIdentity(model="ViT-B-16", weights="", weights_fingerprint="1:ab",
                            embed_dim=48, image_size=32, mean=[0.5] * 3, std=[0.5] * 3,
                            interpolation="bicubic")
    names = CLASSNAMES[:4]
    cache = str(tmp_path / "classifiers")

    def weights(context: str, cache_dir: str = cache):
        return cached_classifier(Z.TextEncoder(clip, context), tokenizer, ident.to_dict(),
                                 names, TEMPLATES, "cpu", cache_dir)

    got = {c: weights(c) for c in Z.TEXT_CONTEXTS}
    assert {info["cache"] for _, info in got.values()} == {"built"}
    assert (got["trimmed"][0] - got["full"][0]).abs().max().item() < 1e-5
    assert len(os.listdir(cache)) == 2  # one cache entry per context
    again, info = weights("trimmed")
    assert info["cache"] == "hit" and torch.equal(again, got["trimmed"][0])
    off, info = weights("trimmed", "")
    assert info["cache"] == "off" and torch.equal(off, got["trimmed"][0])
    with pytest.raises(UtaUsageError, match="--text-context"):
        check_options(ExportOptions(ckpt="x", format="torchscript", output="y",
                                    output_kind="classifier", text_context="short"))


def test_command_line_lists_the_text_contexts():
    import typing

    from uta_cli.commands import export as export_cmd
    from uta_cli.commands import zeroshot as zeroshot_cmd

    assert typing.get_args(zeroshot_cmd.TextContext) == Z.TEXT_CONTEXTS
    assert typing.get_args(export_cmd.TextContext) == Z.TEXT_CONTEXTS


def test_zeroshot_accuracy_runs_zeroshot_core_in_eval_mode_and_restores_it():
    """eval_classifier.zeroshot_accuracy (tuning validation, the demo's report) is the zero-shot
    core: over the full context it is `encode_text` + evaluate on normalised uint8 batches; the
    CLIP is scored in eval mode and left in the mode it came in."""
    from uta_cli.data.pipeline import View, normalize
    from uta_cli.evaluate.class_weights import zeroshot_accuracy

    clip, tokenizer = clip_tower(), open_clip.get_tokenizer("ViT-B-16")
    view = View("image", 32, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (24, 3, 32, 32),
                                                                 dtype=np.uint8))
    weights = Z.build_classifier(clip.encode_text, tokenizer, CLASSNAMES, TEMPLATES)
    with torch.no_grad():
        top = Z.zero_shot_logits(clip.encode_image(normalize(images, view)), weights)
    # each image labelled with its 1st, 2nd or 3rd ranked class: top-1 1/3, top-5 all
    labels = top.argsort(dim=-1, descending=True)[torch.arange(24), torch.arange(24) % 3]
    want = Z.evaluate(clip.encode_image, [(normalize(images, view), labels)], weights)
    assert want["acc1"] == 1 / 3 and want["acc5"] == 1.0
    batches = [{"image": images[:10], "label": labels[:10]},
               {"image": images[10:], "label": labels[10:]}]
    clip.train()
    for context in Z.TEXT_CONTEXTS:
        got = zeroshot_accuracy(clip, tokenizer, CLASSNAMES, TEMPLATES, batches, view, "cpu",
                                context)
        assert got == want and clip.training
