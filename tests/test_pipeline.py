"""Pipeline parallelism: the stage split, the stage modules, and equality with one process.

The multi-rank tests run every layout from the one-process model's state dict on the same global
batch (mask_ratio 0.5, fp32, gloo on the CPU) and compare the loss of each of 3 AdamW steps and
every parameter after them, and the gradients of the first step, with one process training on the
whole batch. Layouts that share a world size run in one spawn. Tolerances: see below.
"""

from __future__ import annotations

import pytest
import torch

from flip_scale.config import ModelConfig
from flip_scale.models import build_model
from flip_scale.models.masking import masking_noise
from flip_scale.models.registry import MODEL_SIZES, arch_from_config
from flip_scale.parallel.pipeline import (
    build_stage_module,
    check_microbatches,
    naive_split,
    split_stage_output,
    split_stages,
    stage_state_dict,
)

TINY = dict(name="tiny", vocab_size=64, image_size=16, patch_size=4, vision_layers=4, text_layers=2)
MASK_RATIO = 0.5
GLOBAL_BATCH = 8
STEPS = 3
SEED = 0
# fp32. The loss and the gradients agree to float round-off (the pipeline sums the micro-batches'
# contributions in another order than one backward over the whole batch). Adam divides each
# gradient entry by its own running magnitude, so an entry whose gradient is ~1e-7 turns round-off
# of ~1e-10 into a visible step difference; after 3 steps at lr 1e-3 (each parameter moves ~3e-3)
# parameters agree to ~3e-5 (one process with 4 micro-batches through flip_scale.step: 2e-5).
LOSS_TOLERANCE = 1e-5
GRAD_TOLERANCE = 1e-5
# Gradient-norm clipping below the tiny model's norm (asserted), so the global norm over the stages
# (and the tp / dp shards within them) is what scales every step.
GRAD_CLIP = 0.5
NORM_TOLERANCE = 1e-5  # relative
PARAM_TOLERANCE = 1e-4


def tiny_cfg(**overrides) -> ModelConfig:
    return ModelConfig(mask_ratio=MASK_RATIO, **{**TINY, **overrides})


# ----------------------------------------------------------------------------- split (no processes)


def _max_stage_flops(specs) -> int:
    return max(spec.flops for spec in specs)


@pytest.mark.parametrize("name,num_stages", [("tiny", 2), ("tiny", 3), ("tiny", 6), ("H/14", 4), ("H/14", 5),
                                              ("G/14", 8), ("G/14", 16)])
def test_split_assigns_every_block_once_in_order(name, num_stages):
    arch = arch_from_config(ModelConfig(**TINY)) if name == "tiny" else MODEL_SIZES[name]
    specs = split_stages(arch, MASK_RATIO, num_stages, verbose=False)
    assert len(specs) == num_stages
    assert [s.index for s in specs] == list(range(num_stages))
    assert specs[0].is_first and specs[-1].is_last and not any(s.is_first for s in specs[1:])
    vision = [block for s in specs for block in s.vision_range]
    text = [block for s in specs for block in s.text_range]
    assert vision == list(range(arch.vision.layers))
    assert text == list(range(arch.text.layers))
    assert all(len(s.vision_range) + len(s.text_range) >= 1 for s in specs)
    # Balanced within 1% of the best split, and never worse than cutting each tower evenly.
    assert _max_stage_flops(specs) <= _max_stage_flops(naive_split(arch, MASK_RATIO, num_stages))


def test_split_balances_better_than_even_split():
    # ViT-H/14 over 5 stages: 32 image and 24 text blocks do not divide by 5; cutting each tower
    # evenly gives stage 0 seven image + five text blocks + the patch embedding.
    arch = MODEL_SIZES["H/14"]
    balanced, naive = split_stages(arch, MASK_RATIO, 5), naive_split(arch, MASK_RATIO, 5)
    mean = sum(s.flops for s in balanced) / 5
    assert _max_stage_flops(balanced) / mean < 1.03
    assert _max_stage_flops(naive) / mean > 1.08
    assert _max_stage_flops(balanced) < 0.95 * _max_stage_flops(naive)


def test_split_uses_visible_token_count():
    # tiny: an image block at 50% masking (9 tokens) is cheaper than a text block (32 tokens), at
    # 0% masking (17 tokens) dearer; the 3-stage split moves blocks accordingly.
    arch = arch_from_config(ModelConfig(**TINY))
    masked = split_stages(arch, 0.5, 3, verbose=False)
    unmasked = split_stages(arch, 0.0, 3, verbose=False)
    assert [s.vision_blocks for s in masked] != [s.vision_blocks for s in unmasked]
    assert sum(s.flops for s in masked) < sum(s.flops for s in unmasked)


def test_split_refuses_impossible_split():
    arch = arch_from_config(ModelConfig(**TINY))
    with pytest.raises(ValueError, match=r"4 image blocks \+ 2 text blocks = 6 blocks over 7 pipeline stages"):
        split_stages(arch, MASK_RATIO, 7)
    with pytest.raises(ValueError, match="at least one stage"):
        split_stages(arch, MASK_RATIO, 0)


def test_microbatch_count_checks():
    with pytest.raises(ValueError, match=r"parallel.microbatches=1 < parallel.pp=2"):
        check_microbatches(1, 2, "1f1b")
    with pytest.raises(ValueError, match="interleaved 1F1B"):
        check_microbatches(5, 2, "interleaved_1f1b")
    with pytest.raises(ValueError, match="unknown schedule"):
        check_microbatches(4, 2, "zero_bubble")
    check_microbatches(4, 2, "interleaved_1f1b")


def test_feature_cache_refuses_missing_mask_noise_and_uneven_batch():
    from types import SimpleNamespace

    from flip_scale.parallel.pipeline import pipeline_forward_backward

    cfg = tiny_cfg()
    stage = build_stage_module(build_model(cfg), split_stages(arch_from_config(cfg), MASK_RATIO, 2, verbose=False)[0])
    pipe = SimpleNamespace(has_first_stage=True, microbatches=4, modules=[stage])
    images, tokens, noise = global_batch(0)
    with pytest.raises(ValueError, match="needs mask_noise"):
        pipeline_forward_backward(pipe, None, images, tokens, None)
    with pytest.raises(ValueError, match="6 samples cannot be split into parallel.microbatches=4"):
        pipeline_forward_backward(pipe, None, images[:6], tokens[:6], noise[:6])


@pytest.mark.parametrize("num_stages", [1, 2, 4])
@pytest.mark.parametrize("text_causal", [False, True])
def test_stage_chain_equals_whole_model(num_stages, text_causal):
    """Stages run one after another in one process give FLIPModel's outputs, bit for bit, and their
    state-dict keys are disjoint and make up the whole model's."""
    cfg = tiny_cfg(text_causal=text_causal, text_pad_mask=text_causal)
    torch.manual_seed(SEED)
    model = build_model(cfg)
    images, tokens, noise = global_batch(0)
    expected = model(images, tokens, noise)
    specs = split_stages(arch_from_config(cfg), MASK_RATIO, num_stages, verbose=False)
    stages = [build_stage_module(model, spec) for spec in specs]
    x = (images, tokens, noise)
    for stage in stages:
        x = stage(*x)
    for got, want in zip(split_stage_output(x, model.arch.embed_dim), expected):
        assert torch.equal(got, want)
    keys = [key for stage in stages for key in stage.state_dict()]
    assert len(keys) == len(set(keys)) and set(keys) == set(model.state_dict())
    assert stage_state_dict(model.state_dict(), stages[-1]).keys() == stages[-1].state_dict().keys()


def test_stage_from_meta_model_keeps_names():
    cfg = tiny_cfg()
    meta = build_model(cfg, device="meta")
    specs = split_stages(arch_from_config(cfg), MASK_RATIO, 2, verbose=False)
    first, last = (build_stage_module(meta, spec) for spec in specs)
    assert "visual.patch_embed.weight" in first.state_dict() and "logit_scale" not in first.state_dict()
    assert "logit_scale" in last.state_dict() and "text.token_embedding.weight" not in last.state_dict()
    assert len(meta.visual.blocks) == 4  # the source model is left whole


# ----------------------------------------------------------------------------- data and reference


def global_batch(step: int):
    """The step's global batch: images, padded tokens, and the per-sample mask noise."""
    generator = torch.Generator().manual_seed(1000 + step)
    images = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=generator)
    tokens = torch.randint(1, 64, (GLOBAL_BATCH, 32), generator=generator)
    lengths = torch.randint(4, 32, (GLOBAL_BATCH, 1), generator=generator)
    tokens = tokens.masked_fill(torch.arange(32)[None, :] >= lengths, 0)
    noise = masking_noise(SEED, step, torch.arange(GLOBAL_BATCH), 16)
    return images, tokens, noise


def make_optimizer(params):
    # eps well above float noise: attention's key bias has an exactly-zero gradient in exact
    # arithmetic, and with eps=1e-8 Adam would turn its ~1e-10 round-off into lr-sized steps.
    return torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1, foreach=False)


def reference_run(model_kwargs: dict):
    """One process, whole batch: (losses per step, initial state dict, final state dict, step-1 grads)."""
    from flip_scale.loss import ContrastiveLoss

    torch.manual_seed(SEED)
    model = build_model(tiny_cfg(**model_kwargs))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = make_optimizer(model.parameters())
    loss_fn = ContrastiveLoss(None)
    losses, norms = [], []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = loss_fn(*model(*global_batch(step)))
        loss.backward()
        if step == 0:
            grads = {name: param.grad.clone() for name, param in model.named_parameters()}
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP).item())
        optimizer.step()
        model.clamp_logit_scale()
        losses.append(loss.item())
    assert min(norms) > GRAD_CLIP, f"clipping must be active in the reference: norms {norms}"
    return losses, initial, {k: v.clone() for k, v in model.state_dict().items()}, grads, norms


# ----------------------------------------------------------------------------- one layout on one rank


def _run_layout(layout: dict, initial: dict) -> dict:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from flip_scale.loss import ContrastiveLoss
    from flip_scale.parallel import init_buffers
    from flip_scale.parallel.utils import clip_grad_norm_
    from flip_scale.parallel.dims import ParallelDims
    from flip_scale.parallel.pipeline import build_pipeline, build_stage_modules, num_stages, pipeline_forward_backward

    pp, dp, tp, schedule = layout["pp"], layout.get("dp", 1), layout.get("tp", 1), layout["schedule"]
    dims = ParallelDims(pp=pp, dp_replicate=1, dp_shard=dp, tp=tp, world_size=dist.get_world_size())
    dims.build_mesh("cpu")
    cfg = tiny_cfg(**layout.get("model", {}))
    specs = split_stages(arch_from_config(cfg), MASK_RATIO, num_stages(pp, schedule), verbose=False)
    modules = build_stage_modules(build_model(cfg, device="meta"), specs, dims.pp_rank, pp, schedule)
    for module in modules:
        if tp > 1:
            from flip_scale.parallel.tensor import apply_tp

            apply_tp(module, dims.tp_mesh)
        if dp > 1:
            from flip_scale.parallel.fsdp import apply_fsdp

            # With pipelining FSDP2 keeps the gathered weights from forward to backward (as
            # torchtitan): otherwise every micro-batch of both passes gathers them again.
            apply_fsdp(module, dims.dp_mesh, reshard_after_forward=False)
        module.to_empty(device="cpu")
        if dp > 1:
            from flip_scale.parallel.fsdp import register_scalar_grad_averaging

            # The temperature stays out of FSDP; its gradient-averaging hook died with to_empty.
            register_scalar_grad_averaging(module)
        set_model_state_dict(module, stage_state_dict(initial, module), options=StateDictOptions(full_state_dict=True))
        init_buffers(module)
        if tp > 1 and dp == 1:
            from flip_scale.parallel.tensor import replicate_partial_gradients

            replicate_partial_gradients(module)

    pipe = build_pipeline(modules, dims.pp_mesh, schedule, layout["microbatches"], "cpu")
    optimizer = make_optimizer(list(pipe.parameters()))
    loss_fn = ContrastiveLoss(dims.dp_group)
    local = GLOBAL_BATCH // dims.dp_size
    rows = slice(dims.dp_rank * local, (dims.dp_rank + 1) * local)
    losses, norms = [], []
    for step in range(STEPS):
        images, tokens, noise = (t[rows] for t in global_batch(step))
        optimizer.zero_grad()
        loss = pipeline_forward_backward(pipe, loss_fn, images, tokens, noise)
        if step == 0:
            grads = {name: _full(param.grad) for module in modules for name, param in module.named_parameters()}
        # The trainer's layout-aware clipping: the norm sums over pp stages, tp and dp shards.
        norms.append(clip_grad_norm_(list(pipe.parameters()), GRAD_CLIP, dims).item())
        optimizer.step()
        pipe.clamp_logit_scale()
        if dims.dp_group is not None:  # the global loss is the mean of the data-parallel ranks' losses
            dist.all_reduce(loss, group=dims.dp_group)
            loss /= dims.dp_size
        losses.append(loss.item())
    params = {}
    for module in modules:
        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
        params.update({k: v.detach().clone() for k, v in full.items()})
    keep = dims.dp_rank == 0 and dims.tp_rank == 0
    return {"losses": losses, "norms": norms, "params": params if keep else {}, "grads": grads if keep else {}}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def _run_layouts(rank: int, world_size: int, layouts: list, initials: list) -> list:
    return [_run_layout(layout, initial) for layout, initial in zip(layouts, initials)]


def _check_against_reference(layouts: list, world_size: int, timeout: float):
    from dist_utils import run_distributed

    references = [reference_run(layout.get("model", {})) for layout in layouts]
    results = run_distributed(_run_layouts, world_size, args=(layouts, [r[1] for r in references]), timeout=timeout)
    report = []
    for layout, (ref_losses, ref_initial, ref_params, ref_grads, ref_norms), per_rank in zip(
        layouts, references, zip(*results)
    ):
        params, grads = {}, {}
        for result in per_rank:
            assert not set(result["params"]) & set(params), "two stages hold the same parameter"
            params.update(result["params"])
            grads.update(result["grads"])
        assert set(params) == set(ref_params) and set(grads) == set(ref_grads), f"{layout}: parameters missing or extra"
        loss_diff = max(abs(a - b) for result in per_rank for a, b in zip(result["losses"], ref_losses))
        # Gradients of step 1, relative to the largest gradient entry of each parameter.
        grad_diff = max((grads[k] - g).abs().max().item() / g.abs().max().item() for k, g in ref_grads.items())
        param_diff = max((params[k] - ref_params[k]).abs().max().item() for k in ref_params)
        # Every rank computes the same global norm (all stages, all shards).
        norm_diff = max(abs(a - b) / b for result in per_rank for a, b in zip(result["norms"], ref_norms))
        report.append(
            f"{layout}: max |loss diff| {loss_diff:.1e}, max relative grad diff (step 1) {grad_diff:.1e}, "
            f"max relative clipped-norm diff {norm_diff:.1e}, max |param diff| (after {STEPS} AdamW steps) {param_diff:.1e}"
        )
        assert loss_diff < LOSS_TOLERANCE and grad_diff < GRAD_TOLERANCE and param_diff < PARAM_TOLERANCE, report[-1]
        assert norm_diff < NORM_TOLERANCE, report[-1]
        # The parameters moved: the comparison is not between two untouched copies.
        assert max((ref_params[k] - v).abs().max().item() for k, v in ref_initial.items()) > 1e-3
    print("\n".join(report))
    return report


def test_pipeline_two_ranks_matches_one_process():
    """pp=2 on 2 ranks: 1F1B (4 micro-batches), GPipe (2, with the text tower's padding mask and
    causal pooling, so the tokens travel between stages), interleaved 1F1B (4 stages, some holding
    one tower only)."""
    layouts = [
        {"pp": 2, "schedule": "1f1b", "microbatches": 4},
        {"pp": 2, "schedule": "gpipe", "microbatches": 2, "model": {"text_pad_mask": True, "text_causal": True}},
        {"pp": 2, "schedule": "interleaved_1f1b", "microbatches": 4},
    ]
    report = _check_against_reference(layouts, world_size=2, timeout=150)
    assert len(report) == len(layouts)  # every layout was compared (each comparison asserts above)


def test_pipeline_with_fsdp_and_tp_matches_one_process():
    """pp=2 x dp_shard=2 (FSDP2) and pp=2 x tp=2 (DTensor tensor + sequence parallel), 4 ranks."""
    layouts = [
        {"pp": 2, "dp": 2, "schedule": "1f1b", "microbatches": 4},
        {"pp": 2, "tp": 2, "schedule": "1f1b", "microbatches": 4},
    ]
    report = _check_against_reference(layouts, world_size=4, timeout=170)
    assert len(report) == len(layouts)  # every layout was compared (each comparison asserts above)


# ----------------------------------------------------------------------------- the trainer's own build


def _engine_config(parallel: dict):
    from flip_scale.config import Config, OptimConfig, ParallelConfig, ScheduleConfig, TrainConfig

    # Adam's eps well above float noise (see make_optimizer); a constant lr, clipping active.
    return Config(
        train=TrainConfig(global_batch_size=GLOBAL_BATCH, seed=SEED, precision="fp32", device="cpu"),
        model=tiny_cfg(), optim=OptimConfig(lr=1e-3, grad_clip=GRAD_CLIP, weight_decay=0.1, eps=1e-6),
        schedule=ScheduleConfig(name="constant"), parallel=ParallelConfig(**parallel),
    )


def _train_engine(parallel: dict, world_size: int) -> dict:
    """The trainer's path: preflight's plan, `build_engine` (parallelize_pipeline: TP, FSDP2 under
    tp, the stage split, the schedule; weights initialised by (seed, name)), its forward_backward and
    clip_and_step, on this rank's data-parallel rows of each global batch."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from flip_scale.engine import build_engine
    from flip_scale.preflight import plan_run

    cfg = _engine_config(parallel)
    plan = plan_run(cfg, world_size, training=False)
    engine = build_engine(cfg, plan, torch.device("cpu"))
    dims = engine.dims
    local = GLOBAL_BATCH // dims.dp_size
    rows = slice(dims.dp_rank * local, (dims.dp_rank + 1) * local)
    losses, norms, grads = [], [], {}
    for step in range(STEPS):
        images, tokens, noise = (t[rows] for t in global_batch(step))
        engine.train()
        loss = engine.forward_backward(images, tokens, noise).detach().clone()
        if step == 0:
            grads = {name: _full(param.grad) for part in engine.model_parts for name, param in part.named_parameters()}
        norms.append(float(engine.clip_and_step().grad_norm))
        if dims.dp_group is not None:
            dist.all_reduce(loss, group=dims.dp_group)
            loss /= dims.dp_size
        losses.append(loss.item())
    params = {}
    for part in engine.model_parts:
        full = get_model_state_dict(part, options=StateDictOptions(full_state_dict=True))
        params.update({k: v.detach().clone() for k, v in full.items()})
    keep = dims.dp_rank == 0 and dims.tp_rank == 0
    engine.close()
    return {"losses": losses, "norms": norms, "params": params if keep else {}, "grads": grads if keep else {}}


def _train_engines(rank: int, world_size: int, layouts: list) -> list:
    return [_train_engine(parallel, world_size) for parallel in layouts]


def test_trainer_pipeline_layouts_match_one_process():
    """pp=2 x tp=2 and pp=2 x dp_shard=2 as the trainer builds them (the engine seam), against the
    same engine on one process: per-parameter gradients of step 1, losses and norms of every step,
    every parameter after 3 steps."""
    from dist_utils import run_distributed

    reference = _train_engine({}, 1)
    layouts = [dict(pp=2, tp=2, dp_shard=1, microbatches=4), dict(pp=2, dp_shard=2, microbatches=4)]
    results = run_distributed(_train_engines, 4, args=(layouts,), timeout=200)
    report = []
    for index, layout in enumerate(layouts):
        per_rank = [results[rank][index] for rank in range(4)]
        params, grads = {}, {}
        for result in per_rank:
            params.update(result["params"])
            grads.update(result["grads"])
        assert set(params) == set(reference["params"]) and set(grads) == set(reference["grads"]), layout
        grad_diff = {k: (grads[k] - g).abs().max().item() / g.abs().max().item() for k, g in reference["grads"].items()
                     if g.abs().max() > 0}
        worst = max(grad_diff, key=grad_diff.get)
        param_diff = max((params[k] - v).abs().max().item() for k, v in reference["params"].items())
        loss_diff = max(abs(a - b) for result in per_rank for a, b in zip(result["losses"], reference["losses"]))
        norm_diff = max(abs(a - b) / b for result in per_rank for a, b in zip(result["norms"], reference["norms"]))
        report.append(f"{layout}: loss {loss_diff:.1e}, grad (relative, worst {worst}) {grad_diff[worst]:.1e}, "
                      f"norm {norm_diff:.1e}, params after {STEPS} steps {param_diff:.1e}")
        assert grad_diff[worst] < GRAD_TOLERANCE and param_diff < PARAM_TOLERANCE, report[-1]
        assert loss_diff < LOSS_TOLERANCE and norm_diff < NORM_TOLERANCE, report[-1]
    assert min(reference["norms"]) > GRAD_CLIP  # clipping was active
    print("\n".join(report))
