"""Evaluation datasets for uta zeroshot: ImageNet and its variants, ObjectNet, CLIP_benchmark
webdatasets, class folders, tar shards and caption files, each resolved to one EvalSet."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import fsspec
import torch

from uta_cli.data.captions import CAPTION_FILES, CAPTIONS_HELP, parse_captions
from uta_cli.data.demo import CLASSNAMES, TEMPLATES, demo_splits
from uta_cli.data.folders import (
    TAR_SUFFIXES,
    ImageFolderDataset,
    ImageFolderIndex,
    folder_classname,
    index_image_folder,
    match_classnames,
)
from uta_cli.data.pipeline import (
    ArrayImageDataset,
    detect_format,
)
from uta_cli.data.shard_writer import manifest_classnames
from uta_cli.data.shards import expand_shard_urls
from uta_cli.errors import UtaUsageError
from uta_cli.evaluate.zeroshot import (
    read_text_lines,
    resolve_templates,
    template_strings,
)
from uta_cli.io import is_local, url_of, url_to_fs
from uta_cli.recipe import DemoConfig

_CLASSES_LAYOUT = ("uta zeroshot reads the 'classes' layout: ROOT/<class name>/<image>, one "
                   "sub-folder per class (class names from the folder names, underscores as "
                   "spaces, or from --classnames).")


# --------------------------------------------------------------------------------------------
# datasets


@dataclass
class EvalSet:
    """A resolved evaluation dataset: where the images are, and the class names or captions."""

    name: str
    kind: str  # imagenet | folder | tar | wds (CLIP_benchmark's layout) | demo | captions
    location: str
    classnames: list[str] = field(default_factory=list)
    classnames_source: str = ""
    default_templates: str = "openai"
    index: ImageFolderIndex | None = None
    demo_images: object = None  # uint8 (N, H, W, 3) for the demo
    demo_labels: object = None
    shards: list[str] | None = None
    captions: list[list[str]] | None = None  # retrieval: the captions of image i
    classnames_note: str = ""  # how --classnames was paired with the folders, to print

    @property
    def num_samples(self) -> int | None:
        if self.index is not None:
            return len(self.index)
        if self.demo_images is not None:
            return len(self.demo_images)
        return None  # tar shards have no length

    def dataset(self, transform) -> torch.utils.data.Dataset:
        if self.index is not None:
            return ImageFolderDataset(self.index, transform)
        return ArrayImageDataset(self.demo_images, self.demo_labels, transform)


def _apply_classnames_file(path: str, count: int, what: str) -> list[str]:
    names = read_text_lines(path, "class names")
    if len(names) != count:
        raise UtaUsageError(f"--classnames {path} lists {len(names)} names, but {what} has "
                            f"{count} classes. Give one name per line, in label order.")
    return names


def _demo_split(meta: dict):
    # The held-out split that the checkpoint's own recipe generated (its size and seed).
    recorded = (meta.get("recipe") or {}).get("demo") or {}
    defaults = DemoConfig()
    val = int(recorded.get("val_images", defaults.val_images))
    seed = int(recorded.get("data_seed", defaults.data_seed))
    if val < 1:
        raise UtaUsageError("The checkpoint's recipe has demo.val_images = 0: no held-out demo "
                            "images to evaluate.")
    return demo_splits(0, val, seed)[1]


def _imagenet(data_dir: str, classnames_file: str) -> EvalSet:
    from open_clip import IMAGENET_CLASSNAMES
    from timm.data import ImageNetInfo

    if not data_dir:
        raise UtaUsageError("--dataset imagenet needs --data-dir: the ImageNet folder that holds "
                            "val/<wnid>/*.JPEG, or the val folder itself.")
    fs, path = url_to_fs(data_dir)
    root = data_dir.rstrip("/") + "/val" if fs.isdir(path.rstrip("/") + "/val") else data_dir
    index = index_image_folder(root, "classes")
    wnids = ImageNetInfo("imagenet-1k").label_names()  # the 1000 synsets, sorted
    known = set(wnids)
    unknown = [c for c in index.classes if c not in known]
    layout = ("Expected ImageNet-1k's val layout: val/<wnid>/*.JPEG with the 1000 synset "
              f"folders {wnids[0]} ... {wnids[-1]} (see ILSVRC2012 valprep).")
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:3])
        raise UtaUsageError(f"{root} has {len(unknown)} folder(s) that are not ImageNet-1k "
                            f"wnids (e.g. {shown}). {layout} For other class folders pass the "
                            f"folder itself as --dataset.")
    if index.classes != wnids:
        missing = sorted(known - set(index.classes))
        raise UtaUsageError(f"{root} has {len(index.classes)} of the 1000 ImageNet-1k class "
                            f"folders (missing e.g. {', '.join(missing[:3])}). {layout}")
    names, source = list(IMAGENET_CLASSNAMES), "openai (open_clip IMAGENET_CLASSNAMES)"
    if classnames_file:
        names, source = _apply_classnames_file(classnames_file, 1000, "ImageNet-1k"), \
            classnames_file
    return EvalSet("imagenet", "imagenet", root, names, source, "openai", index=index)


IMAGENET_VARIANTS = ("imagenet-v2", "imagenet-a", "imagenet-r", "imagenet-sketch", "objectnet")
_VARIANT_LAYOUTS = {
    "imagenet-v2": "folders 0 ... 999 named by ImageNet class index (ImageNetV2's "
                   "imagenetv2-*-format-val folder, or the folder holding it)",
    "imagenet-a": "one folder per ImageNet wnid (200 of them: n01498041 ...)",
    "imagenet-r": "one folder per ImageNet wnid (200 of them: n01443537 ...)",
    "imagenet-sketch": "one folder per ImageNet wnid (all 1000; ImageNet-Sketch's sketch/)",
    "objectnet": "objectnet-1.0/images/<folder>/ plus the mapping files "
                 "folder_to_objectnet_label.json and objectnet_to_imagenet_1k.json (in "
                 "--data-dir, objectnet-1.0/mappings/ or mappings/)",
}


def _single_subfolder(fs, path: str, accept) -> str:
    """path, or its only sub-folder that `accept`s (archives unpack into one folder)."""
    entries = [e for e in fs.ls(path, detail=True) if e["type"] == "directory"]
    if not any(accept(os.path.basename(e["name"].rstrip("/"))) for e in entries) and \
            len(entries) == 1:
        return entries[0]["name"]
    return path


def _imagenet_variant(name: str, data_dir: str, classnames_file: str) -> EvalSet:
    """ImageNet-V2 / -A / -R / -Sketch and ObjectNet with CLIP_benchmark's labels: V2's
    numeric folders in numeric order; A and R as 200-way tasks over their wnid subsets (OpenAI
    names); Sketch as ImageNet-1k; ObjectNet's 113 ImageNet-mapped classes by its own names."""
    from open_clip import IMAGENET_CLASSNAMES
    from timm.data import ImageNetInfo

    layout = f"--dataset {name} expects --data-dir with {_VARIANT_LAYOUTS[name]}."
    if not data_dir:
        raise UtaUsageError(f"--dataset {name} needs --data-dir. {layout}")
    fs, path = url_to_fs(data_dir)
    if not fs.isdir(path):
        raise UtaUsageError(f"--data-dir {data_dir} is not a folder. {layout}")
    wnids = ImageNetInfo("imagenet-1k").label_names()
    wnid_index = {w: i for i, w in enumerate(wnids)}
    source = "openai (open_clip IMAGENET_CLASSNAMES)"
    if name == "objectnet":
        return _objectnet(data_dir, fs, path, classnames_file, layout)
    if name == "imagenet-v2":
        path = _single_subfolder(fs, path, str.isdigit)
        root = url_of(fs, path)
        index = index_image_folder(root, "classes")
        bad = [c for c in index.classes if not c.isdigit() or int(c) >= 1000]
        if bad:
            raise UtaUsageError(f"{root} has folder(s) that are not ImageNet class indices "
                                f"(e.g. {bad[0]!r}). {layout}")
        # label = the folder's number, not its place in the (string-)sorted listing
        numbers = [int(c) for c in index.classes]
        index.labels = [numbers[y] for y in index.labels]
        index.classes = [str(i) for i in range(1000)]
        names = list(IMAGENET_CLASSNAMES)
    else:
        if name == "imagenet-sketch":
            path = _single_subfolder(fs, path, lambda n: n in wnid_index)
        root = url_of(fs, path)
        index = index_image_folder(root, "classes")
        unknown = [c for c in index.classes if c not in wnid_index]
        if unknown:
            raise UtaUsageError(f"{root} has folder(s) that are not ImageNet wnids (e.g. "
                                f"{unknown[0]!r}). {layout}")
        expected = 1000 if name == "imagenet-sketch" else 200
        if len(index.classes) != expected:
            raise UtaUsageError(f"{root} has {len(index.classes)} wnid folders; {name} has "
                                f"{expected}. {layout}")
        names = [IMAGENET_CLASSNAMES[wnid_index[w]] for w in index.classes]
    if classnames_file:
        names = _apply_classnames_file(classnames_file, len(names), name)
        source = classnames_file
    return EvalSet(name, "folder", root, names, source, "openai", index=index)


def _objectnet(data_dir: str, fs, path: str, classnames_file: str, layout: str) -> EvalSet:
    base = path.rstrip("/")
    images = next((p for p in (base + "/objectnet-1.0/images", base + "/images")
                   if fs.isdir(p)), base)
    mapping_dirs = [base, base + "/objectnet-1.0/mappings", base + "/mappings"]
    files = {}
    for fname in ("folder_to_objectnet_label.json", "objectnet_to_imagenet_1k.json"):
        found = next((d + "/" + fname for d in mapping_dirs if fs.isfile(d + "/" + fname)), None)
        if found is None:
            raise UtaUsageError(f"ObjectNet's mapping file {fname} is not in {data_dir}. "
                                f"{layout}")
        try:
            with fs.open(found, "r") as f:
                files[fname] = json.load(f)
        except (OSError, ValueError) as e:
            raise UtaUsageError(f"Cannot read {found}: {e}") from None
    folder_of = {label: folder for folder, label in
                 files["folder_to_objectnet_label.json"].items()}
    mapped = sorted(folder_of[label] for label in files["objectnet_to_imagenet_1k.json"]
                    if label in folder_of)
    root = url_of(fs, images)
    full = index_image_folder(root, "classes")
    missing = [m for m in mapped if m not in full.classes]
    if missing:
        raise UtaUsageError(f"{root} lacks {len(missing)} ObjectNet folder(s) named in the "
                            f"mapping (e.g. {missing[0]!r}). {layout}")
    label_of = {folder: i for i, folder in enumerate(mapped)}
    keep = [i for i, y in enumerate(full.labels) if full.classes[y] in label_of]
    index = ImageFolderIndex(root=full.root, files=[full.files[i] for i in keep],
                             labels=[label_of[full.classes[full.labels[i]]] for i in keep],
                             classes=mapped)
    names = [files["folder_to_objectnet_label.json"][f].lower() for f in mapped]
    source = "ObjectNet labels of the ImageNet-mapped folders"
    if classnames_file:
        names = _apply_classnames_file(classnames_file, len(names), "objectnet")
        source = classnames_file
    return EvalSet("objectnet", "folder", root, names, source, "openai", index=index)


def _wds_root(fs, path: str) -> bool:
    """CLIP_benchmark's webdataset layout: classnames.txt beside split folders of shards."""
    return fs.isfile(path.rstrip("/") + "/classnames.txt")


def _clip_benchmark_wds(dataset: str, fs, path: str, split: str, classnames_file: str
                        ) -> EvalSet:
    base = path.rstrip("/")
    url = dataset.rstrip("/")
    split_dir = base + "/" + split
    if not fs.isdir(split_dir):
        splits = [os.path.basename(e.rstrip("/")) for e in fs.ls(base, detail=False)
                  if fs.isdir(e)]
        raise UtaUsageError(f"{dataset} (CLIP_benchmark's webdataset layout) has no split "
                            f"'{split}'; it has: {', '.join(sorted(splits)) or 'none'}. Choose "
                            f"one with --split.")
    tars = [p for p in fs.ls(split_dir, detail=False) if p.endswith(TAR_SUFFIXES)]
    if not tars:
        raise UtaUsageError(f"{url}/{split} holds no tar shards.")

    def shard_order(p: str):  # 0.tar, 1.tar, ..., 10.tar: numeric where the names are
        stem = os.path.basename(p).split(".")[0]
        return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)

    shards = [f"{url}/{split}/{os.path.basename(p)}" for p in sorted(tars, key=shard_order)]
    names_file = classnames_file or f"{url}/classnames.txt"
    names = read_text_lines(names_file, "class names")
    templates_file = base + "/zeroshot_classification_templates.txt"
    templates = f"{url}/zeroshot_classification_templates.txt" if fs.isfile(templates_file) \
        else "openai"
    name = os.path.basename(url)
    return EvalSet(name if split == "test" else f"{name}/{split}", "wds", url, names,
                   names_file, templates, shards=shards)


def _is_tar_spec(location: str) -> bool:
    s = location.rstrip("/")
    return s.endswith(TAR_SUFFIXES) or ("{" in s and "}" in s) or \
        (os.path.isdir(s) and detect_format(s, "auto") == "tar")


def resolve_dataset(dataset: str, data_dir: str = "", classnames_file: str = "",
                    task: str = "classification", meta: dict | None = None,
                    split: str = "test") -> EvalSet:
    """Resolve --dataset (+ --data-dir, --classnames, --split) into an EvalSet; bad input is
    exit 2."""
    meta = meta or {}
    if not dataset:
        raise UtaUsageError("--dataset is empty. Give imagenet, demo, a class folder, tar shards "
                            "or (with --task retrieval) an image-caption set.")
    if task == "retrieval":
        return _retrieval_set(dataset, data_dir, meta)
    if dataset == "imagenet":
        return _imagenet(data_dir, classnames_file)
    if dataset in IMAGENET_VARIANTS:
        return _imagenet_variant(dataset, data_dir, classnames_file)
    if data_dir:
        raise UtaUsageError("--data-dir is for --dataset imagenet and for retrieval images. For "
                            "a class folder or tar shards, give the location as --dataset.")
    if dataset == "demo":
        split = _demo_split(meta)
        names, source = list(CLASSNAMES), "demo"
        if classnames_file:
            names, source = _apply_classnames_file(classnames_file, len(CLASSNAMES), "demo"), \
                classnames_file
        return EvalSet("demo", "demo", "demo", names, source, "demo",
                       demo_images=split.images, demo_labels=split.labels)
    if "{" not in dataset and not dataset.rstrip("/").endswith(TAR_SUFFIXES):
        fs, path = url_to_fs(dataset)
        if fs.isdir(path) and _wds_root(fs, path):
            return _clip_benchmark_wds(dataset, fs, path, split, classnames_file)
    if _is_tar_spec(dataset):
        shards = expand_shard_urls(dataset)
        names = manifest_classnames(dataset)  # a split written by uta shards: OUT/<split>
        if names and not classnames_file:
            return EvalSet(dataset, "tar", dataset, names, "manifest", "openai", shards=shards)
        if not classnames_file:
            raise UtaUsageError(
                "Tar shards carry integer labels (.cls) but no class names. Pass --classnames "
                "FILE with one class name per line in label order (line 1 is label 0).")
        names = read_text_lines(classnames_file, "class names")
        return EvalSet(dataset, "tar", dataset, names, classnames_file, "openai", shards=shards)
    try:
        index = index_image_folder(dataset, "classes")
    except UtaUsageError as e:
        raise UtaUsageError(f"{e} {_CLASSES_LAYOUT}") from None
    note = ""
    if classnames_file:
        names = _apply_classnames_file(classnames_file, len(index.classes),
                                       f"the folder {dataset}")
        names, note = match_classnames(names, index.classes, classnames_file)
        source = classnames_file
    else:
        names, source = [folder_classname(c) for c in index.classes], "folder names"
    return EvalSet(dataset, "folder", dataset, names, source, "openai", index=index,
                   classnames_note=note)


def resolve_eval_templates(spec: str, evalset: EvalSet) -> tuple[str, list[str]]:
    """--templates, or the dataset's own set when not given."""
    spec = spec or evalset.default_templates
    if spec == "demo":
        return "demo", template_strings(TEMPLATES)
    return resolve_templates(spec)


# -- image-caption sets ----------------------------------------------------------------------


def _retrieval_set(dataset: str, data_dir: str, meta: dict) -> EvalSet:
    if dataset == "demo":
        split = _demo_split(meta)
        return EvalSet("demo", "demo", "demo", classnames_source="demo",
                       demo_images=split.images,
                       demo_labels=torch.arange(len(split.images)).numpy(),
                       captions=[[c] for c in split.captions])
    fs, path = url_to_fs(dataset)
    local = is_local(fs)
    if fs.isdir(path):
        found = [n for n in CAPTION_FILES if fs.isfile(path.rstrip("/") + "/" + n)]
        if not found:
            raise UtaUsageError(f"{dataset} holds no {', '.join(CAPTION_FILES)}. "
                                f"{CAPTIONS_HELP}")
        captions_url = dataset.rstrip("/") + "/" + found[0]
        image_root = data_dir or dataset
    elif fs.isfile(path) and path.lower().endswith((".json", ".csv", ".tsv")):
        captions_url = dataset
        image_root = data_dir or (os.path.dirname(os.path.abspath(dataset)) if local
                                  else dataset.rsplit("/", 1)[0])
    else:
        raise UtaUsageError(f"Retrieval dataset {dataset!r} is neither a folder with a captions "
                            f"file nor a .json/.csv/.tsv file (or it does not exist). "
                            f"{CAPTIONS_HELP}")
    with fsspec.open(captions_url, "r", encoding="utf-8") as f:
        text = f.read()
    fmt = captions_url.lower().rsplit(".", 1)[-1]
    pairs = parse_captions(text, fmt, captions_url)
    root_fs, root_path = url_to_fs(image_root)
    if is_local(root_fs):
        root = os.path.normpath(root_path)
        files = [os.path.normpath(os.path.join(root, img)) for img, _ in pairs]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise UtaUsageError(f"{len(missing)} image(s) named in {captions_url} do not exist "
                                f"(e.g. {missing[0]}). Image paths are taken relative to "
                                f"{root}; set --data-dir to the images' folder.")
    else:  # remote images are not checked one request each; a missing one is counted as skipped
        root = root_fs.unstrip_protocol(root_path.rstrip("/"))
        files = [img if "://" in img else f"{root}/{img.lstrip('/')}" for img, _ in pairs]
    index = ImageFolderIndex(root=root, files=files, labels=list(range(len(files))), classes=[])
    return EvalSet(captions_url, "captions", captions_url, index=index,
                   captions=[caps for _, caps in pairs])
