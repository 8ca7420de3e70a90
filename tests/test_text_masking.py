"""Text masking (model.text_mask_ratio, model.text_masking; FLIP Table 1c): which tokens the text
tower sees, that the removed ones never enter it, its FLOPs, its noise, the layouts and resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flip_scale.config import ConfigError, ModelConfig, load_config
from flip_scale.models import build_model, masking_noise, sample_mask_noise, split_mask_noise
from flip_scale.models.flops import flops_for_config, flops_per_sample, measure_forward_flops
from flip_scale.models.masking import TEXT_STREAM
from flip_scale.models.registry import arch_from_config
from flip_scale.models.text_masking import TextMasking

TINY = dict(name="tiny", vocab_size=64, image_size=16, patch_size=4, context_length=8, mask_ratio=0.5,
            embed_dim=16, vision_width=32, vision_layers=2, vision_heads=4, vision_mlp_dim=64,
            text_width=32, text_layers=2, text_heads=4, text_mlp_dim=64)
GLOBAL_BATCH = 8
STEPS = 2
SEED = 0


def tiny_cfg(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, "text_mask_ratio": 0.5, **overrides})


def _tokens(rows: int, length: int, lengths, vocab: int = 64, seed: int = 5) -> torch.Tensor:
    """Captions of the given lengths (ids >= 1), right-padded with 0."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (rows, length), generator=generator)
    for row, n in enumerate(lengths):
        tokens[row, n:] = 0
    return tokens


def _tokens_seen(model, tokens, noise):
    """[B, K, width] input of the text tower's first block (what the encoder sees)."""
    seen = []
    handle = model.text.blocks["0"].register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[0]),
                                                              with_kwargs=True)
    try:
        model(None, tokens, noise)
    finally:
        handle.remove()
    return seen[0]


# ----------------------------------------------------------------------------- the mechanism


def test_prioritized_removes_padding_first_then_random_tokens():
    masking = TextMasking(0.5, "prioritized")
    tokens = _tokens(3, 8, [2, 5, 8])
    noise = masking_noise(SEED, 0, torch.arange(3), 8, TEXT_STREAM)
    keep = masking.keep_indices(tokens, noise, torch.zeros(3, dtype=torch.long))
    assert keep.shape == (3, 4)  # int(8 * 0.5)
    # 2 real tokens: both kept, then 2 pads; 5 real tokens: only real ones; 8: a random 4, token 0 among them.
    assert keep[0, :2].tolist() == [0, 1] and (tokens[0, keep[0, 2:]] == 0).all()
    assert (tokens[1, keep[1]] != 0).all() and keep[1].max() < 5
    assert keep[2, 0] == 0 and len(set(keep[2].tolist())) == 4
    for row in keep:  # sentence order
        assert row.tolist() == sorted(row.tolist())
    # random masking ignores padding: with this noise it keeps pads of the first caption beyond its 2 tokens
    random_keep = TextMasking(0.5, "random").keep_indices(tokens, noise, torch.zeros(3, dtype=torch.long))
    ranked = noise.clone()
    ranked[:, 0] = -1
    assert torch.equal(random_keep, ranked.argsort(dim=1, stable=True)[:, :4].sort(dim=1).values)
    assert not torch.equal(random_keep[1], keep[1])  # (random keeps a pad of caption 1 here)


def test_the_text_encoder_sees_only_the_kept_tokens_at_their_positions():
    model = build_model(tiny_cfg(text_masking="prioritized"))
    model.train()
    tokens = _tokens(4, 8, [3, 6, 8, 1])
    arch = model.arch
    noise = sample_mask_noise(SEED, 2, torch.arange(10, 14), arch.num_patches, arch.context_length)
    _, text_noise = split_mask_noise(noise, arch.num_patches, arch.context_length)
    seen = _tokens_seen(model, tokens, noise)
    assert seen.shape == (4, 4, 32)  # 4 of 8 tokens enter the blocks
    kept_tokens, positions = model.text.keep(tokens, text_noise)
    expected = model.text.token_embedding(kept_tokens) + model.text.pos_embed[positions]
    torch.testing.assert_close(seen, expected, rtol=0, atol=0)
    # The features are those of the short sequence through the blocks: nothing of the removed tokens.
    x = expected
    for block in model.text.blocks.values():
        x = block(x)
    by_hand = F.normalize(model.text.proj(model.text.ln_final(x)[:, 0]), dim=-1)
    _, text_features, _ = model(None, tokens, noise)
    torch.testing.assert_close(text_features, by_hand)
    changed = tokens.clone()
    removed = torch.ones_like(tokens, dtype=torch.bool).scatter(1, positions, False)
    changed[removed & (tokens != 0)] = 63  # another word at a removed place changes nothing
    torch.testing.assert_close(model(None, changed, noise)[1], text_features, rtol=0, atol=0)


def test_causal_text_keeps_its_end_of_text_token_and_pad_mask_applies():
    model = build_model(tiny_cfg(text_causal=True, text_pad_mask=True))
    model.train()
    tokens = _tokens(4, 8, [3, 6, 8, 5], seed=9)
    arch = model.arch
    for step in range(5):
        noise = sample_mask_noise(SEED, step, torch.arange(4), arch.num_patches, arch.context_length)
        kept, positions = model.text.keep(tokens, split_mask_noise(noise, arch.num_patches, 8)[1])
        eot = (tokens != 0).sum(dim=1) - 1
        assert (positions == eot[:, None]).any(dim=1).all(), (step, positions, eot)
        # the pooled (end-of-text) position of the kept tokens is the end-of-text token
        assert torch.equal(kept[torch.arange(4), model.text.pooled_position(kept)], tokens[torch.arange(4), eot])
        mask, _ = model.text.attention_mask(kept)
        assert mask.shape == (4, 1, 4, 4) and torch.equal(mask[:, 0, -1, :], (kept != 0))


def test_argmax_pooling_keeps_the_highest_id_token():
    # OpenCLIP's text pooling (model.text_pool: argmax) composes with text masking: the highest-id
    # (end-of-text) token is always kept and is the one pooled among the kept tokens.
    model = build_model(tiny_cfg(text_causal=True, text_pool="argmax"))
    model.train()
    tokens = _tokens(4, 8, [3, 6, 8, 5], vocab=60, seed=11)
    eot = torch.tensor([2, 5, 7, 4])
    tokens[torch.arange(4), eot] = 63  # the highest id of the vocabulary, as OpenCLIP's end-of-text
    arch = model.arch
    for step in range(5):
        noise = sample_mask_noise(SEED, step, torch.arange(4), arch.num_patches, arch.context_length)
        kept, positions = model.text.keep(tokens, split_mask_noise(noise, arch.num_patches, 8)[1])
        assert (positions == eot[:, None]).any(dim=1).all(), (step, positions)
        assert torch.equal(kept[torch.arange(4), model.text.pooled_position(kept)], torch.full((4,), 63))


def test_eval_never_masks_text():
    model = build_model(tiny_cfg(text_masking="prioritized"))
    tokens = _tokens(4, 8, [3, 6, 8, 1])
    arch = model.arch
    noise = sample_mask_noise(SEED, 0, torch.arange(4), arch.num_patches, arch.context_length)
    model.eval()
    assert _tokens_seen(model, tokens, noise).shape[1] == 8
    torch.testing.assert_close(model(None, tokens, noise)[1], model(None, tokens)[1], rtol=0, atol=0)
    model.train()
    assert _tokens_seen(model, tokens, noise).shape[1] == 4


def test_text_noise_is_its_own_stream_and_a_function_of_the_sample():
    index = torch.tensor([3, 17, 40])
    image = masking_noise(SEED, 4, index, 8)
    text = masking_noise(SEED, 4, index, 8, TEXT_STREAM)
    assert not torch.allclose(image, text)
    assert (image - text).abs().mean() > 0.1  # not a shifted copy
    assert torch.equal(text[1:2], masking_noise(SEED, 4, torch.tensor([17]), 8, TEXT_STREAM))  # per sample
    both = sample_mask_noise(SEED, 4, index, 16, 8)
    assert both.shape == (3, 24) and torch.equal(both[:, :16], masking_noise(SEED, 4, index, 16))
    assert torch.equal(both[:, 16:], text)
    assert sample_mask_noise(SEED, 4, index, 16).shape == (3, 16)  # no text masking: the image noise alone
    with pytest.raises(ValueError, match=r"\[B, 16\] \(image patches\) or \[B, 24\]"):
        split_mask_noise(torch.zeros(3, 20), 16, 8)


def test_config_refuses_bad_text_masking_values():
    with pytest.raises(ConfigError, match=r"model.text_mask_ratio: 1.0 is outside \[0, 1\)"):
        load_config(None, ["model.text_mask_ratio=1.0"])
    with pytest.raises(ConfigError, match="model.text_masking: 'padding' is not valid; choose one of random, prioritized"):
        load_config(None, ["model.text_masking=padding"])


# ----------------------------------------------------------------------------- FLOPs


def test_text_masking_flops_fall_as_counted_and_reported():
    from flip_scale.models.info import model_info

    cfg = tiny_cfg()
    arch = arch_from_config(cfg)
    full = flops_per_sample(arch, 0.5)
    half = flops_per_sample(arch, 0.5, text_mask_ratio=0.5)
    assert half["text_tokens"] == 4 and full["text_tokens"] == 8
    assert half["vision"] == full["vision"] and half["text"] < 0.55 * full["text"]
    assert flops_for_config(cfg, training=True)["text"] == 3 * half["text"]  # MFU counts the short text
    # The measured text tower forward (torch's flop counter, meta device) falls by the same amount.
    model = build_model(cfg, device="meta")
    model.train()
    tokens = torch.zeros(2, 8, dtype=torch.long, device="meta")
    noise = torch.zeros(2, arch.num_patches + 8, device="meta")
    measured_masked = measure_forward_flops(model, None, tokens, noise)
    model.eval()
    measured_full = measure_forward_flops(model, None, tokens)
    assert measured_full - measured_masked == 2 * (full["text"] - half["text"])
    info = model_info(cfg)
    assert info["text_tokens"] == 4 and info["text_masking"] == "random"
    assert info["gflops_fwd_text_saved"] == pytest.approx((full["text"] - half["text"]) / 1e9)
    assert info["gflops_fwd_text"] == pytest.approx(half["text"] / 1e9)


# ----------------------------------------------------------------------------- layouts (the trainer's build)


def _engine_config(model: ModelConfig, parallel: dict):
    from flip_scale.config import Config, OptimConfig, ParallelConfig, ScheduleConfig, TrainConfig

    return Config(
        train=TrainConfig(global_batch_size=GLOBAL_BATCH, seed=SEED, precision="fp32", device="cpu"),
        model=model, optim=OptimConfig(lr=1e-3, grad_clip=0.5, weight_decay=0.1, eps=1e-6),
        schedule=ScheduleConfig(name="constant"), parallel=ParallelConfig(**parallel),
    )


def _global_batch(step: int, arch):
    generator = torch.Generator().manual_seed(100 + step)
    images = torch.randn(GLOBAL_BATCH, 3, arch.image_size, arch.image_size, generator=generator)
    lengths = torch.randint(1, arch.context_length + 1, (GLOBAL_BATCH,), generator=generator).tolist()
    tokens = _tokens(GLOBAL_BATCH, arch.context_length, lengths, seed=200 + step)
    noise = sample_mask_noise(SEED, step, torch.arange(GLOBAL_BATCH), arch.num_patches, arch.context_length)
    return images, tokens, noise


def _full(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).clone()


def _train_engine(model_cfg: ModelConfig, parallel: dict, world_size: int) -> dict:
    """plan_run + build_engine (the trainer's build), its forward_backward and clip_and_step on this
    rank's data-parallel rows of each global batch: losses, norms and the first step's gradients."""
    import torch.distributed as dist

    from flip_scale.engine import build_engine
    from flip_scale.preflight import plan_run

    cfg = _engine_config(model_cfg, parallel)
    engine = build_engine(cfg, plan_run(cfg, world_size, training=False), torch.device("cpu"))
    dims = engine.dims
    arch = arch_from_config(model_cfg)
    local = GLOBAL_BATCH // dims.dp_size
    rows = slice(dims.dp_rank * local, (dims.dp_rank + 1) * local)
    losses, norms, grads = [], [], {}
    for step in range(STEPS):
        images, tokens, noise = (t[rows] for t in _global_batch(step, arch))
        engine.train()
        loss = engine.forward_backward(images, tokens, noise).detach().clone()
        if step == 0:
            grads = {name: _full(p.grad) for part in engine.model_parts for name, p in part.named_parameters()
                     if p.grad is not None}
        norms.append(float(engine.clip_and_step().grad_norm))
        if dims.dp_group is not None:
            dist.all_reduce(loss, group=dims.dp_group)
            loss /= dims.dp_size
        losses.append(loss.item())
    keep = dims.dp_rank == 0 and dims.tp_rank == 0
    engine.close()
    return {"losses": losses, "norms": norms, "grads": grads if keep else {}}


def _train_engines(rank: int, world_size: int, runs: list) -> list:
    return [_train_engine(model_cfg, parallel, world_size) for model_cfg, parallel in runs]


MODELS = {
    "random": tiny_cfg(vision_layers=4),
    "prioritized+causal+pad_mask": tiny_cfg(vision_layers=4, text_masking="prioritized", text_causal=True,
                                            text_pad_mask=True),
}
LAYOUTS = {
    "dp_shard=2": dict(dp_shard=2),
    "tp=2": dict(tp=2, dp_shard=1),
    "pp=2": dict(pp=2, dp_shard=1, microbatches=2),
}
RUNS = [("random", "dp_shard=2"), ("random", "tp=2"), ("random", "pp=2"), ("prioritized+causal+pad_mask", "pp=2"),
        ("prioritized+causal+pad_mask", "tp=2")]


@pytest.mark.slow
def test_text_masking_layouts_match_one_process():
    """dp_shard=2 (FSDP2), tp=2 (DTensor + sequence parallel over the shortened text) and pp=2 (the
    kept tokens travel between stages for the causal tower's pooling and pad mask) train like one
    process on the whole batch: losses, clipped norms, every gradient of step 1."""
    from dist_utils import run_distributed

    references = {name: _train_engine(MODELS[name], {}, 1) for name in MODELS}
    results = run_distributed(_train_engines, 2, args=([(MODELS[m], LAYOUTS[lay]) for m, lay in RUNS],), timeout=240)
    report = []
    for index, (model_name, layout) in enumerate(RUNS):
        reference = references[model_name]
        per_rank = [results[rank][index] for rank in range(2)]
        grads = {}
        for result in per_rank:
            grads.update(result["grads"])
        assert set(grads) == set(reference["grads"]), (model_name, layout)
        grad_diff = max((grads[k] - g).abs().max().item() / max(g.abs().max().item(), 1e-12)
                        for k, g in reference["grads"].items())
        loss_diff = max(abs(a - b) for r in per_rank for a, b in zip(r["losses"], reference["losses"]))
        norm_diff = max(abs(a - b) / b for r in per_rank for a, b in zip(r["norms"], reference["norms"]))
        report.append(f"{model_name} {layout}: loss {loss_diff:.1e}, grad {grad_diff:.1e}, norm {norm_diff:.1e}")
        assert loss_diff < 1e-5 and grad_diff < 1e-5 and norm_diff < 1e-5, report[-1]
    # The runs above were masked: an unmasked run of the same batches has another loss.
    unmasked = _train_engine(tiny_cfg(vision_layers=4, text_mask_ratio=0.0), {}, 1)
    assert abs(unmasked["losses"][0] - references["random"]["losses"][0]) > 1e-4
    print("\n".join(report))


# ----------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_text_masked_run_resumes_exactly(tmp_path: Path, synthetic_dir):
    """Stop after the checkpoint of step 2 of 4 and resume: steps 3-4 have bitwise the losses of the
    uninterrupted run (the text masks, like the image masks, come from (seed, step, sample row))."""
    from test_checkpoint import _losses, _overrides, _Stop, _stop_after_save, _train

    args = _overrides(synthetic_dir, 4, 2, 0, "model.text_mask_ratio=0.5", "model.text_masking=prioritized",
                      "train.global_batch_size=16")
    _train(tmp_path / "uninterrupted", args)
    reference = _losses(tmp_path / "uninterrupted")
    with _stop_after_save(2), pytest.raises(_Stop):
        _train(tmp_path / "run", args)
    _train(tmp_path / "run", args, resume="auto")
    resumed = _losses(tmp_path / "run")
    assert [resumed[s] for s in (3, 4)] == [reference[s] for s in (3, 4)]
