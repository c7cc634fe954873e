"""The Hugging Face model repository layout of a UTA student (`uta export --format hf-hub`).

    README.md                    model card: recipe, teacher, data, zero-shot figures, commands
    open_clip_config.json        open_clip's config; the image tower is the timm model
                                 "hf-hub:ORG/NAME", i.e. this same repository
    open_clip_model.safetensors  open_clip weights (student image tower + the text tower)
    config.json                  timm's config: architecture + model_args (the exact arguments
                                 uta builds the student's trunk with), pretrained_cfg
    model.safetensors            timm weights: trunk + head, so timm's forward is the embedding
    uta_export.json              export metadata (checkpoint hash, verification)

Nothing names a path of the exporting machine. open_clip resolves
`create_model_and_transforms("hf-hub:ORG/NAME")` from open_clip_config.json and, for the image
tower, asks timm for "hf-hub:ORG/NAME", which reads config.json from the same repository; timm
alone loads `timm.create_model("hf-hub:ORG/NAME", pretrained=True)` from config.json and
model.safetensors. Both go through huggingface_hub's cache, so the folder is verified by placing
it in a temporary cache exactly as huggingface_hub would (models--ORG--NAME/snapshots/REV/ plus
refs/main) and loading it offline.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from unittest import mock

import yaml
from safetensors.torch import save_file
from torch import nn

from uta_cli.errors import UtaUsageError
from uta_cli.io import atomic_write_json
from uta_cli.models.open_clip_folder import open_clip_state_dict

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_repo_id(repo_id: str) -> str:
    if not repo_id:
        raise UtaUsageError("--format hf-hub needs --repo-id ORG/NAME (the Hugging Face "
                            "repository the folder is for; its name is written into the "
                            "open_clip config).")
    if not REPO_ID.match(repo_id) or ".." in repo_id or repo_id.endswith((".", "-")):
        raise UtaUsageError(f"--repo-id {repo_id!r} is not a Hugging Face repository id: use "
                            f"ORG/NAME with letters, digits, '.', '_' or '-', e.g. "
                            f"my-lab/uta-vitb16.")
    return repo_id


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def check_push_possible() -> None:
    """Refuse --push-to-hub before any work when huggingface_hub is in offline mode."""
    if hub_offline():
        raise UtaUsageError("--push-to-hub needs the network, but huggingface_hub is offline "
                            "(HF_HUB_OFFLINE is set). Export without --push-to-hub and upload "
                            "the folder later with: huggingface-cli upload ORG/NAME FOLDER")


# -- writing ---------------------------------------------------------------------------------------
def write_hub_folder(folder: str, repo_id: str, student: nn.Module, clip: nn.Module,
                     oc_config: dict, timm_config: dict, card: str) -> None:
    """Write the repository layout into the (new, empty) `folder`."""
    os.makedirs(folder)
    oc_config = json.loads(json.dumps(oc_config))
    oc_config["model_cfg"]["vision_cfg"]["timm_model_name"] = "hf-hub:" + repo_id
    atomic_write_json(os.path.join(folder, "open_clip_config.json"), oc_config)
    save_file(open_clip_state_dict(student, clip),
              os.path.join(folder, "open_clip_model.safetensors"))
    # timm's own view: the trunk with the projection as its classifier head, so that
    # timm.create_model(..., pretrained=True)(x) is the (unnormalised) CLIP embedding
    cfg = json.loads(json.dumps(timm_config))
    dim = int(student.embed_dim)
    cfg["num_classes"] = cfg["pretrained_cfg"]["num_classes"] = dim
    cfg["model_args"]["num_classes"] = dim
    cfg["pretrained_cfg"]["hf_hub_id"] = repo_id
    atomic_write_json(os.path.join(folder, "config.json"), cfg)
    state = {k: v.detach().float().contiguous().cpu() for k, v in
             student.trunk.state_dict().items()}
    state["head.weight"] = student.head.weight.detach().float().contiguous().cpu()
    state["head.bias"] = student.head.bias.detach().float().contiguous().cpu()
    save_file(state, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)


# -- loading through a Hugging Face cache ----------------------------------------------------------
def place_in_cache(folder: str, repo_id: str, cache_dir: str, link: bool = True) -> str:
    """Put `folder` where huggingface_hub keeps a downloaded repository; returns the snapshot.

    HF_HUB_CACHE/models--ORG--NAME/{refs/main, snapshots/REV/...}: REV is a 40-hex revision
    (here derived from the files), refs/main names it. Files are symlinked (link) or copied.
    """
    h = hashlib.sha1(repo_id.encode())
    for name in sorted(os.listdir(folder)):
        h.update(name.encode())
        h.update(str(os.path.getsize(os.path.join(folder, name))).encode())
    rev = h.hexdigest()
    repo = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", rev)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    shutil.rmtree(snapshot, ignore_errors=True)
    os.makedirs(snapshot)
    for name in os.listdir(folder):
        src, dst = os.path.join(os.path.abspath(folder), name), os.path.join(snapshot, name)
        if link:
            os.symlink(src, dst)
        else:
            shutil.copy2(src, dst)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(rev)
    return snapshot


@contextlib.contextmanager
def offline_cache(cache_dir: str) -> Iterator[None]:
    """huggingface_hub offline, reading `cache_dir` (it reads both at call time)."""
    from huggingface_hub import constants

    with mock.patch.object(constants, "HF_HUB_CACHE", cache_dir), \
            mock.patch.object(constants, "HF_HUB_OFFLINE", True):
        yield


def load_through_cache(folder: str, repo_id: str
                       ) -> tuple[nn.Module, Callable, nn.Module]:
    """(open_clip model, open_clip tokenizer, timm model with pretrained weights), each loaded
    by name, "hf-hub:ORG/NAME", from a temporary cache holding `folder`, offline."""
    import open_clip
    import timm

    with tempfile.TemporaryDirectory(prefix="uta-hf-cache-") as cache:
        place_in_cache(folder, repo_id, cache)
        with offline_cache(cache):
            model, _, _ = open_clip.create_model_and_transforms("hf-hub:" + repo_id)
            tokenizer = open_clip.get_tokenizer("hf-hub:" + repo_id)
            timm_model = timm.create_model("hf-hub:" + repo_id, pretrained=True)
    return model.eval(), tokenizer, timm_model.eval()


# -- pushing ---------------------------------------------------------------------------------------
def push(folder: str, repo_id: str, private: bool, say: Callable[[str], None]) -> str:
    """Create the repository if needed and upload the folder; returns the repository URL."""
    check_push_possible()
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model",
                          commit_message="Upload UTA student (uta export --format hf-hub)")
    except Exception as e:  # network, authentication, permissions: all the user's to fix
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UtaUsageError(f"Pushing to the Hugging Face Hub failed ({type(e).__name__}: "
                            f"{first}). The folder is complete at {folder}; log in with "
                            f"`huggingface-cli login` (or set HF_TOKEN) and upload it with: "
                            f"huggingface-cli upload {repo_id} {folder}") from None
    say(f"pushed {folder} to {url}")
    return str(url)


# -- the model card --------------------------------------------------------------------------------
def _run_dir(meta: dict) -> str:
    """The run directory of a checkpoints/step_* folder (where metrics.jsonl lives), or ''."""
    folder = str(meta.get("checkpoint_dir", ""))
    parent = os.path.dirname(folder)
    if os.path.basename(parent) == "checkpoints":
        return os.path.dirname(parent)
    return ""


def zeroshot_rows(meta: dict, reports: list[str]) -> list[dict]:
    """Zero-shot figures: `uta zeroshot --output-json` reports given at export, then the demo
    evaluations the run logged in metrics.jsonl."""
    rows = []
    for path in reports:
        try:
            with open(path, encoding="utf-8") as f:
                r = json.load(f)
        except (OSError, ValueError) as e:
            raise UtaUsageError(f"--zeroshot-json {path} is not a readable JSON report: "
                                f"{e}") from None
        if "dataset" not in r or "task" not in r:
            raise UtaUsageError(f"--zeroshot-json {path} is not a `uta zeroshot --output-json` "
                                f"report (no dataset/task).")
        metrics = r.get("metrics") or {}
        row = {"dataset": r["dataset"], "task": r["task"], "metrics": metrics,
               "num_samples": r.get("num_samples"), "source": os.path.basename(path)}
        teacher = (r.get("teacher_result") or {}).get("metrics")
        if teacher:
            row["teacher_metrics"] = teacher
        rows.append(row)
    run = _run_dir(meta)
    metrics_path = os.path.join(run, "metrics.jsonl") if run else ""
    if metrics_path and os.path.isfile(metrics_path):
        with open(metrics_path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("event") == "zeroshot":
                    rows.append({"dataset": rec.get("dataset", "demo"),
                                 "task": "zeroshot_classification",
                                 "metrics": {"acc1": rec.get("student_acc1"),
                                             "acc5": rec.get("student_acc5")},
                                 "teacher_metrics": {"acc1": rec.get("teacher_acc1")},
                                 "num_samples": rec.get("num_samples"),
                                 "source": f"metrics.jsonl, step {rec.get('step')}"})
    return rows


def _public(name) -> str:
    """A teacher's name for a public card: a local folder shown by its name, not its path."""
    name = str(name or "")
    for prefix in ("local-dir:", ""):
        if name.startswith(prefix) and os.path.isabs(name[len(prefix):]):
            return prefix + os.path.basename(name[len(prefix):].rstrip("/"))
    return name


def _fmt(v, absent: str = "-") -> str:
    """A metric in percent; n/a for NaN (meaningless: top-5 of fewer than five classes), `absent`
    for anything else (a JSON report writes that NaN as null)."""
    if isinstance(v, (int, float)) and math.isfinite(v):
        return f"{100 * v:.2f}"
    return "n/a" if isinstance(v, float) else absent


def model_card(repo_id: str, meta: dict, metadata: dict, teacher_model: str,
               zeroshot: list[dict], command: str, license_id: str = "other") -> str:
    """README.md of the repository: front matter for the Hub, then what the model is, how it
    was made, what it scores, and how to use it."""
    s = meta.get("student") or {}
    recipe = meta.get("recipe") or {}
    teacher = meta.get("teacher") or {}
    release = meta.get("release") or meta.get("converted_from") or {}
    arch = (f"{s.get('family', 'eva')} ViT, width {s.get('width')}, depth {s.get('depth')}, "
            f"{s.get('heads')} heads, patch {s.get('patch_size')}, {s.get('image_size')} px")
    front = {"license": license_id, "library_name": "open_clip",
             "pipeline_tag": "zero-shot-image-classification",
             "tags": ["clip", "open_clip", "timm", "uta", "unmasked-token-alignment",
                      "image-feature-extraction"]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {repo_id}", "",
             f"A vision transformer ({arch}) whose image embeddings live in the joint "
             f"image-text space of a CLIP model: an image tower trained with Unmasked Token "
             f"Alignment (UTA), packaged with the text tower that scores it "
             f"({_public(teacher_model or teacher.get('model', 'its teacher'))}). Embedding "
             f"dimension "
             f"{metadata.get('embed_dim')}; input {metadata['input_size'][1]} px, "
             f"{metadata.get('interpolation')} resize of the short side, centre crop, mean "
             f"{metadata.get('mean')}, std {metadata.get('std')}.", ""]

    lines += ["## How it was made", ""]
    if release:
        lines += [f"Converted from the authors' released checkpoint `{release.get('name')}` "
                  f"(fingerprint `{release.get('fingerprint')}`); its own text tower is kept.",
                  ""]
    if recipe:
        data = recipe.get("data") or {}
        sched = recipe.get("schedule") or {}
        optim = recipe.get("optim") or {}
        mask = recipe.get("mask") or {}
        length = f"{sched['steps']} steps" if sched.get("steps") else \
            f"{sched.get('epochs')} epochs"
        lines += [f"- Recipe: `{recipe.get('name')}` (task `{meta.get('task')}`), "
                  f"checkpoint step {meta.get('step')}.",
                  f"- Teacher: `{_public(teacher.get('model'))}`, weights "
                  f"`{_public(teacher.get('weights'))}` (fingerprint "
                  f"`{teacher.get('weights_fingerprint')}`).",
                  f"- Data: `{data.get('source')}`, batch {data.get('batch_size')} per "
                  f"process, crop scale {data.get('crop_scale')}.",
                  f"- Masking: {mask.get('strategy')}, ratio {mask.get('ratio')}.",
                  f"- Optimiser: AdamW lr {optim.get('lr')}, weight decay "
                  f"{optim.get('weight_decay')}, betas {optim.get('betas')}; {length}.",
                  "", "To train it again, save the resolved recipe below as `recipe.yaml` "
                  "and run `uta pretrain recipe.yaml` (or `uta finetune` for a tuning task).",
                  "", "<details><summary>Resolved recipe</summary>", "", "```yaml",
                  yaml.safe_dump(recipe, sort_keys=False).strip(), "```", "", "</details>", ""]
    elif teacher and not release:
        lines += [f"- Teacher / text tower: `{_public(teacher.get('model'))}`.", ""]
    lines += ["The exact command that wrote this repository:", "", "```bash", command, "```", "",
              f"Source checkpoint hash: `{metadata.get('checkpoint_hash')}`; "
              f"uta {metadata.get('uta_version')}, torch {metadata.get('torch_version')}.", ""]

    lines += ["## Zero-shot results", ""]
    if zeroshot:
        lines += ["| dataset | task | top-1 / R@1 | top-5 | mean per-class recall | teacher "
                  "top-1 | images | source |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in zeroshot:
            m, t = r["metrics"], r.get("teacher_metrics") or {}
            first = m.get("acc1", m.get("image_retrieval_recall@1"))
            lines.append(f"| {r['dataset']} | {r['task']} | {_fmt(first)} | "
                         f"{_fmt(m.get('acc5'), 'n/a' if 'acc5' in m else '-')} | "
                         f"{_fmt(m.get('mean_per_class_recall'))} | "
                         f"{_fmt(t.get('acc1'))} | {r.get('num_samples') or '-'} | "
                         f"{r['source']} |")
        lines.append("")
    else:
        lines += ["No zero-shot evaluation was given at export time (`uta zeroshot "
                  "--output-json FILE`, then `uta export ... --zeroshot-json FILE`).", ""]

    lines += ["## Use", "", "open_clip:", "", "```python", "import open_clip, torch",
              f'model, _, preprocess = open_clip.create_model_and_transforms("hf-hub:{repo_id}")',
              f'tokenizer = open_clip.get_tokenizer("hf-hub:{repo_id}")',
              "image = preprocess(pil_image).unsqueeze(0)",
              'text = tokenizer(["a photo of a cat", "a photo of a dog"])',
              "with torch.no_grad():",
              "    img = model.encode_image(image, normalize=True)",
              "    txt = model.encode_text(text, normalize=True)",
              "probs = (100 * img @ txt.T).softmax(dim=-1)", "```", "",
              "timm (the image tower alone; its output is the unnormalised embedding):", "",
              "```python", "import timm",
              f'model = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()',
              "cfg = timm.data.resolve_data_config({}, model=model)",
              "transform = timm.data.create_transform(**cfg)", "```", "",
              "CLIP_benchmark:", "", "```bash",
              f"clip_benchmark eval --model_type open_clip --model hf-hub:{repo_id} "
              f"--pretrained '' --dataset imagenet1k --dataset_root /data/imagenet", "```", "",
              "uta (embeddings and zero-shot labels in one line):", "", "```bash",
              f"huggingface-cli download {repo_id} --local-dir uta-model",
              "uta embed --ckpt uta-model --dir photos/ --output photos.safetensors",
              'uta classify --ckpt uta-model cat.jpg --labels "cat,dog"', "```", ""]
    return "\n".join(lines)
