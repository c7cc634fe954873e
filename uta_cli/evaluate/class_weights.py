"""A CLIP text tower as a zero-shot classifier: its class weights through the disk cache (one
function for `uta zeroshot`, zero-shot while pre-training and the fine-tuning zero-shot head),
and the zero-shot accuracy of a CLIP over labelled batches (training validation, the demo).

The class weights themselves are zeroshot.py's; this module decides when they are built, by
which processes, and where they are kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from uta_cli.data.pipeline import View, normalize
from uta_cli.evaluate.lockstep import CountingCall, even_out_forwards, is_sharded, stand_in_forward
from uta_cli.evaluate.zeroshot import (
    TextEncoder,
    assemble_classifier,
    build_classifier,
    class_batches,
    classifier_part,
    evaluate,
    template_strings,
)
from uta_cli.io import atomic_path, cache_root
from uta_cli.progress import progress_bar

if TYPE_CHECKING:
    from accelerate import PartialState
    from rich.console import Console

CLASSIFIER_CACHE_VERSION = 1


# --------------------------------------------------------------------------------------------
# the disk cache


def default_cache_dir() -> str:
    """Where class weights are cached unless told otherwise: <uta cache>/classifiers."""
    return os.path.join(cache_root(), "classifiers")


def classifier_cache_key(teacher: dict, classnames: Sequence[str], templates: Sequence,
                         text_dtype: str, tuned_text: str = "",
                         text_context: str = "full") -> str:
    """What the class weights depend on: the text tower's weights and config, the prompts, the
    dtype it ran in and the text context it ran over (TextEncoder.context: the one used, not
    the one asked for). The teacher's path is left out, so a moved teacher still hits.
    tuned_text: the fingerprint of tuned text weights that replaced the teacher's own."""
    payload = {"v": CLASSIFIER_CACHE_VERSION, "text_context": text_context,
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
    with atomic_path(path) as tmp:
        save_file({"classifier": classifier.detach().float().cpu().contiguous()}, tmp,
                  metadata={k: str(v) for k, v in info.items()})
    return path


def cached_classifier(encode: TextEncoder, tokenizer, identity: dict, classnames: list[str],
                      templates: list[str], device: torch.device | str, cache_dir: str = "", *,
                      dtype: torch.dtype = torch.float32, tuned_text: str = "",
                      texts_per_batch: int = 1024, state: PartialState | None = None,
                      console: Console | None = None
                      ) -> tuple[torch.Tensor, dict]:
    """(embed_dim, num_classes) class weights on `device`, and how they were obtained
    ({"cache": hit | built | off, "path", "seconds", "text_context", "text_context_note"}).

    Loaded from `cache_dir` ("" = no cache) when a file of the same key is there, else built
    and saved. identity: the text tower's TeacherIdentity as a dict; dtype: the one its text
    tower runs in; tuned_text: the fingerprint of tuned text weights (CLIPTeacher.
    text_fingerprint), which the identity cannot tell apart. A text tower on another device is
    moved to `device` for the encoding and back.

    state: accelerate's PartialState when several processes ask together: the main process
    reads the cache and shares what it found, the class batches are split over the processes
    by whole batches (bit-identical to one process) and gathered, the main process saves.
    None: this process alone. console: a progress bar on the main process (None: none).
    """
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    main = state is None or state.is_main_process
    key = classifier_cache_key(identity, classnames, templates,
                               str(dtype).replace("torch.", ""), tuned_text, encode.context)
    path = os.path.join(cache_dir, f"{key}.safetensors") if cache_dir else ""
    t0 = time.perf_counter()

    def info(cache: str) -> dict:
        return {"cache": cache, "path": path, "seconds": round(time.perf_counter() - t0, 3),
                "text_context": encode.context, "text_context_note": encode.note}

    cached = [load_cached_classifier(cache_dir, key, len(classnames))
              if main and cache_dir else None]
    if state is not None:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(cached)
    if cached[0] is not None:
        return cached[0].to(device), info("hit")
    mine = class_batches(len(classnames), len(templates), texts_per_batch)[rank::world]
    home = next(encode.clip.parameters()).device
    encode.clip.to(device)
    with progress_bar(console, console is not None and main and len(mine) > 1,
                      sum(e - s for s, e in mine),
                      f"class weights ({len(classnames)} x {len(templates)} prompts)") as adv:
        part = classifier_part(encode, tokenizer, classnames, templates, device,
                               texts_per_batch, rank, world, progress=adv)
    encode.clip.to(home)
    if state is not None:
        from accelerate.utils import gather_object

        parts = gather_object([part])
    else:
        parts = [part]
    classifier = assemble_classifier(parts)
    if main and cache_dir:
        save_cached_classifier(cache_dir, key, classifier, {
            "teacher": identity.get("model", ""), "classes": len(classnames),
            "templates": len(templates), "dtype": str(dtype), "text_context": encode.context})
    return classifier.to(device), info("built" if cache_dir else "off")


# --------------------------------------------------------------------------------------------
# zero-shot accuracy of a CLIP


def zeroshot_accuracy(clip: torch.nn.Module, tokenizer, classnames: Sequence[str],
                      templates: Sequence, batches: Iterable[dict], view: View,
                      device: torch.device | str, text_context: str = "trimmed",
                      encode_image: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      autocast: Callable[[], contextlib.AbstractContextManager] =
                      contextlib.nullcontext) -> dict[str, float]:
    """Top-1, top-5, mean per-class recall and the sample count of zeroshot.py's protocol:
    class weights through `clip`'s text tower, built afresh (a tower being tuned changes
    between calls), images of `view` from loader batches ({view.name, "label"}) through
    `encode_image` (default: `clip`'s own image tower), all inside `autocast()`. `clip` runs in
    eval mode and is put back as it was."""
    was_training = clip.training
    clip.eval()
    try:
        with autocast():
            classifier = build_classifier(TextEncoder(clip, text_context), tokenizer,
                                          classnames, templates, device)
            return evaluate(encode_image or clip.encode_image,
                            ((normalize(b[view.name].to(device), view), b["label"])
                             for b in batches if view.name in b), classifier)
    finally:
        clip.train(was_training)


def zeroshot_accuracy_in_shares(clip: torch.nn.Module, tokenizer, classnames: Sequence[str],
                                templates: Sequence, batches: Iterable[dict], view: View,
                                accelerator, text_context: str = "trimmed") -> dict[str, float]:
    """zeroshot_accuracy over this process's share of the images (`batches`), summed over all
    processes: every process must call it. {"acc1", "acc5", "num_samples"} of the whole set;
    top-5 NaN below five classes. A sharded (FSDP) model's image forwards are collectives, so
    each process evens out its count with stand-in forwards (evaluate/lockstep)."""
    encode = CountingCall(clip.encode_image)
    r = zeroshot_accuracy(clip, tokenizer, classnames, templates, batches, view,
                          accelerator.device, text_context, encode_image=encode,
                          autocast=accelerator.autocast)
    if is_sharded(clip):
        was_training = clip.training
        clip.eval()
        with accelerator.autocast():
            even_out_forwards(encode.calls, stand_in_forward(clip, view.size, accelerator.device,
                                                             "encode_image"), accelerator.device)
        clip.train(was_training)
    n = r["num_samples"]
    # hit counts (acc x n is a whole number up to rounding) and samples, summed in float64
    totals = torch.tensor([round(r["acc1"] * n), r["acc5"] * n, n], dtype=torch.float64)
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum").cpu()
    hit1, hit5, n = totals.tolist()
    if len(classnames) < 5:  # CLIP_benchmark's rule, whichever process saw no image
        hit5 = float("nan")
    return {"acc1": hit1 / n if n else 0.0, "acc5": hit5 / n if n else hit5,
            "num_samples": int(n)}
