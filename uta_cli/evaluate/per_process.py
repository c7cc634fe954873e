"""One process's share of an evaluation, and the merge of every process's share.

Each process reads a disjoint shard of the images (indices rank::world, or whole tar shards)
and keeps its results per sample with the sample's id: top-k predictions (classification),
embeddings (retrieval, linear probe). Merged by id, the parts give exactly what one process
would have computed. `uta zeroshot` (workflows/zeroshot.py) and zero-shot while pre-training
(during_training.py) run these loops.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from torch.utils.data import DataLoader

from uta_cli.data.folders import collate_skip_none
from uta_cli.data.pipeline import normalize
from uta_cli.data.shards import TarShardDataset
from uta_cli.errors import UtaUsageError
from uta_cli.evaluate.datasets import EvalSet, resolve_dataset
from uta_cli.evaluate.encoders import Encoder, text_encoder
from uta_cli.evaluate.linear_probe import ProbeConfig, linear_probe
from uta_cli.evaluate.zeroshot import (
    Predictions,
    classification_metrics,
    encode_texts,
    merge_by_id,
    retrieval_metrics,
    zero_shot_logits,
)
from uta_cli.progress import progress_bar


def shard_loader(evalset: EvalSet, transform, rank: int, world: int, batch_size: int,
                 workers: int, pin: bool) -> tuple[DataLoader, int | None]:
    """This process's loader (indices rank::world, or whole tar shards) and its image count."""
    common = dict(batch_size=batch_size, collate_fn=collate_skip_none, pin_memory=pin)
    if evalset.shards is not None:
        if len(evalset.shards) < world:
            raise UtaUsageError(f"{len(evalset.shards)} tar shard(s) cannot be split over {world} "
                                "processes: each process reads whole shards. Use fewer "
                                "processes or more, smaller shards.")
        workers = min(workers, len(evalset.shards) // world)  # each reader slot needs a shard
        dataset = TarShardDataset(evalset.shards, transform, rank=rank, world_size=world,
                                  seed=0, shuffle_shards=False)
        dataset.check_split(workers)
        return DataLoader(dataset, num_workers=workers, **common), None
    dataset = evalset.dataset(transform)
    order = list(range(rank, len(dataset), world))  # disjoint, no padding: no sample twice
    workers = min(workers, max(1, math.ceil(len(order) / batch_size)))
    kwargs = dict(prefetch_factor=4) if workers else {}
    return (DataLoader(dataset, sampler=order, num_workers=workers, **common, **kwargs),
            len(order))


def classify_shard(loader, total: int | None, encoders: list[Encoder],
                   classifiers: dict[str, torch.Tensor], device: torch.device, console: Console,
                   main: bool) -> dict:
    """Top-k predictions of every encoder (role -> its class weights) for this process's
    images, plus the skip count."""
    num_classes = next(iter(classifiers.values())).shape[1]
    k = min(5, num_classes)
    ids, labels, tops = [], [], {e.role: [] for e in encoders}
    skipped, error = 0, None
    t0 = time.perf_counter()
    with progress_bar(console, main, total, "images") as advance, torch.inference_mode():
        for batch in loader:
            skipped += int(batch["num_skipped"])
            if "sample_id" in batch:
                y = batch["label"].long()
                bad = y[(y < 0) | (y >= num_classes)]
                if len(bad):  # only tar shards can carry labels outside the class list
                    error = ("A sample has no .cls label. Zero-shot classification needs an "
                             "integer class index in a .cls member of every sample."
                             if int(bad[0]) < 0 else
                             f"A sample has label {int(bad[0])} (.cls), but there are only "
                             f"{num_classes} class names (labels 0..{num_classes - 1}). Check "
                             f"--classnames: one name per line, in label order.")
                    break
                for e in encoders:
                    x = normalize(batch[e.view.name].to(device, non_blocking=True), e.view)
                    logits = zero_shot_logits(e.encode(x), classifiers[e.role])
                    tops[e.role].append(logits.topk(k, dim=-1).indices.cpu())
                ids.append(batch["sample_id"].long())
                labels.append(y)
            advance(len(batch.get("sample_id", ())) + int(batch["num_skipped"]))
    seconds = time.perf_counter() - t0
    preds = {role: Predictions(_cat_long(ids), _cat_long(labels),
                               torch.cat(t) if t else torch.zeros(0, k, dtype=torch.long))
             for role, t in tops.items()}
    return {"error": error, "skipped": skipped, "seconds": seconds, "predictions": preds}


def _cat_long(xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long)


def retrieval_shard(loader, total: int | None, encoders: list[Encoder],
                    captions: list[list[str]], device: torch.device, texts_per_batch: int,
                    console: Console, main: bool, text_context: str = "trimmed") -> dict:
    """Normalised embeddings of this process's images and of their captions, per encoder (each
    through its own text tower; encoders sharing one share the text embeddings)."""
    ids, embs = [], {e.role: [] for e in encoders}
    skipped = 0
    t0 = time.perf_counter()
    with progress_bar(console, main, total, "images") as advance, torch.inference_mode():
        for batch in loader:
            skipped += int(batch["num_skipped"])
            if "sample_id" in batch:
                for e in encoders:
                    x = normalize(batch[e.view.name].to(device, non_blocking=True), e.view)
                    embs[e.role].append(F.normalize(e.encode(x), dim=-1).cpu())
                ids.append(batch["sample_id"].long())
            advance(len(batch.get("sample_id", ())) + int(batch["num_skipped"]))
        image_ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)
        # The captions of the images this process read (a skipped image takes its captions
        # with it: they would have no positive). Text ids are global caption indices.
        offsets = [0]
        for caps in captions:
            offsets.append(offsets[-1] + len(caps))
        text_ids, text_image, texts = [], [], []
        for i in image_ids.tolist():
            for j, c in enumerate(captions[i]):
                text_ids.append(offsets[i] + j)
                text_image.append(i)
                texts.append(c)
        by_tower: dict[int, torch.Tensor] = {}
        for e in encoders:
            if id(e.text) not in by_tower:
                encode = text_encoder(e.text, text_context)
                # encode_texts: sorted by length, so trimmed forwards stay short
                chunks = [F.normalize(encode_texts(
                    encode, e.text.tokenizer(texts[s:s + texts_per_batch])), dim=-1).cpu()
                    for s in range(0, len(texts), texts_per_batch)]
                by_tower[id(e.text)] = torch.cat(chunks) if chunks else \
                    torch.zeros(0, e.text.embed_dim)
    dim = encoders[0].text.embed_dim
    return {"error": None, "skipped": skipped, "seconds": time.perf_counter() - t0,
            "image_ids": image_ids,
            "image_emb": {r: torch.cat(v) if v else torch.zeros(0, dim) for r, v in embs.items()},
            "text_ids": torch.tensor(text_ids, dtype=torch.long),
            "text_image": torch.tensor(text_image, dtype=torch.long),
            "text_emb": {e.role: by_tower[id(e.text)] for e in encoders}}


def probe_train_set(evalset: EvalSet, meta: dict, train_dataset: str, dataset: str,
                    data_dir: str = "", classnames: str = "") -> EvalSet:
    """The images a linear probe is fitted on: `train_dataset` (any --dataset form), else the
    train split of `dataset` when that is a CLIP_benchmark webdataset."""
    if train_dataset:
        train = resolve_dataset(train_dataset, data_dir, classnames, "classification", meta,
                                "train")
    elif evalset.kind == "wds":
        train = resolve_dataset(dataset, "", classnames, "classification", meta, "train")
    else:
        raise UtaUsageError("--task linear-probe needs images to fit the probe on: "
                            "--train-dataset (a class folder or any --dataset form), or a "
                            "CLIP_benchmark webdataset with a train split.")
    if len(train.classnames) != len(evalset.classnames):
        raise UtaUsageError(f"The train set has {len(train.classnames)} classes, the test set "
                            f"{len(evalset.classnames)}; the probe needs the same classes.")
    return train


def embed_shard(loader, total: int | None, encoders: list[Encoder], device: torch.device,
                console: Console, main: bool, label: str = "images") -> dict:
    """Image embeddings of every encoder (role -> (N, D) on CPU) with sample ids and labels."""
    ids, labels, embs = [], [], {e.role: [] for e in encoders}
    skipped = 0
    t0 = time.perf_counter()
    with progress_bar(console, main, total, label) as advance, torch.inference_mode():
        for batch in loader:
            skipped += int(batch["num_skipped"])
            if "sample_id" in batch:
                for e in encoders:
                    x = normalize(batch[e.view.name].to(device, non_blocking=True), e.view)
                    embs[e.role].append(e.encode(x).float().cpu())
                ids.append(batch["sample_id"].long())
                labels.append(batch["label"].long())
            advance(len(batch.get("sample_id", ())) + int(batch["num_skipped"]))
    return {"error": None, "skipped": skipped, "seconds": time.perf_counter() - t0,
            "ids": _cat_long(ids), "labels": _cat_long(labels),
            "emb": {r: torch.cat(v) if v else torch.zeros(0, 1) for r, v in embs.items()}}


def _merged_features(parts: list[dict], role: str) -> tuple[torch.Tensor, torch.Tensor]:
    _, labels = merge_by_id([(p["ids"], p["labels"][:, None]) for p in parts])
    _, emb = merge_by_id([(p["ids"], p["emb"][role]) for p in parts])
    return emb, labels[:, 0] if len(labels) else labels


def fit_probes(train_parts: list[dict], test_parts: list[dict], roles: list[str],
               num_classes: int, cfg: ProbeConfig, say) -> dict:
    """role -> linear-probe metrics (linear_probe.py) on the merged features of every process;
    each process fits the same probe from the same features, so all agree."""
    out = {}
    for role in roles:
        train_x, train_y = _merged_features(train_parts, role)
        test_x, test_y = _merged_features(test_parts, role)
        for y, what in ((train_y, "train"), (test_y, "test")):
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
                raise UtaUsageError(f"A {what} image has no label in 0..{num_classes - 1} "
                                    "(.cls of tar shards, or class folders).")
        say(f"[dim]{role}: fitting the probe on {len(train_x)} images (weight decay search "
            f"on {cfg.val_proportion:.0%} of them)[/dim]", highlight=False)
        out[role] = linear_probe(train_x, train_y, test_x, test_y, num_classes, cfg)
    return out


def merge_classification(parts: list[dict], roles: list[str], num_classes: int) -> dict:
    """role -> metrics over the merged per-sample predictions of every process."""
    out = {}
    for role in roles:
        merged = Predictions.merge([p["predictions"][role] for p in parts])
        if len(torch.unique(merged.sample_ids)) != len(merged.sample_ids):
            raise RuntimeError("a sample was evaluated twice across processes")
        out[role] = classification_metrics(merged.labels, merged.topk, num_classes)
    return out


def merge_retrieval(parts: list[dict], roles: list[str]) -> dict:
    """role -> retrieval metrics over the merged embeddings of every process."""
    image_ids, _ = merge_by_id([(p["image_ids"], p["image_ids"][:, None]) for p in parts])
    text_ids, text_image = merge_by_id([(p["text_ids"], p["text_image"][:, None])
                                        for p in parts])
    if len(image_ids) == 0 or len(text_ids) == 0:
        raise UtaUsageError("No readable images (or no captions) to evaluate retrieval on.")
    # rows of the merged image matrix are sorted by image id: map each text to its row
    text_row = torch.searchsorted(image_ids, text_image[:, 0])
    out = {}
    for role in roles:
        _, image_emb = merge_by_id([(p["image_ids"], p["image_emb"][role]) for p in parts])
        _, text_emb = merge_by_id([(p["text_ids"], p["text_emb"][role]) for p in parts])
        out[role] = {**retrieval_metrics(image_emb, text_emb, text_row),
                     "num_samples": len(image_ids), "num_texts": len(text_emb)}
    return out
