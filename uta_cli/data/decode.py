"""JPEG decoding in the training process, on the device (`data.decode: gpu`).

With it, loader workers only read bytes: a JPEG sample leaves the worker as its encoded bytes
plus the crop box and flip drawn for it (`TrainTransform.encoded`, the same keyed generator as
the CPU path); other images (PNG, CMYK JPEGs, ...) are decoded in the worker as before. The
training process then decodes the batch with `torchvision.io.decode_jpeg(list, device=...)`
(nvJPEG on CUDA) and renders each view with the crop, an antialiased resize and the flip on the
device. The result has the CPU path's shape and dtype (uint8 views), so the tasks see no
difference.
"""

from __future__ import annotations

import logging

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from uta_cli.data.folders import ImageFolderDataset
from uta_cli.data.shards import TarShardDataset
from uta_cli.data.transforms import View
from uta_cli.errors import UtaUsageError

log = logging.getLogger(__name__)

DECODE_MODES = ("auto", "cpu", "gpu")
_INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                  "nearest": InterpolationMode.NEAREST}
_JPEG = (".jpg", ".jpeg")


def check_decode(mode: str, cuda: bool | None = None) -> None:
    """`gpu` needs CUDA: refused (exit 2) before anything is loaded."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if mode == "gpu" and not cuda:
        raise UtaUsageError("data.decode is gpu, but this machine has no CUDA device. Use "
                            "data.decode=auto (GPU decoding where CUDA is, the loader workers "
                            "elsewhere) or data.decode=cpu.")


def is_jpeg_source(dataset) -> bool:
    """JPEG files (a folder named .jpg/.jpeg throughout its first 1,000 files) or tar shards
    whose first sample is a JPEG."""
    if isinstance(dataset, ImageFolderDataset):
        files = dataset.index.files[:1000]
        return bool(files) and all(f.lower().endswith(_JPEG) for f in files)
    if isinstance(dataset, TarShardDataset):
        for _, _, fields in dataset._read_shard(dataset.shards[0]):
            return any(f in ("jpg", "jpeg") for f in fields)
    return False


def resolve_decode(mode: str, dataset, device: torch.device) -> str:
    """cpu or gpu: `auto` is gpu on CUDA for JPEG sources, cpu otherwise."""
    check_decode(mode, device.type == "cuda")
    if mode == "auto":
        return "gpu" if device.type == "cuda" and is_jpeg_source(dataset) else "cpu"
    return mode


class DeviceDecoder:
    """Turns a batch whose JPEG samples are still encoded into the CPU path's batch, on
    `device`. Samples whose bytes fail to decode are dropped and counted in num_skipped."""

    def __init__(self, views: list[View], device: torch.device | str):
        self.views, self.device = views, torch.device(device)

    def _decode(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        if not data:
            return []
        device = self.device if self.device.type == "cuda" else "cpu"
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # one bad image fails the whole batch: find it
            out = []
            for d in data:
                try:
                    out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                except RuntimeError as e:
                    log.warning("Skipping a JPEG that does not decode on %s: %s", device, e)
                    out.append(None)
            return out

    def render(self, image: torch.Tensor, box, flip: bool) -> dict[str, torch.Tensor]:
        """Each view of one crop, as `transforms._render` draws it from a PIL image."""
        left, top, right, bottom = (int(c) for c in box)
        crop = image[:, top:bottom, left:right]
        done: dict[tuple, torch.Tensor] = {}
        out = {}
        for view in self.views:
            key = (view.size, view.interpolation)
            if key not in done:
                im = TF.resize(crop, [view.size, view.size], _INTERPOLATION[view.interpolation],
                               antialias=view.interpolation != "nearest")
                done[key] = im.flip(-1) if flip else im
            out[view.name] = done[key]
        return out

    def __call__(self, batch: dict) -> dict:
        extras = batch.pop("decode", None)
        if extras is None:
            return batch
        images = iter(self._decode([e["jpeg"] for e in extras if "jpeg" in e]))
        rows: list[dict[str, torch.Tensor] | None] = []
        for e in extras:
            if "jpeg" in e:
                image = next(images)
                rows.append(None if image is None else
                            self.render(image.to(self.device), e["box"].tolist(),
                                        bool(e["flip"])))
            else:  # decoded in the worker (not a JPEG, or CMYK)
                rows.append({v.name: e[v.name].to(self.device, non_blocking=True)
                             for v in self.views})
        keep = [i for i, r in enumerate(rows) if r is not None]
        if len(keep) < len(rows):
            index = torch.tensor(keep)
            for k, v in list(batch.items()):
                if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == len(rows):
                    batch[k] = v[index]
                elif isinstance(v, list) and len(v) == len(rows):
                    batch[k] = [v[i] for i in keep]
            batch["num_skipped"] = int(batch.get("num_skipped", 0)) + len(rows) - len(keep)
        if not keep:
            return {"num_skipped": batch["num_skipped"]}
        for view in self.views:
            batch[view.name] = torch.stack([rows[i][view.name] for i in keep])
        return batch
