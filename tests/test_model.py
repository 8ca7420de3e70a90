"""The FLIP model: masked image path, text tower, temperature, FLOPs, parameter counts, model_info."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
import torch.nn.functional as F

from flip_scale.config import ModelConfig, load_config
from flip_scale.models import build_model, count_parameters, masking_noise, visible_count
from flip_scale.models.flops import (
    flops_for_config,
    flops_per_sample,
    measure_forward_flops,
    model_flops_utilization,
    train_flops_per_sample,
)
from flip_scale.models.info import main as model_info_main
from flip_scale.models.registry import MODEL_SIZES
from flip_scale.models.text import PAD_ID

# 28 px / patch 4 = 49 patches: int(49 * 0.5) = 24 and int(49 * 0.25) = 12 both truncate.
SMALL = dict(name="tiny", image_size=28)


def small_model(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(**{**SMALL, **overrides}))


def images_for(model, batch: int = 3, seed: int = 1) -> torch.Tensor:
    size = model.arch.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def tokens_for(model, batch: int = 3, length: int = 9, seed: int = 2) -> torch.Tensor:
    """Token ids 1..vocab-1 in the first `length` positions, padding (0) after them."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, model.arch.context_length, dtype=torch.long)
    tokens[:, :length] = torch.randint(1, model.arch.vocab_size, (batch, length), generator=generator)
    return tokens


# ----------------------------------------------------------------------------- masked image path


@pytest.mark.parametrize("mask_ratio", [0.5, 0.75])
def test_blocks_see_only_visible_patches_plus_cls(mask_ratio):
    model = small_model(mask_ratio=mask_ratio).train()
    visual = model.visual
    num_patches = model.arch.num_patches
    assert num_patches == 49
    keep = int(num_patches * (1 - mask_ratio))
    assert keep == visible_count(num_patches, mask_ratio) == {0.5: 24, 0.75: 12}[mask_ratio]

    seen = {}
    hooks = [
        visual.blocks["0"].register_forward_pre_hook(lambda m, args: seen.__setitem__("first", args[0].detach())),
        visual.blocks[str(len(visual.blocks) - 1)].register_forward_pre_hook(
            lambda m, args: seen.__setitem__("last", args[0].detach())
        ),
    ]
    images = images_for(model)
    noise = masking_noise(seed=3, step=7, sample_index=torch.arange(images.shape[0]), num_patches=num_patches)
    with torch.no_grad():
        model.encode_image(images, noise)
    for hook in hooks:
        hook.remove()

    width = model.arch.vision.width
    assert seen["first"].shape == (3, 1 + keep, width)
    assert seen["last"].shape == (3, 1 + keep, width)
    # The tokens are CLS, then exactly the kept patches (argsort(noise)[:keep]) with their position
    # embeddings, in that order: the stride-p convolution of every patch, then the removal (the tower
    # embeds only the kept patches' pixels; the two differ by float rounding of the sums alone).
    with torch.no_grad():
        conv = torch.nn.functional.conv2d(images, visual.patch_embed.weight, stride=model.arch.patch_size)
        patches = conv.flatten(2).transpose(1, 2) + visual.pos_embed
    kept = noise.argsort(dim=1, stable=True)[:, :keep]
    expected = torch.stack([patches[b, kept[b]] for b in range(3)])
    torch.testing.assert_close(seen["first"][:, 1:], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["first"][:, 0], visual.cls_token.detach().expand(3, -1), rtol=0, atol=0)


@pytest.mark.parametrize("mask_ratio", [0.5, 0.75])
def test_gradient_reaches_only_kept_patches(mask_ratio):
    model = small_model(mask_ratio=mask_ratio).train()
    patch, grid, num_patches = model.arch.patch_size, model.arch.grid_size, model.arch.num_patches
    images = images_for(model).requires_grad_(True)
    noise = masking_noise(seed=0, step=1, sample_index=torch.arange(3), num_patches=num_patches)
    features = model.encode_image(images, noise, normalize=False)
    (features**2).sum().backward()

    # [B, 3, g, p, g, p] -> gradient mass per patch [B, g*g] in the conv's (row-major) patch order.
    per_patch = images.grad.reshape(3, 3, grid, patch, grid, patch).abs().sum(dim=(1, 3, 5)).reshape(3, -1)
    keep = visible_count(num_patches, mask_ratio)
    kept = torch.zeros(3, num_patches, dtype=torch.bool)
    kept.scatter_(1, noise.argsort(dim=1, stable=True)[:, :keep], True)
    assert torch.all(per_patch[~kept] == 0), "removed patches received gradient"
    assert torch.all(per_patch[kept] > 0), "a kept patch received no gradient"
    assert int(kept.sum()) == 3 * keep


def _reference_sincos(width: int, grid: int) -> torch.Tensor:
    """MAE's 2-D sin-cos table, written out: first half of the channels encodes the column, the
    second half the row; each half is [sin(pos * omega), cos(pos * omega)]."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    rows, cols = rows.reshape(-1, 1) * omega, cols.reshape(-1, 1) * omega
    return torch.cat([cols.sin(), cols.cos(), rows.sin(), rows.cos()], dim=1)


def _reference_vit(visual, images: torch.Tensor, pool: str) -> torch.Tensor:
    """A plain ViT forward with the tower's weights: patchify, + sincos, CLS, blocks, LN, pool, proj."""
    batch = images.shape[0]
    patch, width = visual.arch.patch_size, visual.arch.vision.width
    grid = visual.arch.grid_size
    # Patchify as a matmul: [B, 3, g, p, g, p] -> [B, g*g, 3*p*p] (channel, row, column order of the conv kernel).
    pixels = images.reshape(batch, 3, grid, patch, grid, patch).permute(0, 2, 4, 1, 3, 5).reshape(batch, grid * grid, -1)
    x = pixels @ visual.patch_embed.weight.reshape(width, -1).T
    x = x + _reference_sincos(width, grid).to(x.dtype)
    x = torch.cat([visual.cls_token.expand(batch, 1, -1), x], dim=1)
    heads = visual.arch.vision.heads
    head_dim = width // heads
    for block in visual.blocks.values():
        h = F.layer_norm(x, (width,), block.ln_1.weight, block.ln_1.bias, eps=1e-6)
        qkv = h @ block.attn.qkv.weight.T + block.attn.qkv.bias  # output layout: [heads, (q, k, v), head_dim]
        qkv = qkv.reshape(batch, -1, heads, 3, head_dim)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]  # [B, N, heads, head_dim]
        scores = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(head_dim)
        attended = torch.einsum("bhnm,bmhd->bnhd", scores.softmax(dim=-1), v).reshape(batch, -1, width)
        x = x + attended @ block.attn.proj.weight.T + block.attn.proj.bias
        h = F.layer_norm(x, (width,), block.ln_2.weight, block.ln_2.bias, eps=1e-6)
        h = F.gelu(h @ block.mlp.fc1.weight.T + block.mlp.fc1.bias)
        x = x + h @ block.mlp.fc2.weight.T + block.mlp.fc2.bias
    x = F.layer_norm(x, (width,), visual.ln_post.weight, visual.ln_post.bias, eps=1e-6)
    pooled = {"avg_patches": x[:, 1:].mean(dim=1), "avg_all": x.mean(dim=1), "cls": x[:, 0]}[pool]
    return pooled @ visual.proj.weight.T


@pytest.mark.parametrize("pool", ["avg_patches", "avg_all", "cls"])
def test_mask_zero_is_a_plain_vit(pool):
    model = small_model(mask_ratio=0.0, vision_pool=pool).double().train()
    images = images_for(model).double()
    with torch.no_grad():
        ours = model.encode_image(images, normalize=False)
        reference = _reference_vit(model.visual, images, pool)
    assert ours.shape == (3, model.arch.embed_dim)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    # The model's fixed table is the MAE/FLIP sin-cos table.
    torch.testing.assert_close(model.visual.pos_embed, _reference_sincos(96, 7), rtol=0, atol=1e-7)  # a float32 table


def test_eval_ignores_mask_ratio():
    model = small_model(mask_ratio=0.75)
    images = images_for(model)
    noise = masking_noise(0, 0, torch.arange(3), model.arch.num_patches)
    with torch.no_grad():
        masked = model.train().encode_image(images, noise)
        evaluated = model.eval().encode_image(images, noise)
        model.mask_ratio = 0.0
        unmasked = model.train().encode_image(images, noise)
    torch.testing.assert_close(evaluated, unmasked, rtol=0, atol=0)
    assert (masked - unmasked).abs().max() > 1e-3  # the training forward really was masked


def test_masking_noise_is_a_pure_function_of_its_arguments():
    num_patches = 196
    whole = masking_noise(seed=5, step=11, sample_index=torch.arange(16), num_patches=num_patches)
    assert whole.shape == (16, num_patches) and whole.dtype == torch.float32
    assert whole.min() >= 0 and whole.max() < 1
    assert abs(whole.mean().item() - 0.5) < 0.02  # 3136 draws of U[0, 1): std of the mean ~0.005
    torch.testing.assert_close(whole, masking_noise(5, 11, torch.arange(16), num_patches), rtol=0, atol=0)
    # A sample's row is the same whichever slice of the batch (rank, micro-batch) computes it.
    torch.testing.assert_close(whole[4:10], masking_noise(5, 11, torch.arange(4, 10), num_patches), rtol=0, atol=0)
    torch.testing.assert_close(whole[[13, 2]], masking_noise(5, 11, torch.tensor([13, 2]), num_patches), rtol=0, atol=0)
    # Each argument changes the noise, and different samples get different rows.
    for other in (masking_noise(6, 11, torch.arange(16), num_patches), masking_noise(5, 12, torch.arange(16), num_patches)):
        assert (other != whole).float().mean() > 0.99
    assert (masking_noise(5, 11, torch.arange(1, 17), num_patches) != whole).float().mean() > 0.99
    assert (whole[0] != whole[1]).float().mean() > 0.99
    # Different kept sets per sample (per-sample masking, not one mask for the batch).
    keep = visible_count(num_patches, 0.5)
    kept = whole.argsort(dim=1, stable=True)[:, :keep].sort(dim=1).values
    assert len({tuple(row.tolist()) for row in kept}) == 16


# ----------------------------------------------------------------------------- text tower


def _final_hidden(model, tokens):
    """The text tower's ln_final output [B, T, width] and its features (not normalised)."""
    captured = {}
    hook = model.text.ln_final.register_forward_hook(lambda m, args, out: captured.__setitem__("x", out.detach()))
    with torch.no_grad():
        features = model.encode_text(tokens, normalize=False)
    hook.remove()
    return captured["x"], features


def test_text_pools_the_first_token_and_attends_both_ways():
    model = small_model()
    tokens = tokens_for(model)
    hidden, features = _final_hidden(model, tokens)
    assert features.shape == (3, model.arch.embed_dim)
    torch.testing.assert_close(features, hidden[:, 0] @ model.text.proj.weight.T, rtol=0, atol=1e-6)
    # Non-causal: the first token's feature depends on the last real token.
    changed = tokens.clone()
    changed[:, 8] = changed[:, 8] % (model.arch.vocab_size - 1) + 1
    _, changed_features = _final_hidden(model, changed)
    assert (changed_features - features).abs().max() > 1e-4


def test_text_pad_mask_ignores_what_sits_in_padding():
    for pad_mask, should_change in ((True, False), (False, True)):
        model = small_model(text_pad_mask=pad_mask)
        tokens = tokens_for(model)
        _, before = _final_hidden(model, tokens)
        with torch.no_grad():
            model.text.token_embedding.weight[PAD_ID] += torch.randn(model.arch.text.width)  # not a constant: LayerNorm would remove that
        _, after = _final_hidden(model, tokens)
        difference = (after - before).abs().max().item()
        if should_change:
            assert difference > 1e-3, "without the pad mask, padding should be attended to"
        else:
            assert difference < 1e-6, f"with the pad mask, padding changed the features by {difference}"


def test_text_causal_sees_only_earlier_tokens_and_pools_end_of_text():
    model = small_model(text_causal=True)
    length = 9
    tokens = tokens_for(model, length=length)
    hidden, features = _final_hidden(model, tokens)
    # Pooled at the last non-padding token.
    torch.testing.assert_close(features, hidden[:, length - 1] @ model.text.proj.weight.T, rtol=0, atol=1e-6)
    # Changing token 5 leaves the hidden states of positions 0-4 unchanged and changes 5 onwards.
    changed = tokens.clone()
    changed[:, 5] = changed[:, 5] % (model.arch.vocab_size - 1) + 1
    changed_hidden, changed_features = _final_hidden(model, changed)
    torch.testing.assert_close(changed_hidden[:, :5], hidden[:, :5], rtol=0, atol=1e-6)
    assert (changed_hidden[:, 5:length] - hidden[:, 5:length]).abs().amax(dim=-1).min() > 1e-4
    assert (changed_features - features).abs().max() > 1e-4
    # Padding comes after the pooled token, so even without a pad mask it cannot reach the features.
    with torch.no_grad():
        model.text.token_embedding.weight[PAD_ID] += torch.randn(model.arch.text.width)  # not a constant: LayerNorm would remove that
    _, padded_features = _final_hidden(model, tokens)
    torch.testing.assert_close(padded_features, features, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- temperature


def test_logit_scale_init_and_clamp():
    model = small_model()
    _, _, logit_scale = model(None, tokens_for(model))
    assert logit_scale.item() == pytest.approx(math.log(1 / 0.07), abs=1e-6)
    assert math.exp(logit_scale.item()) == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(math.log(100), abs=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(-0.5)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == 0.0
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == 3.0


# ----------------------------------------------------------------------------- FLOPs


def test_flop_ratios_of_l16_match_the_paper():
    """Paper Table 1a (ViT-L/16, both towers, text length 32): 0.52x FLOPs at 50%, 0.28x at 75%."""
    cfg = ModelConfig(name="L/16")
    model = build_model(cfg, device="meta").train()
    images = torch.empty(1, 3, 224, 224, device="meta")
    tokens = torch.zeros(1, 32, dtype=torch.long, device="meta")
    measured = {}
    for mask_ratio in (0.0, 0.5, 0.75):
        model.mask_ratio = mask_ratio
        measured[mask_ratio] = measure_forward_flops(model, images, tokens)
        analytic = flops_per_sample(model.arch, mask_ratio)["total"]
        assert analytic == pytest.approx(measured[mask_ratio], rel=0.01)
    ratios = {r: measured[r] / measured[0.0] for r in (0.5, 0.75)}
    print(
        f"\nFLIP-L/16 forward GFLOPs per sample: 0%: {measured[0.0] / 1e9:.2f}, 50%: {measured[0.5] / 1e9:.2f}, "
        f"75%: {measured[0.75] / 1e9:.2f}; ratios 50%: {ratios[0.5]:.4f} (paper 0.52), 75%: {ratios[0.75]:.4f} (paper 0.28)"
    )
    assert abs(ratios[0.5] - 0.52) <= 0.02
    assert abs(ratios[0.75] - 0.28) <= 0.02
    # L/16 at 224 px unmasked: ~128.6 GFLOPs, of which the text tower is a small part (paper: 4.4%
    # of the image encoder counts multiply-adds of a 16-token text; here 32 tokens).
    assert measured[0.0] / 1e9 == pytest.approx(128.58, abs=0.01)


@pytest.mark.parametrize("name", ["tiny", "B/16"])
def test_analytic_flops_agree_with_the_flop_counter(name):
    """models/flops.py against torch.utils.flop_counter, both towers, at mask 0, 0.5 and 0.75: the
    forward (the patch projection on the visible patches only) and a training step (forward +
    backward, the 3x convention) within 2%. On the meta device: no memory, well under a second."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(ModelConfig(name=name), device="meta").train()
    arch, batch = model.arch, 2
    images = torch.empty(batch, 3, arch.image_size, arch.image_size, device="meta")
    tokens = torch.zeros(batch, arch.context_length, dtype=torch.long, device="meta")
    for mask_ratio in (0.0, 0.5, 0.75):
        model.mask_ratio = mask_ratio
        noise = torch.rand(batch, arch.num_patches, device="meta")
        forward = measure_forward_flops(model, images, tokens, noise) / batch
        analytic = flops_per_sample(arch, mask_ratio)
        assert analytic["total"] == pytest.approx(forward, rel=0.02), (name, mask_ratio)
        vision = measure_forward_flops(model, images, None, noise) / batch
        assert analytic["vision"] == pytest.approx(vision, rel=0.02), (name, mask_ratio)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            image_features, text_features, scale = model(images, tokens, noise)
            (image_features.sum() + text_features.sum() + scale).backward()
        training = flops_per_sample(arch, mask_ratio, training=True)["total"]
        assert training == pytest.approx(counter.get_total_flops() / batch, rel=0.02), (name, mask_ratio)
        model.zero_grad(set_to_none=True)


def test_measured_flops_on_cpu_count_attention_and_equal_the_analytic_count():
    # Real CPU tensors: attention must be counted (the CPU flash kernel has no flop formula).
    model = small_model(mask_ratio=0.5).train()
    images, tokens = images_for(model, batch=2), tokens_for(model, batch=2)
    noise = masking_noise(0, 0, torch.arange(2), model.arch.num_patches)
    expected = flops_per_sample(model.arch, 0.5)
    assert measure_forward_flops(model, images, tokens, noise) == 2 * expected["total"]
    assert measure_forward_flops(model, images, None, noise) == 2 * expected["vision"]
    assert measure_forward_flops(model, None, tokens) == 2 * expected["text"]
    # Evaluation (model.eval()) always runs unmasked.
    assert measure_forward_flops(model.eval(), images, tokens) == 2 * flops_per_sample(model.arch, 0.0)["total"]
    # The attention matmuls (2 x 2 N^2 width per block) are a visible part of that count here, so
    # the equalities above would fail if the counter skipped them.
    arch = model.arch
    assert expected["visible_tokens"] == 24
    vision_attention = arch.vision.layers * 4 * (1 + 24) ** 2 * arch.vision.width
    text_attention = arch.text.layers * 4 * arch.context_length**2 * arch.text.width
    assert (vision_attention + text_attention) / expected["total"] > 0.04


def test_flops_helpers():
    cfg = ModelConfig(name="L/16", mask_ratio=0.75)
    forward = flops_for_config(cfg)
    assert forward == flops_per_sample(MODEL_SIZES["L/16"], 0.75)
    assert forward["visible_tokens"] == 49
    assert forward["total"] == forward["vision"] + forward["text"]
    training = flops_for_config(cfg, training=True)
    assert training["total"] == 3 * forward["total"] == train_flops_per_sample(cfg)
    assert flops_for_config(cfg, mask_ratio=0.0)["visible_tokens"] == 196
    # 1000 samples/s at 108.0 GFLOPs each on a 989 TFLOP/s device: 10.9% MFU (the patch projection on
    # the visible quarter only).
    assert model_flops_utilization(1000, training["total"], 989e12) == pytest.approx(0.1092, abs=1e-4)
    with pytest.raises(ValueError, match="mask_ratio"):
        flops_per_sample(MODEL_SIZES["L/16"], 1.0)


# ----------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize(
    "name, paper, tolerance",
    [("B/16", 86e6, 0.01), ("L/16", 303e6, 0.01), ("H/14", 631e6, 0.01), ("G/14", 1.84e9, 0.02)],
)
def test_vision_parameter_counts(name, paper, tolerance):
    counts = count_parameters(build_model(ModelConfig(name=name), device="meta"))
    assert counts["params_vision"] == pytest.approx(paper, rel=tolerance)
    assert counts["params_total"] == counts["params_vision"] + counts["params_text"] + 1  # + logit_scale


@pytest.mark.parametrize("name", ["B/16", "L/16", "H/14", "G/14"])
def test_text_parameter_count_formula(name):
    arch = MODEL_SIZES[name]
    width, mlp_dim = arch.text.width, arch.text.mlp_dim
    block = (3 * width * width + 3 * width) + (width * width + width) + 2 * width * mlp_dim + mlp_dim + width + 4 * width
    expected = arch.vocab_size * width + 32 * width + arch.text.layers * block + 2 * width + width * arch.embed_dim
    counts = count_parameters(build_model(ModelConfig(name=name), device="meta"))
    assert counts["params_text"] == expected


def test_g14_on_meta_allocates_nothing():
    start = time.perf_counter()
    model = build_model(ModelConfig(name="G/14"), device="meta")
    elapsed = time.perf_counter() - start
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.is_meta for t in tensors)
    assert sum(p.numel() for p in model.parameters()) > 2.5e9
    assert elapsed < 10, f"building G/14 on meta took {elapsed:.1f} s"


# ----------------------------------------------------------------------------- model_info CLI


def _run_info(capsys, *argv) -> dict:
    assert model_info_main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_model_info_json(capsys):
    info = _run_info(capsys, "--config", "configs/flip_l16.yaml", "--json")
    for key in ("params_vision", "params_text", "params_total", "gflops_fwd", "visible_tokens", "model", "mask_ratio",
                "image_size", "patch_size", "visible_tokens_with_cls"):
        assert key in info
    cfg = load_config("configs/flip_l16.yaml")
    counts = count_parameters(build_model(cfg.model, device="meta"))
    assert {k: info[k] for k in counts} == counts
    assert info["model"] == "L/16" and info["mask_ratio"] == 0.5
    assert (info["image_size"], info["patch_size"], info["num_patches"]) == (224, 16, 196)
    assert info["visible_tokens"] == 98 and info["visible_tokens_with_cls"] == 99
    assert info["gflops_fwd"] == pytest.approx(flops_for_config(cfg.model)["total"] / 1e9, rel=1e-12)
    assert info["gflops_fwd"] / info["gflops_fwd_unmasked"] == pytest.approx(0.5163, abs=1e-3)  # the paper: 0.52

    info = _run_info(capsys, "--config", "configs/flip_l16.yaml", "model.mask_ratio=0.75", "--json")
    assert info["mask_ratio"] == 0.75 and info["visible_tokens"] == 49 and info["visible_tokens_with_cls"] == 50
    assert info["gflops_fwd"] == pytest.approx(35.998, abs=1e-3)  # patch projection on 49 patches


def test_model_info_text_default_and_errors(capsys):
    assert model_info_main([]) == 0  # configs/tiny.yaml: 32 px / 4 = 64 patches, mask 0.5
    out = capsys.readouterr().out
    assert "model            tiny" in out
    assert "visible_tokens   32 patches (33 with CLS)" in out
    assert "params_total     597,409" in out

    with pytest.raises(SystemExit) as exit_info:
        model_info_main(["--help"])
    assert exit_info.value.code == 0
    assert "python tools/model_info.py --config configs/flip_l16.yaml" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_info:
        model_info_main(["model.mask_ration=0.6"])
    assert exit_info.value.code == 2
    assert "did you mean 'model.mask_ratio'" in capsys.readouterr().err
