"""The arithmetic of zero-shot classification and retrieval, on features (no model, no data).

Ranks are counted, not sorted, so that the result is a pure function of the scores, whatever the
batch order or the parallel layout:

- classification: a sample is correct at k when fewer than k *other* classes score at least as
  high as its true class (a tie counts against the model: a model whose logits are all equal
  scores 0%, not 100%);
- retrieval: a query is a hit at k when fewer than k *wrong* gallery items score at least as high
  as its best-scoring right one. An image's right captions are the captions whose text equals its
  own caption (with one caption per image and no repeated caption text, that is its own caption
  only: the usual diagonal ground truth); a caption's right images are the images it was written
  for or whose caption reads the same. Captions repeated word for word across images (common in
  small synthetic sets) are thus one caption, not distinct items the model cannot tell apart.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F


def classifier_from_text_features(features: torch.Tensor) -> torch.Tensor:
    """[classes, templates, dim] prompt embeddings -> [dim, classes] classifier: per class, the
    re-normalised mean of its normalised prompt embeddings (CLIP's / OpenCLIP's recipe)."""
    if features.ndim != 3:
        raise ValueError(f"expected prompt features [classes, templates, dim], got shape {tuple(features.shape)}")
    return F.normalize(F.normalize(features.float(), dim=-1).mean(dim=1), dim=-1).t()


def correct_at_k(
    logits: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5), valid: Optional[torch.Tensor] = None
) -> dict[int, int]:
    """How many rows have their label among the k best classes, for each k (ties count against).

    logits [N, classes], labels [N]; `valid` [N] bool leaves out padding rows (their label is ignored).
    """
    if valid is None:
        valid = torch.ones_like(labels, dtype=torch.bool)
    safe = labels.clamp(min=0).unsqueeze(1)
    true = logits.gather(1, safe)
    others_above = (logits >= true).sum(dim=1) - 1
    # A non-finite true logit (a diverged model) is never correct.
    never = torch.full_like(others_above, torch.iinfo(others_above.dtype).max)
    others_above = torch.where(torch.isfinite(true.squeeze(1)), others_above, never)
    return {k: int(((others_above < k) & valid).sum()) for k in ks}


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the k highest logits, for each k."""
    return correct_at_k(logits, labels, ks)


def caption_key(text: str) -> int:
    """A 63-bit key of a caption's text: equal texts, equal keys, on every rank."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def retrieval_hits(
    queries: torch.Tensor,
    query_keys: torch.Tensor,
    gallery: torch.Tensor,
    gallery_keys: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    gallery_valid: Optional[torch.Tensor] = None,
    chunk: int = 1024,
) -> dict[int, int]:
    """How many queries find a right gallery item within their top k, for each k.

    queries [Q, D] with keys [Q]; gallery [G, D] with keys [G] (a gallery item is right for a query
    when the keys are equal); `gallery_valid` [G] leaves out padding. Queries are scored `chunk` at a
    time, so memory stays O(chunk x G).
    """
    if gallery_valid is None:
        gallery_valid = torch.ones_like(gallery_keys, dtype=torch.bool)
    hits = {k: 0 for k in ks}
    for start in range(0, queries.shape[0], chunk):
        scores = queries[start : start + chunk].float() @ gallery.float().t()
        right = (query_keys[start : start + chunk].unsqueeze(1) == gallery_keys.unsqueeze(0)) & gallery_valid
        best_right = scores.masked_fill(~right, float("-inf")).max(dim=1).values
        wrong_above = ((scores >= best_right.unsqueeze(1)) & ~right & gallery_valid).sum(dim=1)
        # No right item in the gallery (cannot happen for paired data) or a non-finite score: a miss.
        found = torch.isfinite(best_right)
        for k in ks:
            hits[k] += int(((wrong_above < k) & found).sum())
    return hits


def recall_at_k(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    captions: Optional[Sequence[str]] = None,
) -> dict:
    """Image->text and text->image recall@k (fractions) of N paired features, one process.

    Pair i is (image i, caption i); with `captions`, captions of equal text are one caption (module
    docstring). Returns {"image_to_text": {k: r}, "text_to_image": {k: r}, "samples": N}.
    """
    count = image_features.shape[0]
    if text_features.shape[0] != count:
        raise ValueError(f"{count} images but {text_features.shape[0]} captions; retrieval needs pairs")
    if captions is not None:
        keys = torch.tensor([caption_key(c) for c in captions], dtype=torch.long)
    else:
        keys = torch.arange(count)
    i2t = retrieval_hits(image_features, keys, text_features, keys, ks)
    t2i = retrieval_hits(text_features, keys, image_features, keys, ks)
    return {
        "image_to_text": {k: i2t[k] / count for k in ks},
        "text_to_image": {k: t2i[k] / count for k in ks},
        "samples": count,
    }
