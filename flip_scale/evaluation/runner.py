"""Zero-shot classification and retrieval of a (possibly sharded) FLIP model.

Images and prompts go through the model's forward (one tower at a time for classification, both
for retrieval) so that a sharded or tensor-parallel model gathers its weights as in training.
Every rank takes part in every forward; the data-parallel ranks split the data (`group.py`) and
the counts are summed over them, so any layout gives the numbers of one process.

Evaluation runs the model in eval mode, which never masks. `mask_ratio=r` evaluates the way the
model was trained instead: the image tower keeps a random (1 - r) of the patches of each image,
with noise drawn from the image's position in the dataset (`masking_noise(mask_seed, 0, index)`),
so the masked numbers are reproducible and the same under any layout. `masked_views=N` embeds
each image as the ensemble of N complementary masked views (`masked_views.py`); `run_evaluation`
reports it beside the full-image numbers when `eval.masked_views` asks for it.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import Optional, Sequence

import torch

from ..models import masking_noise
from ..models.masking import ratio_keeping
from ..runtime import host_to_device
from .datasets import ClassificationSet, caption_batches, open_classification
from .group import EvalGroup, EvalProgress, Field, lockstep_batches
from .masked_views import ensemble_image_features, view_keep_count, view_noises
from .scoring import classifier_from_text_features, correct_at_k, retrieval_hits
from .templates import load_templates

RECALL_KS = (1, 5, 10)


def _unwrap(model):
    return getattr(model, "module", model)


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module, mask_ratio: Optional[float] = None):
    """The model in eval mode; with `mask_ratio` > 0 its image tower still removes that fraction of
    the patches (the training-time view of the images)."""
    was_training = model.training
    masking = _unwrap(model).visual.masking
    old_ratio = masking.mask_ratio
    model.eval()
    if mask_ratio:
        masking.mask_ratio = float(mask_ratio)
        masking.train()
    try:
        yield
    finally:
        masking.mask_ratio = old_ratio
        model.train(was_training)


def eval_mode(model: torch.nn.Module):
    """The model in eval mode (no masking) for the block."""
    return evaluation_mode(model, None)


def _arch(model):
    return _unwrap(model).arch


def _image_noise(model, index: torch.Tensor, mask_ratio: Optional[float], mask_seed: int, device):
    if not mask_ratio:
        return None
    return host_to_device(masking_noise(mask_seed, 0, index.clamp(min=0), _arch(model).num_patches), device)


class _ImageView:
    """How a batch's images are embedded: whole, masked (`mask_ratio`), or as the ensemble of
    `masked_views` complementary masked views."""

    def __init__(self, model, mask_ratio: Optional[float], mask_seed: int, masked_views: int = 0,
                 masked_view_ratio: float = 0.0):
        if masked_views and mask_ratio:
            raise ValueError("masked views and a mask ratio exclude each other: each view sets its own mask")
        self.model, self.mask_seed, self.views = model, mask_seed, masked_views
        num_patches = _arch(model).num_patches
        self.keep = view_keep_count(num_patches, masked_views, masked_view_ratio) if masked_views else 0
        self.mask_ratio = ratio_keeping(num_patches, self.keep) if masked_views else mask_ratio

    def mode(self):
        return evaluation_mode(self.model, self.mask_ratio)

    def __call__(self, images: torch.Tensor, index: torch.Tensor, device) -> torch.Tensor:
        images = host_to_device(images, device)
        if not self.views:
            noise = _image_noise(self.model, index, self.mask_ratio, self.mask_seed, device)
            return self.model(images, None, noise)[0]
        noises = view_noises(self.mask_seed, index, _arch(self.model).num_patches, self.views, self.keep)
        return ensemble_image_features(self.model, images, noises)


@torch.no_grad()
def build_zero_shot_classifier(model, tokenizer, classnames: Sequence[str], templates: Sequence[str], device,
                               batch_size: int = 256, group: Optional[EvalGroup] = None) -> torch.Tensor:
    """[embed_dim, classes]: per class, the re-normalised mean of its prompts' normalised embeddings.

    The prompts are split over the data-parallel ranks in equal contiguous slices (the last padded),
    embedded in batches of `batch_size`, and gathered: every rank gets the whole classifier.
    """
    group = group or EvalGroup()
    if not classnames or not templates:
        raise ValueError(f"a zero-shot classifier needs class names and templates, got {len(classnames)} and {len(templates)}")
    prompts = [template.format(name) for name in classnames for template in templates]
    per_rank = math.ceil(len(prompts) / group.size)
    mine = prompts[group.rank * per_rank : (group.rank + 1) * per_rank]
    mine += [""] * (per_rank - len(mine))  # padding prompts, cut off after the gather
    features = []
    progress = EvalProgress(f"zero-shot classifier ({len(classnames)} classes x {len(templates)} prompts)",
                            total=len(prompts))
    with evaluation_mode(model):
        for start in range(0, per_rank, batch_size):
            tokens = host_to_device(tokenizer(mine[start : start + batch_size]), device)
            _, text_features, _ = model(None, tokens)
            features.append(text_features.float())
            progress.update(min(len(prompts), (start + batch_size) * group.size))
    gathered = group.all_gather(torch.cat(features))[: len(prompts)]
    return classifier_from_text_features(gathered.view(len(classnames), len(templates), -1))


@torch.no_grad()
def zero_shot_accuracy(model, classifier: torch.Tensor, loader, device, max_samples: int = 0,
                       group: Optional[EvalGroup] = None, batch_size: Optional[int] = None,
                       mask_ratio: Optional[float] = None, mask_seed: int = 0, total: Optional[int] = None,
                       masked_views: int = 0, masked_view_ratio: float = 0.0) -> dict:
    """top-1 / top-5 accuracy (fractions) over this rank's share of the labelled batches of `loader`
    ({images, labels} dicts or (images, labels) pairs), summed over the data-parallel ranks."""
    group = group or EvalGroup()
    view = _ImageView(model, mask_ratio, mask_seed, masked_views, masked_view_ratio)
    arch = _arch(model)
    classes = classifier.shape[1]
    batches = (b if isinstance(b, dict) else {"images": b[0], "labels": b[1]} for b in loader)
    if batch_size is None:
        if group.distributed:
            raise ValueError("zero_shot_accuracy over several ranks needs batch_size: every rank pads to it")
        first = next(batches, None)  # one process: the first batch says the size
        batch_size = len(first["labels"]) if first is not None else 1
        batches = itertools.chain([first] if first is not None else [], batches)
    fields = {"images": Field((3, arch.image_size, arch.image_size), torch.float32), "labels": Field((), torch.long, -1)}
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1, top-5, samples
    with view.mode():
        for batch in lockstep_batches(batches, fields, batch_size, group, device, max_samples,
                                      label="zero-shot images", total=total):
            labels, valid = batch["labels"].to(device), batch["valid"].to(device)
            if int(labels.max()) >= classes:
                raise ValueError(f"an evaluation sample has class {int(labels.max())} but there are only {classes} "
                                 f"class names (classes are 0..{classes - 1})")
            image_features = view(batch["images"], batch["index"], device)
            correct = correct_at_k(image_features.float() @ classifier, labels, (1, 5), valid)
            counts += torch.tensor([correct[1], correct[5], int(valid.sum())], dtype=torch.float64, device=device)
    top1, top5, seen = (int(v) for v in group.sum_(counts).tolist())
    if seen == 0:
        raise ValueError("zero-shot evaluation saw no images: check the dataset (eval.zero_shot_shards / --dataset)")
    return {"top1": top1 / seen, "top5": top5 / seen, "samples": seen}


@torch.no_grad()
def retrieval_recall(model, loader, device, batch_size: int, max_samples: int = 0, group: Optional[EvalGroup] = None,
                     ks: Sequence[int] = RECALL_KS, mask_ratio: Optional[float] = None, mask_seed: int = 0,
                     masked_views: int = 0, masked_view_ratio: float = 0.0) -> dict:
    """Image->text and text->image recall@k over image-caption pairs ({images, tokens, caption_keys}
    batches). Each rank embeds its share, the embeddings are gathered, each rank ranks its own
    queries against the whole gallery, and the hit counts are summed."""
    group = group or EvalGroup()
    arch = _arch(model)
    fields = {
        "images": Field((3, arch.image_size, arch.image_size), torch.float32),
        "tokens": Field((arch.context_length,), torch.long, 0),
        "caption_keys": Field((), torch.long, -1),
    }
    images, texts, keys = [], [], []
    view = _ImageView(model, mask_ratio, mask_seed, masked_views, masked_view_ratio)
    with view.mode():
        for batch in lockstep_batches(loader, fields, batch_size, group, device, max_samples,
                                      label="retrieval pairs"):
            if masked_views:  # the views' forwards embed images only; the captions once, apart
                image_features = view(batch["images"], batch["index"], device)
                _, text_features, _ = model(None, host_to_device(batch["tokens"], device))
            else:
                noise = _image_noise(model, batch["index"], mask_ratio, mask_seed, device)
                image_features, text_features, _ = model(host_to_device(batch["images"], device),
                                                         host_to_device(batch["tokens"], device), noise)
            valid = batch["valid"].to(device)
            images.append(image_features.float()[valid])
            texts.append(text_features.float()[valid])
            keys.append(batch["caption_keys"].to(device)[valid])
    embed_dim = arch.embed_dim
    mine_images = torch.cat(images) if images else torch.zeros(0, embed_dim, device=device)
    mine_texts = torch.cat(texts) if texts else torch.zeros(0, embed_dim, device=device)
    mine_keys = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.long, device=device)
    # Gather the gallery: ranks hold different counts, so pad to the largest and mask.
    count = mine_keys.shape[0]
    largest = int(group.max_(torch.tensor([count], device=device)).item())

    def padded(tensor, value):
        out = torch.full((largest, *tensor.shape[1:]), value, dtype=tensor.dtype, device=device)
        out[:count] = tensor
        return group.all_gather(out)

    all_images, all_texts = padded(mine_images, 0.0), padded(mine_texts, 0.0)
    all_keys = padded(mine_keys, -1)
    all_valid = padded(torch.ones(count, dtype=torch.bool, device=device), False)
    i2t = retrieval_hits(mine_images, mine_keys, all_texts, all_keys, ks, all_valid)
    t2i = retrieval_hits(mine_texts, mine_keys, all_images, all_keys, ks, all_valid)
    totals = group.sum_(torch.tensor([count] + [i2t[k] for k in ks] + [t2i[k] for k in ks],
                                     dtype=torch.float64, device=device)).tolist()
    samples = int(totals[0])
    if samples == 0:
        raise ValueError("retrieval evaluation saw no image-caption pairs: check eval.retrieval_shards / --retrieval")
    return {
        "image_to_text": {k: totals[1 + i] / samples for i, k in enumerate(ks)},
        "text_to_image": {k: totals[1 + len(ks) + i] / samples for i, k in enumerate(ks)},
        "samples": samples,
    }


# ----------------------------------------------------------------------------- configured evaluations


def run_zero_shot(model, tokenizer, eval_cfg, data_cfg, image_size: int, device, group: Optional[EvalGroup] = None,
                  mask_ratio: Optional[float] = None, mask_seed: int = 0,
                  dataset: Optional[ClassificationSet] = None, masked_views: int = 0) -> Optional[dict]:
    """The configured zero-shot evaluation (`eval.zero_shot_shards`: shards or an image folder), or
    None when no dataset is configured."""
    if dataset is None:
        if not eval_cfg.zero_shot_shards:
            return None
        dataset = open_classification(eval_cfg.zero_shot_shards, eval_cfg.classnames)
    group = group or EvalGroup()
    templates = load_templates(eval_cfg.templates)
    classifier = build_zero_shot_classifier(model, tokenizer, dataset.classnames, templates, device,
                                            eval_cfg.batch_size, group)
    batches = dataset.batches(image_size, data_cfg, eval_cfg.batch_size, group.rank, group.size)
    result = zero_shot_accuracy(model, classifier, batches, device, eval_cfg.max_samples, group,
                                eval_cfg.batch_size, mask_ratio, mask_seed, total=len(dataset.items) if dataset.items is not None else None,
                                masked_views=masked_views, masked_view_ratio=getattr(eval_cfg, "masked_view_ratio", 0.0))
    result["classes"] = len(dataset.classnames)
    result["chance"] = 1.0 / len(dataset.classnames)
    return result


def run_retrieval(model, tokenizer, eval_cfg, data_cfg, image_size: int, device, group: Optional[EvalGroup] = None,
                  mask_ratio: Optional[float] = None, mask_seed: int = 0, masked_views: int = 0) -> Optional[dict]:
    """The configured retrieval evaluation (`eval.retrieval_shards`), or None when there is none."""
    if not getattr(eval_cfg, "retrieval_shards", ""):
        return None
    group = group or EvalGroup()
    loader = caption_batches(eval_cfg.retrieval_shards, image_size, data_cfg, tokenizer, eval_cfg.batch_size,
                             group.rank, group.size)
    return retrieval_recall(model, loader, device, eval_cfg.batch_size, eval_cfg.max_samples, group,
                            mask_ratio=mask_ratio, mask_seed=mask_seed, masked_views=masked_views,
                            masked_view_ratio=getattr(eval_cfg, "masked_view_ratio", 0.0))


def run_evaluation(model, tokenizer, cfg, device, group: Optional[EvalGroup] = None,
                   mask_ratio: Optional[float] = None, mask_seed: int = 0) -> dict:
    """Every evaluation the config asks for: {"zero_shot": {...}, "retrieval": {...}} (absent when
    not configured), and with `eval.masked_views` N (and no `mask_ratio`) the same under
    "masked_views_N" for the ensemble of N masked views. Collective: every rank of the model calls it."""
    image_size = _arch(model).image_size
    views = getattr(cfg.eval, "masked_views", 0) if not mask_ratio else 0
    results = {}
    for name, masked_views in (("", 0), (f"masked_views_{views}", views)):
        if name and not views:
            continue
        part = {}
        zero_shot = run_zero_shot(model, tokenizer, cfg.eval, cfg.data, image_size, device, group, mask_ratio, mask_seed,
                                  masked_views=masked_views)
        if zero_shot is not None:
            part["zero_shot"] = zero_shot
        retrieval = run_retrieval(model, tokenizer, cfg.eval, cfg.data, image_size, device, group, mask_ratio,
                                  mask_seed, masked_views=masked_views)
        if retrieval is not None:
            part["retrieval"] = retrieval
        if not name:
            results.update(part)
        elif part:
            results[name] = part
    return results


def log_values(results: dict) -> dict:
    """Flat scalars of `run_evaluation`'s results, for eval.jsonl and tensorboard; a masked-view
    ensemble's under its name: `masked_views_N/zero_shot_top1`."""
    values = {}
    for name, part in results.items():
        if name.startswith("masked_views_"):
            values.update({f"{name}/{key}": value for key, value in log_values(part).items()})
    if "zero_shot" in results:
        zs = results["zero_shot"]
        values.update(zero_shot_top1=zs["top1"], zero_shot_top5=zs["top5"], samples=zs["samples"], classes=zs["classes"])
    if "retrieval" in results:
        rt = results["retrieval"]
        for direction, short in (("image_to_text", "i2t"), ("text_to_image", "t2i")):
            for k, value in rt[direction].items():
                values[f"retrieval_{short}_r{k}"] = value
        values["retrieval_samples"] = rt["samples"]
    return values


def describe(results: dict) -> str:
    """One line of `run_evaluation`'s results."""
    parts = []
    if "zero_shot" in results:
        zs = results["zero_shot"]
        parts.append(f"zero-shot top-1 {100 * zs['top1']:.1f}%, top-5 {100 * zs['top5']:.1f}% on {zs['samples']} images, "
                     f"{zs['classes']} classes (chance {100 * zs['chance']:.1f}%)")
    if "retrieval" in results:
        rt = results["retrieval"]
        for direction, name in (("image_to_text", "image->text"), ("text_to_image", "text->image")):
            recalls = ", ".join(f"R@{k} {100 * v:.1f}%" for k, v in rt[direction].items())
            parts.append(f"{name} {recalls}")
        parts[-1] += f" on {rt['samples']} pairs"
    for name, part in results.items():
        if name.startswith("masked_views_"):
            parts.append(f"ensemble of {name[len('masked_views_'):]} masked views: {describe(part)}")
    return "; ".join(parts) if parts else "nothing to evaluate (no eval.zero_shot_shards or eval.retrieval_shards)"
