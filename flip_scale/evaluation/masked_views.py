"""Masked-view ensemble at inference (`eval.masked_views`, `flip-eval --masked-views N`; FLIP Table 1d).

Each image is embedded N times, each time through the model's own masked path (the image tower keeps
`keep` of its L patches), and its embedding is the mean of the N views' embeddings. The views'
masks are complementary: view k keeps the k-th block of `keep` patches of a random permutation of
the patches, so with the default `keep = L // N` (`eval.masked_view_ratio` 0, i.e. 1 - 1/N) the
views are disjoint and, when N divides L, their union is the whole image. The permutation is the
argsort of `masking_noise(seed, 0, sample index)`, the noise of `flip-eval --masked` for the same
seed: a function of the image's place in the dataset, the same under every layout. A ratio below
1 - 1/N gives views that overlap (the blocks wrap around the permutation).

How the views are combined: each view's embedding is L2-normalised (as every embedding the model
returns), the N are averaged and the mean is normalised again, as the prompts of a zero-shot
classifier are ensembled. FLIP reports the ensemble (Table 1d) without saying more; with cosine
scores the final normalisation changes no ranking of a query, only makes the vectors comparable
as gallery items (text->image retrieval).

The model's masked path is asked for exactly the blocks: the noise of view k is each patch's place
in the permutation, rotated by k * keep, so a stable argsort puts view k's patches first, and the
image tower's mask ratio is set to one that keeps exactly `keep` (`masking.ratio_keeping`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import masking_noise, visible_count
from ..runtime import host_to_device


def view_keep_count(num_patches: int, views: int, ratio: float = 0.0) -> int:
    """Patches each of `views` views keeps: L // N by default, `visible_count(L, ratio)` if given."""
    if views < 2:
        raise ValueError(f"eval.masked_views: an ensemble needs at least 2 views, got {views}")
    if ratio:
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"eval.masked_view_ratio: {ratio} is outside (0, 1) (0: 1 - 1/masked_views)")
        return visible_count(num_patches, ratio)
    if num_patches < views:
        raise ValueError(f"eval.masked_views: {views} views of an image of {num_patches} patches leave a view empty")
    return num_patches // views


def view_noises(seed: int, sample_index: torch.Tensor, num_patches: int, views: int, keep: int) -> list:
    """[B, L] noise per view: a stable argsort of view k's puts patches perm[k*keep : (k+1)*keep]
    first (indices modulo L), perm being the sample's random permutation of its patches."""
    perm = masking_noise(seed, 0, sample_index.clamp(min=0), num_patches).argsort(dim=1, stable=True)
    places = torch.arange(num_patches, dtype=perm.dtype).expand_as(perm)
    rank = torch.empty_like(perm).scatter_(1, perm, places)  # rank[b, patch] = its place in perm[b]
    return [((rank - k * keep) % num_patches).to(torch.float32) / num_patches for k in range(views)]


def ensemble_image_features(model, images: torch.Tensor, noises: list) -> torch.Tensor:
    """The renormalised mean of the views' normalised image embeddings [B, embed_dim] (float32).
    The model's image tower must keep `keep` patches (runner: `evaluation_mode(model, ratio_keeping(L, keep))`);
    one forward per view, every rank alike (collective)."""
    device = images.device
    features = [model(images, None, host_to_device(noise, device))[0].float() for noise in noises]
    return F.normalize(torch.stack(features).mean(dim=0), dim=-1)
