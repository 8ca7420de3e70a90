"""Zero-shot classification: class prompts -> text classifier -> top-1 / top-5 on unmasked images.

Images and prompts go through the model's forward (one tower at a time) so that a sharded or
tensor-parallel model gathers its weights as in training; every rank of the model takes part.
Evaluation always runs the model in eval mode, which never masks.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

# The 7 short ImageNet prompts FLIP evaluates with (a subset of OpenAI's 80).
FLIP_SHORT_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

TEMPLATE_SETS = {"flip_short": FLIP_SHORT_TEMPLATES}


def load_templates(setting: str) -> list[str]:
    """A named template set or a file with one template per line, each holding `{}`."""
    if setting in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[setting])
    path = Path(setting)
    if not path.is_file():
        raise FileNotFoundError(
            f"eval.templates: '{setting}' is neither a template set ({', '.join(TEMPLATE_SETS)}) nor a file"
        )
    templates = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    bad = [t for t in templates if "{}" not in t]
    if bad or not templates:
        raise ValueError(f"eval.templates file {path}: every line needs a '{{}}' for the class name; bad lines: {bad[:3]}")
    return templates


def load_classnames(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"eval.classnames: no file at '{path}' (one class name per line)")
    names = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"eval.classnames: {path} holds no class names")
    return names


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def build_zero_shot_classifier(
    model, tokenizer, classnames: Sequence[str], templates: Sequence[str], device, batch_size: int = 256
) -> torch.Tensor:
    """[embed_dim, classes]: per class, the re-normalised mean of its prompts' normalised embeddings."""
    prompts = [template.format(name) for name in classnames for template in templates]
    features = []
    with eval_mode(model):
        for start in range(0, len(prompts), batch_size):
            tokens = tokenizer(prompts[start : start + batch_size]).to(device)
            _, text_features, _ = model(None, tokens)
            features.append(text_features.float())
    features = torch.cat(features).view(len(classnames), len(templates), -1)
    classifier = F.normalize(F.normalize(features, dim=-1).mean(dim=1), dim=-1)
    return classifier.t()


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5)) -> dict:
    """Number of samples whose label is among the k highest logits, for each k."""
    out = {}
    for k in ks:
        k_eff = min(k, logits.shape[1])
        top = logits.topk(k_eff, dim=1).indices
        out[k] = int((top == labels.unsqueeze(1)).any(dim=1).sum())
    return out


@torch.no_grad()
def zero_shot_accuracy(model, classifier: torch.Tensor, loader, device, max_samples: int = 0) -> dict:
    """top-1 / top-5 accuracy (fractions) over (images, labels) batches of `loader`."""
    correct = {1: 0, 5: 0}
    seen = 0
    with eval_mode(model):
        for images, labels in loader:
            image_features, _, _ = model(images.to(device), None)
            logits = image_features.float() @ classifier
            for k, n in topk_correct(logits, labels.to(device)).items():
                correct[k] += n
            seen += labels.shape[0]
            if max_samples and seen >= max_samples:
                break
    if seen == 0:
        raise ValueError("zero-shot evaluation saw no images: check eval.zero_shot_shards")
    return {"top1": correct[1] / seen, "top5": correct[5] / seen, "samples": seen}


def run_zero_shot(model, tokenizer, eval_cfg, data_cfg, image_size: int, device, dp_rank: int = 0, dp_size: int = 1) -> Optional[dict]:
    """The configured zero-shot evaluation, or None when no dataset is configured."""
    if not eval_cfg.zero_shot_shards or not eval_cfg.classnames:
        return None
    from .data import build_eval_loader

    classnames = load_classnames(eval_cfg.classnames)
    templates = load_templates(eval_cfg.templates)
    classifier = build_zero_shot_classifier(model, tokenizer, classnames, templates, device, eval_cfg.batch_size)
    loader = build_eval_loader(eval_cfg.zero_shot_shards, image_size, data_cfg, eval_cfg.batch_size, dp_rank, dp_size)
    result = zero_shot_accuracy(model, classifier, loader, device, eval_cfg.max_samples)
    result["classes"] = len(classnames)
    result["chance"] = 1.0 / len(classnames)
    return result
