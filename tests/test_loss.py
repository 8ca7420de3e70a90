"""The contrastive loss over data-parallel ranks equals one process holding the whole batch.

Each rank holds its slice of the global batch and a replica of the model; the loss gathers the
features over the data-parallel group with gradient and computes its own rows. With gradients
averaged over the ranks (as FSDP/DDP do), the loss (mean over ranks) and EVERY parameter gradient
equal those of one process on the whole batch (CPU, gloo, fp32). Masks come from each sample's
global index, so a sample is masked the same wherever it is processed.
"""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed
from flip_scale.config import ModelConfig
from flip_scale.loss import ContrastiveLoss, contrastive_loss_rows
from flip_scale.models import build_model, masking_noise

pytestmark = pytest.mark.slow

SEED = 0
STEP = 7
GLOBAL_BATCH = 8
LOSS_TOL = 1e-6
# fp32, per parameter: max |grad - reference| <= GRAD_RTOL x max |reference| + GRAD_ATOL (the atol
# covers the attention key biases, whose exact gradient is zero and computed one is rounding noise).
GRAD_RTOL = 1e-5
GRAD_ATOL = 1e-7


def tiny_model_config() -> ModelConfig:
    return ModelConfig(
        name="tiny", vocab_size=64, image_size=16, patch_size=4, context_length=8, mask_ratio=0.5,
        embed_dim=16, vision_width=32, vision_layers=2, vision_heads=4, vision_mlp_dim=64,
        text_width=32, text_layers=2, text_heads=4, text_mlp_dim=64,
    )


def global_batch():
    cfg = tiny_model_config()
    generator = torch.Generator().manual_seed(123)
    images = torch.randn(GLOBAL_BATCH, 3, cfg.image_size, cfg.image_size, generator=generator)
    tokens = torch.randint(1, cfg.vocab_size, (GLOBAL_BATCH, cfg.context_length), generator=generator)
    return images, tokens


def tiny_model():
    torch.manual_seed(SEED)
    return build_model(tiny_model_config(), device="cpu")


def local_loss_and_grads(model, group, dp_rank: int, dp_size: int):
    """Forward/backward of this rank's slice; -> (its local loss, its gradients)."""
    images, tokens = global_batch()
    local = GLOBAL_BATCH // dp_size
    index = torch.arange(dp_rank * local, (dp_rank + 1) * local)
    noise = masking_noise(SEED, STEP, index, model.visual.arch.num_patches)
    image_features, text_features, log_scale = model(images[index], tokens[index], noise)
    loss = ContrastiveLoss(group)(image_features, text_features, log_scale)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def _data_parallel(rank: int, world_size: int, replicas: int):
    """`replicas` copies of a data-parallel group of world_size / replicas ranks (ranks r, r+replicas, ...),
    like the tp ranks of one layout: every copy sees the same samples and must give the same numbers."""
    import torch.distributed as dist

    groups = [dist.new_group(list(range(start, world_size, replicas))) for start in range(replicas)]
    group = groups[rank % replicas]
    dp_rank, dp_size = dist.get_rank(group), dist.get_world_size(group)
    loss, grads = local_loss_and_grads(tiny_model(), group if replicas < world_size else None, dp_rank, dp_size)
    dist.all_reduce(loss, group=group)
    for grad in grads.values():
        dist.all_reduce(grad, group=group)
        grad.div_(dp_size)
    return (loss / dp_size).item(), grads


@pytest.fixture(scope="module")
def reference():
    model = tiny_model()
    loss, grads = local_loss_and_grads(model, None, 0, 1)
    return loss.item(), grads


def assert_equal_to_reference(results, reference, label):
    want_loss, want_grads = reference
    for rank, (loss, grads) in enumerate(results):
        assert abs(loss - want_loss) <= LOSS_TOL, f"{label}, rank {rank}: loss {loss} vs one process {want_loss}"
        assert set(grads) == set(want_grads)
        for name, want in want_grads.items():
            assert grads[name] is not None, f"{label}: {name} got no gradient"
            error = (grads[name] - want).abs().max().item()
            scale = want.abs().max().item()
            assert error <= GRAD_RTOL * scale + GRAD_ATOL, (
                f"{label}, rank {rank}: gradient of {name} differs by {error:.3g} (its largest entry: {scale:.3g})"
            )


@pytest.mark.parametrize("world_size", [2, 4])
def test_data_parallel_loss_and_every_gradient_equal_one_process(world_size, reference):
    results = run_distributed(_data_parallel, world_size, (1,))
    assert_equal_to_reference(results, reference, f"{world_size} ranks")
    # Both towers and the temperature get gradients (the comparison covers them all).
    for prefix in ("visual.", "text.", "logit_scale"):
        assert sum(g.abs().sum() for n, g in reference[1].items() if n.startswith(prefix)) > 0, prefix


def test_loss_gathers_over_a_subgroup_only(reference):
    # 4 ranks = 2 replicas x a data-parallel group of 2 ({0, 2} and {1, 3}), as under tp=2: the
    # loss must gather over its group and nothing else, whatever the ranks' global numbers.
    results = run_distributed(_data_parallel, 4, (2,))
    assert_equal_to_reference(results, reference, "2 groups of 2")


def test_local_rows_sum_to_the_global_loss():
    # No processes: the mean of each shard's rows is the whole-batch loss.
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(2.0)
    whole = contrastive_loss_rows(image, text, image, text, scale, 0)
    parts = [contrastive_loss_rows(image[i:i + 2], text[i:i + 2], image, text, scale, i) for i in range(0, 8, 2)]
    torch.testing.assert_close(torch.stack(parts).mean(), whole)
