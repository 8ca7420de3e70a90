"""The losses over the global batch (symmetric InfoNCE; SigLIP's sigmoid); each owns its gather.

Each rank gathers the features of every data-parallel rank *with* gradient, then computes only
its own rows of the global logit matrix (local loss): image rows against all texts and text rows
against all images. The mean of the ranks' losses is the one-process loss over the global batch,
and with gradients averaged over data-parallel ranks (as FSDP/DDP do) the gradients are equal too:
the gather's backward sums every rank's contribution back onto the features that produced it.
The group is that of the data-parallel ranks only: tensor- and pipeline-parallel ranks of one
replica hold the same samples and must never be gathered over.

The sigmoid loss (SigLIP) is the same local-loss form: this rank's image rows against every text
of the global batch, B_local x B pairs, each pair once over the ranks. Its memory per rank is the
gathered text features (B x D) and that logit block; big_vision's ring exchange of text chunks
would hold B/dp x D at a time instead, but the B x D gather is of the order of the logit block and
small beside the activations (docs/design.md section 5, "Sigmoid loss"), so the gather form is the one built.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


# The collectives under their new names where torch has them, else the old ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward: reduce-scatter, so each rank gets the sum of every rank's
    gradient for its own rows. (torch.distributed.nn.functional.all_gather's backward on gloo
    mistakes group ranks for global ranks and fails on any group but the world.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // dist.get_world_size(ctx.group), *grad.shape[1:]))
        _reduce_scatter_single(out, grad, group=ctx.group)
        return out, None


def gather_with_grad(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Concatenate `x` of every rank of `group` along dim 0; the backward sums the gradients."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _GatherWithGrad.apply(x, group)


def contrastive_loss_rows(
    image_local: torch.Tensor,
    text_local: torch.Tensor,
    image_all: torch.Tensor,
    text_all: torch.Tensor,
    logit_scale: torch.Tensor,
    row_offset: int,
) -> torch.Tensor:
    """Mean symmetric cross-entropy of the local rows; positives sit at `row_offset + i`.

    The logits are fp32 whatever the caller's autocast: a matmul under bf16 autocast runs in bf16
    even on fp32 inputs, and at logit scale 100 a bf16 logit moves in steps of 0.5."""
    with torch.autocast(device_type=image_local.device.type, enabled=False):
        scale = logit_scale.float().exp()
        logits_image = scale * image_local.float() @ text_all.float().t()
        logits_text = scale * text_local.float() @ image_all.float().t()
        labels = torch.arange(image_local.shape[0], device=image_local.device) + row_offset
        return 0.5 * (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels))


class ContrastiveLoss(nn.Module):
    """loss(image_features, text_features, logit_scale) with features [B_local, D], L2-normalised.

    `logit_scale` is the log-temperature parameter (the loss takes its exp). With `group` set, the
    global batch is the concatenation of the local batches of the group's ranks in rank order; all
    ranks must hold the same number of samples.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        self.group = group

    def forward(self, image_features, text_features, logit_scale):
        image_all = gather_with_grad(image_features, self.group)
        text_all = gather_with_grad(text_features, self.group)
        rank = dist.get_rank(self.group) if self.group is not None else 0
        offset = rank * image_features.shape[0]
        return contrastive_loss_rows(image_features, text_features, image_all, text_all, logit_scale, offset)


def split_loss_parameters(params: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(log temperature, bias or None) of the model's third output: the temperature alone (shape ()
    or (1,)), or [log temperature, bias] (shape (2,), or (1, 2) as a pipeline's row)."""
    if params.numel() == 2:
        flat = params.reshape(2)
        return flat[0], flat[1]
    return params.reshape(()), None


def sigmoid_loss_rows(
    image_local: torch.Tensor,
    text_all: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    row_offset: int,
) -> torch.Tensor:
    """SigLIP's loss of the local image rows against every text, normalised by the local rows:
    -(1/B_local) sum_i sum_j log sigmoid(z_ij (exp(t) x_i.y_j + b)), z_ij = 1 on the positive pair
    (j = row_offset + i), -1 elsewhere. The mean over ranks is the paper's sum over the B x B pairs
    divided by B. fp32 logits whatever the autocast, as the contrastive loss."""
    with torch.autocast(device_type=image_local.device.type, enabled=False):
        logits = logit_scale.float().exp() * image_local.float() @ text_all.float().t() + logit_bias.float()
        rows = image_local.shape[0]
        signs = -torch.ones_like(logits)
        index = torch.arange(rows, device=logits.device)
        signs[index, index + row_offset] = 1.0
        return -F.logsigmoid(signs * logits).sum() / rows


class SigmoidLoss(nn.Module):
    """loss(image_features, text_features, loss_parameters), features [B_local, D] L2-normalised,
    `loss_parameters` the model's [log temperature, bias] (models.flip.loss_parameters). Only the
    text features are gathered: each rank's image rows meet every text, so each pair counts once."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        self.group = group

    def forward(self, image_features, text_features, loss_parameters):
        logit_scale, logit_bias = split_loss_parameters(loss_parameters)
        if logit_bias is None:
            raise ValueError("loss.kind sigmoid needs the model's logit bias (model.logit_bias_init is null: build the "
                             "model from a config with loss.kind=sigmoid)")
        text_all = gather_with_grad(text_features, self.group)
        rank = dist.get_rank(self.group) if self.group is not None else 0
        offset = rank * image_features.shape[0]
        return sigmoid_loss_rows(image_features, text_all, logit_scale, logit_bias, offset)


LOSSES = {"contrastive": ContrastiveLoss, "sigmoid": SigmoidLoss}


def build_loss(loss_cfg, group: Optional[dist.ProcessGroup] = None) -> nn.Module:
    if loss_cfg.kind not in LOSSES:
        raise ValueError(f"loss.kind: unknown loss '{loss_cfg.kind}'; valid: {', '.join(LOSSES)}")
    return LOSSES[loss_cfg.kind](group)
