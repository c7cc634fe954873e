"""Zero-shot top-1 / top-5 of the student while it pre-trains (`eval.zeroshot`): the same
class weights (and disk cache) and the same sharded loop as `uta zeroshot`."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from rich.console import Console

from uta_cli.data.folders import ImageFolderIndex
from uta_cli.data.pipeline import EvalTransform, View
from uta_cli.errors import UtaUsageError
from uta_cli.evaluate.class_weights import cached_classifier, default_cache_dir
from uta_cli.evaluate.datasets import EvalSet, resolve_dataset, resolve_eval_templates
from uta_cli.evaluate.encoders import Encoder, eval_view, text_encoder
from uta_cli.evaluate.lockstep import CountingCall, even_out_forwards, is_sharded
from uta_cli.evaluate.per_process import classify_shard, merge_classification, shard_loader
from uta_cli.recipe import recipe_to_dict

if TYPE_CHECKING:
    from uta_cli.models.teacher import CLIPTeacher


def _spread_subset(evalset: EvalSet, limit: int) -> EvalSet:
    """The first `limit` of an evenly spaced pick over the whole set, so every class keeps its
    share (folders list their images class by class)."""
    n = evalset.num_samples
    if limit <= 0 or n is None or limit >= n:
        return evalset
    pick = [i * n // limit for i in range(limit)]
    if evalset.index is not None:
        ix = evalset.index
        index = ImageFolderIndex(root=ix.root, files=[ix.files[i] for i in pick],
                                 labels=[ix.labels[i] for i in pick], classes=ix.classes)
        return EvalSet(**{**evalset.__dict__, "index": index})
    return EvalSet(**{**evalset.__dict__, "demo_images": evalset.demo_images[pick],
                      "demo_labels": evalset.demo_labels[pick]})


class TrainingZeroShot:
    """Zero-shot top-1 / top-5 of the student while it trains (`eval.zeroshot`,
    `eval.zeroshot_every`): the dataset is resolved before training (bad input fails at once),
    the class weights are built once when the teacher is on its device (and cached on disk as
    `uta zeroshot` caches them), and each evaluation is sharded over the processes and gathered,
    so it reports what one process would."""

    def __init__(self, evalset: EvalSet, templates_name: str, templates: list[str], view: View,
                 every: int, batch_size: int, workers: int, cache_dir: str):
        self.evalset, self.templates_name, self.templates = evalset, templates_name, templates
        self.view, self.every = view, every
        self.batch_size, self.workers, self.cache_dir = batch_size, workers, cache_dir
        self.classifier: torch.Tensor | None = None
        self.classifier_info: dict = {}
        self.teacher: CLIPTeacher | None = None

    @classmethod
    def from_recipe(cls, recipe, student_view: View) -> TrainingZeroShot:
        e = recipe.eval
        if e.zeroshot_every < 0 or e.zeroshot_samples < 0:
            raise UtaUsageError("eval.zeroshot_every and eval.zeroshot_samples must be >= 0.")
        evalset = resolve_dataset(e.zeroshot, e.data_dir, e.classnames, "classification",
                                  {"recipe": recipe_to_dict(recipe)})
        if e.zeroshot_samples and evalset.shards is not None:
            raise UtaUsageError("eval.zeroshot_samples picks images of a folder; tar shards are "
                                "read whole. Point eval.zeroshot at fewer shards instead.")
        templates_name, templates = resolve_eval_templates(e.templates, evalset)
        view = eval_view("student", student_view.size, student_view.mean, student_view.std,
                         student_view.interpolation, student_view.resize_mode)
        return cls(_spread_subset(evalset, e.zeroshot_samples), templates_name, templates, view,
                   e.zeroshot_every, recipe.data.batch_size, recipe.data.num_workers,
                   default_cache_dir())

    def describe(self) -> str:
        n = self.evalset.num_samples
        when = f"every {self.every} steps and at the end" if self.every else "at the end"
        return (f"zero-shot on {self.evalset.name} ({n if n is not None else 'streamed'} images,"
                f" {len(self.evalset.classnames)} classes, {self.templates_name} templates x "
                f"{len(self.templates)}) {when}")

    def setup(self, teacher: CLIPTeacher, state, console: Console | None = None) -> None:
        """Build (or load) the class weights: once, on the teacher's device, split over ranks."""
        self.teacher = teacher
        self.classifier, self.classifier_info = cached_classifier(
            text_encoder(teacher), teacher.tokenizer, teacher.identity.to_dict(),
            self.evalset.classnames, self.templates, teacher.device, self.cache_dir,
            dtype=teacher.dtype, tuned_text=teacher.text_fingerprint, state=state,
            console=console or Console(quiet=True))

    def due(self, step: int, final: bool) -> bool:
        return final or (self.every > 0 and step > 0 and step % self.every == 0)

    @torch.no_grad()
    def __call__(self, student: torch.nn.Module, state, autocast=contextlib.nullcontext
                 ) -> dict:
        """{"zeroshot_acc1", "zeroshot_acc5", "zeroshot_samples"}; every process must call."""
        from accelerate.utils import gather_object

        if self.classifier is None:
            raise RuntimeError("TrainingZeroShot.setup was not called")
        device = self.classifier.device
        was_training = student.training
        student.eval()

        def encode_image(x: torch.Tensor) -> torch.Tensor:
            with autocast():
                return student.encode_image(x).float()

        encode = CountingCall(encode_image)
        encoder = Encoder("student", "student", "", self.view, encode, self.teacher)
        loader, total = shard_loader(self.evalset, EvalTransform([self.view]),
                                     state.process_index, state.num_processes, self.batch_size,
                                     self.workers, pin=device.type == "cuda")
        payload = classify_shard(loader, total, [encoder], {"student": self.classifier}, device,
                                 Console(quiet=True), False)
        if is_sharded(student):  # a sharded student's forwards are collectives
            even_out_forwards(encode.calls, lambda: encode_image(torch.zeros(
                1, 3, self.view.size, self.view.size, device=device)), device)
        student.train(was_training)
        parts = gather_object([payload])
        errors = [p["error"] for p in parts if p["error"]]
        if errors:
            raise UtaUsageError(errors[0])
        r = merge_classification(parts, ["student"], len(self.evalset.classnames))["student"]
        return {"zeroshot_acc1": r["acc1"], "zeroshot_acc5": r["acc5"],
                "zeroshot_samples": r["num_samples"]}
