"""A trained UTA student as a CLIP model for notebooks: `encode_image`, `encode_text`,
`preprocess` and `tokenizer`, in open_clip's shape, from any checkpoint `uta zeroshot --ckpt`
takes. `uta_cli.load_model(path)` returns one.

The image side is the student (its CLS embedding is a CLIP image embedding); the text side is
the checkpoint's own when it carries one (a released file, a contrastive run, an exported
open_clip folder), else the teacher it recorded. Preprocessing is the student's recorded one,
identical to open_clip's eval preprocess (resize the short side, centre crop, normalise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from uta_cli.data.transforms import EvalTransform, normalize
from uta_cli.loading.model import LoadedModel, load_model


class UTAModel:
    """A UTA student and the text tower that scores it, used like an open_clip CLIP."""

    def __init__(self, loaded: LoadedModel, device: str | torch.device = "cpu",
                 teacher_weights: str = ""):
        self.device = torch.device(device)
        self.loaded = loaded
        self.meta = loaded.meta
        self.student = loaded.student.to(self.device).eval()
        self.text = loaded.text_tower(teacher_weights).to(self.device, "fp32")
        self.tokenizer = self.text.tokenizer
        ident = self.text.identity
        self.view = loaded.preprocess(ident.mean, ident.std).view("image")
        self._resize_crop = EvalTransform([self.view])

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> a normalised (3, S, S) float tensor, as open_clip's preprocess."""
        pixels = self._resize_crop(image.convert("RGB"), 0)[self.view.name]
        return normalize(pixels.unsqueeze(0), self.view)[0]

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, S, S) preprocessed images -> (B, embed_dim) CLIP image embeddings."""
        out = self.student.encode_image(images.to(self.device)).float()
        return F.normalize(out, dim=-1) if normalize else out

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, context) token ids from `tokenizer` -> (B, embed_dim) CLIP text embeddings."""
        out = self.text.clip.encode_text(tokens.to(self.device)).float()
        return F.normalize(out, dim=-1) if normalize else out


def load_clip_model(path: str, device: str = "cpu", teacher_weights: str = "",
                    ckpt_format: str = "auto") -> UTAModel:
    """Any checkpoint as a UTAModel: a run directory, a checkpoint folder, a contrastive run, a
    released UTA file (uta_*.pt) or an exported open_clip folder.

    device: where the model runs ("cpu", "cuda", "cuda:1"). teacher_weights: where the recorded
    teacher's weights live now, if they moved since training. ckpt_format: "auto", "uta" or
    "uta-release" (a released file whose name does not say so).
    """
    return UTAModel(load_model(path, ckpt_format, teacher_weights), device, teacher_weights)
