"""AdamW groups, the warmup + cosine schedule, the fused-kernel choice (apex only when it is NVIDIA's
and usable), and a bf16 training step on the CPU."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from flip_scale import optim
from flip_scale.config import load_config
from flip_scale.distributed import ProcessInfo
from flip_scale.models import build_model


def _cfg(*overrides):
    return load_config(None, ["model.vocab_size=64", *overrides])


def test_decay_groups_follow_the_paper():
    """Matrices decay; biases, norm scales, position embeddings, CLS and the temperature do not."""
    cfg = _cfg("optim.weight_decay=0.2")
    model = build_model(cfg.model)
    decay, no_decay = optim.param_groups(model, cfg.optim.weight_decay)
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed and kept and not decayed & kept
    assert all(p.ndim >= 2 for p in decay["params"])
    for name in kept:
        assert name.endswith("bias") or "norm" in name or "ln" in name or any(
            key in name for key in optim.NO_DECAY_NAMES), name
    assert any("logit_scale" in name for name in kept)
    assert not any(key in name for name in decayed for key in optim.NO_DECAY_NAMES)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | kept == trainable


def test_linear_warmup_then_cosine_to_min_lr():
    cfg = _cfg("optim.lr=1.0", "schedule.warmup_steps=4", "train.max_steps=14", "schedule.min_lr=0.0")
    lrs = [optim.lr_at(step, cfg) for step in range(15)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    # Cosine over the 10 steps after warmup: half-way is half the peak, the end is min_lr.
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(0.5)
    assert lrs[14] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 10)))


def test_lr_scales_with_the_batch_when_not_given():
    cfg = _cfg("optim.lr=null", "optim.base_lr=4e-6", "train.global_batch_size=65536")
    assert optim.lr_at(10**9, _cfg("optim.lr=null", "schedule.warmup_steps=0", "schedule.name=constant",
                                    "optim.base_lr=4e-6", "train.global_batch_size=512")) == pytest.approx(8e-6)
    from flip_scale.config import effective_lr

    assert effective_lr(cfg) == pytest.approx(4e-6 * 256)


def _fake_apex(monkeypatch, with_optimizers: bool):
    """A module named `apex`: the unrelated PyPI toolkit has no `apex.optimizers`; NVIDIA's has."""
    apex = types.ModuleType("apex")
    monkeypatch.setitem(sys.modules, "apex", apex)
    if with_optimizers:
        made = []

        class FusedAdam(torch.optim.AdamW):
            def __init__(self, params, lr, betas, eps, adam_w_mode):
                assert adam_w_mode is True  # decoupled weight decay, as AdamW
                made.append(self)
                super().__init__(params, lr=lr, betas=betas, eps=eps)

        optimizers = types.ModuleType("apex.optimizers")
        optimizers.FusedAdam = FusedAdam
        apex.optimizers = optimizers
        monkeypatch.setitem(sys.modules, "apex.optimizers", optimizers)
        return made
    monkeypatch.delitem(sys.modules, "apex.optimizers", raising=False)
    return None


def test_an_apex_that_is_not_nvidias_is_never_used(monkeypatch):
    _fake_apex(monkeypatch, with_optimizers=False)
    assert not optim.nvidia_apex_available()
    model = nn.Linear(3, 3)
    opt = optim.build_optimizer(model, _cfg(), torch.device("cpu"))
    assert type(opt) is torch.optim.AdamW and opt.flip_kind.startswith("PyTorch AdamW")


def test_nvidia_apex_fused_adam_only_on_cuda_with_plain_parameters(monkeypatch):
    made = _fake_apex(monkeypatch, with_optimizers=True)
    assert optim.nvidia_apex_available()
    model = nn.Linear(3, 3)
    # CPU: PyTorch's AdamW whatever apex offers.
    assert not optim.apex_fused_adam_usable(model, torch.device("cpu"))
    assert optim.build_optimizer(model, _cfg(), torch.device("cpu")).flip_kind == "PyTorch AdamW (fused)"
    assert optim.build_optimizer(model, _cfg("optim.fused=false"), torch.device("cpu")).flip_kind == "PyTorch AdamW (foreach)"
    # A CUDA device with plain tensors: apex's FusedAdam in AdamW mode, the two groups kept.
    opt = optim.build_optimizer(model, _cfg("optim.weight_decay=0.2"), torch.device("cuda"))
    assert made == [opt] and opt.flip_kind.startswith("apex FusedAdam")
    assert [group["weight_decay"] for group in opt.param_groups] == [0.2, 0.0]
    # optim.fused=false asks for no fused kernel at all.
    opt = optim.build_optimizer(model, _cfg("optim.fused=false"), torch.device("cuda"))
    assert type(opt) is torch.optim.AdamW and len(made) == 1


def test_fused_adamw_on_cpu_steps_as_the_foreach_one():
    """The CPU default (PyTorch's fused kernel) against optim.fused=false (foreach): the same weights
    after a few steps with both groups, up to float rounding."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [optim.build_optimizer(m, _cfg("optim.weight_decay=0.1", f"optim.fused={f}"), torch.device("cpu"))
            for m, f in zip(models, ("auto", "false"))]
    assert [o.flip_kind for o in opts] == ["PyTorch AdamW (fused)", "PyTorch AdamW (foreach)"]
    for _ in range(3):
        x = torch.randn(5, 8)
        for model, opt in zip(models, opts):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_bf16_autocast_step_on_cpu(tmp_path: Path):
    """train.precision=bf16 runs the real step under CPU autocast: a finite loss, fp32 master weights
    that move, and the same loss as fp32 to bf16 precision."""
    from flip_scale.train import Trainer

    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = _cfg(f"train.precision={precision}", "train.global_batch_size=8", "logging.tensorboard=false",
                   "train.device=cpu", "model.mask_ratio=0.5")
        torch.manual_seed(0)
        trainer = Trainer(cfg, tmp_path / precision, ProcessInfo(0, 1, 0, torch.device("cpu")), with_data=False)
        assert trainer.precision == precision
        before = [p.detach().clone() for p in trainer.parameters()]
        generator = torch.Generator().manual_seed(1)
        arch = trainer.arch
        batch = {"images": torch.randn(8, 3, arch.image_size, arch.image_size, generator=generator),
                 "tokens": torch.randint(4, arch.vocab_size, (8, arch.context_length), generator=generator)}
        out = trainer.train_step(batch)
        loss = float(out["loss"])
        assert math.isfinite(loss) and math.isfinite(float(out["grad_norm"]))
        assert all(p.dtype == torch.float32 for p in trainer.parameters())
        assert any(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.parameters()))
        losses[precision] = loss
        trainer.close()
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)
    assert losses["bf16"] != losses["fp32"]  # autocast really ran in bf16


def test_mfu_peak_and_the_progress_line():
    from flip_scale.metrics import Progress, peak_tflops

    assert peak_tflops(torch.device("cpu")) is None
    assert peak_tflops(torch.device("cpu"), configured=100.0) == 100.0
    line = Progress(0, 10).line(5, {"loss": 1.0, "lr": 1e-3, "logit_scale": 14.3, "images_per_s": 50.0,
                                    "mfu": 0.412, "data_wait_fraction": 0.25})
    assert "MFU 41.2%" in line and "data 25%" in line and "ETA" in line


def test_a_non_finite_step_never_reaches_the_weights(tmp_path: Path):
    """A batch that makes the gradient NaN: the step is skipped (weights kept, the lr schedule moves
    on, counted); more than optim.max_nonfinite_steps in a row stop the run, weights intact."""
    from flip_scale.train import Trainer

    cfg = _cfg("train.global_batch_size=8", "logging.tensorboard=false", "train.device=cpu", "train.precision=fp32",
               "optim.max_nonfinite_steps=1", "optim.lr=1e-3", "schedule.warmup_steps=4")
    trainer = Trainer(cfg, tmp_path, ProcessInfo(0, 1, 0, torch.device("cpu")), with_data=False)
    arch = trainer.arch
    generator = torch.Generator().manual_seed(0)

    def batch(poisoned=False):
        images = torch.randn(8, 3, arch.image_size, arch.image_size, generator=generator)
        if poisoned:
            images[3] = float("nan")
        return {"images": images, "tokens": torch.randint(4, arch.vocab_size, (8, arch.context_length),
                                                          generator=generator)}

    def weights():
        return [p.detach().clone() for p in trainer.parameters()]

    def step(b):
        out = trainer.train_step(b)
        trainer.state.step += 1
        return out

    step(batch())
    before = weights()
    out = step(batch(poisoned=True))
    assert out.get("skipped_step") and not math.isfinite(float(out["grad_norm"]))
    assert all(torch.equal(a, b) for a, b in zip(before, weights()))  # untouched
    assert trainer.state.nonfinite_steps == 1
    assert trainer.optimizers.lr == pytest.approx(optim.lr_at(2, cfg))  # the schedule moved on
    assert not step(batch()).get("skipped_step")
    assert any(not torch.equal(a, b) for a, b in zip(before, weights()))
    # Two in a row is more than the one allowed: stop, with the weights of the last finite step.
    kept = weights()
    step(batch(poisoned=True))
    with pytest.raises(FloatingPointError, match=r"non-finite for 2 steps in a row, more than optim.max_nonfinite_steps=1"):
        step(batch(poisoned=True))
    assert all(torch.equal(a, b) for a, b in zip(kept, weights()))
    assert trainer.state.nonfinite_steps == 3
    trainer.close()
