"""The GPU path's set-up, checked where no GPU is: fp32 logits under bf16 autocast, the
deterministic mode's environment, the process-group backend that takes offloaded (CPU) gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flip_scale import loss as loss_module


def test_logits_are_fp32_under_bf16_autocast(monkeypatch):
    seen = []
    cross_entropy = F.cross_entropy

    def spy(logits, labels, *args, **kwargs):
        seen.append(logits.dtype)
        return cross_entropy(logits, labels, *args, **kwargs)

    monkeypatch.setattr(loss_module.F, "cross_entropy", spy)
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(4, 8, generator=generator), dim=-1).bfloat16()
    text = F.normalize(torch.randn(4, 8, generator=generator), dim=-1).bfloat16()
    scale = torch.tensor(4.6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # Under autocast a plain matmul of fp32 tensors is bf16: the case the loss must escape.
        assert (image.float() @ text.float().t()).dtype == torch.bfloat16
        value = loss_module.ContrastiveLoss()(image, text, scale)
    assert seen == [torch.float32, torch.float32]
    assert value.dtype == torch.float32
    exact = loss_module.contrastive_loss_rows(image.double(), text.double(), image.double(), text.double(),
                                              scale.double(), 0)
    assert abs(value.item() - exact.item()) < 1e-5
