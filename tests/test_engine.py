"""The engine seam and the run plan: what the trainer relies on, tested through the trainer's own
build (one process; the layouts' equality tests are in test_parallel.py / test_pipeline.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flip_scale.config import ConfigError, load_config
from flip_scale.distributed import ProcessInfo
from flip_scale.engine import Engine, StepResult, build_engine
from flip_scale.models import masking_noise
from flip_scale.parallel import LayoutError
from flip_scale.preflight import describe_plan, plan_run

CPU = ProcessInfo(0, 1, 0, torch.device("cpu"))


def _cfg(*overrides: str):
    return load_config(None, ["train.global_batch_size=8", "logging.tensorboard=false", "train.device=cpu",
                              "train.precision=fp32", *overrides])


def _batch(arch, rows: int, sample_index=None) -> dict:
    generator = torch.Generator().manual_seed(3)
    batch = {"images": torch.randn(rows, 3, arch.image_size, arch.image_size, generator=generator),
             "tokens": torch.randint(4, arch.vocab_size, (rows, arch.context_length), generator=generator)}
    if sample_index is not None:
        batch["sample_index"] = torch.tensor(sample_index)
    return batch


def test_the_mask_of_a_sample_comes_from_its_row_in_the_global_batch(tmp_path: Path, monkeypatch):
    """Trainer.train_step draws the noise from batch["sample_index"] (set by the loader), not from
    its own rank; a batch made by hand gets this rank's rows in order."""
    from flip_scale.train import Trainer

    trainer = Trainer(_cfg("model.mask_ratio=0.5"), tmp_path, CPU, with_data=False)
    seen = []

    def forward_backward(images, tokens, noise):
        seen.append(noise)
        return torch.zeros(())

    monkeypatch.setattr(trainer.engine, "forward_backward", forward_backward)
    monkeypatch.setattr(trainer.engine, "clip_and_step", lambda: StepResult(torch.tensor(1.0), 0.1))
    patches = trainer.arch.num_patches
    trainer.train_step(_batch(trainer.arch, 4, [12, 13, 14, 15]))
    assert torch.equal(seen[0], masking_noise(0, 0, torch.arange(12, 16), patches))
    trainer.train_step(_batch(trainer.arch, 4))
    assert torch.equal(seen[1], masking_noise(0, 0, torch.arange(0, 4), patches))
    trainer.close()


def test_native_engine_state_is_the_checkpoint_format(tmp_path: Path):
    """The native engine's checkpoint state is DCP's {"model", "optim"} (the on-disk format of every
    checkpoint so far), and loading it back restores the weights."""
    cfg = _cfg()
    engine = build_engine(cfg, plan_run(cfg, 1), "cpu")
    assert isinstance(engine, Engine) and engine.name == "fsdp" and engine.checkpoint_kind == "sharded"
    engine.train()
    batch = _batch(engine.arch, 8)
    loss = engine.forward_backward(batch["images"], batch["tokens"], None)
    result = engine.clip_and_step()
    assert torch.isfinite(loss) and not result.skipped and result.lr > 0 and torch.isfinite(result.grad_norm)
    state = engine.state_dict()
    assert sorted(state) == ["model", "optim"]
    assert "logit_scale" in state["model"] and any(key.startswith("state.") for key in state["optim"])
    saved = {k: v.detach().clone() for k, v in state["model"].items()}
    with torch.no_grad():
        for param in engine.parameters():
            param.zero_()
    engine.load_state_dict({"model": saved})
    assert all(torch.equal(v, saved[k]) for k, v in engine.state_dict()["model"].items())
    assert 0 < engine.logit_scale() <= 100


def test_a_non_finite_norm_skips_the_step_in_the_engine(tmp_path: Path):
    cfg = _cfg()
    engine = build_engine(cfg, plan_run(cfg, 1), "cpu")
    before = [p.detach().clone() for p in engine.parameters()]
    lr = engine.lr
    for param in engine.parameters():
        param.grad = torch.full_like(param, float("nan"))
    result = engine.clip_and_step()
    assert result.skipped and not torch.isfinite(result.grad_norm) and result.lr == lr
    assert all(torch.equal(a, b) for a, b in zip(before, engine.parameters()))
    assert all(p.grad is None for p in engine.parameters())  # dropped, not carried into the next step


def test_build_engine_names_the_valid_engines():
    cfg = _cfg()
    plan = plan_run(cfg, 1)
    cfg.parallel.engine = "megatron"
    with pytest.raises(ValueError, match="parallel.engine='megatron'.*valid: fsdp"):
        build_engine(cfg, plan, "cpu")


def test_plan_run_checks_once_for_training_and_evaluation():
    """The same checks for flip-train, --dry-run, flip-eval and the unmask tool; evaluation is not
    bound by the training batch."""
    cfg = _cfg("parallel.dp_shard=3", "train.global_batch_size=8")
    with pytest.raises(LayoutError, match="global_batch_size=8 is not divisible by the data-parallel size 3"):
        plan_run(cfg, 3)
    assert plan_run(cfg, 3, training=False).dims.dp_size == 3
    cfg = _cfg("data.streams=3")
    with pytest.raises(ConfigError, match="not divisible by data.streams=3"):
        plan_run(cfg, 1)
    cfg = _cfg("model.vocab_size=512")
    with pytest.raises(ConfigError, match="has 600 tokens but model.vocab_size is 512; set model.vocab_size=600"):
        plan_run(cfg, 1, tokenizer_vocab=600)
    # data.streams 0: chosen from the data (8 shards, global batch 8), the same under every layout
    plan = plan_run(_cfg("parallel.dp_shard=2", "model.mask_ratio=0.75"), 2, tokenizer_vocab=500)
    assert plan.local_batch == 4 and plan.streams == 8 and plan.visible_patches == plan.arch.num_patches // 4
    assert plan_run(_cfg(), 1, tokenizer_vocab=500).streams == 8
    text = describe_plan(plan)
    assert "data-parallel sizes 1, 2, 4, 8 draws these same batches" in text
    assert "batch: 8 = 2 data-parallel ranks x 4" in text and "fits model.vocab_size" in text
    assert f"{plan.visible_patches} of {plan.arch.num_patches} patches visible" in text


class _NeedsTwoArguments(Exception):
    def __init__(self, path, why):
        super().__init__(f"{path}: {why}")


def _rank0_error(rank: int, world_size: int) -> str:
    from flip_scale.runtime import on_rank0_for_all

    def compute():
        raise _NeedsTwoArguments("ckpt", "unreadable")

    try:
        on_rank0_for_all(compute)
    except Exception as error:  # noqa: BLE001 - the type is what is checked
        return f"{type(error).__name__}: {error}"
    return "no error"


def test_an_error_that_cannot_be_rebuilt_reaches_every_rank_alike():
    from dist_utils import run_distributed

    assert run_distributed(_rank0_error, 2) == ["RemoteError: on rank 0: _NeedsTwoArguments: ckpt: unreadable"] * 2
