"""Caption files of image-text sets (retrieval evaluation, contrastive tuning): JSON (a list of
{image, captions} rows, an image -> captions mapping, or COCO's images + annotations), CSV or TSV
with a header, each read into (image path, captions) pairs."""

from __future__ import annotations

import csv
import io
import json

from uta_cli.errors import UtaUsageError

CAPTIONS_HELP = (
    "Expected: a folder of images plus captions.json, a list of {\"image\": \"a.jpg\", "
    "\"captions\": [\"...\", \"...\"]} (or {\"a.jpg\": [\"...\"]}, or COCO's images + "
    "annotations), or captions.csv / .tsv with a header and columns image,caption (one row per "
    "caption; several rows per image). Image paths are relative to --data-dir, else to the "
    "captions file's folder.")
CAPTION_FILES = ("captions.json", "captions.csv", "captions.tsv")
_CAPTION_KEYS = ("captions", "caption", "texts", "text", "sentences")
_IMAGE_KEYS = ("image", "filename", "file_name", "file", "filepath", "image_path", "path")


def _as_caption_list(value, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UtaUsageError(f"Captions of {where} must be a string or a list of strings. "
                            f"{CAPTIONS_HELP}")
    return [v.strip() for v in value if v.strip()]


def _pick(keys, options: tuple[str, ...]) -> str | None:
    lowered = {k.lower(): k for k in keys}
    return next((lowered[o] for o in options if o in lowered), None)


def parse_captions(text: str, fmt: str, source: str) -> list[tuple[str, list[str]]]:
    """(image path, captions) in order of first appearance; rows of one image are merged."""
    grouped: dict[str, list[str]] = {}

    def add(image, caps, where: str) -> None:
        if not isinstance(image, str) or not image:
            raise UtaUsageError(f"{source}: {where} has no image path. {CAPTIONS_HELP}")
        grouped.setdefault(image, []).extend(_as_caption_list(caps, f"{image!r}"))

    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UtaUsageError(f"{source} is not valid JSON ({e}). {CAPTIONS_HELP}") from None
        if isinstance(data, dict) and "annotations" in data and "images" in data:  # COCO
            files = {img["id"]: img["file_name"] for img in data["images"]}
            for img in data["images"]:
                grouped.setdefault(img["file_name"], [])
            for ann in data["annotations"]:
                add(files.get(ann.get("image_id")), ann.get("caption"), "an annotation")
        elif isinstance(data, dict):
            for image, caps in data.items():
                add(image, caps, f"key {image!r}")
        elif isinstance(data, list):
            for i, row in enumerate(data):
                if not isinstance(row, dict):
                    raise UtaUsageError(f"{source}: entry {i} is not an object. {CAPTIONS_HELP}")
                ik, ck = _pick(row, _IMAGE_KEYS), _pick(row, _CAPTION_KEYS)
                if ik is None or ck is None:
                    raise UtaUsageError(f"{source}: entry {i} needs an image key "
                                        f"({'/'.join(_IMAGE_KEYS)}) and a caption key "
                                        f"({'/'.join(_CAPTION_KEYS)}). {CAPTIONS_HELP}")
                add(row[ik], row[ck], f"entry {i}")
        else:
            raise UtaUsageError(f"{source}: unsupported JSON layout. {CAPTIONS_HELP}")
    else:
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if fmt == "tsv" else ",")
        ik = _pick(reader.fieldnames or [], _IMAGE_KEYS)
        ck = _pick(reader.fieldnames or [], _CAPTION_KEYS)
        if ik is None or ck is None:
            raise UtaUsageError(f"{source}: the header {reader.fieldnames} needs an image column "
                                f"({'/'.join(_IMAGE_KEYS)}) and a caption column "
                                f"({'/'.join(_CAPTION_KEYS)}). {CAPTIONS_HELP}")
        for i, row in enumerate(reader):
            add(row[ik], row[ck] or "", f"row {i + 2}")
    if not grouped:
        raise UtaUsageError(f"{source} lists no images. {CAPTIONS_HELP}")
    bare = [img for img, caps in grouped.items() if not caps]
    if bare:
        raise UtaUsageError(f"{source}: {len(bare)} image(s) have no caption (e.g. {bare[0]!r}); "
                            "every image needs at least one.")
    return list(grouped.items())
