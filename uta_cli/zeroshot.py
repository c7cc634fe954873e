"""Zero-shot classification through a CLIP text tower (UTA-METHOD.md §5).

Class weights: encode every template with the class name, L2-normalise each, average over
templates, L2-normalise again. Logits = 100 * normalised image embedding @ class weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F


def render_template(template: str | Callable[[str], str], classname: str) -> str:
    """Templates are strings with `{c}` (or `{}`), or callables as in open_clip's OpenAI set."""
    if callable(template):
        return template(classname)
    return template.replace("{c}", classname) if "{c}" in template else template.format(classname)


@torch.no_grad()
def build_classifier(encode_text: Callable[[torch.Tensor], torch.Tensor], tokenizer,
                     classnames: Sequence[str], templates: Sequence,
                     device: torch.device | str = "cpu",
                     texts_per_batch: int = 1024) -> torch.Tensor:
    """(embed_dim, num_classes) weights. Batches all templates of many classes per forward."""
    classes_per_batch = max(1, texts_per_batch // len(templates))
    columns = []
    for start in range(0, len(classnames), classes_per_batch):
        names = classnames[start:start + classes_per_batch]
        texts = [render_template(t, c) for c in names for t in templates]
        emb = encode_text(tokenizer(texts).to(device)).float()
        emb = F.normalize(emb, dim=-1).view(len(names), len(templates), -1).mean(dim=1)
        columns.append(F.normalize(emb, dim=-1))
    return torch.cat(columns).T.contiguous()


@torch.no_grad()
def evaluate(encode_image: Callable[[torch.Tensor], torch.Tensor],
             batches: Iterable[tuple[torch.Tensor, torch.Tensor]], classifier: torch.Tensor,
             ) -> dict[str, float]:
    """Top-1, top-5, mean per-class recall and the sample count over (images, labels) batches."""
    num_classes = classifier.shape[1]
    correct1 = correct5 = total = 0
    per_class_hits = torch.zeros(num_classes, dtype=torch.long)
    per_class_count = torch.zeros(num_classes, dtype=torch.long)
    for images, labels in batches:
        emb = F.normalize(encode_image(images).float(), dim=-1)
        logits = 100.0 * emb @ classifier.to(emb.device)
        labels = labels.to(logits.device)
        top = logits.topk(min(5, num_classes), dim=-1).indices
        hit1 = top[:, 0] == labels
        correct1 += int(hit1.sum())
        correct5 += int((top == labels[:, None]).any(dim=-1).sum())
        total += len(labels)
        per_class_hits += torch.bincount(labels[hit1].cpu(), minlength=num_classes)
        per_class_count += torch.bincount(labels.cpu(), minlength=num_classes)
    seen = per_class_count > 0
    recall = (per_class_hits[seen].float() / per_class_count[seen].float()).mean().item() \
        if seen.any() else 0.0
    return {"acc1": correct1 / max(1, total), "acc5": correct5 / max(1, total),
            "mean_per_class_recall": recall, "num_samples": total}
