"""Forward + backward of one global batch, with exact contrast under micro-batching.

The contrastive loss couples every sample of the global batch, so splitting the batch into
micro-batches (gradient accumulation) and contrasting each alone changes the math. The two-pass
feature cache keeps it exact:

  pass 1  embed every micro-batch without autograd, concatenate the embeddings;
          compute the loss on the whole batch and d(loss)/d(embeddings), d(loss)/d(log temperature);
  pass 2  re-run each micro-batch with autograd and back-propagate its slice of those gradients.

Both passes must see the same mask for a sample: the caller passes `mask_noise` (one row per
sample, a function of seed, step and the sample's global index), sliced here with the batch.
With one micro-batch it is a plain forward/backward.

The MAE reconstruction loss (loss.mae_weight > 0; models/decoder.py) is per sample: each
micro-batch's forward with autograd returns its mean, and `mae_weight x mean / micro-batches` is
back-propagated with that micro-batch (pass 2), so the sum over micro-batches is the mean of the
whole batch; pass 1 skips the decoder.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch


def _split(tensor: Optional[torch.Tensor], parts: int):
    if tensor is None:
        return [None] * parts
    return list(tensor.chunk(parts, dim=0))


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool):
    """Skip the data-parallel gradient reduction of all but the last micro-batch (FSDP2)."""
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is None or enabled:
        yield
        return
    setter(False)
    try:
        yield
    finally:
        setter(True)


def split_outputs(outputs) -> tuple:
    """(image features, text features, log temperature, reconstruction loss or None) of a model's output."""
    return (*outputs[:3], outputs[3] if len(outputs) > 3 else None)


def forward_backward(
    model: torch.nn.Module,
    loss_fn,
    images: torch.Tensor,
    tokens: torch.Tensor,
    mask_noise: Optional[torch.Tensor] = None,
    microbatches: int = 1,
    exact: bool = True,
    autocast=contextlib.nullcontext,
    reduce_every_microbatch: bool = False,
    mae_weight: float = 0.0,
    stats: Optional[dict] = None,
) -> torch.Tensor:
    """Accumulate the gradients of the loss over (images, tokens) into the model; return the loss.

    `loss_fn(image_features, text_features, log_temperature)` must do its own data-parallel gather.
    `exact=False` contrasts each micro-batch alone (cheaper, different math), averaging the losses.
    `reduce_every_microbatch`: FSDP2 reduce-scatters after every micro-batch's backward instead of
    holding unsharded gradients until the last (parallel.reduce_every_microbatch).
    `mae_weight` > 0: the model returns a reconstruction loss too, added with that weight; the
    batch's mean of it goes to `stats["mae_loss"]` (a detached tensor) when `stats` is given.
    """
    batch = images.shape[0]
    if microbatches < 1 or batch % microbatches:
        raise ValueError(f"a local batch of {batch} samples cannot be split into {microbatches} equal micro-batches")
    image_chunks, token_chunks, noise_chunks = _split(images, microbatches), _split(tokens, microbatches), _split(mask_noise, microbatches)

    if microbatches == 1 or not exact:
        total = torch.zeros((), device=images.device)
        mae_total = torch.zeros((), device=images.device)
        for index in range(microbatches):
            with gradient_sync(model, reduce_every_microbatch or index == microbatches - 1):
                with autocast():
                    image_features, text_features, log_scale, mae = split_outputs(
                        model(image_chunks[index], token_chunks[index], noise_chunks[index]))
                    loss = loss_fn(image_features, text_features, log_scale)
                    if mae is not None:
                        loss = loss + mae_weight * mae
                        mae_total += mae.detach() / microbatches
                    loss = loss / microbatches
                loss.backward()
            total += loss.detach()
        if stats is not None and mae_weight > 0:
            stats["mae_loss"] = mae_total
        return total

    # Pass 1: embeddings of the whole batch, no autograd graph kept.
    skip_decoder = {"reconstruct": False} if mae_weight > 0 else {}
    with torch.no_grad():
        image_parts, text_parts = [], []
        for index in range(microbatches):
            with autocast():
                image_features, text_features, log_scale = model(image_chunks[index], token_chunks[index],
                                                                 noise_chunks[index], **skip_decoder)
            image_parts.append(image_features)
            text_parts.append(text_features)
    image_all = torch.cat(image_parts).detach().requires_grad_(True)
    text_all = torch.cat(text_parts).detach().requires_grad_(True)
    log_scale = log_scale.detach().requires_grad_(True)
    with autocast():
        loss = loss_fn(image_all, text_all, log_scale)
    loss.backward()
    image_grads = image_all.grad.chunk(microbatches)
    text_grads = text_all.grad.chunk(microbatches)

    # Pass 2: re-run each micro-batch with autograd and push its slice of the cached gradients.
    mae_total = torch.zeros((), device=images.device)
    for index in range(microbatches):
        with gradient_sync(model, reduce_every_microbatch or index == microbatches - 1):
            with autocast():
                image_features, text_features, scale_out, mae = split_outputs(
                    model(image_chunks[index], token_chunks[index], noise_chunks[index]))
            outputs = [image_features, text_features]
            grads = [image_grads[index].to(image_features.dtype), text_grads[index].to(text_features.dtype)]
            if index == 0:  # the temperature's gradient enters once
                outputs.append(scale_out)
                grads.append(log_scale.grad.to(scale_out.dtype))
            if mae is not None:  # per sample: this micro-batch's share of the batch mean
                outputs.append(mae * (mae_weight / microbatches))
                grads.append(torch.ones_like(outputs[-1]))
                mae_total += mae.detach() / microbatches
            # A locked tower's features carry no graph (it runs under no_grad): nothing to push there.
            pairs = [(out, grad) for out, grad in zip(outputs, grads) if out.requires_grad]
            if pairs:
                torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
    if mae_weight > 0:
        if stats is not None:
            stats["mae_loss"] = mae_total
        return loss.detach() + mae_weight * mae_total
    return loss.detach()
