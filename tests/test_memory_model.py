"""The memory model the dry run prints (flip_scale/parallel/memory.py, README "Sizing") against what
a step really holds on the CPU (fp32), per rank.

What is measured (stable: a count of tensor bytes, not of the process's pages):
  - activations: the bytes of every tensor autograd saves for the backward of the one micro-batch
    (each storage once, parameters left out), which all live at the start of that backward:
    `torch.autograd.graph.saved_tensors_hooks`;
  - states: the bytes of the rank's parameters, gradients and AdamW moments after one step;
  - the unsharded-accumulation term: the bytes of the unsharded gradients FSDP2 holds between the
    micro-batches of one step (dp_shard 2, two micro-batches);
  - per rank, in the same 2-rank launch: the activations under dp_shard 2 (FSDP2's gathered
    parameters left out) and under tp 2 with sequence parallel.
The estimate's checkpointed-block recompute is transient (inside the backward) and left out of the
activation comparison. Margins: states within 1% (the temperature and norms are a few elements);
activations within ACTIVATION_MARGIN (the model counts the blocks; the stem, the pooling and the
projections are not in it).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dist_utils import run_distributed
from flip_scale.config import load_config
from flip_scale.loss import ContrastiveLoss
from flip_scale.models import build_model, count_parameters, masking_noise
from flip_scale.parallel import parallelize_model
from flip_scale.parallel.utils import optimizer_state_bytes, shard_bytes
from flip_scale.preflight import memory_estimate, plan_run
from flip_scale.step import forward_backward

ACTIVATION_MARGIN = 0.10


def _config(recipe: str, overrides: list):
    return load_config(recipe, ["train.device=cpu", "train.precision=fp32", *overrides])


def _batch(plan, step: int = 0):
    arch, batch = plan.arch, plan.cfg.train.global_batch_size
    generator = torch.Generator().manual_seed(step)
    images = torch.randn(batch, 3, arch.image_size, arch.image_size, generator=generator)
    tokens = torch.randint(1, arch.vocab_size, (batch, arch.context_length), generator=generator)
    noise = masking_noise(0, step, torch.arange(batch), arch.num_patches) if plan.cfg.model.mask_ratio > 0 else None
    return images, tokens, noise


def _estimate(plan) -> dict:
    params = count_parameters(build_model(plan.cfg.model, device="meta"))["params_total"]
    return memory_estimate(plan, params)


def _saved_bytes(model, run) -> int:
    """Bytes autograd saves while `run()` builds its graph (each storage once, no parameters: under
    FSDP2 neither the gathered ones, under tensor parallel this rank's local pieces)."""
    def local(tensor):
        return tensor.to_local() if hasattr(tensor, "to_local") else tensor

    params = {local(p).untyped_storage().data_ptr() for p in model.parameters()}
    fsdp_params = _fsdp_params(model)
    storages: dict = {}

    def pack(tensor):
        gathered = {local(p._unsharded_param).untyped_storage().data_ptr() for p in fsdp_params
                    if getattr(p, "_unsharded_param", None) is not None}
        storage = local(tensor).untyped_storage()
        if storage.data_ptr() not in params | gathered and storage.nbytes():
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


CASES = {
    "tiny, mask 0.5": ("configs/tiny.yaml", ["train.global_batch_size=8", "model.mask_ratio=0.5"]),
    "tiny, mask 0, full checkpointing": ("configs/tiny.yaml", ["train.global_batch_size=8", "model.mask_ratio=0",
                                                              "parallel.activation_checkpointing=full"]),
    "B/16, mask 0.75": ("configs/flip_b16.yaml", ["train.global_batch_size=2", "model.mask_ratio=0.75"]),
    "B/16, mask 0.5, every 2nd block checkpointed": (
        "configs/flip_b16.yaml", ["train.global_batch_size=2", "model.mask_ratio=0.5",
                                  "parallel.activation_checkpointing=selective"]),
}


@pytest.mark.parametrize("label", [pytest.param(label, marks=[pytest.mark.slow] if "B/16" in label else [])
                                   for label in CASES])
def test_memory_model_matches_one_step_on_cpu(label):
    torch.manual_seed(0)
    plan = plan_run(_config(*CASES[label]), 1)
    estimate = _estimate(plan)
    model = parallelize_model(build_model(plan.cfg.model, device="meta"), plan.dims, plan.cfg, "cpu")
    images, tokens, noise = _batch(plan)
    loss_fn = ContrastiveLoss()
    holder = {}

    def forward():
        image_features, text_features, scale = model(images, tokens, noise)
        holder["loss"] = loss_fn(image_features, text_features, scale)

    activations = _saved_bytes(model, forward)
    holder.pop("loss").backward()
    optimizer = torch.optim.AdamW(model.parameters(), foreach=True)
    optimizer.step()
    states = shard_bytes(model.parameters()) + shard_bytes(p.grad for p in model.parameters()) \
        + optimizer_state_bytes(optimizer)
    modelled = estimate["activations"] - estimate["recompute"] + estimate["loss"]
    print(f"{label}: activations measured {activations / 2**20:.2f} MiB, modelled {modelled / 2**20:.2f} MiB; "
          f"states measured {states / 2**20:.1f} MiB, modelled {estimate['states'] / 2**20:.1f} MiB")
    assert estimate["unsharded_grads"] == 0 and estimate["gathered_params"] == 0  # one process
    assert abs(states - estimate["states"]) <= 0.01 * states, (states, estimate)
    assert abs(activations - modelled) <= ACTIVATION_MARGIN * activations, (activations, modelled)


def _fsdp_params(model) -> list:
    return [p for module in model.modules() if hasattr(module, "_get_fsdp_state")
            for group in [module._get_fsdp_state()._fsdp_param_group] if group is not None
            for p in group.fsdp_params]


def _held_gradient_bytes(fsdp_param) -> int:
    """Unsharded gradient bytes FSDP2 holds for one parameter between micro-batches (its own
    attributes: the upcast accumulator under mixed precision, else the unsharded parameter's grad)."""
    grad = getattr(fsdp_param, "unsharded_accumulated_grad", None)
    if grad is None:
        grad = getattr(getattr(fsdp_param, "_unsharded_param", None), "grad", None)
    return 0 if grad is None else grad.numel() * grad.element_size()


def _unsharded_gradient_bytes(rank: int, world_size: int, every: str) -> dict:
    cfg = _config("configs/tiny.yaml", ["train.global_batch_size=8", "optim.grad_accum_steps=2",
                                        f"parallel.reduce_every_microbatch={every}"])
    plan = plan_run(cfg, world_size)
    plan.dims.build_mesh("cpu")
    model = parallelize_model(build_model(cfg.model, device="meta"), plan.dims, cfg, "cpu")
    fsdp_params = _fsdp_params(model)
    held = []
    images, tokens, noise = _batch(plan)
    rows = slice(rank * 4, rank * 4 + 4)
    from flip_scale.parallel.memory import reduce_every_microbatch

    params = sum(p.numel() for p in model.parameters())
    reduce_each, _ = reduce_every_microbatch(cfg, plan.dims, params)
    # The bytes held between the micro-batches: read inside the second one's forward.
    hook = model.visual.register_forward_pre_hook(lambda *_: held.append(sum(map(_held_gradient_bytes, fsdp_params))))
    forward_backward(model, ContrastiveLoss(plan.dims.dp_group), images[rows], tokens[rows], noise[rows],
                     microbatches=2, reduce_every_microbatch=reduce_each)
    hook.remove()
    return dict(held=max(held), estimate=_estimate(dataclasses.replace(plan))["unsharded_grads"])


def _layout_activation_bytes(rank: int, world_size: int, layout: str) -> dict:
    """Per-rank saved bytes of one forward of tiny under `layout` (2 ranks), and the model's figure."""
    cfg = _config("configs/tiny.yaml", ["train.global_batch_size=8", "model.mask_ratio=0.5", layout])
    plan = plan_run(cfg, world_size)
    plan.dims.build_mesh("cpu")
    torch.manual_seed(0)
    model = parallelize_model(build_model(cfg.model, device="meta"), plan.dims, cfg, "cpu")
    images, tokens, noise = _batch(plan)
    rows = slice(rank * plan.local_batch, (rank + 1) * plan.local_batch) if plan.dims.dp_size > 1 else slice(None)
    loss_fn, holder = ContrastiveLoss(plan.dims.dp_group), {}

    def forward():
        image_features, text_features, scale = model(images[rows], tokens[rows], noise[rows])
        holder["loss"] = loss_fn(image_features, text_features, scale)

    measured = _saved_bytes(model, forward)
    holder.pop("loss").backward()
    estimate = _estimate(plan)
    return dict(measured=measured, modelled=estimate["activations"] - estimate["recompute"] + estimate["loss"])


def _both_settings(rank: int, world_size: int) -> dict:
    results = {every: _unsharded_gradient_bytes(rank, world_size, every) for every in ("false", "true")}
    for layout in ("parallel.dp_shard=2", "parallel.tp=2"):  # ZeRO-3 over 2; tensor + sequence parallel
        results[layout] = _layout_activation_bytes(rank, world_size, layout)
    return results


@pytest.mark.slow
def test_unsharded_accumulation_term_and_per_rank_activations_match_two_ranks():
    # One 2-rank launch: the unsharded-accumulation term, and the per-rank activations under
    # ZeRO-3 (dp_shard 2: half the batch per rank) and tp 2 with sequence parallel (the blocks'
    # activations split over the ranks), against the model within ACTIVATION_MARGIN.
    for results in run_distributed(_both_settings, 2, timeout=180):
        for layout in ("parallel.dp_shard=2", "parallel.tp=2"):
            measured, modelled = results.pop(layout).values()
            print(f"{layout}: activations measured {measured / 2**20:.3f} MiB, modelled {modelled / 2**20:.3f} MiB")
            assert abs(measured - modelled) <= ACTIVATION_MARGIN * measured, (layout, measured, modelled)
        for every, result in results.items():
            print(f"reduce_every_microbatch={every}: held {result['held']} B, modelled {result['estimate']} B")
        held, modelled = results["false"]["held"], results["false"]["estimate"]
        assert modelled > 0 and abs(held - modelled) <= 0.01 * modelled, results
        assert results["true"]["held"] == 0 and results["true"]["estimate"] == 0, results


def test_dry_run_prints_the_per_rank_memory():
    from flip_scale.train import dry_run

    cfg = _config("configs/tiny.yaml", ["train.global_batch_size=8", "optim.grad_accum_steps=2"])
    estimate = _estimate(plan_run(cfg, 2))
    text = dry_run(cfg, 2)
    line = next(line for line in text.splitlines() if "memory per rank" in line)
    assert f"states {estimate['states'] / 2**20:.1f} MiB" in line
    assert f"unsharded fp32 gradients {estimate['unsharded_grads'] / 2**20:.1f} MiB" in line
    assert f"activations {estimate['activations'] / 2**20:.1f} MiB" in text
    every = dry_run(_config("configs/tiny.yaml", ["train.global_batch_size=8", "optim.grad_accum_steps=2",
                                                  "parallel.reduce_every_microbatch=true"]), 2)
    assert "no unsharded gradients (parallel.reduce_every_microbatch=true)" in every
    piped = dry_run(_config("configs/tiny.yaml", ["train.global_batch_size=8", "parallel.pp=2",
                                                  "parallel.microbatches=2"]), 4)
    line = next(line for line in piped.splitlines() if "memory per rank" in line)
    assert "the pipeline schedule holds them; parallel.reduce_every_microbatch does not apply under pp" in line
    assert "reduce-scatters each instead" not in line


def test_gathered_parameters_two_blocks_and_the_tower_unit_or_the_whole_stage():
    from flip_scale.preflight import largest_block_parameters, tower_unit_parameters

    cfg = _config("configs/tiny.yaml", ["train.global_batch_size=8"])
    plan, params = plan_run(cfg, 2), count_parameters(build_model(cfg.model, device="meta"))["params_total"]
    blocks, unit = largest_block_parameters(plan.arch), tower_unit_parameters(cfg)
    assert unit > 0 and _estimate(plan)["gathered_params"] == (2 * blocks + unit) * 4  # fp32, dp_shard 2
    piped = plan_run(_config("configs/tiny.yaml", ["train.global_batch_size=8", "parallel.pp=2",
                                                   "parallel.microbatches=2"]), 4)
    assert _estimate(piped)["gathered_params"] == int(params * 4 / 2)  # the stage's half, gathered


def test_frozen_parameters_hold_their_weights_only():
    # A locked tower (LiT) and the attentive masking's EMA tower keep fp32 weights, no gradients and
    # no moments: 4 bytes per parameter in the states, where a trained one costs 16 (FSDP2) or 20
    # (DeepSpeed on one rank: its fp32 master copy besides the weights).
    params = count_parameters(build_model(_config("configs/tiny.yaml", []).model, device="meta"))["params_total"]
    for engine, cost in (("parallel.engine=fsdp", 16), ("parallel.engine=deepspeed", 20)):
        base = _estimate(plan_run(_config("configs/tiny.yaml", [engine]), 1))["states"]
        assert base == cost * params
        locked = plan_run(_config("configs/tiny.yaml", [engine, "model.lock_vision=true"]), 1)
        vision = count_parameters(build_model(locked.cfg.model, device="meta"))["params_vision"]
        assert _estimate(locked)["states"] == base - (cost - 4) * vision
        if engine.endswith("fsdp"):  # attentive masking runs under FSDP2 only
            attentive = plan_run(_config("configs/tiny.yaml", [engine, "model.masking=attentive"]), 1)
            ema = count_parameters(build_model(attentive.cfg.model, device="meta"))["params_ema"]
            assert _estimate(attentive)["states"] == base + 4 * ema
