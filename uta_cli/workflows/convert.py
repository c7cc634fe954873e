"""`uta convert`: an authors' released UTA file (uta_*.pt) as a uta checkpoint folder
(model.safetensors, text_tower.safetensors, meta.json) holding an open_clip `local-dir:` folder
(`open_clip/`), both loaded back and checked against the release before anything is kept.

A workflow above models/: it reads with models/release.py and writes with
models/open_clip_folder.py and checkpoint.py's metadata version.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
from safetensors.torch import save_file

from uta_cli import __version__
from uta_cli import checkpoint as ckpt
from uta_cli.errors import UtaUsageError
from uta_cli.io import atomic_path
from uta_cli.loading.model import student_preprocess
from uta_cli.models.open_clip_folder import export_open_clip, load_open_clip, point_open_clip_at
from uta_cli.models.release import ReleasedModel, load_release
from uta_cli.models.teacher import TeacherIdentity, file_fingerprint


def convert_release(path: str, output: str, force: bool = False,
                    say: Callable[[str], None] = print) -> str:
    """Write a uta checkpoint folder (model.safetensors, text_tower.safetensors, meta.json) with
    an open_clip `local-dir:` folder inside (`open_clip/`), which is also its recorded teacher,
    then load both back and check them against the release."""
    output = os.path.abspath(output)
    if os.path.exists(output):
        if not force:
            raise UtaUsageError(f"{output} exists; pass --force to replace it.")
    rel = load_release(path)
    say(f"loaded {rel.arch.name} from {path} (strict; RoPE tables match the formula to "
        f"{rel.meta['release']['rope_max_abs_diff']:.2g})")
    # staged beside the output and renamed into place whole; removed on any failure
    with atomic_path(output) as tmp:
        os.makedirs(tmp)
        save_file({k: v.contiguous() for k, v in rel.student.state_dict().items()},
                  os.path.join(tmp, "model.safetensors"))
        save_file({k: v.contiguous() for k, v in rel.text_tower.clip.state_dict().items()},
                  os.path.join(tmp, "text_tower.safetensors"))
        pp = student_preprocess(rel.meta)
        oc_meta = {"input_size": [3, pp.size, pp.size], "mean": list(pp.mean),
                   "std": list(pp.std), "interpolation": pp.interpolation}
        oc_tmp = os.path.join(tmp, "open_clip")
        export_open_clip(rel.student, rel.text_tower, oc_tmp, oc_meta)
        _verify_open_clip(rel, oc_tmp, say)  # still pointing at itself: loadable here
        oc_final = os.path.join(output, "open_clip")
        point_open_clip_at(oc_tmp, oc_final)
        with open(os.path.join(oc_tmp, "open_clip_config.json"), encoding="utf-8") as f:
            oc_cfg = json.load(f)
        meta = {k: v for k, v in rel.meta.items() if k != "checkpoint_dir"}
        meta["teacher"] = TeacherIdentity(
            model="local-dir:" + oc_final, weights="local-dir:" + oc_final,
            weights_fingerprint=file_fingerprint(
                os.path.join(oc_tmp, "open_clip_model.safetensors")),
            embed_dim=rel.arch.embed_dim, image_size=pp.size, mean=list(pp.mean),
            std=list(pp.std), interpolation=pp.interpolation,
            model_cfg=oc_cfg["model_cfg"]).to_dict()
        meta["format"] = "uta"
        meta["uta_version"] = __version__
        meta["meta_schema"] = ckpt.META_SCHEMA  # read back by checkpoint.load_meta like a run's
        meta["text_tower"] = {"file": "text_tower.safetensors",
                              "open_clip_model_cfg": oc_cfg["model_cfg"],
                              "note": "the release's text.X as X, plus logit_scale "
                                      "(open_clip CLIP key names)"}
        meta["converted_from"] = rel.meta["release"]
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
    say(f"wrote {output} (uta checkpoint) and {oc_final} (open_clip local-dir:{oc_final})")
    return output


@torch.no_grad()
def _verify_open_clip(rel: ReleasedModel, folder: str, say: Callable[[str], None]) -> None:
    """The written open_clip folder must reproduce the release's image and text embeddings."""
    model, tokenizer = load_open_clip(folder)
    size = rel.arch.image_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    img = (model.encode_image(x) - rel.student.encode_image(x)).abs().max().item()
    prompts = ["a photo of a dog.", "itap of a small boat."]
    txt = (model.encode_text(tokenizer(prompts))
           - rel.text_tower.clip.encode_text(rel.text_tower.tokenizer(prompts))).abs().max().item()
    say(f"verified open_clip folder: image max |diff| {img:.2g}, text max |diff| {txt:.2g}")
    if not (img <= 1e-4 and txt <= 1e-4):
        raise UtaUsageError(f"The converted open_clip folder does not reproduce the release "
                            f"(image {img:.3g}, text {txt:.3g}); nothing was written.")
