"""Released UTA checkpoints (docs/release-format.md): key lists of all three sizes against the
TSVs in tests/data/release_keys (written by tests/data/make_release_keys.py from the format's
facts), RoPE test values, forwards against independent implementations of the format's equations,
strict-load failures, and `uta zeroshot` / `uta convert` / `uta export` / student.init end to end.

Full-size files: the base key set is allocated with random weights, torch.save'd and loaded
strictly (and evaluated end to end). Large and giant are checked from their TSVs on the meta
device (no weights allocated). Forward equivalence and the command-level tests use a reduced
copy of the same key structure (`TINY`: depth 2, width 64, text width 128 x 2 layers) built by the
template that the TSV tests validate, so it runs in seconds.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import cli
from PIL import Image
from timm.layers import RotaryEmbeddingCat

from uta_cli import checkpoint as ckpt
from uta_cli.errors import UtaUsageError
from uta_cli.loading.model import load_model
from uta_cli.loading.starts import student_init_state
from uta_cli.models import release as R
from uta_cli.models.student import UTAStudent

KEYS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "release_keys")
SIZES = {  # docs/release-format.md: image, patch, width, depth, heads, mlp hidden
    "uta_base_p16_224": (224, 16, 768, 12, 12, 2048),
    "uta_large_p14_336": (336, 14, 1024, 24, 16, 2730),
    "uta_giant_p14_336": (336, 14, 1408, 40, 16, 4096),
}
TINY = R.ReleaseArch(image_size=32, patch_size=8, width=64, depth=2, heads=2, mlp_hidden=170,
                     embed_dim=48, text_context=77, text_vocab=49408, text_width=128,
                     text_layers=2, text_heads=2, text_dim=48)


def read_tsv(name: str) -> dict[str, tuple[tuple[int, ...], bool]]:
    rows = {}
    with open(os.path.join(KEYS, f"{name}.tsv")) as f:
        next(f)
        for line in f:
            key, shape, _dtype, persistent, _kind = line.rstrip("\n").split("\t")
            dims = () if shape == "scalar" else tuple(int(d) for d in shape.split("x"))
            rows[key] = (dims, persistent == "true")
    return rows


def make_state(arch: R.ReleaseArch, seed: int = 0, scale: float = 0.1) -> dict:
    """Random weights with exactly the release's keys and shapes; RoPE copies from the formula."""
    g = torch.Generator().manual_seed(seed)
    cos, sin = R.rope_tables(arch.grid, arch.head_dim)
    state = {}
    for k, shape in R.expected_shapes(arch).items():
        if k.endswith("freqs_cos"):
            state[k] = cos.clone()
        elif k.endswith("freqs_sin"):
            state[k] = sin.clone()
        elif k == "logit_scale":
            state[k] = torch.tensor(4.6052)
        else:
            state[k] = torch.randn(shape, generator=g) * scale
    return state


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("rel") / "uta_tiny.pt")
    torch.save(make_state(TINY), path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "red_car"):
        os.makedirs(root / c)
        for i in range(3):
            img = rng.uniform(0, 1, (1, 1, 3)) + rng.normal(0, 0.3, (40, 52, 3))
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(
                root / c / f"{i}.png")
    return str(root)


# ------------------------------------------------------------------------ key lists (all sizes)
@pytest.mark.parametrize("name", list(SIZES))
def test_tsv_key_lists_map_strictly_onto_timm_eva_and_open_clip(name):
    rows = read_tsv(name)
    in_file = {k: s for k, (s, persistent) in rows.items() if persistent}
    assert [k for k, (_, p) in rows.items() if not p] == ["text.attn_mask"]
    meta_state = {k: torch.empty(s, device="meta") for k, s in in_file.items()}
    arch = R.infer_arch(meta_state, name)  # strict: raises on any key or shape difference
    assert arch.name == name
    assert (arch.image_size, arch.patch_size, arch.width, arch.depth, arch.heads,
            arch.mlp_hidden) == SIZES[name]
    assert (arch.embed_dim, arch.text_width, arch.text_layers, arch.text_heads) == \
        (1024, 1024, 24, 16)
    assert R.expected_shapes(arch) == in_file
    n_rope = sum(".rope." in k or k.startswith("visual.rope.") for k in in_file)
    assert n_rope == 2 * (1 + arch.depth)
    # vision: every non-RoPE visual key lands on a UTAStudent parameter of the same shape
    with torch.device("meta"):
        student = UTAStudent(arch.student_config(), arch.embed_dim)
        text = R.ReleaseTextCLIP(arch)
    mapped = R.vision_state(meta_state)
    want = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == want
    student.load_state_dict(mapped, strict=True, assign=True)
    assert student.trunk.blocks[0].mlp.fc1_g.weight.shape[0] == arch.mlp_hidden
    assert not student.trunk.blocks[0].attn.k_proj.bias  # no k bias
    # text: the release's text.X is open_clip CLIP's X
    text_keys = {k[5:]: s for k, s in in_file.items() if k.startswith("text.")}
    text_keys["logit_scale"] = ()
    assert {k: tuple(v.shape) for k, v in text.state_dict().items()} == text_keys


def test_key_list_data_is_the_generator_output_and_matches_the_inventory():
    """The TSVs in tests/data are what make_release_keys.py writes, and agree with the format's
    inventory table (keys, RoPE copies, text keys, tensor elements)."""
    sys.path.insert(0, os.path.dirname(KEYS))
    try:
        import make_release_keys
    finally:
        sys.path.pop(0)
    inventory = {"uta_base_p16_224": (556, 262, 26, 293, 440_997_121),
                 "uta_large_p14_336": (808, 514, 50, 293, 660_521_921),
                 "uta_giant_p14_336": (1144, 850, 82, 293, 1_371_638_145)}
    for name, (n_keys, n_visual, n_rope, n_text, n_elements) in inventory.items():
        with open(os.path.join(KEYS, f"{name}.tsv")) as f:
            assert f.read() == make_release_keys.tsv(name)
        in_file = {k: s for k, (s, p) in read_tsv(name).items() if p}
        assert len(in_file) == n_keys
        assert sum(k.startswith("visual.") for k in in_file) == n_visual
        assert sum(".rope." in k for k in in_file) == n_rope
        assert sum(k.startswith("text.") for k in in_file) == n_text
        assert sum(math.prod(s) for s in in_file.values()) == n_elements


# ------------------------------------------------------------------------------------------ RoPE
ROPE_VALUES = {  # docs/release-format.md, RoPE: sum(cos), sum(sin), (row, col, table, value)...
    "uta_base_p16_224": (9147.385821, 2097.197321,
                         [(16, 0, "cos", 0.414997), (16, 1, "cos", 0.414997),
                          (16, 32, "cos", -0.655556), (16, 33, "cos", -0.655556),
                          (16, 2, "sin", 0.599340)]),
    "uta_large_p14_336": (26603.784850, 6284.209228,
                          [(26, 0, "cos", 0.785887), (26, 32, "cos", 0.235238),
                           (26, 2, "sin", 0.366174)]),
    "uta_giant_p14_336": (36895.170306, 8332.775800,
                          [(26, 0, "cos", 0.785887), (26, 44, "cos", 0.235238),
                           (26, 2, "sin", 0.424692)]),
}


def formula_rope(grid: int, hd: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The formula written out element by element (docs/release-format.md, RoPE), independent
    of the module."""
    d, nf = hd // 2, hd // 4
    omega = [1.0 / 10000 ** (2 * k / d) for k in range(nf)]
    t = [i / grid * 16 for i in range(grid)]
    theta = torch.zeros(grid * grid, hd, dtype=torch.float64)
    for r in range(grid):
        for c in range(grid):
            for k in range(nf):
                theta[r * grid + c, 2 * k] = theta[r * grid + c, 2 * k + 1] = t[r] * omega[k]
                theta[r * grid + c, d + 2 * k] = theta[r * grid + c, d + 2 * k + 1] = \
                    t[c] * omega[k]
    return theta.cos().float(), theta.sin().float()


@pytest.mark.parametrize("name", list(SIZES))
def test_rope_tables_equal_the_format_check_values(name):
    image, patch, width, _, heads, _ = SIZES[name]
    grid, hd = image // patch, width // heads
    cos, sin = R.rope_tables(grid, hd)
    sum_cos, sum_sin, points = ROPE_VALUES[name]
    assert cos.shape == (grid * grid, hd)
    assert cos.double().sum().item() == pytest.approx(sum_cos, abs=2e-3)
    assert sin.double().sum().item() == pytest.approx(sum_sin, abs=2e-3)
    for row, col, table, value in points:
        assert (cos if table == "cos" else sin)[row, col].item() == pytest.approx(value, abs=1e-6)
    assert torch.all(cos[0] == 1) and torch.all(sin[0] == 0)
    ref_cos, ref_sin = formula_rope(grid, hd)
    assert torch.allclose(cos, ref_cos, atol=1e-5) and torch.allclose(sin, ref_sin, atol=1e-5)
    # timm's table (what the model actually uses) is the same: [sin | cos]
    timm_rope = RotaryEmbeddingCat(hd, in_pixels=False, feat_shape=[grid, grid],
                                   ref_feat_shape=(16, 16))
    assert torch.allclose(timm_rope.get_embed(), torch.cat([sin, cos], -1), atol=1e-5)


# ------------------------------------------------------------------ forwards from the equations
def ln(x, w, b, eps):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def rotate(x, cos, sin):
    """Interleaved pairs: y[2m] = x[2m] cos - x[2m+1] sin, y[2m+1] = x[2m+1] cos + x[2m] sin."""
    rot = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    return x * cos + rot * sin


def formula_vision(sd: dict, x: torch.Tensor, arch: R.ReleaseArch) -> torch.Tensor:
    """docs/release-format.md, image tower steps 1-6 and the RoPE rotation, from the equations."""
    W, P, G, nh, hd = arch.width, arch.patch_size, arch.grid, arch.heads, arch.head_dim
    B = x.shape[0]
    y = F.conv2d(x, sd["visual.patch_embed.proj.weight"], sd["visual.patch_embed.proj.bias"],
                 stride=P)
    y = y.flatten(2).transpose(1, 2)  # patch p = r*G + c
    y = torch.cat([sd["visual.cls_token"].expand(B, 1, W), y], 1) + sd["visual.pos_embed"]
    cos, sin = formula_rope(G, hd)
    for i in range(arch.depth):
        p = lambda n, i=i: sd[f"visual.blocks.{i}.{n}"]  # noqa: E731
        h = ln(y, p("norm1.weight"), p("norm1.bias"), 1e-6)
        q = h @ p("attn.q_proj.weight").T + p("attn.q_bias")
        k = h @ p("attn.k_proj.weight").T
        v = h @ p("attn.v_proj.weight").T + p("attn.v_bias")
        q, k, v = (t.reshape(B, -1, nh, hd).transpose(1, 2) for t in (q, k, v))
        q = torch.cat([q[:, :, :1], rotate(q[:, :, 1:], cos, sin)], 2)
        k = torch.cat([k[:, :, :1], rotate(k[:, :, 1:], cos, sin)], 2)
        a = torch.softmax(q @ k.transpose(-1, -2) * hd ** -0.5, dim=-1)
        o = (a @ v).transpose(1, 2).reshape(B, -1, W)
        y = y + o @ p("attn.proj.weight").T + p("attn.proj.bias")
        h = ln(y, p("norm2.weight"), p("norm2.bias"), 1e-6)
        m = F.silu(h @ p("mlp.w1.weight").T + p("mlp.w1.bias")) * \
            (h @ p("mlp.w2.weight").T + p("mlp.w2.bias"))
        m = ln(m, p("mlp.ffn_ln.weight"), p("mlp.ffn_ln.bias"), 1e-6)
        y = y + m @ p("mlp.w3.weight").T + p("mlp.w3.bias")
    y = ln(y, sd["visual.norm.weight"], sd["visual.norm.bias"], 1e-6)
    return y[:, 0] @ sd["visual.head.weight"].T + sd["visual.head.bias"]


def formula_text(sd: dict, ids: torch.Tensor, arch: R.ReleaseArch) -> torch.Tensor:
    """docs/release-format.md, text tower: causal pre-LN transformer, ln_final, the token at
    argmax(ids), x @ projection."""
    B, L = ids.shape
    tw, nh = arch.text_width, arch.text_heads
    hd = tw // nh
    x = sd["text.token_embedding.weight"][ids] + sd["text.positional_embedding"][:L]
    causal = torch.full((L, L), float("-inf")).triu(1)
    for i in range(arch.text_layers):
        p = lambda n, i=i: sd[f"text.transformer.resblocks.{i}.{n}"]  # noqa: E731
        h = ln(x, p("ln_1.weight"), p("ln_1.bias"), 1e-5)
        qkv = h @ p("attn.in_proj_weight").T + p("attn.in_proj_bias")
        q, k, v = (t.reshape(B, L, nh, hd).transpose(1, 2) for t in qkv.split(tw, dim=-1))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + causal, dim=-1)
        o = (a @ v).transpose(1, 2).reshape(B, L, tw)
        x = x + o @ p("attn.out_proj.weight").T + p("attn.out_proj.bias")
        h = ln(x, p("ln_2.weight"), p("ln_2.bias"), 1e-5)
        h = F.gelu(h @ p("mlp.c_fc.weight").T + p("mlp.c_fc.bias"))
        x = x + h @ p("mlp.c_proj.weight").T + p("mlp.c_proj.bias")
    x = ln(x, sd["text.ln_final.weight"], sd["text.ln_final.bias"], 1e-5)
    return x[torch.arange(B), ids.argmax(-1)] @ sd["text.text_projection"]


def test_vision_and_text_forwards_equal_the_format_equations(tiny_file):
    sd = torch.load(tiny_file, weights_only=True)
    rel = R.load_release(tiny_file)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = rel.student.encode_image(x)
        want = formula_vision(sd, x, TINY)
    assert got.shape == (2, 48)
    assert (got - want).abs().max().item() < 1e-5
    ids = rel.text_tower.tokenizer(["a photo of a dog.", "itap of a small red boat."])
    assert ids.shape == (2, 77) and ids.max().item() == 49407
    with torch.no_grad():
        got_t = rel.text_tower.clip.encode_text(ids)
        want_t = formula_text(sd, ids, TINY)
    assert (got_t - want_t).abs().max().item() < 1e-5
    assert rel.meta["release"]["logit_scale"] == pytest.approx(4.6052)


def test_meta_records_the_authors_preprocessing(tiny_file):
    loaded = load_model(tiny_file)
    meta = loaded.meta
    assert loaded.meta["format"] == "uta-release" and loaded.source == "uta-release"
    assert loaded.text is not None and loaded.text_tower() is loaded.text
    assert meta["task"] == "uta-alignment"  # what uta finetune accepts as a UTA start
    assert meta["student_preprocess"] == {"size": 32, "mean": R.OPENAI_MEAN,
                                          "std": R.OPENAI_STD, "interpolation": "bicubic"}
    assert meta["student"]["timm_kwargs"] == {"ref_feat_shape": [16, 16]}
    assert meta["teacher"]["weights_fingerprint"] and meta["embed_dim"] == 48
    assert R.is_uta_release(tiny_file) and not R.is_uta_release(os.path.dirname(tiny_file))


# ---------------------------------------------------------------------------- strict failures
def test_wrong_keys_truncated_and_foreign_files_fail_clearly(tmp_path):
    base = make_state(TINY)
    cases = {
        "extra": ({**base, "visual.blocks.0.attn.k_bias": torch.zeros(64)},
                  "unexpected keys: visual.blocks.0.attn.k_bias"),
        "missing": ({k: v for k, v in base.items() if k != "visual.blocks.1.mlp.ffn_ln.bias"},
                    "missing keys: visual.blocks.1.mlp.ffn_ln.bias"),
        "shape": ({**base, "visual.blocks.0.mlp.w3.bias": torch.zeros(65)},
                  "visual.blocks.0.mlp.w3.bias (65,) != (64,)"),
        "inner_ln": ({**base, "visual.blocks.0.attn.inner_attn_ln.weight": torch.ones(64)},
                     "inner_attn_ln"),
        "wrapped": ({"state_dict": base}, "not a UTA release"),
        "foreign": ({"weight": torch.zeros(3)}, "not a UTA release"),
    }
    bad_rope = dict(base)
    bad_rope["visual.blocks.1.attn.rope.freqs_sin"] = base["visual.rope.freqs_sin"] * 0.5
    cases["rope"] = (bad_rope, "visual.blocks.1.attn.rope.freqs_sin")
    for name, (state, needle) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(state, path)
        with pytest.raises(UtaUsageError) as e:
            R.load_release(str(path))
        assert needle in str(e.value), (name, str(e.value))
    good = tmp_path / "good.pt"
    torch.save(base, good)
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    evil = tmp_path / "evil.pt"  # a plain pickle of an arbitrary object: weights_only refuses
    with open(evil, "wb") as f:
        pickle.dump({"model": _Foreign()}, f)
    for path, needle in ((tmp_path / "trunc.pt", "truncated"), (evil, "truncated"),
                         (tmp_path / "nothere.pt", "not found")):
        with pytest.raises(UtaUsageError) as e:
            R.load_release(str(path))
        assert needle in str(e.value)


class _Foreign:
    pass


def test_bad_files_are_exit_2_without_traceback(tiny_file, tmp_path, images):
    bad = tmp_path / "bad.pt"
    torch.save({**make_state(TINY), "visual.fc_norm.weight": torch.ones(64)}, bad)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(open(tiny_file, "rb").read()[:100000])
    for args in (["zeroshot", "--ckpt", bad, "--dataset", images],
                 ["zeroshot", "--ckpt", trunc, "--dataset", images],
                 ["convert", "--from", "uta-release", bad, "--output", tmp_path / "o"],
                 ["export", "--ckpt", trunc, "--format", "torchscript", "--output",
                  tmp_path / "x.pt"],
                 ["zeroshot", "--ckpt", tiny_file, "--dataset", images, "--teacher"],
                 ["zeroshot", "--ckpt", tiny_file, "--ckpt-format", "bogus", "--dataset",
                  images],
                 ["zeroshot", "--ckpt", tmp_path, "--ckpt-format", "uta-release", "--dataset",
                  images],
                 ["convert", "--from", "timm", tiny_file, "--output", tmp_path / "o"]):
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output
    assert "visual.fc_norm.weight" in cli("convert", "--from", "uta-release", bad, "--output",
                                          tmp_path / "o").output
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------- end to end
def independent_acc1(rel, images: str) -> float:
    names = sorted(os.listdir(images))
    tf = open_clip.image_transform(rel.arch.image_size, is_train=False, mean=R.OPENAI_MEAN,
                                   std=R.OPENAI_STD, interpolation="bicubic")
    with torch.no_grad():
        emb = F.normalize(rel.text_tower.clip.encode_text(
            rel.text_tower.tokenizer([f"a photo of a {n.replace('_', ' ')}." for n in names])),
            dim=-1)
        hits = []
        for y, n in enumerate(names):
            for f in sorted(os.listdir(os.path.join(images, n))):
                x = tf(Image.open(os.path.join(images, n, f)).convert("RGB"))[None]
                logits = F.normalize(rel.student.encode_image(x), dim=-1) @ emb.T
                hits.append(int(logits.argmax().item() == y))
    return float(np.mean(hits))


def test_zeroshot_and_convert_end_to_end(tiny_file, images, tmp_path):
    out = tmp_path / "zs.json"
    args = ["--dataset", images, "--templates", "simple", "--workers", "0", "--precision",
            "fp32", "--cache-dir", "none"]
    result = cli("zeroshot", "--ckpt", tiny_file, *args, "--output-json", out)
    assert result.exit_code == 0, result.output
    rep = json.loads(out.read_text())
    assert rep["model"] == "uta_w64_d2_p8_32" and rep["teacher"]["model"].startswith("uta-release")
    assert rep["preprocess"]["mean"] == R.OPENAI_MEAN and rep["image_size"] == 32
    assert rep["preprocess"]["interpolation"] == "bicubic"
    rel = R.load_release(tiny_file)
    assert rep["acc1"] == pytest.approx(independent_acc1(rel, images), abs=1e-9)

    conv = tmp_path / "conv"
    result = cli("convert", "--from", "uta-release", tiny_file, "--output", conv)
    assert result.exit_code == 0, result.output
    assert {"model.safetensors", "meta.json", "text_tower.safetensors", "open_clip"} <= \
        set(os.listdir(conv))
    assert cli("convert", "--from", "uta-release", tiny_file, "--output", conv).exit_code == 2
    # a versioned checkpoint like a training run's, read back through the same schema check
    raw = json.loads((conv / "meta.json").read_text())
    assert raw["meta_schema"] == ckpt.META_SCHEMA and raw["format"] == "uta"
    # open_clip loads the folder by itself (no uta code) and reproduces both towers
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{conv}/open_clip")
    tok = open_clip.get_tokenizer(f"local-dir:{conv}/open_clip")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval().encode_image(x), rel.student.encode_image(x),
                              atol=1e-5)
        ids = tok(["a photo of a cat."])
        assert torch.allclose(model.encode_text(ids), rel.text_tower.clip.encode_text(ids),
                              atol=1e-5)
    # the converted folder is a uta checkpoint: zeroshot gives the same numbers
    out2 = tmp_path / "zs2.json"
    result = cli("zeroshot", "--ckpt", conv, *args, "--output-json", out2)
    assert result.exit_code == 0, result.output
    assert json.loads(out2.read_text())["acc1"] == rep["acc1"]


def test_export_takes_a_release_file(tiny_file, tmp_path):
    result = cli("export", "--ckpt", tiny_file, "--ckpt-format", "uta-release", "--format",
                 "torchscript", "--output", tmp_path / "s.pt")
    assert result.exit_code == 0, result.output
    md = json.loads((tmp_path / "s.pt.json").read_text())
    assert md["mean"] == R.OPENAI_MEAN and md["input_size"] == [3, 32, 32]


def test_student_init_from_a_release_file(tiny_file):
    cfg = R.read_release(tiny_file)[1].student_config()
    state, source = student_init_state(tiny_file, cfg, 48)
    assert source == f"the released UTA file {tiny_file}"
    student = UTAStudent(cfg, 48)
    student.load_state_dict(state)  # strict
    wrong = R.read_release(tiny_file)[1].student_config()
    wrong.depth, wrong.timm_kwargs = 3, {}
    with pytest.raises(UtaUsageError, match="depth=3 .release: 2.*ref_feat_shape"):
        student_init_state(tiny_file, wrong, 48)
    with pytest.raises(UtaUsageError, match="embed_dim=32"):
        student_init_state(tiny_file, cfg, 32)


# ------------------------------------------------------------------ the full-size base file
def test_full_size_base_release_end_to_end(tmp_path, images):
    """All 556 keys of uta_base_p16_224 at their real shapes (~1.8 GB, random): `uta zeroshot`
    loads it strictly and scores it with its own text tower at 224 px."""
    rows = read_tsv("uta_base_p16_224")
    arch = R.infer_arch({k: torch.empty(s, device="meta") for k, (s, p) in rows.items() if p},
                        "base")
    state = make_state(arch, scale=0.02)
    assert {k: tuple(v.shape) for k, v in state.items()} == \
        {k: s for k, (s, p) in rows.items() if p}
    path = tmp_path / "uta_base_p16_224.pt"
    torch.save(state, path)
    del state
    report = tmp_path / "zs.json"
    out = subprocess.run([sys.executable, "-m", "uta_cli", "zeroshot", "--ckpt", str(path),
                          "--dataset", images, "--templates", "simple", "--workers", "0",
                          "--precision", "fp32", "--cache-dir", "none", "--output-json",
                          str(report)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rep = json.loads(report.read_text())
    assert rep["model"] == "uta_base_p16_224" and rep["image_size"] == 224
    assert rep["num_samples"] == 9 and rep["teacher"]["embed_dim"] == 1024
    assert rep["preprocess"]["interpolation"] == "bicubic"


def test_pretrain_student_init_from_a_release_file(tmp_path, tiny_clip_dir):
    """`student.init: FILE.pt` starts UTA pre-training from the release's vision tower."""
    from conftest import tiny_overrides

    arch = R.ReleaseArch(image_size=32, patch_size=8, width=32, depth=2, heads=2, mlp_hidden=85,
                         embed_dim=32, text_context=77, text_vocab=49408, text_width=64,
                         text_layers=1, text_heads=1, text_dim=32)
    path = tmp_path / "uta_small.pt"
    torch.save(make_state(arch), path)
    sets = tiny_overrides(tiny_clip_dir, steps=1, **{
        "student.mlp_ratio": arch.student_config().mlp_ratio, "student.init": path,
        "train.checkpoint_every": 1})
    args = ["pretrain", "demo", "--output-dir", tmp_path / "run"]
    for s in sets + ['student.timm_kwargs={"ref_feat_shape": [16, 16]}']:
        args += ["--set", s]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert "initialised from the released UTA file" in result.output
    bad = cli(*args[:-2], "--output-dir", tmp_path / "run2")  # no ref_feat_shape: refused
    assert bad.exit_code == 2 and "ref_feat_shape" in bad.output


def test_finetune_takes_a_release_file(tiny_file, images, tmp_path):
    """`init: FILE.pt` for both fine-tuning tasks. Classification with the zero-shot head starts
    exactly at the release's zero-shot top-1 (its own text tower builds the head). Contrastive
    tuning tunes the release's text tower; the tuned checkpoint is then scored with it, and
    finds the release again through --teacher-weights after the file moved."""
    import shutil

    from uta_cli.recipe import load_recipe
    from uta_cli.workflows.finetune import run_finetune

    zs_args = ["--dataset", images, "--templates", "simple", "--workers", "0", "--precision",
               "fp32", "--cache-dir", "none"]
    assert cli("zeroshot", "--ckpt", tiny_file, *zs_args, "--output-json",
               tmp_path / "rel.json").exit_code == 0
    release_acc1 = json.loads((tmp_path / "rel.json").read_text())["acc1"]
    base = {"data.source": images, "data.val_source": images, "data.batch_size": 4,
            "data.num_workers": 0, "data.val_samples": 0, "schedule.steps": 2,
            "schedule.warmup_steps": 1, "train.precision": "fp32", "train.val_every": 2,
            "train.checkpoint_every": 2, "student.drop_path": 0.1,
            "finetune.templates": "simple"}

    def run(name, out, **sets):
        sets = {**base, **sets}
        return run_finetune(load_recipe(name, [f"{k}={v}" for k, v in sets.items()]),
                            output_dir=str(out), resume="never")

    # lr 0: the checkpoint holds the starting model, which must be the release's
    s = run("finetune_demo", tmp_path / "cls", init=tiny_file, **{
        "finetune.zeroshot_head": True, "optim.lr": 0.0, "finetune.ema_decay": 0.0})
    assert s["first_val"]["step"] == 0
    assert s["first_val"]["val_acc1"] == pytest.approx(release_acc1, abs=1e-9)
    from uta_cli import checkpoint as ckpt
    from uta_cli.evaluate.zeroshot import SIMPLE_TEMPLATES, build_classifier

    folder = ckpt.latest_checkpoint(str(tmp_path / "cls"))
    meta, start = ckpt.load_meta(folder), ckpt.load_weights(folder)
    assert meta["preprocess"]["mean"] == R.OPENAI_MEAN and meta["preprocess"]["size"] == 32
    assert meta["teacher"]["model"].startswith("uta-release:")
    rel = R.load_release(tiny_file)
    for k, v in rel.student.state_dict().items():  # the projection is the new head's first part
        assert torch.equal(start[k.replace("head.", "head.proj.")], v), k
    names = [n.replace("_", " ") for n in sorted(os.listdir(images))]
    classifier = build_classifier(rel.text_tower.clip.encode_text, rel.text_tower.tokenizer,
                                  names, list(SIMPLE_TEMPLATES))
    head = F.normalize(start["head.classes.weight"], dim=-1)
    assert torch.allclose(head, F.normalize(classifier.T, dim=-1), atol=1e-5)

    # contrastive: captions from the folder names, the release's text tower unlocked
    rows = ["image,caption"] + [f"{os.path.join(images, c, f)},a photo of a {c.replace('_', ' ')}."
                                for c in sorted(os.listdir(images))
                                for f in sorted(os.listdir(os.path.join(images, c)))]
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("\n".join(rows) + "\n")
    local = tmp_path / "uta_local.pt"
    shutil.copy(tiny_file, local)
    s = run("contrastive_demo", tmp_path / "con", init=local, **{
        "data.source": str(pairs),
        "finetune.text_locked": False, "optim.lr": 1e-3})
    tuned = ckpt.load_weights(ckpt.latest_checkpoint(str(tmp_path / "con")))
    original = rel.text_tower.clip.state_dict()
    assert not torch.equal(tuned["text_projection"], original["text_projection"])
    out = tmp_path / "con.json"
    assert cli("zeroshot", "--ckpt", tmp_path / "con", *zs_args, "--output-json",
               out).exit_code == 0
    tuned_acc1 = json.loads(out.read_text())["acc1"]
    assert tuned_acc1 == pytest.approx(s["val"]["val_zeroshot_acc1"], abs=1e-9)
    # exported as an open_clip folder, the tuned run carries its tuned text tower
    assert cli("export", "--ckpt", tmp_path / "con", "--format", "open-clip", "--output",
               tmp_path / "oc").exit_code == 0
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    ids = rel.text_tower.tokenizer(["a photo of a cat."])
    with torch.no_grad():
        tuned_text = R.ReleaseTextCLIP(rel.arch)
        tuned_text.load_state_dict({k: v for k, v in tuned.items()
                                    if not k.startswith("visual.")})
        assert torch.allclose(model.eval().encode_text(ids), tuned_text.encode_text(ids),
                              atol=1e-5)
    # on the demo data there is no teacher reference to report (no CLIP image tower)
    demo = run("contrastive_demo", tmp_path / "con_demo", init=local, **{
        "data.source": "demo", "data.val_source": "", "demo.train_images": 16,
        "demo.val_images": 8})
    assert "val_zeroshot_acc1" in demo["val"] and not any("teacher" in k for k in demo["val"])
    moved = tmp_path / "elsewhere.pt"
    os.replace(local, moved)
    gone = cli("zeroshot", "--ckpt", tmp_path / "con", *zs_args)
    assert gone.exit_code == 2 and "--teacher-weights" in gone.output
    again = cli("zeroshot", "--ckpt", tmp_path / "con", *zs_args, "--teacher-weights", moved,
                "--output-json", tmp_path / "again.json")
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "again.json").read_text())["acc1"] == tuned_acc1
    wrong = cli("zeroshot", "--ckpt", tmp_path / "con", *zs_args, "--teacher-weights",
                tmp_path / "elsewhere_wrong.pt")
    assert wrong.exit_code == 2
    no_teacher = cli("zeroshot", "--ckpt", tmp_path / "con", *zs_args, "--teacher-weights",
                     moved, "--teacher")
    assert no_teacher.exit_code == 2 and "Drop --teacher" in no_teacher.output
