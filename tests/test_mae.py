"""The MAE reconstruction auxiliary loss (loss.mae_weight, models/decoder.py): its target, its
gradient path, its exactness under the layouts and micro-batching (through the trainer's own
build: `build_engine(cfg, plan_run(cfg, world))` and `Trainer`), resume, the pp refusal, the
export and the FLOPs report."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed
from flip_scale.config import ConfigError, load_config
from flip_scale.distributed import ProcessInfo
from flip_scale.models import build_model, masking_noise

CPU = ProcessInfo(0, 1, 0, torch.device("cpu"))
BATCH = 8
TINY = ["model.name=tiny", "model.vocab_size=64", "model.image_size=16", "model.patch_size=4",
        "model.context_length=8", "model.mask_ratio=0.5", "model.embed_dim=16", "model.vision_width=32",
        "model.vision_layers=2", "model.vision_heads=4", "model.vision_mlp_dim=64", "model.text_width=32",
        "model.text_layers=1", "model.text_heads=4", "model.text_mlp_dim=64",
        "model.decoder_layers=2", "model.decoder_width=32", "model.decoder_heads=4", "loss.mae_weight=0.5",
        "train.device=cpu", "train.precision=fp32", "logging.tensorboard=false", f"train.global_batch_size={BATCH}",
        "optim.lr=1e-3", "optim.eps=1e-6", "optim.grad_clip=0", "checkpoint.async_save=false"]
TOL = 2e-5


def _cfg(*overrides: str):
    return load_config(None, [*TINY, *overrides])


def _batch(cfg, step: int = 0):
    generator = torch.Generator().manual_seed(100 + step)
    m = cfg.model
    images = torch.randn(BATCH, 3, m.image_size, m.image_size, generator=generator)
    tokens = torch.randint(1, m.vocab_size, (BATCH, m.context_length), generator=generator)
    return images, tokens


def _noise(cfg, step: int = 0, rows=slice(0, BATCH)):
    patches = (cfg.model.image_size // cfg.model.patch_size) ** 2
    return masking_noise(cfg.train.seed, step, torch.arange(BATCH)[rows], patches)


def _grads(model) -> dict:
    """Every parameter's whole gradient (gathered where sharded: collective under FSDP2 / tp)."""
    out = {}
    for name, param in model.named_parameters():
        grad = param.grad
        if grad is not None:
            out[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone()
    return out


def _engine_step(cfg, world_size: int, rank: int, rows: slice) -> dict:
    from flip_scale.engine import build_engine
    from flip_scale.preflight import plan_run

    engine = build_engine(cfg, plan_run(cfg, world_size), "cpu")
    engine.train()
    images, tokens = _batch(cfg)
    loss = engine.forward_backward(images[rows], tokens[rows], _noise(cfg, 0, rows))
    qkv = engine.model.decoder.blocks["0"].attn.qkv.weight
    local_rows = qkv.to_local().shape[0] if hasattr(qkv, "to_local") else qkv.shape[0]
    return {"loss": float(loss), "mae": float(engine.step_stats["mae_loss"]), "grads": _grads(engine.model),
            "decoder_qkv_rows": (local_rows, qkv.shape[0])}


@pytest.fixture(scope="module")
def reference() -> dict:
    """One process, the whole batch, one micro-batch."""
    return _engine_step(_cfg(), 1, 0, slice(0, BATCH))


def _assert_same(got: dict, want: dict, label: str) -> None:
    assert abs(got["loss"] - want["loss"]) <= TOL, (label, got["loss"], want["loss"])
    assert abs(got["mae"] - want["mae"]) <= TOL, (label, got["mae"], want["mae"])
    assert set(got["grads"]) == set(want["grads"]), label
    for name, value in want["grads"].items():
        error = (got["grads"][name] - value).abs().max().item()
        assert error <= TOL * max(1.0, value.abs().max().item()), f"{label}: {name}'s gradient differs by {error:.3g}"


# ----------------------------------------------------------------------------- the mechanism


def test_target_is_the_normalised_pixels_of_the_removed_patches():
    """The loss is the MSE, over the removed patches only, of the decoder's prediction against each
    patch's pixels normalised by its own mean and unbiased variance: computed here patch by patch."""
    cfg = _cfg()
    model = build_model(cfg.model, mae_decoder=True).train()
    images, tokens = _batch(cfg)
    noise = _noise(cfg)
    _, visible_tokens, ids_keep = model.visual(images, noise, return_tokens=True)
    prediction = model.decoder.predict(visible_tokens, ids_keep)
    p, grid = cfg.model.patch_size, cfg.model.image_size // cfg.model.patch_size
    keep = int(grid * grid * (1 - cfg.model.mask_ratio))
    assert torch.equal(ids_keep, noise.argsort(dim=1, stable=True)[:, :keep])  # the image path's own mask
    errors = []
    for sample in range(BATCH):
        kept = set(ids_keep[sample].tolist())
        for patch in range(grid * grid):
            if patch in kept:
                continue
            row, col = divmod(patch, grid)
            pixels = images[sample, :, row * p:(row + 1) * p, col * p:(col + 1) * p].reshape(-1)
            target = (pixels - pixels.mean()) / (pixels.var(unbiased=True) + 1e-6).sqrt()
            errors.append(((prediction[sample, patch] - target) ** 2).mean())
    assert len(errors) == BATCH * (grid * grid - keep)
    direct = torch.stack(errors).mean()
    _, _, _, mae = model(images, tokens, noise)
    assert torch.allclose(mae, direct, rtol=1e-6, atol=1e-7), (mae, direct)
    # The visible tokens come back at their patch positions, the mask token everywhere else.
    model.eval()
    assert len(model(images, tokens)) == 3  # evaluation: no decoder, whole images


def test_reconstruction_gradient_reaches_the_encoder_not_the_text_tower():
    cfg = _cfg()
    model = build_model(cfg.model, mae_decoder=True).train()
    images, tokens = _batch(cfg)
    *_, mae = model(images, tokens, _noise(cfg))
    mae.backward()
    grads = {name: param.grad for name, param in model.named_parameters()}
    for name in ("visual.patch_embed.weight", "visual.blocks.0.attn.qkv.weight", "visual.cls_token",
                 "visual.ln_post.weight", "decoder.mask_token", "decoder.embed.weight", "decoder.pred.weight",
                 "decoder.blocks.1.mlp.fc2.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert all(grads[name] is None for name in grads if name.startswith("text.") or name == "logit_scale")
    assert grads["visual.proj.weight"] is None  # the pooled projection serves the contrast only


def test_no_decoder_without_the_weight():
    cfg = _cfg("loss.mae_weight=0")
    model = build_model(cfg.model)
    assert model.decoder is None and not any(k.startswith("decoder.") for k in model.state_dict())
    assert len(model.train()(*_batch(cfg), _noise(cfg))) == 3


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, message", [
    (["parallel.pp=2"], r"loss.mae_weight=0.5 with parallel.pp=2: the MAE decoder needs the image tower's token "
                        r"sequence.*use parallel.pp=1"),
    (["model.mask_ratio=0"], r"model.mask_ratio=0.0 removes none"),
    (["loss.mae_weight=-1"], r"loss.mae_weight: must be 0 \(off\) or > 0"),
    (["model.decoder_heads=5"], r"model.decoder_width=32 is not divisible by model.decoder_heads=5"),
    (["model.decoder_heads=2", "model.decoder_width=32", "parallel.tp=4"], r"model.decoder_heads=2 .* parallel.tp=4"),
])
def test_config_refuses_what_the_decoder_cannot_do(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(*overrides)


# ----------------------------------------------------------------------------- layouts


def _layouts(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    local = BATCH // world_size
    results = {}
    for label, overrides in (("dp_shard=2", ["parallel.dp_shard=2"]), ("tp=2", ["parallel.tp=2", "parallel.dp_shard=1"])):
        rows = slice(rank * local, (rank + 1) * local) if label.startswith("dp") else slice(0, BATCH)
        out = _engine_step(_cfg(*overrides), world_size, rank, rows)
        if label.startswith("dp"):  # each rank's loss is its own rows': the one-process loss is the mean
            values = torch.tensor([out["loss"], out["mae"]], dtype=torch.float64)
            dist.all_reduce(values)
            out["loss"], out["mae"] = (values / world_size).tolist()
        results[label] = out
    return results


def test_dp_shard_and_tp_match_one_process(reference):
    """Loss, MAE loss and every gradient (decoder included) under ZeRO-3 (FSDP2, dp_shard=2) and
    tensor parallel (tp=2, the decoder's blocks split like the towers') equal one process's."""
    results = run_distributed(_layouts, world_size=2)
    for label, got in results[0].items():
        _assert_same(got, reference, label)
    # The decoder is sharded as the towers are: over dp_shard (FSDP2), and column-split over tp.
    width = reference["grads"]["decoder.blocks.0.attn.qkv.weight"].shape[0]
    assert results[0]["dp_shard=2"]["decoder_qkv_rows"] == (width // 2, width)
    assert results[0]["tp=2"]["decoder_qkv_rows"] == (width // 2, width)
    assert any(name.startswith("decoder.blocks.") for name in reference["grads"])


def test_two_microbatches_equal_one_batch(reference):
    """The feature cache (exact contrast) with the MAE term added per micro-batch."""
    _assert_same(_engine_step(_cfg("optim.grad_accum_steps=2"), 1, 0, slice(0, BATCH)), reference, "accum 2")


def _deepspeed_zero3(rank: int, world_size: int, run_dir: str) -> dict:
    from flip_scale.train import Trainer

    cfg = _cfg("parallel.engine=deepspeed", "parallel.zero_stage=3", "parallel.dp_shard=2")
    proc = ProcessInfo(rank, world_size, rank, torch.device("cpu"))
    return _two_steps(Trainer(cfg, Path(run_dir), proc, with_data=False), cfg, rank, world_size)


def _two_steps(trainer, cfg, rank: int = 0, world_size: int = 1) -> dict:
    import torch.distributed as dist

    local = BATCH // world_size
    rows = slice(rank * local, (rank + 1) * local)
    losses = []
    for step in range(2):
        images, tokens = _batch(cfg, step)
        out = trainer.train_step({"images": images[rows], "tokens": tokens[rows],
                                  "sample_index": torch.arange(BATCH)[rows]})
        trainer.state.step += 1
        values = torch.tensor([float(out["loss"]), float(out["mae_loss"])], dtype=torch.float64)
        if world_size > 1:
            dist.all_reduce(values)
        losses.append((values / world_size).tolist())
    engine = trainer.engine
    if engine.name == "deepspeed":
        params = {name: value.reshape(()) if name == "logit_scale" else value
                  for name, value in engine.full_parameters().items()}
    else:
        params = {name: p.detach().clone() for name, p in engine.model.named_parameters()}
    trainer.close()
    return {"losses": losses, "params": params}


@pytest.mark.slow
def test_deepspeed_zero3_matches_one_process(tmp_path):
    """The DeepSpeed engine (ZeRO-3, two ranks) trains the decoder as the native engine does."""
    pytest.importorskip("deepspeed")
    from flip_scale.train import Trainer

    cfg = _cfg()
    want = _two_steps(Trainer(cfg, tmp_path, CPU, with_data=False), cfg)
    got = run_distributed(_deepspeed_zero3, world_size=2, args=(str(tmp_path / "ds"),), timeout=300)[0]
    assert sum(got["losses"], []) == pytest.approx(sum(want["losses"], []), abs=TOL)
    assert set(got["params"]) == set(want["params"])
    # 1e-5, a tenth of these steps' size: on an AVX2-only CPU (no AVX-512) the two-rank gradient sums
    # in another order and one qkv-bias element whose gradient is near optim.eps (AdamW divides by
    # sqrt(v) + eps, so such an element's step follows the rounding) lands 7.6e-6 away.
    for name, value in want["params"].items():
        assert (got["params"][name] - value).abs().max().item() <= 1e-5, name


# ----------------------------------------------------------------------------- resume, export, report


def test_resume_is_exact(tmp_path):
    """Two steps straight, or one step, a checkpoint (decoder included) and a resumed second step:
    the same losses (MAE included) and the same weights, bit for bit."""
    from flip_scale.train import Trainer

    cfg = _cfg()
    straight = _two_steps(Trainer(cfg, tmp_path / "a", CPU, with_data=False), cfg)
    first = Trainer(cfg, tmp_path / "b", CPU, with_data=False)
    images, tokens = _batch(cfg, 0)
    first.train_step({"images": images, "tokens": tokens, "sample_index": torch.arange(BATCH)})
    first.state.step += 1
    path = first.save()
    first.close()
    resumed = Trainer(cfg, tmp_path / "b", CPU, with_data=False)
    resumed.resume(path)
    assert resumed.state.step == 1
    images, tokens = _batch(cfg, 1)
    out = resumed.train_step({"images": images, "tokens": tokens, "sample_index": torch.arange(BATCH)})
    assert [float(out["loss"]), float(out["mae_loss"])] == straight["losses"][1]
    params = {name: p.detach() for name, p in resumed.engine.model.named_parameters()}
    resumed.close()
    assert any(name.startswith("decoder.") for name in params)
    for name, value in straight["params"].items():
        assert torch.equal(params[name], value), name


def test_consolidate_keeps_the_decoder_and_to_openclip_drops_it(tmp_path, caplog):
    open_clip = pytest.importorskip("open_clip")
    from flip_scale.convert import consolidate
    from flip_scale.convert.openclip import to_openclip
    from flip_scale.checkpoint.consolidated import load_consolidated
    from flip_scale.checkpoint.sources import read_consolidated_config
    from flip_scale.train import Trainer

    cfg = _cfg()
    trainer = Trainer(cfg, tmp_path / "run", CPU, with_data=False)
    images, tokens = _batch(cfg)
    trainer.train_step({"images": images, "tokens": tokens, "sample_index": torch.arange(BATCH)})
    trainer.state.step += 1
    path = trainer.save()
    trained = {name: p.detach().clone() for name, p in trainer.engine.model.state_dict().items()}
    trainer.close()
    consolidate(path, tmp_path / "consolidated")
    back = build_model(read_consolidated_config(tmp_path / "consolidated").model, mae_decoder=True)
    load_consolidated(tmp_path / "consolidated", back)  # strict: the decoder is there
    assert all(torch.equal(back.state_dict()[k], v) for k, v in trained.items())
    with caplog.at_level(logging.INFO, logger="flip_scale.convert"):
        report = to_openclip(tmp_path / "consolidated", tmp_path / "openclip")
    assert "MAE decoder dropped" in caplog.text
    oc_model = open_clip.create_model(f"local-dir:{tmp_path / 'openclip'}").eval()  # strict load
    assert report["tensors"] == len(oc_model.state_dict())
    document = json.loads((tmp_path / "openclip" / "open_clip_config.json").read_text())
    assert "decoder" not in json.dumps(document["model_cfg"])
    back.eval()
    with torch.no_grad():
        ours = back.encode_image(images, normalize=False)
        theirs = oc_model.encode_image(images)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_model_info_reports_the_decoder_flops():
    """The analytic decoder FLOPs equal torch's flop counter on the decoder's forward (meta device)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from flip_scale.models.info import main, model_info

    cfg = _cfg()
    info = model_info(cfg.model, cfg.loss.mae_weight)
    without = model_info(cfg.model, 0.0)
    model = build_model(cfg.model, device="meta", mae_decoder=True).train()
    images, _ = _batch(cfg)
    _, tokens, ids_keep = build_model(cfg.model, mae_decoder=True).train().visual(images, _noise(cfg), return_tokens=True)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.decoder(tokens.to("meta"), ids_keep.to("meta"), images.to("meta"))
    assert info["gflops_fwd_decoder"] * 1e9 == pytest.approx(counter.get_total_flops() / BATCH, rel=1e-9)
    assert info["params_decoder"] == sum(p.numel() for p in model.decoder.parameters())
    assert info["params_total"] == without["params_total"] + info["params_decoder"]
    assert info["gflops_train"] == pytest.approx(without["gflops_train"] + 3 * info["gflops_fwd_decoder"])
    assert info["gflops_fwd"] == without["gflops_fwd"]  # evaluation's forward never runs the decoder
    assert main([*TINY, "--json"]) == 0


def test_memory_model_counts_the_decoder():
    """The per-rank memory model (parallel/memory.py) with the decoder against the bytes autograd
    saves in one step (the method of tests/test_memory_model.py), and its parameters in the states."""
    from test_memory_model import ACTIVATION_MARGIN, _saved_bytes

    from flip_scale.loss import ContrastiveLoss
    from flip_scale.models import count_parameters
    from flip_scale.parallel import parallelize_model
    from flip_scale.preflight import memory_estimate, plan_run

    estimates = {}
    for weight in ("0", "1.0"):
        cfg = load_config("configs/tiny.yaml", ["train.device=cpu", "train.precision=fp32", "train.global_batch_size=8",
                                                f"loss.mae_weight={weight}", "model.decoder_layers=2",
                                                "model.decoder_width=64", "model.decoder_heads=4"])
        plan = plan_run(cfg, 1)
        params = count_parameters(build_model(cfg.model, device="meta", mae_decoder=cfg.loss.mae_weight > 0))
        estimates[weight] = memory_estimate(plan, params["params_total"])
    assert estimates["1.0"]["states"] == estimates["0"]["states"] + 16 * params["params_decoder"]
    torch.manual_seed(0)
    model = parallelize_model(build_model(cfg.model, device="meta", mae_decoder=True), plan.dims, plan.cfg, "cpu")
    arch = plan.arch
    images = torch.randn(8, 3, arch.image_size, arch.image_size)
    tokens = torch.randint(1, arch.vocab_size, (8, arch.context_length))
    noise = masking_noise(0, 0, torch.arange(8), arch.num_patches)
    loss_fn, holder = ContrastiveLoss(), {}

    def forward():
        image_features, text_features, scale, mae = model(images, tokens, noise)
        holder["loss"] = loss_fn(image_features, text_features, scale) + mae

    activations = _saved_bytes(model, forward)
    estimate = estimates["1.0"]
    modelled = estimate["activations"] - estimate["recompute"] + estimate["loss"]
    print(f"activations with the decoder: measured {activations / 2**20:.2f} MiB, modelled {modelled / 2**20:.2f} MiB")
    assert abs(activations - modelled) <= ACTIVATION_MARGIN * activations, (activations, modelled)
    assert estimate["activations"] > estimates["0"]["activations"]
