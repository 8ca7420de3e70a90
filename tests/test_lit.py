"""Locked towers (LiT): which parameters are frozen (against OpenCLIP's own lock_image_tower /
lock_text_tower on the exported model), that they receive no gradient, no optimizer state and stay
bitwise unchanged through the trainer's engine, that dp_shard=2 (FSDP2) and tp=2 train a partly
locked model as one process does, that the per-rank optimizer state shrinks by the frozen share
(FSDP2 and DeepSpeed ZeRO-1), and the config's refusals."""

from __future__ import annotations

import pytest
import torch

from flip_scale.config import (
    Config, ConfigError, ModelConfig, OptimConfig, ParallelConfig, ScheduleConfig, TrainConfig, load_config, validate,
)
from flip_scale.models import build_model
from flip_scale.models.masking import masking_noise

TINY = dict(name="tiny", vocab_size=64, image_size=16, patch_size=4, vision_layers=3, text_layers=2)
GLOBAL_BATCH = 8
SEED = 0
STEPS = 2


def lit_config(parallel: dict | None = None, **model) -> Config:
    return validate(Config(
        train=TrainConfig(global_batch_size=GLOBAL_BATCH, seed=SEED, precision="fp32", device="cpu"),
        model=ModelConfig(mask_ratio=0.5, **{**TINY, **model}),
        optim=OptimConfig(lr=1e-3, grad_clip=1.0, weight_decay=0.1, eps=1e-6),
        schedule=ScheduleConfig(name="constant"), parallel=ParallelConfig(**(parallel or {})),
    ))


def batch(step: int):
    generator = torch.Generator().manual_seed(1000 + step)
    images = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=generator)
    tokens = torch.randint(1, 64, (GLOBAL_BATCH, 32), generator=generator)
    return images, tokens, masking_noise(SEED, step, torch.arange(GLOBAL_BATCH), 16)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def train_engine(cfg: Config, world_size: int) -> dict:
    """STEPS steps of the trainer's engine on this rank's data-parallel rows: the global losses, the
    first step's full gradients (None: no gradient), every parameter before and after, and this
    rank's optimizer-state bytes."""
    import torch.distributed as dist

    from flip_scale.engine import build_engine
    from flip_scale.parallel.utils import optimizer_state_bytes
    from flip_scale.preflight import plan_run

    engine = build_engine(cfg, plan_run(cfg, world_size, training=False), torch.device("cpu"))
    dims = engine.dims
    local = GLOBAL_BATCH // dims.dp_size
    rows = slice(dims.dp_rank * local, (dims.dp_rank + 1) * local)

    def params() -> dict:
        if engine.name == "deepspeed":
            return {k: v.reshape(()) if k == "logit_scale" else v for k, v in engine.full_parameters().items()}
        return {n: _full(p) for part in engine.model_parts for n, p in part.named_parameters()}

    before, losses, grads = params(), [], {}
    for step in range(STEPS):
        engine.train()
        loss = engine.forward_backward(*(t[rows] for t in batch(step))).detach().clone()
        if step == 0 and engine.name != "deepspeed":
            grads = {n: None if p.grad is None else _full(p.grad)
                     for part in engine.model_parts for n, p in part.named_parameters()}
        engine.clip_and_step()
        if dims.dp_group is not None:
            dist.all_reduce(loss, group=dims.dp_group)
            loss /= dims.dp_size
        losses.append(loss.item())
    if engine.name == "deepspeed":
        state_bytes = engine.optimizer_state_bytes()
    else:
        state_bytes = sum(optimizer_state_bytes(o) for o in engine.optimizers.optimizers)
    out = {"losses": losses, "grads": grads, "before": before, "after": params(), "state_bytes": state_bytes}
    engine.close()
    return out


# ----------------------------------------------------------------------------- which parameters


@pytest.mark.parametrize("family", [{}, dict(vision_pos_embed="learned", vision_ln_pre=True)])
@pytest.mark.parametrize("tower, unlocked", [("vision", 0), ("vision", 1), ("vision", 2), ("vision", 4),
                                             ("vision", 9), ("text", 0), ("text", 2), ("text", 3)])
def test_frozen_parameters_are_openclips(tower, unlocked, family):
    """The same parameters are trainable as OpenCLIP's lock_image_tower(unlocked_groups) /
    lock_text_tower(unlocked_layers) leave trainable on the exported model (names mapped by the
    converter's table); also with OpenCLIP's learned position table and ln_pre (its first group)."""
    open_clip = pytest.importorskip("open_clip")
    from flip_scale.convert.openclip import key_pairs
    from flip_scale.convert.openclip_config import openclip_model_config

    keys = {"vision": ("lock_vision", "lock_vision_unlocked_blocks"), "text": ("lock_text", "lock_text_unlocked_layers")}
    lock, count = keys[tower]
    cfg = lit_config(**{lock: True, count: unlocked}, **family)
    ours = build_model(cfg.model, device="meta")
    oc_model = open_clip.model.CLIP(**openclip_model_config(cfg.model))
    if tower == "vision":
        oc_model.lock_image_tower(unlocked_groups=unlocked)
    else:
        oc_model.lock_text_tower(unlocked_layers=unlocked)
    oc_params = dict(oc_model.named_parameters())
    trainable_ours = {name for name, p in ours.named_parameters() if p.requires_grad}
    trainable_theirs = {pair.flip for pair in key_pairs(ours.arch, cfg.model)
                        if pair.flip is not None and oc_params[pair.openclip].requires_grad}
    assert trainable_ours == trainable_theirs
    layers = ours.arch.vision.layers if tower == "vision" else ours.arch.text.layers
    assert any(not p.requires_grad for p in ours.parameters()) == (unlocked < layers + 2)


def test_norm_flags_keep_the_unlocked_layernorms_frozen():
    model = build_model(lit_config(lock_vision=True, lock_vision_unlocked_blocks=2, lock_vision_norm=True,
                                   lock_text=False).model, device="meta")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad and name.startswith("visual")}
    assert trainable == {"visual.proj.weight"} | {f"visual.blocks.2.{m}.{leaf}" for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
                                                  for leaf in ("weight", "bias")}


def test_lock_keys_are_checked():
    with pytest.raises(ConfigError, match="model.lock_vision_unlocked_blocks: set, but model.lock_vision is false"):
        load_config(None, ["model.lock_vision_unlocked_blocks=2"])
    with pytest.raises(ConfigError, match="model.lock_text_freeze_layer_norm: set, but model.lock_text is false"):
        load_config(None, ["model.lock_text_freeze_layer_norm=true"])
    with pytest.raises(ConfigError, match="model.lock_vision_unlocked_blocks: must be 0"):
        load_config(None, ["model.lock_vision=true", "model.lock_vision_unlocked_blocks=-1"])
    with pytest.raises(ConfigError, match="both towers wholly frozen"):
        load_config(None, ["model.lock_vision=true", "model.lock_text=true"])


# ----------------------------------------------------------------------------- training


def test_a_locked_tower_gets_no_gradient_no_state_and_stays_bitwise():
    """lock_vision (whole tower) through the engine on one process: no image parameter has a
    gradient or optimizer state, and all of them are bitwise unchanged after the steps; the text
    tower and the temperature train. The frozen tower runs without an autograd graph."""
    from flip_scale.engine import build_engine
    from flip_scale.preflight import plan_run

    cfg = lit_config(lock_vision=True)
    result = train_engine(cfg, 1)
    for name, grad in result["grads"].items():
        if name.startswith("visual."):
            assert grad is None, name
            assert torch.equal(result["after"][name], result["before"][name]), name
        else:
            assert grad is not None and grad.abs().max() > 0, name
            assert not torch.equal(result["after"][name], result["before"][name]), name
    engine = build_engine(cfg, plan_run(cfg, 1, training=False), torch.device("cpu"))
    model = engine.model_parts[0]
    images, tokens, noise = batch(0)
    image_features, text_features, _ = model(images, tokens, noise)
    assert image_features.grad_fn is None and text_features.grad_fn is not None  # no graph, no activations
    held = {id(p) for group in engine.optimizers.optimizers[0].param_groups for p in group["params"]}
    assert not any(id(p) in held for p in model.visual.parameters())
    engine.close()


@pytest.mark.parametrize("locked", [dict(lock_vision=True), dict(lock_text=True)])
def test_a_locked_tower_under_the_exact_feature_cache_equals_one_micro_batch(locked):
    """optim.grad_accum_steps=2 (the exact feature cache: embeddings first, then each micro-batch
    again with its slice of the gradients) with a wholly locked tower, whose features carry no
    graph: the same losses, gradients and weights as one micro-batch."""
    import dataclasses

    one = train_engine(lit_config(**locked), 1)
    cfg = lit_config(**locked)
    two = train_engine(dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, grad_accum_steps=2)), 1)
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    for name, grad in one["grads"].items():
        if grad is None:
            assert two["grads"][name] is None, name
        else:
            torch.testing.assert_close(two["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
        # Adam divides near-zero gradients by their own size: float noise of 1e-7 in them moves a
        # weight by up to a tenth of a step (lr 1e-3); the gradients above are the tight check.
        torch.testing.assert_close(two["after"][name], one["after"][name], rtol=0, atol=1e-4, msg=name)


def _layouts(rank: int, world_size: int, layouts: list) -> list:
    return [train_engine(lit_config(parallel, **model), world_size) for parallel, model in layouts]


PARTIAL = dict(lock_vision=True, lock_vision_unlocked_blocks=2)


def test_partly_locked_model_trains_alike_under_fsdp2_tp_and_pp():
    """lock_vision with the last block, ln_post and the projection unlocked (frozen and trainable
    parameters side by side in FSDP2's groups): dp_shard=2, tp=2 and pp=2 against one process; and the
    per-rank optimizer state of dp_shard=2 shrinks by the frozen share."""
    from dist_utils import run_distributed

    reference = train_engine(lit_config(**PARTIAL), 1)
    layouts = [(dict(dp_shard=2), PARTIAL), (dict(tp=2, dp_shard=1), PARTIAL), (dict(dp_shard=2), {}),
               (dict(pp=2, dp_shard=1, microbatches=2), PARTIAL)]
    results = run_distributed(_layouts, 2, args=(layouts,), timeout=300)
    # Pipeline stages hold disjoint parameters: the two ranks' results together are the model's.
    staged = {key: {**results[0][3][key], **results[1][3][key]} for key in ("grads", "before", "after")}
    staged["losses"] = results[0][3]["losses"]
    for layout, got in ((layouts[0][0], results[0][0]), (layouts[1][0], results[0][1]), (layouts[3][0], staged)):
        assert set(got["grads"]) == set(reference["grads"]), layout
        assert max(abs(a - b) for a, b in zip(got["losses"], reference["losses"])) < 1e-5, layout
        for name, want in reference["grads"].items():
            if want is None:
                assert got["grads"][name] is None, (layout, name)
                assert torch.equal(got["after"][name], reference["before"][name]), (layout, name)
            else:
                diff = (got["grads"][name] - want).abs().max() / want.abs().max()
                assert diff < 1e-4, (layout, name, float(diff))
        assert max((got["after"][k] - v).abs().max().item() for k, v in reference["after"].items()) < 1e-4, layout
    # Per-rank optimizer state (Adam's two moments + step) against the same layout unlocked.
    model = build_model(lit_config(**PARTIAL).model, device="meta")
    share = sum(p.numel() for p in model.parameters() if p.requires_grad) / sum(p.numel() for p in model.parameters())
    for rank in range(2):
        ratio = results[rank][0]["state_bytes"] / results[rank][2]["state_bytes"]
        print(f"rank {rank}: optimizer state locked / unlocked = {ratio:.3f} (trainable share {share:.3f})")
        assert abs(ratio - share) < 0.02, (ratio, share)


def _deepspeed(rank: int, world_size: int) -> list:
    return [train_engine(lit_config(dict(engine="deepspeed", zero_stage=1), **model), world_size)
            for model in (dict(lock_vision=True), {})]


@pytest.mark.slow
def test_deepspeed_zero1_excludes_the_frozen_tower():
    """ZeRO-1, 2 ranks: the per-rank optimizer state (fp32 master partition + moments) shrinks by
    the frozen share, and the locked tower is bitwise unchanged."""
    pytest.importorskip("deepspeed")
    from dist_utils import run_distributed

    results = run_distributed(_deepspeed, 2, timeout=500)
    model = build_model(lit_config(lock_vision=True).model, device="meta")
    share = sum(p.numel() for p in model.parameters() if p.requires_grad) / sum(p.numel() for p in model.parameters())
    for rank in range(2):
        locked, unlocked = results[rank]
        ratio = locked["state_bytes"] / unlocked["state_bytes"]
        print(f"ZeRO-1 rank {rank}: optimizer state locked / unlocked = {ratio:.3f} (trainable share {share:.3f})")
        assert abs(ratio - share) < 0.05, (ratio, share)
        for name, value in locked["before"].items():
            if name.startswith("visual."):
                assert torch.equal(locked["after"][name], value), name
            elif name.startswith("text.") and value.numel() > 1:
                assert not torch.equal(locked["after"][name], value), name


# ----------------------------------------------------------------------------- exact resume


def test_exact_resume_with_a_locked_tower_and_the_sigmoid_loss(tmp_path, synthetic_dir):
    """flip-train with lock_vision (projection unlocked) and loss.kind sigmoid: stopped after the
    checkpoint of step 2 and resumed, steps 3-4 have bitwise the losses of an uninterrupted run
    (the bias, the optimizer state of the trainable share and the frozen weights all come back)."""
    import pytest as _pytest
    from test_checkpoint import _losses, _overrides, _Stop, _stop_after_save, _train

    args = _overrides(synthetic_dir, 4, 2, 0, "model.lock_vision=true", "model.lock_vision_unlocked_blocks=1",
                      "loss.kind=sigmoid", "model.vision_layers=2", "model.text_layers=2")
    _train(tmp_path / "reference", args)
    reference = _losses(tmp_path / "reference")
    with _stop_after_save(2), _pytest.raises(_Stop):
        _train(tmp_path / "run", args)
    _train(tmp_path / "run", args, resume="auto")
    resumed = _losses(tmp_path / "run")
    assert sorted(reference) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])
    assert len(set(reference.values())) == 4  # it trains
