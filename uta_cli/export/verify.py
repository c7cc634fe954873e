"""Checking an export: the reloaded artefact against what PyTorch computes, on random and on
image-like inputs at more than one batch size, and a CLIP format's text tower against the
teacher's. Nothing here writes; `uta export` puts the artefact in place only after `verify`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from uta_cli.export.formats import LOGIT_SCALE, Reloaded, Runner

# Tolerances on the largest absolute difference, per kind: embeddings are unit vectors, logits are
# 100 * cosine (so 1e-2 there is 1e-4 in cosine units), tokens are unnormalised head outputs.
DEFAULT_ATOL = {"embedding": 1e-4, "tokens": 1e-3, "classifier": 1e-2}
DEFAULT_MIN_COSINE = 0.9999
VERIFY_BATCHES = (1, 3)


@dataclass
class Check:
    """One comparison of the reloaded artefact with PyTorch."""

    inputs: str
    batch: int
    max_abs_diff: float
    cosine: float  # the smallest per-sample cosine between flattened outputs
    ok: bool
    note: str = ""

    def line(self) -> str:
        status = "ok" if self.ok else "FAIL"
        note = f" ({self.note})" if self.note else ""
        return (f"  {self.inputs:<7} batch {self.batch}: max |diff| {self.max_abs_diff:.3g}, "
                f"cosine {self.cosine:.7f}  {status}{note}")


class VerificationFailed(RuntimeError):
    """The reloaded artefact does not compute what PyTorch computes (exit 1)."""

    def __init__(self, message: str, checks: list[Check]):
        super().__init__(message)
        self.checks = checks


@torch.no_grad()
def reference_outputs(student: nn.Module, kind: str, classifier: torch.Tensor | None,
                      images: torch.Tensor) -> torch.Tensor:
    """What PyTorch computes, through the student's public methods (not ExportModule), so the
    wrapper is checked too."""
    if kind == "tokens":
        return student(images)
    emb = F.normalize(student.encode_image(images), dim=-1)
    return emb if kind == "embedding" else LOGIT_SCALE * emb @ classifier


def sample_inputs(size: int, mean: Sequence[float], std: Sequence[float], seed: int = 0,
                  batches: Sequence[int] = VERIFY_BATCHES) -> list[tuple[str, torch.Tensor]]:
    """Preprocessed inputs: white noise, and smooth image-like pictures (low-frequency colour
    fields plus a ramp and a little grain, in [0, 1], then normalised like real images)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    out = []
    for b in batches:
        out.append(("random", torch.randn(b, 3, size, size, generator=g)))
        coarse = torch.rand(b, 3, 4, 4, generator=g)
        img = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
        ramp = torch.linspace(0, 1, size).view(1, 1, 1, size)
        img = 0.75 * img + 0.25 * ramp + 0.02 * torch.randn(b, 3, size, size, generator=g)
        out.append(("smooth", (img.clamp(0, 1) - m) / s))
    return out


def compare(run: Runner, reference: Runner, inputs: list[tuple[str, torch.Tensor]], atol: float,
            min_cosine: float) -> list[Check]:
    checks = []
    for name, x in inputs:
        want = reference(x).float()
        got = torch.as_tensor(run(x)).float()
        if got.shape != want.shape:
            checks.append(Check(name, len(x), float("inf"), -1.0, False,
                                f"shape {tuple(got.shape)} != {tuple(want.shape)}"))
            continue
        diff = (got - want).abs().max().item()
        cos = F.cosine_similarity(got.flatten(1).double(), want.flatten(1).double(),
                                  dim=-1).min().item()
        checks.append(Check(name, len(x), diff, cos, diff <= atol and cos >= min_cosine))
    return checks


def text_checks(model: nn.Module, tokenizer: Callable, teacher,
                min_cosine: float) -> list[Check]:
    """The open_clip folder's text tower and tokenizer against the teacher's (must be equal)."""
    prompts = ["a photo of a dog.", "a diagram of a red circle.", "itap of a small boat."]
    with torch.no_grad():
        got = model.encode_text(tokenizer(prompts), normalize=True)
        want = teacher.clip.encode_text(teacher.tokenizer(prompts), normalize=True)
    diff = (got - want).abs().max().item()
    cos = F.cosine_similarity(got, want, dim=-1).min().item()
    return [Check("text", len(prompts), diff, cos, diff <= 1e-5 and cos >= min_cosine,
                  "encode_text vs the teacher")]


def verify(reloaded: Reloaded, student: nn.Module, kind: str, classifier: torch.Tensor | None,
           teacher, inputs: list[tuple[str, torch.Tensor]], atol: float, min_cosine: float,
           say: Callable[[str], None], output: str) -> list[Check]:
    """Every check of a reloaded artefact, each printed; VerificationFailed if any fails."""
    reference = lambda x: reference_outputs(student, kind, classifier, x)  # noqa: E731
    checks = compare(reloaded.image, reference, inputs, atol, min_cosine)
    if reloaded.clip is not None:
        checks += text_checks(reloaded.clip, reloaded.tokenizer, teacher, min_cosine)
    for note, run in reloaded.also.items():
        more = compare(run, reference, inputs[:2], atol, min_cosine)
        for c in more:
            c.note = note
        checks += more
    for c in checks:
        say(c.line())
    bad = [c for c in checks if not c.ok]
    if bad:
        worst = max(bad, key=lambda c: c.max_abs_diff)
        raise VerificationFailed(
            f"Verification failed on {len(bad)} of {len(checks)} checks (worst: "
            f"{worst.inputs} batch {worst.batch}, max |diff| {worst.max_abs_diff:.3g}, "
            f"cosine {worst.cosine:.7f}; tolerances: atol {atol:g}, min cosine "
            f"{min_cosine:g}). Nothing was written to {output}. Loosen --atol or "
            f"--min-cosine, or pass --no-verify to keep the artefact unchecked.", checks)
    return checks


def summary(checks: list[Check], atol: float, min_cosine: float) -> dict:
    """The verification as the export metadata records it."""
    return {"atol": atol, "min_cosine": min_cosine,
            "max_abs_diff": max(c.max_abs_diff for c in checks),
            "min_cosine_seen": min(c.cosine for c in checks)}
