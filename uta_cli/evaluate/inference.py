"""One-line inference over any checkpoint: image embeddings (`uta embed`) and zero-shot labels
(`uta classify`).

Models load exactly as `uta zeroshot` loads them (a run directory, a checkpoint folder, a released
uta_*.pt file, or an exported open_clip folder), images go through the zero-shot preprocessing
the checkpoint records (short-side resize, centre crop, its mean and std), and classification is
the zero-shot protocol: template-averaged class embeddings from the checkpoint's text tower
(its teacher's, a tuned one, or the release's own), 100 x cosine, softmax over the labels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from torch.utils.data import DataLoader

from uta_cli.data.folders import (
    ImageFolderDataset,
    ImageFolderIndex,
    collate_skip_none,
    index_image_folder,
)
from uta_cli.data.pipeline import EvalTransform, normalize
from uta_cli.errors import UtaUsageError
from uta_cli.evaluate.encoders import Encoder, build_encoders, resolve_precision, text_encoder
from uta_cli.evaluate.zeroshot import build_classifier, read_classnames, resolve_templates
from uta_cli.io import atomic_path
from uta_cli.progress import progress_bar

EMBED_SUFFIXES = (".safetensors", ".npy")
LOGIT_SCALE = 100.0  # the zero-shot protocol's fixed scale


@dataclass
class InferenceModel:
    """The student on its recorded preprocessing, and the text tower that scores it."""

    encoder: Encoder
    text: object  # CLIPTeacher or ReleaseTextTower: .clip.encode_text, .tokenizer, .identity
    meta: dict
    device: torch.device
    precision: str


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UtaUsageError(f"--device {spec!r} is not a device; use auto, cpu, cuda or "
                            f"cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UtaUsageError("--device cuda was asked for, but no CUDA GPU is available here. "
                            "Use --device cpu (or auto).")
    return device


def load_model(ckpt: str, ckpt_format: str = "auto", teacher_weights: str = "",
               device: str = "auto", precision: str = "auto") -> InferenceModel:
    """Any checkpoint `uta zeroshot` takes, or an exported open_clip folder."""
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    encoders, text, meta = build_encoders(ckpt, dev, prec, False, teacher_weights, ckpt_format)
    return InferenceModel(encoders[0], text, meta, dev, prec)


# -- images ----------------------------------------------------------------------------------------
def image_index(images: Sequence[str], folder: str = "") -> ImageFolderIndex:
    """Image files in the order given, or every image under `folder` (recursive, sorted)."""
    if bool(images) == bool(folder):
        raise UtaUsageError("Give image files (uta embed --ckpt CKPT a.jpg b.png ...) or "
                            "--dir FOLDER, one of the two.")
    if folder:
        return index_image_folder(folder, "flat")
    files = []
    for path in images:
        if "://" not in path:
            if os.path.isdir(path):
                raise UtaUsageError(f"{path} is a folder; pass it as --dir {path} to use every "
                                    f"image in it.")
            if not os.path.isfile(path):
                raise UtaUsageError(f"Image not found: {path}.")
            path = os.path.abspath(path)
        files.append(path)
    return ImageFolderIndex(root=files[0], files=files, labels=[-1] * len(files), classes=[])


def encode_images(model: InferenceModel, index: ImageFolderIndex, batch_size: int = 64,
                  workers: int = 0, console: Console | None = None
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(sample ids, L2-normalised float32 embeddings on CPU) batch by batch, with progress;
    unreadable images are left out (their ids never appear)."""
    if batch_size < 1:
        raise UtaUsageError(f"--batch-size must be at least 1, not {batch_size}.")
    view = model.encoder.view
    dataset = ImageFolderDataset(index, EvalTransform([view]))
    workers = min(workers, max(0, (len(index) + batch_size - 1) // batch_size))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_skip_none, pin_memory=model.device.type == "cuda")
    console = console or Console(stderr=True)
    with progress_bar(console, len(index) > batch_size, len(index), "images") as advance, \
            torch.inference_mode():
        for batch in loader:
            if "sample_id" in batch:
                x = normalize(batch[view.name].to(model.device, non_blocking=True), view)
                emb = F.normalize(model.encoder.encode(x).float(), dim=-1).cpu()
                yield batch["sample_id"].long(), emb
            advance(len(batch.get("sample_id", ())) + int(batch["num_skipped"]))


def embed(model: InferenceModel, index: ImageFolderIndex, batch_size: int = 64,
          workers: int = 0, console: Console | None = None
          ) -> tuple[torch.Tensor, list[str], list[str]]:
    """(N, D) normalised embeddings, the N files they belong to (in order), the skipped files."""
    ids, rows = [], []
    for i, emb in encode_images(model, index, batch_size, workers, console):
        ids.append(i)
        rows.append(emb)
    kept = torch.cat(ids).tolist() if ids else []
    if not kept:
        raise UtaUsageError(f"None of the {len(index)} image(s) could be read.")
    done = set(kept)
    skipped = [f for i, f in enumerate(index.files) if i not in done]
    return torch.cat(rows), [index.files[i] for i in kept], skipped


def check_embed_output(output: str, force: bool) -> None:
    if not output.endswith(EMBED_SUFFIXES):
        raise UtaUsageError(f"--output {output} must end in .safetensors or .npy (the "
                            f"embeddings' format).")
    for path in (output, files_list_path(output)):
        if os.path.exists(path) and not force:
            raise UtaUsageError(f"{path} already exists. Pass --force to replace it, or choose "
                                f"another --output.")


def files_list_path(output: str) -> str:
    """emb.safetensors -> emb.files.txt: line i names the image of row i."""
    return os.path.splitext(output)[0] + ".files.txt"


def write_embeddings(output: str, embeddings: torch.Tensor, files: list[str],
                     info: dict) -> tuple[str, str]:
    """Atomically (temp + rename) write the embeddings and, beside them, the file list."""
    from safetensors.torch import save_file

    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    listing = files_list_path(output)
    # both written before either is renamed: embeddings first, then their file list
    with atomic_path(listing) as tmp_list, atomic_path(output) as tmp:
        data = embeddings.detach().float().cpu().contiguous()
        if output.endswith(".npy"):
            with open(tmp, "wb") as f:
                np.save(f, data.numpy())
        else:
            save_file({"embeddings": data}, tmp,
                      metadata={k: v if isinstance(v, str) else json.dumps(v)
                                for k, v in info.items()})
        with open(tmp_list, "w", encoding="utf-8") as f:
            f.write("".join(p + "\n" for p in files))
    return output, listing


def embedding_info(model: InferenceModel) -> dict:
    v = model.encoder.view
    return {"checkpoint": str(model.meta.get("checkpoint_dir", "")),
            "model": model.encoder.model, "normalized": "true",
            "embed_dim": str(model.meta.get("embed_dim", "")),
            "preprocess": {"size": v.size, "mean": list(v.mean), "std": list(v.std),
                           "interpolation": v.interpolation,
                           "resize": "shortest side, centre crop"},
            "precision": model.precision}


# -- classification --------------------------------------------------------------------------------
def parse_labels(labels: str, classnames_file: str) -> list[str]:
    """--labels "a cat,a dog" or --classnames FILE (one a line), exactly one of the two."""
    if bool(labels) == bool(classnames_file):
        raise UtaUsageError('Give the candidate labels with --labels "a cat,a dog" or '
                            '--classnames FILE (one a line), one of the two.')
    if classnames_file:
        return read_classnames(classnames_file)
    names = [s.strip() for s in labels.split(",") if s.strip()]
    if len(names) < 2:
        raise UtaUsageError(f'--labels needs at least two comma-separated labels, e.g. '
                            f'--labels "a cat,a dog"; got {labels!r}.')
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UtaUsageError(f"--labels repeats {', '.join(dupes)}; give each label once.")
    return names


def label_templates(spec: str) -> list[str]:
    """openai (80), simple, none (each label is the whole prompt), or a file of templates."""
    if spec == "none":
        return ["{c}"]
    return resolve_templates(spec)[1]


def label_weights(model: InferenceModel, labels: list[str], templates: list[str]) -> torch.Tensor:
    """(embed_dim, len(labels)) normalised class weights through the text tower."""
    return build_classifier(text_encoder(model.text), model.text.tokenizer, labels, templates,
                            model.device)


def classify(model: InferenceModel, index: ImageFolderIndex, labels: list[str],
             templates: list[str], top_k: int = 5, batch_size: int = 64, workers: int = 0,
             console: Console | None = None,
             on_result: Callable[[dict], None] | None = None) -> list[dict]:
    """Per readable image: {"file", "predictions": [{"label", "probability", "cosine"}]},
    best first; probabilities are softmax(100 x cosine) over all the labels."""
    if top_k < 1:
        raise UtaUsageError(f"--top-k must be at least 1, not {top_k}.")
    weights = label_weights(model, labels, templates)
    k = min(top_k, len(labels))
    results = []
    for ids, emb in encode_images(model, index, batch_size, workers, console):
        cos = emb.to(weights.device) @ weights.float()
        probs = (LOGIT_SCALE * cos).softmax(dim=-1)
        top = probs.topk(k, dim=-1)
        for row, i in enumerate(ids.tolist()):
            preds = [{"label": labels[j], "probability": float(p), "cosine": float(cos[row, j])}
                     for p, j in zip(top.values[row].tolist(), top.indices[row].tolist())]
            result = {"file": index.files[i], "predictions": preds}
            results.append(result)
            if on_result is not None:
                on_result(result)
    if not results:
        raise UtaUsageError(f"None of the {len(index)} image(s) could be read.")
    return results
