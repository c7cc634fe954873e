"""Zero-shot classification and retrieval through a CLIP text tower (docs/method.md §6).

Class weights: encode every template with the class name, L2-normalise each, average over
templates, L2-normalise again. Logits = 100 * normalised image embedding @ class weights.
Retrieval recall@k follows CLIP_benchmark: a text counts when its image is among the top-k images;
an image counts when ANY of its texts is among the top-k texts.

Everything here works on tensors. Results are kept per sample (top-k predictions, embeddings) with
the sample's id, so the parts that several processes computed merge into exactly the result one
process would have computed. The class weights' disk cache is in class_weights.py; datasets,
models and the command are in datasets.py, encoders.py and workflows/zeroshot.py.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from uta_cli.errors import UtaUsageError

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


def read_classnames(path: str) -> list[str]:
    """One class name a line; blank lines and lines starting with # are skipped."""
    if not path:
        raise UtaUsageError("--output-kind classifier needs --classnames FILE (one class name a "
                            "line), e.g. --classnames classes.txt")
    if not os.path.isfile(path):
        raise UtaUsageError(f"--classnames file not found: {path}. Give a text file with one "
                            f"class name a line.")
    with open(path, encoding="utf-8") as f:
        names = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    if not names:
        raise UtaUsageError(f"--classnames file {path} holds no class names (one a line).")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UtaUsageError(f"--classnames file {path} repeats {', '.join(dupes[:5])}; each class "
                            f"must appear once, or its logits column is ambiguous.")
    return names


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
# text encoding, trimmed to the prompts' length

TEXT_CONTEXTS = ("trimmed", "full")
# Tokens (prompts x longest prompt) per text forward when trimming. The prompts are sorted by
# length, so a forward's padding is small; a forward still needs thousands of token rows to
# keep matmuls efficient (bf16 linears on CPU cost ~as much at 256 rows as at 1,152).
TRIMMED_TOKENS_PER_FORWARD = 8192


def causal_text_tower(clip: torch.nn.Module) -> tuple[torch.nn.Module | None, str]:
    """The module holding `clip`'s text transformer if trimming it cannot change its output,
    else None and the reason.

    Trimming is exact when attention is causal (position i sees positions <= i only) and the
    embedding is read at the end-of-text token: positions after the longest prompt of a batch
    never reach it. That holds for open_clip `CLIP` (and the released UTA text towers, laid out
    like it) and `CustomTextCLIP` with a `TextTransformer` (EVA02-*), with argmax or eos pooling
    and no appended class token. Bidirectional towers, first/last-token pooling (SigLIP, CoCa)
    and Hugging Face towers need the full context.
    """
    from open_clip.transformer import TextTransformer, Transformer

    tower = getattr(clip, "text", None)
    if tower is None:  # CLIP-like: the text modules are attributes of the model itself
        tower = clip
        pool = getattr(clip, "text_pool_type", None)
        if pool is None and hasattr(clip, "transformer"):
            pool = "argmax"  # open_clip releases before pool types existed
        cls_emb = None
    elif isinstance(tower, TextTransformer):
        pool, cls_emb = tower.pool_type, tower.cls_emb
    else:
        return None, f"{type(tower).__name__} text tower (not an open_clip TextTransformer)"
    if not all(isinstance(getattr(tower, a, None), m) for a, m in (
            ("token_embedding", torch.nn.Embedding), ("transformer", Transformer))):
        return None, f"{type(clip).__name__} has no open_clip text transformer"
    if cls_emb is not None:
        return None, "the text tower appends a class token (CoCa-style)"
    if pool not in ("argmax", "eos"):
        return None, f"the text tower pools the '{pool}' token, not the end-of-text token"
    mask = getattr(tower, "attn_mask", None)
    if mask is None:
        return None, "the text tower attends bidirectionally (no causal mask)"
    n = mask.shape[-1]
    future = torch.ones(n, n, dtype=torch.bool, device=mask.device).triu(1)
    if mask.shape != (n, n) or not torch.equal(torch.isneginf(mask), future) or \
            bool(mask[~future].any()):
        return None, "the text tower's attention mask is not causal"
    return tower, "causal attention, end-of-text pooling"


class TextEncoder:
    """Token ids (B, context) -> fp32 text embeddings through a CLIP's text tower, as its
    `encode_text` computes them.

    context 'trimmed' (where `causal_text_tower` allows it) runs each batch only up to its
    longest prompt: the positional embedding and the causal mask are sliced with the sequence.
    ImageNet prompts end by about token 20 of 77, so this is several times less work; the
    result equals the full-context one up to float rounding (~1e-6). 'full' calls
    `encode_text` over the whole context, bit for bit what reference tools compute.
    autocast: a context-manager factory the forward runs in (mixed precision on GPUs).
    """

    def __init__(self, clip: torch.nn.Module, context: str = "trimmed",
                 device: torch.device | str | None = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] | None = None):
        if context not in TEXT_CONTEXTS:
            raise UtaUsageError(f"Unknown text context {context!r}: use trimmed (each batch "
                                f"only as long as its longest prompt) or full (the whole "
                                f"context, for bit-parity with reference tools).")
        self.clip, self.device, self.autocast = clip, device, autocast
        tower, why = causal_text_tower(clip) if context == "trimmed" else (None, "")
        self.tower = tower
        self.context = "trimmed" if tower is not None else "full"
        self.note = (f"trimmed to each batch's longest prompt ({why})" if tower is not None
                     else "full context, as requested" if context == "full"
                     else f"full context: {why}")

    def pool_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) the position each prompt's embedding is read at (its end-of-text token)."""
        t = self.tower
        if getattr(t, "pool_type", getattr(t, "text_pool_type", "argmax")) == "eos":
            eos = getattr(t, "eos_id", getattr(t, "text_eos_id", None))
            return (tokens == eos).int().argmax(dim=-1)
        return tokens.argmax(dim=-1)  # the end-of-text id is the largest in CLIP's vocabulary

    def lengths(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """(B,) positions each prompt needs, or None when this encoder runs the full context."""
        return None if self.tower is None else self.pool_index(tokens) + 1

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.device is not None:
            tokens = tokens.to(self.device)
        with self.autocast() if self.autocast is not None else contextlib.nullcontext():
            if self.tower is None:
                return self.clip.encode_text(tokens).float()
            return self._trimmed(tokens).float()

    def _trimmed(self, tokens: torch.Tensor) -> torch.Tensor:
        # open_clip's CLIP.encode_text / TextTransformer.forward on tokens[:, :n]
        t = self.tower
        idx = self.pool_index(tokens)
        n = int(idx.max()) + 1
        cast_dtype = t.transformer.get_cast_dtype()
        x = t.token_embedding(tokens[:, :n]).to(cast_dtype)
        x = x + t.positional_embedding[:n].to(cast_dtype)
        x = t.transformer(x, attn_mask=t.attn_mask[:n, :n])
        x = t.ln_final(x[torch.arange(len(x), device=x.device), idx])  # per token: pool first
        proj = t.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


# --------------------------------------------------------------------------------------------
# the classifier


def class_batches(num_classes: int, num_templates: int,
                  texts_per_batch: int) -> list[tuple[int, int]]:
    """[start, end) class ranges: all templates of many classes go through one text forward."""
    per_batch = max(1, texts_per_batch // max(1, num_templates))
    return [(s, min(s + per_batch, num_classes)) for s in range(0, num_classes, per_batch)]


@torch.no_grad()
def encode_texts(encode_text: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """(len(tokens), embed_dim) fp32 embeddings in the order given. A trimming TextEncoder gets
    the prompts sorted by length, in forwards of up to TRIMMED_TOKENS_PER_FORWARD tokens, so
    each forward is only as long as its own longest prompt; anything else gets them all in one
    forward."""
    lengths = encode_text.lengths(tokens) if isinstance(encode_text, TextEncoder) else None
    if lengths is None:
        return encode_text(tokens.to(device)).float()
    order = lengths.argsort(stable=True)
    sorted_lengths = lengths[order].tolist()
    parts, start = [], 0
    while start < len(order):
        end = start + 1  # ascending lengths: the newest prompt is the forward's longest
        while end < len(order) and (end + 1 - start) * sorted_lengths[end] <= \
                TRIMMED_TOKENS_PER_FORWARD:
            end += 1
        parts.append(encode_text(tokens[order[start:end]].to(device)).float())
        start = end
    emb = parts[0].new_empty((len(order), parts[0].shape[1]))
    emb[order.to(emb.device)] = torch.cat(parts)
    return emb


@torch.no_grad()
def encode_classes(encode_text: Callable[[torch.Tensor], torch.Tensor], tokenizer,
                   classnames: Sequence[str], templates: Sequence,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """(len(classnames), embed_dim): template-averaged, normalised class embeddings."""
    texts = [render_template(t, c) for c in classnames for t in templates]
    emb = encode_texts(encode_text, tokenizer(texts), device)
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
    CLIP_benchmark), num_samples, and per-class sample / top-1 / top-5 counts.

    Top-5 follows CLIP_benchmark's zero-shot rule (`len(classes) >= 5`, else NaN): with fewer
    than five classes every label is among the top 5 and top-5 would read 1.0, so acc5 is NaN
    (JSON null, n/a in tables) and the per-class top-5 counts are None. (CLIP_benchmark's linear
    probe tests `target.max() >= 5` instead, which depends on which labels the test split
    holds; one rule, on the number of classes, serves all four uses here.)"""
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
    top5_meaningful = num_classes >= 5
    return {"acc1": hit1.double().mean().item() if n else 0.0,
            "acc5": (hit5.double().mean().item() if n else 0.0) if top5_meaningful
            else float("nan"),
            "mean_per_class_recall": recall, "num_samples": n,
            "per_class_count": count.tolist(), "per_class_top1": top1.tolist(),
            "per_class_top5": top5.tolist() if top5_meaningful else [None] * num_classes}


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
        return {"acc1": 0.0, "acc5": 0.0 if num_classes >= 5 else float("nan"),
                "mean_per_class_recall": 0.0, "num_samples": 0}
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
