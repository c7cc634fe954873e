"""The data of `uta finetune`: the recipe's source (the demo, class folders, tar shards or a
caption file) opened as training and validation datasets, with class names and prompt templates,
and the training source the engine iterates.

The workflow (finetune.py) calls `open_data` and `train_source`; a notebook can too.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch
from torch.utils.data import Subset

from uta_cli.data.captions import parse_captions
from uta_cli.data.demo import CLASSNAMES as DEMO_CLASSNAMES
from uta_cli.data.demo import TEMPLATES as DEMO_TEMPLATES
from uta_cli.data.demo import demo_splits
from uta_cli.data.folders import ImageFolderDataset, ImageFolderIndex, match_classnames
from uta_cli.data.pipeline import (
    ArrayImageDataset,
    MaskCollator,
    Source,
    detect_format,
    epoch_samples,
    open_dataset,
)
from uta_cli.data.shard_writer import manifest_classnames
from uta_cli.errors import UtaUsageError
from uta_cli.evaluate.zeroshot import read_text_lines, resolve_templates
from uta_cli.io import is_local, url_to_fs
from uta_cli.recipe import Recipe

CAPTION_FILE_SUFFIXES = (".csv", ".tsv", ".json")

@dataclass
class DataSpec:
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset | None
    classnames: list[str] | None  # None when only integer labels are known
    num_classes: int
    templates: list[str]
    kind: str  # demo | folder | tar | captions
    classnames_note: str = ""  # how finetune.classnames was paired with the folders


def _classnames(recipe: Recipe, found: list[str] | None) -> list[str] | None:
    spec = recipe.finetune.classnames
    if spec == "imagenet":
        from open_clip import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES)
    if spec:
        return read_text_lines(spec, "class names")
    return found


def _templates(recipe: Recipe, kind: str) -> list[str]:
    if kind == "demo":
        return list(DEMO_TEMPLATES)
    return resolve_templates(recipe.finetune.templates)[1]


def first_samples(dataset, limit: int):
    """The first `limit` samples of a map-style dataset (limit <= 0: all of it)."""
    if limit > 0 and not isinstance(dataset, torch.utils.data.IterableDataset) and \
            len(dataset) > limit:
        return Subset(dataset, range(limit))
    return dataset


class CaptionedImages(torch.utils.data.Dataset):
    """Images listed in a CSV/TSV/JSON with their captions (one sample per image; with several
    captions, one is drawn per epoch, keyed by (seed, epoch, image) as the crop is)."""

    def __init__(self, index: ImageFolderIndex, captions: list[list[str]], transform,
                 seed: int):
        self.images = ImageFolderDataset(index, transform)
        self.captions, self.transform, self.seed = captions, transform, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict | None:
        item = self.images[i]
        if item is None:
            return None
        caps = self.captions[i]
        pick = 0 if len(caps) == 1 else random.Random(
            f"caption/{self.seed}/{self.transform.epoch}/{i}").randrange(len(caps))
        item["caption"] = caps[pick]
        return item


def open_caption_file(url: str, transform, seed: int) -> CaptionedImages:
    """(image path, caption) pairs from a CSV/TSV/JSON (local or fsspec); image paths relative
    to the file's folder. The format is the one `uta zeroshot --task retrieval` reads."""
    import fsspec

    try:
        with fsspec.open(url, "r", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UtaUsageError(f"Caption file {url} does not exist.") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UtaUsageError(f"Cannot read the caption file {url}: {e}") from None
    pairs = parse_captions(text, url.lower().rsplit(".", 1)[-1], url)
    fs, path = url_to_fs(url)
    if is_local(fs):
        root = os.path.dirname(os.path.abspath(path))
        files = [os.path.normpath(os.path.join(root, img)) for img, _ in pairs]
        missing = [p for p in files if not os.path.isfile(p)]
        if missing:
            raise UtaUsageError(f"{len(missing)} image(s) named in {url} do not exist (e.g. "
                                f"{missing[0]}); paths are taken relative to {root}.")
    else:
        root = url.rsplit("/", 1)[0]
        files = [img if "://" in img else f"{root}/{img.lstrip('/')}" for img, _ in pairs]
    index = ImageFolderIndex(root=root, files=files, labels=[-1] * len(files), classes=[])
    return CaptionedImages(index, [caps for _, caps in pairs], transform, seed)


def open_data(recipe: Recipe, train_tf, val_tf, rank: int, world: int) -> DataSpec:
    d, f = recipe.data, recipe.finetune
    source = d.source
    if source.lower().endswith(CAPTION_FILE_SUFFIXES):
        kind = "captions"
    else:
        kind = detect_format(source, d.format)
    if recipe.task == "classification" and kind == "captions":
        raise UtaUsageError(f"{source} is a caption file; classification needs labelled images: "
                            f"class folders, tar shards with .cls, or the demo.")
    if recipe.task == "contrastive" and kind == "folder":
        raise UtaUsageError(f"{source} is an image folder without captions. Contrastive tuning "
                            f"reads image-caption pairs: tar shards (.jpg + .txt), a CSV/TSV/JSON "
                            f"of image paths and captions, or the demo.")
    val = None
    if kind == "demo":
        train_split, val_split = demo_splits(recipe.demo.train_images, recipe.demo.val_images,
                                             recipe.demo.data_seed)
        train = ArrayImageDataset(train_split.images, train_split.labels, train_tf,
                                  train_split.captions)
        val = ArrayImageDataset(val_split.images, val_split.labels, val_tf)
        found: list[str] | None = list(DEMO_CLASSNAMES)
    elif kind == "captions":
        train = open_caption_file(source, train_tf, recipe.seed)
        found = None
    else:
        train = open_dataset(source, kind, train_tf, rank, world, recipe.seed,
                             recipe.data.shuffle_buffer, recipe.data.shuffle_interleave)
        found = manifest_classnames(source) if kind == "tar" else None  # uta shards' output
        if isinstance(train, ImageFolderDataset):
            if not train.index.classes:
                raise UtaUsageError(f"{source} has no class sub-folders; classification needs "
                                    f"ROOT/<class>/<image> (or tar shards with .cls labels).")
            found = [c.replace("_", " ") for c in train.index.classes]
    if d.val_source:
        val = open_dataset(d.val_source, "auto", val_tf)
        if isinstance(val, ImageFolderDataset) and isinstance(train, ImageFolderDataset) and \
                val.index.classes != train.index.classes:
            raise UtaUsageError(f"The class folders of data.val_source ({len(val.index.classes)})"
                                f" differ from those of data.source "
                                f"({len(train.index.classes)}); labels would not match.")
        if found is None and isinstance(val, ImageFolderDataset) and val.index.classes:
            found = [c.replace("_", " ") for c in val.index.classes]
    classnames = _classnames(recipe, found)
    if found is not None and classnames is not None and len(classnames) != len(found):
        # the labels are the folders' sorted order; names for another class count would
        # silently pair labels with the wrong names (and size the head wrongly)
        raise UtaUsageError(f"finetune.classnames ({f.classnames}) gives {len(classnames)} "
                            f"names, but the data has {len(found)} classes ({', '.join(found[:3])}"
                            f"{', ...' if len(found) > 3 else ''}). Give one name per class, in "
                            f"the folders' sorted order, or --set finetune.classnames= to use "
                            f"the folder names.")
    note = ""
    if found is not None and classnames is not None and f.classnames not in ("", "imagenet"):
        classnames, note = match_classnames(classnames, found, f.classnames)
    num_classes = f.num_classes or (len(classnames) if classnames else 0)
    if recipe.task == "classification" and num_classes < 1:
        raise UtaUsageError("The number of classes is unknown: tar shards carry integer labels "
                            "only. Set finetune.num_classes (and finetune.classnames to a file, "
                            "one name per line, for the zero-shot head).")
    if classnames is not None and f.num_classes and len(classnames) != f.num_classes:
        raise UtaUsageError(f"finetune.num_classes is {f.num_classes} but there are "
                            f"{len(classnames)} class names; make them agree.")
    if val is not None:
        val = first_samples(val, d.val_samples)  # 0 = all
    return DataSpec(train, val, classnames, num_classes, _templates(recipe, kind), kind, note)


def train_source(recipe: Recipe, data: DataSpec, transform, rank: int, world: int) -> Source:
    return Source(data.train, transform, MaskCollator(None, (1, 1), recipe.seed),
                  recipe.data.batch_size, recipe.data.num_workers, recipe.seed, rank, world,
                  samples_per_epoch=epoch_samples(recipe.data.source,
                                                  recipe.data.samples_per_epoch))
