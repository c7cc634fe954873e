"""Zero-shot classification and retrieval through a CLIP text tower (docs/method.md §6).

Class weights: encode every template with the class name, L2-normalise each, average over
templates, L2-normalise again. Logits = 100 * normalised image embedding @ class weights.
Retrieval recall@k follows CLIP_benchmark: a text counts when its image is among the top-k images;
an image counts when ANY of its texts is among the top-k texts.

Everything here works on tensors. Results are kept per sample (top-k predictions, embeddings) with
the sample's id, so the parts that several processes computed merge into exactly the result one
process would have computed. Datasets, models and the command live in `evaluation.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from uta_cli.errors import UtaUsageError

CLASSIFIER_CACHE_VERSION = 1
# The CLIP paper's single prompt: the baseline that the 80-template ensemble improves on.
SIMPLE_TEMPLATES = ("a photo of a {c}.",)
RECALL_KS = (1, 5, 10)


# --------------------------------------------------------------------------------------------
# templates


def render_template(template: str | Callable[[str], str], classname: str) -> str:
    """Templates are strings with `{c}` (or `{}`), or callables as in open_clip's OpenAI set."""
    if callable(template):
        return template(classname)
    return template.replace("{c}", classname) if "{c}" in template else template.format(classname)


def template_strings(templates: Sequence) -> list[str]:
    """Templates as plain strings with `{c}`: hashable for the cache and printable in reports."""
    out = []
    for t in templates:
        s = render_template(t, "{c}") if callable(t) else t
        out.append(s if "{c}" in s else s.replace("{}", "{c}"))
    return out


def read_text_lines(path: str, what: str) -> list[str]:
    """Non-empty, stripped lines of a local or fsspec text file."""
    import fsspec

    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except FileNotFoundError:
        raise UtaUsageError(f"The {what} file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UtaUsageError(f"Cannot read the {what} file {path}: {e}") from None
    lines = [line for line in lines if line]
    if not lines:
        raise UtaUsageError(f"The {what} file {path} is empty: give one entry per line.")
    return lines


def resolve_templates(spec: str) -> tuple[str, list[str]]:
    """'openai' (open_clip's 80 ImageNet templates), 'simple' (one), or a file, one per line
    ('#' starts a comment line). `uta zeroshot`, `uta finetune` and `uta export` all use this."""
    if spec == "openai":
        from open_clip import OPENAI_IMAGENET_TEMPLATES

        return "openai", template_strings(OPENAI_IMAGENET_TEMPLATES)
    if spec == "simple":
        return "simple", list(SIMPLE_TEMPLATES)
    lines = [line for line in read_text_lines(spec, "templates") if not line.startswith("#")]
    if not lines:
        raise UtaUsageError(f"The templates file {spec} has only comments: give one template "
                            f"per line, e.g. 'a photo of a {{c}}.'.")
    bad = [line for line in lines if "{c}" not in line and "{}" not in line]
    if bad:
        raise UtaUsageError(
            f"Template {bad[0]!r} in {spec} has no '{{c}}' where the class name goes. Write one "
            f"template per line, e.g. 'a photo of a {{c}}.', or use --templates openai|simple.")
    return spec, template_strings(lines)


# --------------------------------------------------------------------------------------------
# the classifier


def class_batches(num_classes: int, num_templates: int,
                  texts_per_batch: int) -> list[tuple[int, int]]:
    """[start, end) class ranges: all templates of many classes go through one text forward."""
    per_batch = max(1, texts_per_batch // max(1, num_templates))
    return [(s, min(s + per_batch, num_classes)) for s in range(0, num_classes, per_batch)]


@torch.no_grad()
def encode_classes(encode_text: Callable[[torch.Tensor], torch.Tensor], tokenizer,
                   classnames: Sequence[str], templates: Sequence,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """(len(classnames), embed_dim): template-averaged, normalised class embeddings."""
    texts = [render_template(t, c) for c in classnames for t in templates]
    emb = encode_text(tokenizer(texts).to(device)).float()
    emb = F.normalize(emb, dim=-1).view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


@torch.no_grad()
def classifier_part(encode_text: Callable[[torch.Tensor], torch.Tensor], tokenizer,
                    classnames: Sequence[str], templates: Sequence,
                    device: torch.device | str = "cpu", texts_per_batch: int = 1024,
                    rank: int = 0, world: int = 1,
                    progress: Callable[[int], None] | None = None) -> dict[int, torch.Tensor]:
    """This process's share of the class batches, {start: (n, embed_dim) on CPU}.

    Whole batches go to ranks, so every class is encoded in the same batch as on one process and
    the assembled classifier is bit-identical to the single-process one.
    """
    out = {}
    for start, end in class_batches(len(classnames), len(templates), texts_per_batch)[rank::world]:
        out[start] = encode_classes(encode_text, tokenizer, classnames[start:end], templates,
                                    device).cpu()
        if progress is not None:
            progress(end - start)
    return out


def assemble_classifier(parts: Iterable[dict[int, torch.Tensor]]) -> torch.Tensor:
    """(embed_dim, num_classes) from the parts of every rank."""
    merged: dict[int, torch.Tensor] = {}
    for part in parts:
        merged.update(part)
    return torch.cat([merged[s] for s in sorted(merged)]).T.contiguous()


@torch.no_grad()
def build_classifier(encode_text: Callable[[torch.Tensor], torch.Tensor], tokenizer,
                     classnames: Sequence[str], templates: Sequence,
                     device: torch.device | str = "cpu", texts_per_batch: int = 1024,
                     progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """(embed_dim, num_classes) weights. Batches all templates of many classes per forward."""
    part = classifier_part(encode_text, tokenizer, classnames, templates, device,
                           texts_per_batch, progress=progress)
    return assemble_classifier([part]).to(device)


def classifier_cache_key(teacher: dict, classnames: Sequence[str], templates: Sequence,
                         text_dtype: str, tuned_text: str = "") -> str:
    """What the class weights depend on: the text tower's weights and config, the prompts, and
    the dtype it ran in. The teacher's path is left out, so a moved teacher still hits.
    tuned_text: the fingerprint of tuned text weights that replaced the teacher's own."""
    payload = {"v": CLASSIFIER_CACHE_VERSION,
               "weights": teacher.get("weights_fingerprint", ""),
               "model": "local-dir" if str(teacher.get("model", "")).startswith("local-dir:")
               else teacher.get("model", ""),
               "model_cfg": teacher.get("model_cfg", {}), "dtype": text_dtype,
               "classnames": list(classnames), "templates": template_strings(templates)}
    if tuned_text:
        payload["tuned_text"] = tuned_text
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def load_cached_classifier(cache_dir: str, key: str, num_classes: int) -> torch.Tensor | None:
    """The cached (embed_dim, num_classes) weights, or None (missing or unreadable)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(cache_dir, f"{key}.safetensors")
    if not os.path.isfile(path):
        return None
    try:
        weights = load_file(path)["classifier"]
    except (OSError, KeyError, SafetensorError):
        return None  # a damaged entry is rebuilt and overwritten
    return weights if weights.ndim == 2 and weights.shape[1] == num_classes else None


def save_cached_classifier(cache_dir: str, key: str, classifier: torch.Tensor,
                           info: dict) -> str:
    """Write atomically (temp + rename): concurrent evaluations never read half a file."""
    from safetensors.torch import save_file

    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"{key}.safetensors")
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({"classifier": classifier.detach().float().cpu().contiguous()}, tmp,
              metadata={k: str(v) for k, v in info.items()})
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------
# classification


def zero_shot_logits(image_emb: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """100 x cosine between the (unnormalised) image embeddings and the class weights."""
    emb = F.normalize(image_emb.float(), dim=-1)
    return 100.0 * emb @ classifier.to(emb.device, torch.float32)


@dataclass
class Predictions:
    """Top-k class predictions per sample; `merge` restores one order whatever the sharding."""

    sample_ids: torch.Tensor  # (N,) int64
    labels: torch.Tensor  # (N,) int64
    topk: torch.Tensor  # (N, k) int64, best first

    @staticmethod
    def merge(parts: Sequence[Predictions]) -> Predictions:
        parts = [p for p in parts if len(p.sample_ids)]
        if not parts:
            empty = torch.zeros(0, dtype=torch.long)
            return Predictions(empty, empty, torch.zeros(0, 1, dtype=torch.long))
        ids = torch.cat([p.sample_ids for p in parts])
        order = ids.argsort(stable=True)
        return Predictions(ids[order], torch.cat([p.labels for p in parts])[order],
                           torch.cat([p.topk for p in parts])[order])


def classification_metrics(labels: torch.Tensor, topk: torch.Tensor,
                           num_classes: int) -> dict:
    """acc1, acc5, mean per-class recall (balanced accuracy over the classes present, as
    CLIP_benchmark), num_samples, and per-class sample / top-1 / top-5 counts."""
    labels = labels.long().cpu()
    topk = topk.long().cpu()
    n = len(labels)
    hit1 = topk[:, 0] == labels if n else torch.zeros(0, dtype=torch.bool)
    hit5 = (topk[:, :5] == labels[:, None]).any(dim=1) if n else hit1
    count = torch.bincount(labels, minlength=num_classes)
    top1 = torch.bincount(labels[hit1], minlength=num_classes)
    top5 = torch.bincount(labels[hit5], minlength=num_classes)
    seen = count > 0
    recall = (top1[seen].double() / count[seen].double()).mean().item() if seen.any() else 0.0
    return {"acc1": hit1.double().mean().item() if n else 0.0,
            "acc5": hit5.double().mean().item() if n else 0.0,
            "mean_per_class_recall": recall, "num_samples": n,
            "per_class_count": count.tolist(), "per_class_top1": top1.tolist(),
            "per_class_top5": top5.tolist()}


@torch.no_grad()
def evaluate(encode_image: Callable[[torch.Tensor], torch.Tensor],
             batches: Iterable[tuple[torch.Tensor, torch.Tensor]], classifier: torch.Tensor,
             ) -> dict[str, float]:
    """Top-1, top-5, mean per-class recall and the sample count over (images, labels) batches."""
    num_classes = classifier.shape[1]
    labels, tops = [], []
    for images, y in batches:
        logits = zero_shot_logits(encode_image(images), classifier)
        tops.append(logits.topk(min(5, num_classes), dim=-1).indices.cpu())
        labels.append(y.cpu())
    if not labels:
        return {"acc1": 0.0, "acc5": 0.0, "mean_per_class_recall": 0.0, "num_samples": 0}
    m = classification_metrics(torch.cat(labels), torch.cat(tops), num_classes)
    return {k: m[k] for k in ("acc1", "acc5", "mean_per_class_recall", "num_samples")}


# --------------------------------------------------------------------------------------------
# retrieval


def merge_by_id(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate (ids, rows) parts from several ranks and sort the rows by id."""
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, 0)
    ids = torch.cat([p[0] for p in parts])
    order = ids.argsort(stable=True)
    return ids[order], torch.cat([p[1] for p in parts])[order]


@torch.no_grad()
def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor,
                      text_image: torch.Tensor, ks: Sequence[int] = RECALL_KS,
                      chunk: int = 1024) -> dict[str, float]:
    """CLIP_benchmark's image/text retrieval recall@k on normalised embeddings.

    text_image[t]: the row of `image_emb` that text t describes (several texts per image).
    image_retrieval_recall@k: the share of texts whose image is among their top-k images.
    text_retrieval_recall@k: the share of images with at least one of their texts among their
    top-k texts. k larger than the number of candidates means all of them. Computed in chunks,
    so the (texts x images) score matrix never exists whole.
    """
    image_emb, text_emb = image_emb.float(), text_emb.float()
    text_image = text_image.long()
    n_img, n_txt = len(image_emb), len(text_emb)
    if n_img == 0 or n_txt == 0:
        raise UtaUsageError("Retrieval needs at least one image and one caption.")
    kmax = max(ks)
    img_hits = {k: 0 for k in ks}
    for s in range(0, n_txt, chunk):
        top = (text_emb[s:s + chunk] @ image_emb.T).topk(min(kmax, n_img), dim=1).indices
        found = top == text_image[s:s + chunk, None]
        for k in ks:
            img_hits[k] += int(found[:, :k].any(dim=1).sum())
    txt_hits = {k: 0 for k in ks}
    for s in range(0, n_img, chunk):
        top = (image_emb[s:s + chunk] @ text_emb.T).topk(min(kmax, n_txt), dim=1).indices
        found = text_image[top] == torch.arange(s, min(s + chunk, n_img))[:, None]
        for k in ks:
            txt_hits[k] += int(found[:, :k].any(dim=1).sum())
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = img_hits[k] / n_txt
        metrics[f"text_retrieval_recall@{k}"] = txt_hits[k] / n_img
    return metrics
