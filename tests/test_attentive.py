"""Attentive token removal (model.masking=attentive, A-CLIP; models/masking.py AttentiveMasking,
models/ema.py): which patches are kept, what the online encoder sees, the EMA tower (no gradient,
its update, its start), the layouts through the trainer's own build (`build_engine(cfg,
plan_run(cfg, world))`), resume with the EMA state, the export, the refusals and the FLOPs report."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed
from flip_scale.config import ConfigError, load_config
from flip_scale.distributed import ProcessInfo
from flip_scale.models import build_model, masking_noise
from flip_scale.models.masking import AttentiveMasking, visible_count

CPU = ProcessInfo(0, 1, 0, torch.device("cpu"))
BATCH = 8
TINY = ["model.name=tiny", "model.vocab_size=64", "model.image_size=16", "model.patch_size=4",
        "model.context_length=8", "model.mask_ratio=0.5", "model.embed_dim=16", "model.vision_width=32",
        "model.vision_layers=2", "model.vision_heads=4", "model.vision_mlp_dim=64", "model.text_width=32",
        "model.text_layers=1", "model.text_heads=4", "model.text_mlp_dim=64", "model.masking=attentive",
        "model.ema_decay=0.9", "train.device=cpu", "train.precision=fp32", "logging.tensorboard=false",
        f"train.global_batch_size={BATCH}", "optim.lr=1e-3", "optim.eps=1e-6", "optim.grad_clip=0",
        "checkpoint.async_save=false"]
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


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


# ----------------------------------------------------------------------------- the mechanism


def test_keeps_the_top_scored_patches_then_a_random_rest_by_the_noise():
    masking = AttentiveMasking(0.75, keep_fraction=0.5).train()
    length, batch = 16, 3
    scores = torch.rand(batch, length, generator=torch.Generator().manual_seed(1))
    noise = masking_noise(0, 3, torch.arange(batch), length)
    keep = masking.keep_indices(batch, length, noise, scores=scores)
    visible = visible_count(length, 0.75)
    top = round(0.5 * visible)
    assert keep.shape == (batch, visible) and top == 2
    for row in range(batch):
        ranked = scores[row].argsort(descending=True).tolist()
        assert keep[row, :top].tolist() == ranked[:top]  # the highest scores, highest first
        rest = [p for p in noise[row].argsort().tolist() if p not in ranked[:top]][:visible - top]
        assert keep[row, top:].tolist() == rest  # then the noise's first among the others
        assert len(set(keep[row].tolist())) == visible
    # keep_fraction 1: by score alone; 0, or no scores, or eval: the random strategy.
    assert AttentiveMasking(0.75, 1.0).keep_indices(batch, length, noise, scores=scores).tolist() == \
        scores.argsort(dim=1, descending=True)[:, :visible].tolist()
    random_keep = noise.argsort(dim=1, stable=True)[:, :visible]
    assert torch.equal(AttentiveMasking(0.75, 0.0).keep_indices(batch, length, noise, scores=scores), random_keep)
    assert torch.equal(masking.keep_indices(batch, length, noise), random_keep)
    assert masking.eval().keep_indices(batch, length, noise, scores=scores) is None
    with pytest.raises(ValueError, match=r"patch scores have shape \(3, 15\), expected \(3, 16\)"):
        masking.train().keep_indices(batch, length, noise, scores=scores[:, :15])


def _cls_attention_by_hand(tower, images) -> torch.Tensor:
    """The last block's CLS-to-patch attention of an unmasked tower, mean over heads, [B, L]."""
    x = tower.embed(images)
    blocks = list(tower.blocks.values())
    for block in blocks[:-1]:
        x = block(x)
    attn = blocks[-1].attn
    qkv = attn.qkv(blocks[-1].ln_1(x)).view(x.shape[0], x.shape[1], -1, 3, attn.head_dim)
    q, k, _ = qkv.permute(3, 0, 2, 1, 4).unbind(0)
    weights = torch.softmax(q @ k.transpose(-2, -1) / attn.head_dim ** 0.5, dim=-1)
    return weights[:, :, 0, 1:].mean(dim=1)


def test_online_encoder_sees_only_the_patches_the_ema_chose():
    cfg = _cfg()
    model = build_model(cfg.model).train()
    images, tokens = _batch(cfg)
    noise = _noise(cfg)
    with torch.no_grad():
        model.ema_visual.blocks["1"].attn.qkv.weight.mul_(3.0)  # an EMA unlike the online tower
        scores = model.patch_scores(images)
        assert torch.allclose(scores, _cls_attention_by_hand(model.ema_visual, images), atol=1e-6)
        keep = model.visual.masking.keep_indices(BATCH, scores.shape[1], noise, scores=scores)
        want = model.visual.embed(images, noise, patch_scores=scores)  # [B, 1 + visible, width]
        # By hand: each kept patch's pixels projected, plus its sin-cos row, after the CLS token.
        p = cfg.model.patch_size
        patches = images.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(BATCH, -1, 3 * p * p)
        rows = torch.gather(patches, 1, keep.unsqueeze(-1).expand(-1, -1, patches.shape[2]))
        by_hand = rows @ model.visual.patch_embed.weight.reshape(32, -1).T + model.visual.pos_embed[keep]
    assert torch.allclose(want[:, 1:], by_hand, atol=1e-5)
    seen = []
    handle = model.visual.blocks["0"].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    model(images, tokens, noise)
    handle.remove()
    assert seen[0].shape == (BATCH, 1 + visible_count(16, 0.5), 32)
    assert torch.allclose(seen[0], want, atol=1e-6)
    # Evaluation: whole images, the EMA not run.
    assert model.eval().patch_scores(images) is None


def test_ema_starts_equal_to_the_online_tower_and_gets_no_gradient():
    cfg = _cfg()
    model = build_model(cfg.model).train()
    ema = dict(model.ema_visual.named_parameters())
    online = dict(model.visual.named_parameters())
    assert set(ema) == set(online) and all(torch.equal(ema[n], online[n]) for n in ema)
    assert not any(p.requires_grad for p in ema.values()) and all(p.requires_grad for p in online.values())
    images, tokens = _batch(cfg)
    image_features, text_features, scale = model(images, tokens, _noise(cfg))
    (image_features @ text_features.T * scale.exp()).sum().backward()
    assert all(p.grad is None for p in ema.values())
    assert online["blocks.1.attn.qkv.weight"].grad.abs().sum() > 0
    assert build_model(_cfg("model.masking=random").model).ema_visual is None
    # Pairs are matched by name without the wrappers' parts (activation checkpointing wraps `visual` only).
    from flip_scale.models.ema import ema_pairs
    from flip_scale.parallel.activation import apply_ac

    apply_ac(model, "full")
    assert [id(e) for e, _ in ema_pairs(model)] == [id(p) for p in ema.values()]
    assert [id(o) for _, o in ema_pairs(model)] == [id(online[n]) for n in ema]


def _engine_step(cfg, world_size: int, rank: int, rows: slice) -> dict:
    """One step through the engine: loss, every gradient, then the EMA and online towers after it."""
    from flip_scale.engine import build_engine
    from flip_scale.preflight import plan_run

    engine = build_engine(cfg, plan_run(cfg, world_size), "cpu")
    engine.train()
    model = engine.model
    before = {name: _full(p) for name, p in model.named_parameters() if name.startswith(("visual.", "ema_visual."))}
    optimized = {id(p) for opt in engine.optimizers.optimizers for group in opt.param_groups for p in group["params"]}
    images, tokens = _batch(cfg)
    loss = engine.forward_backward(images[rows], tokens[rows], _noise(cfg, 0, rows))
    grads = {name: _full(p.grad) for name, p in model.named_parameters() if p.grad is not None}
    engine.clip_and_step()
    after = {name: _full(p) for name, p in model.named_parameters() if name.startswith(("visual.", "ema_visual."))}
    qkv = model.ema_visual.blocks["0"].attn.qkv.weight
    return {"loss": float(loss), "grads": grads, "before": before, "after": after,
            "ema_optimized": any(id(p) in optimized for p in model.ema_visual.parameters()),
            "ema_qkv_rows": (qkv.to_local().shape[0] if hasattr(qkv, "to_local") else qkv.shape[0], qkv.shape[0])}


@pytest.fixture(scope="module")
def reference() -> dict:
    return _engine_step(_cfg(), 1, 0, slice(0, BATCH))


def test_ema_update_after_a_step(reference):
    """ema = decay * ema + (1 - decay) * online after the optimizer step; the optimizer never holds it."""
    before, after = reference["before"], reference["after"]
    assert not reference["ema_optimized"]
    assert not any(name.startswith("ema_visual.") for name in reference["grads"])
    for name in (n for n in after if n.startswith("ema_visual.")):
        online = name[len("ema_"):]
        assert torch.equal(before[name], before[online]), name  # equal at the start
        want = before[name] * 0.9 + after[online] * (1 - 0.9)
        assert torch.allclose(after[name], want, atol=1e-7), name
    moved = after["ema_visual.blocks.0.mlp.fc1.weight"] - before["ema_visual.blocks.0.mlp.fc1.weight"]
    assert moved.abs().max() > 0


def _layouts(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    local = BATCH // world_size
    results = {}
    for label, overrides in (("dp_shard=2", ["parallel.dp_shard=2"]), ("tp=2", ["parallel.tp=2", "parallel.dp_shard=1"])):
        rows = slice(rank * local, (rank + 1) * local) if label.startswith("dp") else slice(0, BATCH)
        out = _engine_step(_cfg(*overrides), world_size, rank, rows)
        if label.startswith("dp"):  # each rank's loss is its own rows': the one-process loss is the mean
            value = torch.tensor([out["loss"]], dtype=torch.float64)
            dist.all_reduce(value)
            out["loss"] = float(value) / world_size
        results[label] = out
    return results


@pytest.mark.slow
def test_dp_shard_and_tp_match_one_process(reference):
    """Loss, every gradient and the EMA tower after the step under ZeRO-3 (dp_shard=2) and tp=2
    (the EMA's blocks split like the online ones, its head scores averaged over tp) equal one process's."""
    results = run_distributed(_layouts, world_size=2)
    width = reference["after"]["ema_visual.blocks.0.attn.qkv.weight"].shape[0]
    for label, got in results[0].items():
        assert abs(got["loss"] - reference["loss"]) <= TOL, (label, got["loss"], reference["loss"])
        assert set(got["grads"]) == set(reference["grads"]), label
        for name, value in reference["grads"].items():
            error = (got["grads"][name] - value).abs().max().item()
            assert error <= TOL * max(1.0, value.abs().max().item()), f"{label}: {name}'s gradient differs by {error:.3g}"
        for name, value in reference["after"].items():
            assert torch.allclose(got["after"][name], value, atol=1e-6), f"{label}: {name} after the step"
        assert not got["ema_optimized"], label
        assert got["ema_qkv_rows"] == (width // 2, width), label  # sharded like the online tower


# ----------------------------------------------------------------------------- resume, export, config, report


def _train_step(trainer, cfg, step: int):
    images, tokens = _batch(cfg, step)
    out = trainer.train_step({"images": images, "tokens": tokens, "sample_index": torch.arange(BATCH)})
    trainer.state.step += 1
    return float(out["loss"])


def test_resume_is_exact_with_the_ema_and_export_drops_it(tmp_path, caplog):
    """Three steps straight, or two, a checkpoint (the EMA tower in it) and a resumed third: the same
    losses and weights, EMA included, bit for bit. consolidate keeps the EMA; to-timm and to-openclip
    drop it (a log line each)."""
    from flip_scale.checkpoint.consolidated import load_consolidated
    from flip_scale.checkpoint.sources import read_consolidated_config
    from flip_scale.convert import consolidate
    from flip_scale.train import Trainer

    cfg = _cfg()
    straight = Trainer(cfg, tmp_path / "a", CPU, with_data=False)
    losses = [_train_step(straight, cfg, step) for step in range(3)]
    want = {name: p.detach().clone() for name, p in straight.engine.model.named_parameters()}
    straight.close()
    first = Trainer(cfg, tmp_path / "b", CPU, with_data=False)
    assert [_train_step(first, cfg, step) for step in range(2)] == losses[:2]
    path = first.save()
    saved = {name: p.detach().clone() for name, p in first.engine.model.state_dict().items()}
    first.close()
    resumed = Trainer(cfg, tmp_path / "b", CPU, with_data=False)
    resumed.resume(path)
    assert resumed.state.step == 2
    assert _train_step(resumed, cfg, 2) == losses[2]
    got = {name: p.detach() for name, p in resumed.engine.model.named_parameters()}
    resumed.close()
    assert any(name.startswith("ema_visual.") for name in got)
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    assert not torch.equal(want["ema_visual.proj.weight"], want["visual.proj.weight"])  # EMA lags the online

    consolidate(path, tmp_path / "consolidated")
    back = build_model(read_consolidated_config(tmp_path / "consolidated").model)
    load_consolidated(tmp_path / "consolidated", back)  # strict: the EMA tower is there
    assert all(torch.equal(back.state_dict()[k], v) for k, v in saved.items())
    from flip_scale.convert.timm import to_timm

    with caplog.at_level(logging.INFO, logger="flip_scale.convert"):
        to_timm(tmp_path / "consolidated", tmp_path / "timm")
    assert "to-timm: EMA image tower dropped" in caplog.text
    pytest.importorskip("open_clip")
    from flip_scale.convert.openclip import to_openclip

    with caplog.at_level(logging.INFO, logger="flip_scale.convert"):
        to_openclip(tmp_path / "consolidated", tmp_path / "openclip")
    assert "to-openclip: EMA image tower dropped" in caplog.text
    from safetensors import safe_open

    with safe_open(str(tmp_path / "openclip" / "open_clip_model.safetensors"), framework="pt") as handle:
        assert not any("ema" in key for key in handle.keys())


@pytest.mark.parametrize("overrides, message", [
    (["parallel.pp=2"], r"model.masking=attentive with parallel.pp=2: the EMA image tower must score every patch"
                        r".*use parallel.pp=1"),
    (["parallel.engine=deepspeed"], r"model.masking=attentive with parallel.engine=deepspeed: .*use parallel.engine=fsdp"),
    (["model.attentive_keep_fraction=1.5"], r"model.attentive_keep_fraction: 1.5 is outside \[0, 1\]"),
    (["model.ema_decay=1.0"], r"model.ema_decay: 1.0 is outside \[0, 1\)"),
    (["model.masking=topk"], r"model.masking"),
])
def test_config_refuses_what_attentive_masking_cannot_do(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(*overrides)


def test_model_info_reports_the_ema_forward_flops():
    """The EMA's FLOPs: one unmasked image-tower forward per sample (torch's flop counter on the
    meta device), in gflops_train once (no backward), not in evaluation's forward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from flip_scale.models.flops import train_flops_per_sample
    from flip_scale.models.info import main, model_info

    cfg = _cfg()
    info = model_info(cfg.model)
    without = model_info(_cfg("model.masking=random").model)
    model = build_model(cfg.model, device="meta").eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.ema_visual(torch.empty(BATCH, 3, 16, 16, device="meta"))
    assert info["gflops_fwd_ema"] * 1e9 == pytest.approx(counter.get_total_flops() / BATCH, rel=1e-9)
    assert info["gflops_train"] == pytest.approx(without["gflops_train"] + info["gflops_fwd_ema"])
    assert train_flops_per_sample(cfg.model) == pytest.approx(info["gflops_train"] * 1e9)
    assert info["gflops_fwd"] == without["gflops_fwd"]
    assert info["params_ema"] == info["params_vision"]
    assert model_info(_cfg("model.mask_ratio=0").model)["gflops_fwd_ema"] == 0  # nothing to score
    assert main([*TINY, "--json"]) == 0


def test_two_microbatches_equal_one_batch(reference):
    """The feature cache: both passes score with the same EMA, so they keep the same patches."""
    got = _engine_step(_cfg("optim.grad_accum_steps=2"), 1, 0, slice(0, BATCH))
    assert abs(got["loss"] - reference["loss"]) <= TOL
    for name, value in reference["grads"].items():
        assert (got["grads"][name] - value).abs().max().item() <= TOL * max(1.0, value.abs().max().item()), name


def test_init_from_a_random_masking_run_starts_the_ema_at_the_loaded_tower(tmp_path, caplog):
    """--init-from a checkpoint without an EMA tower (consolidated or DCP): the online tower is loaded
    and the EMA starts equal to it."""
    from flip_scale.checkpoint.sources import open_checkpoint
    from flip_scale.convert import consolidate
    from flip_scale.engine import build_engine
    from flip_scale.preflight import plan_run
    from flip_scale.train import Trainer

    plain = _cfg("model.masking=random")
    trainer = Trainer(plain, tmp_path / "run", CPU, with_data=False)
    _train_step(trainer, plain, 0)
    path = trainer.save()
    trained = {name: p.detach().clone() for name, p in trainer.engine.model.visual.named_parameters()}
    trainer.close()
    consolidate(path, tmp_path / "consolidated")
    cfg = _cfg()
    for source in (tmp_path / "consolidated", path):  # a consolidated directory, a DCP step directory
        engine = build_engine(cfg, plan_run(cfg, 1), "cpu")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="flip_scale"):
            engine.load_weights(open_checkpoint(source))
        assert "EMA image tower (model.masking=attentive) starts equal to the loaded image tower" in caplog.text
        for name, param in engine.model.ema_visual.named_parameters():
            assert torch.equal(param, trained[name]), (source, name)
            assert torch.equal(engine.model.visual.get_parameter(name), trained[name]), (source, name)


def test_a_skipped_step_leaves_the_ema():
    """The device-side skip (a 0-dim bool: the non-finite step decided without a host read)."""
    from flip_scale.models.ema import update_ema_

    model = build_model(_cfg().model)
    with torch.no_grad():
        for param in model.visual.parameters():
            param.add_(1.0)
    start = {name: p.clone() for name, p in model.ema_visual.named_parameters()}
    update_ema_(model, 0.9, skipped=torch.tensor(True))
    assert all(torch.equal(p, start[name]) for name, p in model.ema_visual.named_parameters())
    update_ema_(model, 0.9, skipped=torch.tensor(False))
    for name, param in model.ema_visual.named_parameters():
        assert torch.allclose(param, start[name] * 0.9 + model.visual.get_parameter(name) * 0.1, atol=1e-7), name


@pytest.mark.slow
def test_flip_train_resumed_mid_way_equals_uninterrupted(tmp_path, synthetic_dir):
    """The real flip-train: 4 steps straight, or 2 steps then --resume auto to 4: the same losses of
    steps 3-4 and the same final weights, the EMA tower's included, bit for bit."""
    from safetensors.torch import load_file

    from flip_scale.convert import consolidate
    from flip_scale.metrics import read_jsonl
    from flip_scale.train import main

    def args(steps: int) -> list:
        return [f"data.synthetic_dir={synthetic_dir}", f"data.train_shards={synthetic_dir}/train-{{000000..000007}}.tar",
                f"data.tokenizer={synthetic_dir}/tokenizer.model", f"train.max_steps={steps}",
                "train.global_batch_size=16", "train.log_every_steps=1", "checkpoint.every_steps=2",
                "checkpoint.keep_last=0", "data.num_workers=0", "eval.at_end=false", "logging.tensorboard=false",
                "model.masking=attentive", "model.ema_decay=0.9", "train.device=cpu"]

    def losses(run_dir: Path) -> dict:
        return {row["step"]: row["loss"] for row in read_jsonl(run_dir / "metrics.jsonl")}

    assert main(["--run-dir", str(tmp_path / "a"), *args(4)]) == 0
    assert main(["--run-dir", str(tmp_path / "b"), *args(2)]) == 0
    assert main(["--run-dir", str(tmp_path / "b"), "--resume", "auto", *args(4)]) == 0
    straight, resumed = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [resumed[step] for step in (3, 4)] == [straight[step] for step in (3, 4)]
    weights = {}
    for run in ("a", "b"):
        consolidate(tmp_path / run / "step_00000004", tmp_path / f"{run}_consolidated")
        weights[run] = load_file(str(tmp_path / f"{run}_consolidated" / "model.safetensors"))
    assert any(name.startswith("ema_visual.") for name in weights["a"])
    assert set(weights["a"]) == set(weights["b"])
    for name, value in weights["a"].items():
        assert torch.equal(weights["b"][name], value), name


def test_composes_with_the_mae_loss():
    """The MAE decoder reconstructs exactly the patches the attentive masking removed."""
    cfg = _cfg("loss.mae_weight=0.5", "model.decoder_layers=1", "model.decoder_width=32", "model.decoder_heads=4")
    model = build_model(cfg.model, mae_decoder=True).train()
    images, tokens = _batch(cfg)
    scores = model.patch_scores(images)
    _, _, ids_keep = model.visual(images, _noise(cfg), return_tokens=True, patch_scores=scores)
    top = round(0.5 * visible_count(16, 0.5))
    assert ids_keep[:, :top].tolist() == scores.argsort(dim=1, descending=True)[:, :top].tolist()
    *_, mae = model(images, tokens, _noise(cfg))
    assert mae.ndim == 0 and mae.requires_grad


def test_unmasked_tuning_leaves_the_ema_behind(tmp_path):
    """An attentive run's checkpoint (DCP or consolidated) loads into a random-masking model (the
    unmask overlay's model.masking=random, mask 0): the online tower's weights, no EMA tower."""
    from flip_scale.checkpoint.sources import open_checkpoint
    from flip_scale.config import load_config as load
    from flip_scale.convert import consolidate
    from flip_scale.engine import build_engine
    from flip_scale.preflight import plan_run
    from flip_scale.train import Trainer

    cfg = _cfg()
    trainer = Trainer(cfg, tmp_path / "run", CPU, with_data=False)
    _train_step(trainer, cfg, 0)
    path = trainer.save()
    want = {name: p.detach().clone() for name, p in trainer.engine.model.visual.named_parameters()}
    trainer.close()
    consolidate(path, tmp_path / "consolidated")
    overlay = load(str(Path(__file__).resolve().parent.parent / "configs" / "unmask_tune.yaml"))
    assert overlay.model.masking == "random" and overlay.model.mask_ratio == 0
    plain = _cfg("model.masking=random", "model.mask_ratio=0")
    for source in (path, tmp_path / "consolidated"):
        engine = build_engine(plain, plan_run(plain, 1), "cpu")
        engine.load_weights(open_checkpoint(source))
        assert engine.model.ema_visual is None
        assert all(torch.equal(p, want[name]) for name, p in engine.model.visual.named_parameters()), source
