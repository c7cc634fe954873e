"""Views and image transforms: one crop (or the evaluation resize) rendered once per view.

A `View` is one network's input: size, normalisation, resampling. `TrainTransform` draws a
random-resized crop and flip per image as a pure function of (seed, epoch, sample id);
`EvalTransform` is open_clip's evaluation preprocess, pixel for pixel. Both give uint8 tensors;
`normalize` turns a batch into the network's floats on the device.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from uta_cli.errors import UtaUsageError

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


@dataclass(frozen=True)
class View:
    """One network's view of the crop: its input size and normalisation."""

    name: str
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    # Evaluation only (training crops are random): open_clip's resize_mode, i.e. how the image
    # meets the square input: shortest side + centre crop, longest side + centre pad, or squash.
    resize_mode: str = "shortest"
    fill: int = 0  # the padding value of resize_mode "longest"


RESIZE_MODES = ("shortest", "longest", "squash")


def _to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def normalize(images: torch.Tensor, view: View) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalised float. Done per batch, on the device: cheaper than per
    image in the loader, and uint8 moves 4x fewer bytes to the GPU. The arithmetic is
    torchvision's ToTensor + Normalize, `(x / 255 - mean) / std` in fp32, so the values are
    bit-identical to open_clip's preprocess."""
    mean = torch.tensor(view.mean, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(view.std, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    return images.float().div(255).sub_(mean).div_(std)


def eval_resize_crop(img: Image.Image, size: int, interpolation: str = "bicubic",
                     resize_mode: str = "shortest", fill: int = 0) -> Image.Image:
    """The evaluation resize and crop with the arithmetic of open_clip's preprocess (torchvision
    Resize, CenterCrop; open_clip's ResizeKeepRatio, CenterCropOrPad), pixel for pixel:

    - shortest: the short side becomes `size`, the long side `int(size * long / short)`
      (truncated, as torchvision's Resize), then a centre crop whose offset is
      `int(round((side - size) / 2))` (Python's round: halves to even).
    - longest: both sides scaled by `size / long` and rounded, then padded with `fill` to a
      square (left/top get the smaller half) and centre-cropped.
    - squash: resized to size x size, the aspect ratio ignored.
    """
    resample = _RESAMPLE[interpolation]
    w, h = img.size
    if resize_mode == "squash":
        return img.resize((size, size), resample) if (w, h) != (size, size) else img
    if resize_mode == "longest":
        ratio = max(h / size, w / size)
        nh, nw = round(h / ratio), round(w / ratio)
    elif resize_mode == "shortest":
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        nw, nh = (size, new_long) if w <= h else (new_long, size)
    else:
        raise UtaUsageError(f"resize_mode {resize_mode!r} is not one of: "
                            f"{', '.join(RESIZE_MODES)}.")
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample)
    if nw < size or nh < size:  # only "longest" can leave a side short: pad, centred
        left, top = max(size - nw, 0) // 2, max(size - nh, 0) // 2
        canvas = Image.new(img.mode, (max(nw, size), max(nh, size)), (fill,) * len(img.getbands()))
        canvas.paste(img, (left, top))
        img, (nw, nh) = canvas, canvas.size
        if (nw, nh) == (size, size):
            return img
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def _render(img: Image.Image, views: list[View], box: tuple[int, ...] | None,
            flip: bool) -> dict[str, torch.Tensor]:
    """Each view of one crop as uint8 CHW; views of equal size and resampling share one render."""
    out: dict[str, torch.Tensor] = {}
    done: dict[tuple[int, str], torch.Tensor] = {}
    for view in views:
        key = (view.size, view.interpolation, view.resize_mode, view.fill)
        if key not in done:
            if box is None:  # evaluation: exactly open_clip's preprocess
                im = eval_resize_crop(img, view.size, view.interpolation, view.resize_mode,
                                      view.fill)
            else:
                im = img.resize((view.size, view.size), _RESAMPLE[view.interpolation], box=box)
            if flip:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            done[key] = _to_uint8_tensor(im)
        out[view.name] = done[key]
    return out


def sample_rng(seed: int, epoch: int, sample_id: int) -> random.Random:
    """A generator keyed by (seed, epoch, sample id); cheaper to seed than NumPy's (4x)."""
    return random.Random(f"{seed}/{epoch}/{sample_id}")


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float],
                            rng: random.Random,
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, ...]:
    """torchvision's RandomResizedCrop parameters, drawn from an explicit generator."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    side = min(width, height)  # fallback: central square crop
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


_DRAFT_KEY = "uta_draft"  # in a drafted image's info: (full size, scale)


class TrainTransform:
    """Random-resized crop + flip, drawn once per image, rendered once per view (uint8)."""

    def __init__(self, views: list[View], crop_scale: tuple[float, float], hflip: bool,
                 seed: int):
        self.views, self.crop_scale, self.hflip, self.seed = views, tuple(crop_scale), hflip, seed
        self.epoch = 0
        # data.decode gpu: JPEGs leave the loader worker encoded (see `encoded`, decode.py)
        self.defer_jpeg = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _draw(self, width: int, height: int, sample_id: int) -> tuple[tuple[int, ...], bool]:
        rng = sample_rng(self.seed, self.epoch, int(sample_id))
        box = random_resized_crop_box(width, height, self.crop_scale, rng)
        return box, self.hflip and rng.random() < 0.5

    def draft(self, img: Image.Image, sample_id: int) -> None:
        """Ask a JPEG, opened but not yet decoded, to decode at 1/2, 1/4 or 1/8 scale (DCT
        scaling: 2-3x faster) when this sample's crop stays at least as large as the largest
        view at that scale, so every view is still a downscale. Other images are untouched."""
        if img.format != "JPEG":
            return
        (left, top, right, bottom), _ = self._draw(img.width, img.height, sample_id)
        room = min(right - left, bottom - top) / max(v.size for v in self.views)
        scale = next((s for s in (8, 4, 2) if s <= room), 1)
        if scale > 1:
            full = img.size
            drafted = img.draft("RGB", (img.width // scale, img.height // scale))
            if drafted is not None and img.size != full:  # (mode, (0, 0, W / s, H / s))
                img.info[_DRAFT_KEY] = (full, round(full[0] / drafted[1][2]))

    def encoded(self, data: bytes, sample_id: int) -> dict[str, torch.Tensor] | None:
        """With `defer_jpeg`: an RGB or grey JPEG as its bytes plus this sample's crop box and
        flip, drawn at the full size from the header alone, to be decoded and rendered on the
        device (decode.DeviceDecoder). None for anything else: it is decoded here."""
        if not self.defer_jpeg:
            return None
        try:
            img = Image.open(io.BytesIO(data))  # the header only
        except Exception:  # not an image: the decode path skips and counts it
            return None
        if img.format != "JPEG" or img.mode not in ("RGB", "L"):
            return None
        box, flip = self._draw(img.width, img.height, sample_id)
        return {"jpeg": torch.frombuffer(bytearray(data), dtype=torch.uint8),
                "box": torch.tensor(box), "flip": torch.tensor(flip)}

    def __call__(self, img: Image.Image, sample_id: int) -> dict[str, torch.Tensor]:
        (width, height), scale = img.info.get(_DRAFT_KEY, (img.size, 1))
        box, flip = self._draw(width, height, sample_id)  # drawn at the full size, always
        if scale > 1:  # pixel i of a 1/s DCT-scaled decode covers full pixels [i*s, (i+1)*s)
            box = tuple(c / scale for c in box)
        return _render(img, self.views, box, flip)


class EvalTransform:
    """Each view's evaluation resize and crop (`eval_resize_crop`; by default the zero-shot
    protocol of docs/method.md §6: resize the short side, centre crop), identical to open_clip's
    preprocess."""

    def __init__(self, views: list[View]):
        self.views = views

    def set_epoch(self, epoch: int) -> None:
        pass

    def __call__(self, img: Image.Image, sample_id: int) -> dict[str, torch.Tensor]:
        return _render(img, self.views, None, False)
