"""The GPU path's set-up, checked where no GPU is: fp32 logits under bf16 autocast, the
deterministic mode's environment, the process-group backend that takes offloaded (CPU) gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flip_scale import loss as loss_module
from flip_scale import runtime


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


def _deterministic_off():
    torch.use_deterministic_algorithms(False)


def test_deterministic_setup_without_cuda_sets_no_variable(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    env = {}
    try:
        assert runtime.configure_determinism(True, "auto", env) == {}
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        _deterministic_off()
    assert env == {}
    assert runtime.configure_determinism(False, "auto", env) == {} and not torch.are_deterministic_algorithms_enabled()


def test_deterministic_setup_with_cuda_sets_the_cublas_workspace(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # nothing below touches the device
    try:
        env = {}
        assert runtime.configure_determinism(True, "auto", env) == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
        assert env == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
        env = {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}  # the user's value is kept
        assert runtime.configure_determinism(True, "cuda", env) == {} and env["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
        env = {}
        assert runtime.configure_determinism(True, "cpu", env) == {} and env == {}  # train.device=cpu
    finally:
        _deterministic_off()
