"""The evaluation resize and crop against open_clip's own preprocess transform (torchvision
Resize / CenterCrop, open_clip's ResizeKeepRatio / CenterCropOrPad) on non-square images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from uta_cli.data.transforms import EvalTransform, View, eval_resize_crop, normalize
from uta_cli.errors import UtaUsageError

# (width, height): landscape and portrait, odd and even, and sizes where rounding the long side
# differs from truncating it (500x375 -> 298x224 in torchvision, 299x224 when rounded; 97x75 ->
# 41x32 vs 41.4) or where the centre-crop offset is a half (round half to even).
SIZES = [(500, 375), (375, 500), (97, 75), (75, 97), (33, 32), (32, 33), (31, 47), (47, 31),
         (65, 48), (48, 65), (17, 90), (90, 17), (64, 64), (13, 13), (301, 64)]
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    # smooth structure plus noise: interpolation differences show up as pixel differences
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(x / 3.0), np.cos(y / 5.0), np.sin((x + y) / 7.0)], -1) * 100 + 128
    img = base + rng.normal(0, 30, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_eval_transform_equals_open_clip_preprocess(resize_mode, interpolation):
    for i, (w, h) in enumerate(SIZES):
        img = _image(w, h, i)
        for size in (32, 48, 224):
            cfg = PreprocessCfg(size=size, mean=MEAN, std=STD,
                                          interpolation=interpolation, resize_mode=resize_mode)
            want = image_transform_v2(cfg, is_train=False)(img)
            view = View("x", size, MEAN, STD, interpolation, resize_mode)
            got = normalize(EvalTransform([view])(img, 0)["x"][None], view)[0]
            assert got.shape == want.shape == (3, size, size)
            # the pixels are the same, and so is the arithmetic: bit-identical tensors
            assert torch.equal(got, want), (w, h, size)


def test_the_sizes_above_catch_rounded_long_sides_and_floored_offsets():
    """A resize that rounds the long side and floors the crop offset (what uta did before) gives
    other pixels than open_clip on these sizes, so the equality test above would catch it."""
    def rounded(img, size):
        scale = size / min(img.size)
        w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
        left, top = (w - size) // 2, (h - size) // 2
        return img.resize((w, h), Image.BICUBIC).crop((left, top, left + size, top + size))

    differ = []
    for i, (w, h) in enumerate(SIZES):
        img = _image(w, h, i)
        for size in (32, 224):
            if not np.array_equal(np.asarray(rounded(img, size)),
                                  np.asarray(eval_resize_crop(img, size))):
                differ.append((w, h, size))
    assert (500, 375, 224) in differ and (375, 500, 224) in differ and len(differ) >= 6


def test_longest_pads_with_the_fill_value_like_open_clip():
    img = _image(90, 17, 3)
    cfg = PreprocessCfg(size=32, mean=(0, 0, 0), std=(1, 1, 1),
                                  resize_mode="longest", fill_color=128)
    want = image_transform_v2(cfg, is_train=False)(img)
    view = View("x", 32, (0, 0, 0), (1, 1, 1), "bicubic", "longest", 128)
    got = normalize(EvalTransform([view])(img, 0)["x"][None], view)[0]
    assert torch.equal(got, want)
    assert torch.allclose(got[:, 0, :], torch.full((3, 32), 128 / 255))  # a padded row


def test_unknown_resize_mode_is_a_usage_error():
    with pytest.raises(UtaUsageError, match="resize_mode"):
        eval_resize_crop(_image(10, 12, 0), 8, resize_mode="crop")
