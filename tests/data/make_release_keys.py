"""Write the key lists of the three released UTA checkpoints (tests/data/release_keys/*.tsv).

How they were made: this script writes them from the format's facts alone (docs/release-format.md:
the key names of the authors' CLIP class in `state_dict()` order, the sizes of section "Vision
tower" and the fixed text tower), with no model code of this project, so that the tests compare
the loader against something it did not produce. Re-run it after changing the format's facts:

    python tests/data/make_release_keys.py

Columns: key, shape (dims joined by "x", "scalar" for 0-dim), dtype, persistent, kind. Every row
is persistent (in the file) except `text.attn_mask`, a non-persistent buffer listed last.
"""

from __future__ import annotations

import os

# name: (image size, patch, width, depth, heads, SwiGLU hidden); embed dim 1024 for all three
SIZES = {
    "uta_base_p16_224": (224, 16, 768, 12, 12, 2048),
    "uta_large_p14_336": (336, 14, 1024, 24, 16, 2730),
    "uta_giant_p14_336": (336, 14, 1408, 40, 16, 4096),
}
EMBED = 1024
TEXT = {"context": 77, "vocab": 49408, "width": 1024, "layers": 24, "mlp": 4096}


def rows(image: int, patch: int, width: int, depth: int, heads: int, hidden: int):
    """(key, shape, kind, persistent) in the order of the authors' CLIP.state_dict()."""
    grid, hd = image // patch, width // heads
    rope = (grid * grid, hd)
    out = [("logit_scale", (), "parameter", True),
           ("visual.cls_token", (1, 1, width), "parameter", True),
           ("visual.pos_embed", (1, 1 + grid * grid, width), "parameter", True),
           ("visual.patch_embed.proj.weight", (width, 3, patch, patch), "parameter", True),
           ("visual.patch_embed.proj.bias", (width,), "parameter", True),
           # one RoPE module shared by the ViT and every attention: stored 1 + depth times
           ("visual.rope.freqs_cos", rope, "buffer", True),
           ("visual.rope.freqs_sin", rope, "buffer", True)]
    for i in range(depth):
        b = f"visual.blocks.{i}."
        block = [("norm1.weight", (width,)), ("norm1.bias", (width,)),
                 ("attn.q_bias", (width,)), ("attn.v_bias", (width,)),
                 ("attn.q_proj.weight", (width, width)), ("attn.k_proj.weight", (width, width)),
                 ("attn.v_proj.weight", (width, width)),
                 ("attn.proj.weight", (width, width)), ("attn.proj.bias", (width,)),
                 ("attn.rope.freqs_cos", rope), ("attn.rope.freqs_sin", rope),
                 ("norm2.weight", (width,)), ("norm2.bias", (width,)),
                 ("mlp.w1.weight", (hidden, width)), ("mlp.w1.bias", (hidden,)),
                 ("mlp.w2.weight", (hidden, width)), ("mlp.w2.bias", (hidden,)),
                 ("mlp.ffn_ln.weight", (hidden,)), ("mlp.ffn_ln.bias", (hidden,)),
                 ("mlp.w3.weight", (width, hidden)), ("mlp.w3.bias", (width,))]
        out += [(b + k, s, "buffer" if ".rope." in k else "parameter", True) for k, s in block]
    out += [("visual.norm.weight", (width,), "parameter", True),
            ("visual.norm.bias", (width,), "parameter", True),
            ("visual.head.weight", (EMBED, width), "parameter", True),
            ("visual.head.bias", (EMBED,), "parameter", True)]
    tw, ctx, mlp = TEXT["width"], TEXT["context"], TEXT["mlp"]
    out += [("text.positional_embedding", (ctx, tw), "parameter", True),
            ("text.text_projection", (tw, EMBED), "parameter", True),
            ("text.token_embedding.weight", (TEXT["vocab"], tw), "parameter", True)]
    for i in range(TEXT["layers"]):
        b = f"text.transformer.resblocks.{i}."
        block = [("ln_1.weight", (tw,)), ("ln_1.bias", (tw,)),
                 ("attn.in_proj_weight", (3 * tw, tw)), ("attn.in_proj_bias", (3 * tw,)),
                 ("attn.out_proj.weight", (tw, tw)), ("attn.out_proj.bias", (tw,)),
                 ("ln_2.weight", (tw,)), ("ln_2.bias", (tw,)),
                 ("mlp.c_fc.weight", (mlp, tw)), ("mlp.c_fc.bias", (mlp,)),
                 ("mlp.c_proj.weight", (tw, mlp)), ("mlp.c_proj.bias", (tw,))]
        out += [(b + k, s, "parameter", True) for k, s in block]
    out += [("text.ln_final.weight", (tw,), "parameter", True),
            ("text.ln_final.bias", (tw,), "parameter", True),
            ("text.attn_mask", (ctx, ctx), "buffer", False)]
    return out


def tsv(name: str) -> str:
    lines = ["key\tshape\tdtype\tpersistent\tkind"]
    for key, shape, kind, persistent in rows(*SIZES[name]):
        dims = "x".join(str(d) for d in shape) if shape else "scalar"
        lines.append(f"{key}\t{dims}\tfloat32\t{str(persistent).lower()}\t{kind}")
    return "\n".join(lines) + "\n"


def main() -> None:
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "release_keys")
    os.makedirs(folder, exist_ok=True)
    for name in SIZES:
        with open(os.path.join(folder, f"{name}.tsv"), "w") as f:
            f.write(tsv(name))


if __name__ == "__main__":
    main()
