"""Every parallel layout trains exactly like one process holding the whole batch (CPU, gloo, fp32).

The reference: one process, `torch.manual_seed(0); build_model(...)`, the same 3 global batches
(mask noise from each sample's global index), AdamW, gradient clipping, temperature clamp. Each
layout builds the model on the meta device, parallelises it with `parallelize_model`, trains the
same 3 steps on its data-parallel slice of each batch, and must give the same loss at step 1,
the same clipped gradient norms and the same parameters after step 3 (full, gathered tensors).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dist_utils import run_distributed
from flip_scale.config import Config, ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from flip_scale.loss import ContrastiveLoss
from flip_scale.models import build_model, masking_noise
from flip_scale.models.registry import arch_from_config
from flip_scale.parallel import LayoutError, ParallelDims, clip_grad_norm_, parallelize_model
from flip_scale.parallel.memory import reduce_every_microbatch
from flip_scale.parallel.utils import optimizer_state_bytes, parameter_counts_per_rank, shard_bytes
from flip_scale.step import forward_backward

pytestmark = pytest.mark.slow

SEED = 0
GLOBAL_BATCH = 8
STEPS = 3
LR = 1e-3
GRAD_CLIP = 0.5  # below the norms of this model, so clipping really scales the gradients
# fp32 on CPU; layouts differ from one process only in the order of additions.
LOSS_TOL = 1e-5
NORM_RTOL = 1e-4
GRAD_RTOL = 1e-5  # of each parameter's largest gradient entry
PARAM_ATOL = 3e-6  # after 3 AdamW steps of lr 1e-3 (each step moves a weight by up to ~1e-3)


def tiny_model_config(**overrides) -> ModelConfig:
    # 16 px / 4 px patches = 16 patches, mask 0.5 -> 1 CLS + 8 visible = 9 image tokens: uneven over
    # tp=2 and tp=4 (sequence parallel must cope); 8 text tokens. Heads 4 and MLP 64 divide by 4.
    base = dict(
        name="tiny", vocab_size=64, image_size=16, patch_size=4, context_length=8, mask_ratio=0.5,
        embed_dim=16, vision_width=32, vision_layers=2, vision_heads=4, vision_mlp_dim=64,
        text_width=32, text_layers=2, text_heads=4, text_mlp_dim=64,
    )
    base.update(overrides)
    return ModelConfig(**base)


def tiny_config(**parallel) -> Config:
    return Config(
        train=TrainConfig(global_batch_size=GLOBAL_BATCH, seed=SEED, precision="fp32", device="cpu"),
        model=tiny_model_config(),
        optim=OptimConfig(lr=LR, grad_clip=GRAD_CLIP, weight_decay=0.1),
        parallel=ParallelConfig(**parallel),
    )


def global_batch(step: int, model_cfg: ModelConfig):
    """Images, tokens and mask noise of the whole global batch of `step`."""
    generator = torch.Generator().manual_seed(1000 + step)
    images = torch.randn(GLOBAL_BATCH, 3, model_cfg.image_size, model_cfg.image_size, generator=generator)
    tokens = torch.randint(1, model_cfg.vocab_size, (GLOBAL_BATCH, model_cfg.context_length), generator=generator)
    num_patches = (model_cfg.image_size // model_cfg.patch_size) ** 2
    noise = masking_noise(SEED, step, torch.arange(GLOBAL_BATCH), num_patches)
    return images, tokens, noise


def make_optimizer(model):
    # eps 1e-6 rather than 1e-8: the key bias of attention has an exactly-zero gradient in exact
    # arithmetic (softmax ignores a per-query constant), so its computed gradient is rounding noise
    # (~1e-9) that Adam would normalise into lr-sized, layout-dependent steps. foreach=True, as the
    # trainer: it refuses a parameter list mixing plain tensors and DTensors.
    return torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1, foreach=True)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def train(model, cfg: Config, dims=None, dp_rank: int = 0, dp_size: int = 1, microbatches: int = 1, exact: bool = True,
          grads: dict | None = None):
    """STEPS optimizer steps on this rank's slice; -> (losses of the global batch, grad norms, optimizer).
    `grads`: filled with every parameter's full gradient of step 1, before clipping."""
    import torch.distributed as dist

    optimizer = make_optimizer(model)
    loss_fn = ContrastiveLoss(dims.dp_group if dims is not None else None)
    every = False
    if dims is not None:  # the engine's choice (parallel.reduce_every_microbatch) for this layout
        with_accum = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, grad_accum_steps=microbatches))
        every, _ = reduce_every_microbatch(with_accum, dims, sum(p.numel() for p in model.parameters()))
    local = GLOBAL_BATCH // dp_size
    rows = slice(dp_rank * local, (dp_rank + 1) * local)
    losses, norms = [], []
    for step in range(STEPS):
        images, tokens, noise = global_batch(step, cfg.model)
        optimizer.zero_grad(set_to_none=True)
        loss = forward_backward(model, loss_fn, images[rows], tokens[rows], noise[rows], microbatches, exact,
                                reduce_every_microbatch=every)
        if step == 0 and grads is not None:
            grads.update({name: _full(param.grad) for name, param in model.named_parameters()})
        if dims is not None and dims.dp_group is not None:  # each rank's loss is the mean of its rows
            dist.all_reduce(loss, group=dims.dp_group)
            loss = loss / dp_size
        norm = clip_grad_norm_(model.parameters(), cfg.optim.grad_clip, dims)
        optimizer.step()
        model.clamp_logit_scale()
        losses.append(loss.item())
        norms.append(norm.item())
    return losses, norms, optimizer


def reference_model(model_cfg: ModelConfig):
    torch.manual_seed(SEED)
    return build_model(model_cfg, device="cpu")


@pytest.fixture(scope="module")
def reference():
    """One process, whole batch: losses, clipped norms, final parameters, parameter+AdamW bytes."""
    cfg = tiny_config()
    model = reference_model(cfg.model)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {}
    losses, norms, optimizer = train(model, cfg, grads=grads)
    nbytes = shard_bytes(model.parameters()) + optimizer_state_bytes(optimizer)
    return dict(initial=initial, losses=losses, norms=norms, params=model.state_dict(), bytes=nbytes, grads=grads,
                buffers={k: v.clone() for k, v in model.named_buffers()})


def assert_matches_reference(result: dict, reference: dict, label: str) -> None:
    for got, want in zip(result["losses"], reference["losses"]):  # step 1, and the steps after updates
        assert abs(got - want) <= LOSS_TOL, (label, result["losses"], reference["losses"])
    for got, want in zip(result["norms"], reference["norms"]):
        assert abs(got - want) <= NORM_RTOL * want, (label, result["norms"], reference["norms"])
    assert set(result["params"]) == set(reference["params"]), label
    if "grads" in result:
        # Per parameter, before clipping: a wrong scale of one tensor (a gradient averaged twice, or
        # summed where it should be averaged) hides in the total norm but not here.
        assert set(result["grads"]) == set(reference["grads"]), label
        for name, want in reference["grads"].items():
            error = (result["grads"][name] - want).abs().max().item()
            assert error <= GRAD_RTOL * want.abs().max().item() + 1e-8, (
                f"{label}: the step-1 gradient of {name} differs by {error:.3g} (largest entry {want.abs().max():.3g})")
    for name, want in reference["params"].items():
        got = result["params"][name]
        assert got.shape == want.shape, (label, name)
        error = (got - want).abs().max().item()
        assert error <= PARAM_ATOL, f"{label}: {name} differs by {error:.3g} after {STEPS} steps"


# ----------------------------------------------------------------------------- multi-rank layouts

LAYOUTS = {
    # name: (parallel config, sequence parallel, micro-batches per step)
    "dp_shard=4": (dict(dp_shard=4), True, 1),
    "dp_shard=2 x tp=2 (SP), full AC": (dict(dp_shard=2, tp=2, activation_checkpointing="full"), True, 1),
    "dp_shard=2 x tp=2 (no SP)": (dict(dp_shard=2, tp=2), False, 1),
    "dp_replicate=2 x dp_shard=2, selective AC": (
        dict(dp_replicate=2, dp_shard=2, activation_checkpointing="selective", activation_checkpointing_every=2), True, 1),
    "tp=4 (SP, 9 image tokens over 4 ranks)": (dict(dp_shard=1, tp=4), True, 1),
    "dp_replicate=2 x tp=2": (dict(dp_replicate=2, dp_shard=1, tp=2), True, 1),
    "dp_shard=4, 2 exact micro-batches, CPU offload": (dict(dp_shard=4, cpu_offload=True), True, 2),
    "dp_shard=4, 2 exact micro-batches, reduce-scatter every micro-batch": (
        dict(dp_shard=4, reduce_every_microbatch="true"), True, 2),
}


def _count_sync_skips(model) -> list:
    """A list that gets one True per set_requires_gradient_sync(False) call on `model`."""
    calls, setter = [], model.set_requires_gradient_sync

    def spy(flag, *args, **kwargs):
        calls.append(not flag)
        return setter(flag, *args, **kwargs)

    model.set_requires_gradient_sync = spy
    return calls


def _run_layouts(rank: int, world_size: int, layouts: dict) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    results = {}
    for label, (parallel, sequence_parallel, microbatches) in layouts.items():
        cfg = tiny_config(**parallel)
        dims = ParallelDims.from_config(cfg.parallel, world_size, arch_from_config(cfg.model), GLOBAL_BATCH, microbatches)
        dims.build_mesh("cpu")
        model = build_model(cfg.model, device="meta")
        model = parallelize_model(model, dims, cfg, "cpu", sequence_parallel=sequence_parallel)
        # Cloned: plain (unsharded) parameters come back as views of the live parameter.
        initial = {k: v.clone() for k, v in get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)).items()}
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        syncs_skipped = _count_sync_skips(model)  # accumulation without a reduce-scatter
        grads = {}
        losses, norms, optimizer = train(model, cfg, dims, dims.dp_rank, dims.dp_size, microbatches, grads=grads)
        params = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        nbytes = shard_bytes(model.parameters()) + optimizer_state_bytes(optimizer)
        counts = parameter_counts_per_rank(model)
        if rank == 0:
            results[label] = dict(initial=initial, buffers=buffers, losses=losses, norms=norms, params=params,
                                  grads=grads, syncs_skipped=sum(syncs_skipped),
                                  describe=dims.describe(), counts=counts, total=sum(p.numel() for p in model.parameters()))
        results.setdefault("bytes", {})[label] = nbytes
    return results


@pytest.fixture(scope="module")
def layout_results():
    return run_distributed(_run_layouts, 4, (LAYOUTS,), timeout=240)


@pytest.mark.parametrize("label", list(LAYOUTS))
def test_layout_matches_one_process(label, layout_results, reference):
    result = layout_results[0][label]
    # Materialised from the meta device: the one-process initial weights and position table, exactly.
    for name, want in reference["initial"].items():
        assert torch.equal(result["initial"][name], want), f"{label}: initial {name} differs"
    for name, want in reference["buffers"].items():
        assert torch.equal(result["buffers"][name], want), f"{label}: buffer {name} differs"
    assert_matches_reference(result, reference, label)


def test_reduce_every_microbatch_skips_no_reduction(layout_results):
    # Equal to one process (above) both ways; only the default layout holds unsharded gradients.
    assert layout_results[0]["dp_shard=4, 2 exact micro-batches, CPU offload"]["syncs_skipped"] == STEPS
    assert layout_results[0]["dp_shard=4, 2 exact micro-batches, reduce-scatter every micro-batch"]["syncs_skipped"] == 0


def test_zero3_shards_parameters_and_optimizer_state(layout_results, reference):
    # Per-rank parameter + AdamW state bytes under dp_shard=4: about a quarter of one process.
    ratios = [result["bytes"]["dp_shard=4"] / reference["bytes"] for result in layout_results]
    print(f"dp_shard=4: parameter + AdamW bytes per rank / one process = {[round(r, 3) for r in ratios]}")
    for rank, ratio in enumerate(ratios):
        assert ratio <= 0.3, f"rank {rank} holds {ratio:.2f}x the one-process parameter + optimizer bytes"
    # The per-rank counts the trainer logs: the 4 shards add up to the model (plus 3 more copies of
    # the replicated one-element temperature); none holds it whole.
    result = layout_results[0]["dp_shard=4"]
    assert sum(result["counts"]) == result["total"] + 3 and max(result["counts"]) < result["total"] / 3


# ----------------------------------------------------------------------------- one process


def test_grad_accumulation_exact_matches_whole_batch(reference):
    # grad_accum_steps=4: 4 micro-batches of 2 through the two-pass feature cache.
    cfg = tiny_config()
    model = reference_model(cfg.model)
    losses, norms, _ = train(model, cfg, microbatches=4)
    assert_matches_reference(dict(losses=losses, norms=norms, params=model.state_dict()), reference, "accum 4")


def test_per_microbatch_contrast_differs(reference):
    # Contrasting each micro-batch alone is different math; the test above can tell them apart.
    cfg = tiny_config()
    model = reference_model(cfg.model)
    losses, _, _ = train(model, cfg, microbatches=4, exact=False)
    assert abs(losses[0] - reference["losses"][0]) > 100 * LOSS_TOL


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_one_process_parallelize_with_checkpointing(mode, reference):
    # World size 1: parallelize_model materialises, initialises and checkpoints; keys unchanged.
    cfg = tiny_config(activation_checkpointing=mode, activation_checkpointing_every=2)
    dims = ParallelDims.from_config(cfg.parallel, 1, arch_from_config(cfg.model), GLOBAL_BATCH)
    model = parallelize_model(build_model(cfg.model, device="meta"), dims, cfg, "cpu")
    checkpointed = [name for name, module in model.named_modules() if getattr(module, "activation_checkpointed", False)]
    expected = (["visual.blocks.0", "visual.blocks.1", "text.blocks.0", "text.blocks.1"] if mode == "full"
                else ["visual.blocks.1", "text.blocks.1"])
    assert sorted(checkpointed) == sorted(expected)
    assert list(model.state_dict()) == list(reference["params"])
    for name, want in reference["initial"].items():
        assert torch.equal(model.state_dict()[name], want), name
    losses, norms, _ = train(model, cfg, dims)
    assert_matches_reference(dict(losses=losses, norms=norms, params=model.state_dict()), reference, f"AC {mode}")


@pytest.mark.parametrize("towers, expected", [
    ("vision", ["visual.blocks.0", "visual.blocks.1"]),
    ("text", ["text.blocks.0", "text.blocks.1"]),
])
def test_checkpointing_per_tower(towers, expected, reference):
    cfg = tiny_config(activation_checkpointing="full", activation_checkpointing_towers=towers)
    dims = ParallelDims.from_config(cfg.parallel, 1, arch_from_config(cfg.model), GLOBAL_BATCH)
    model = parallelize_model(build_model(cfg.model, device="meta"), dims, cfg, "cpu")
    checkpointed = [name for name, module in model.named_modules() if getattr(module, "activation_checkpointed", False)]
    assert sorted(checkpointed) == sorted(expected)
    losses, norms, _ = train(model, cfg, dims)
    assert_matches_reference(dict(losses=losses, norms=norms, params=model.state_dict()), reference, f"AC {towers}")


def test_compiled_blocks_keep_the_keys(reference):
    """parallel.compile: every block's forward goes through torch.compile and the state dict keys
    stay the eager model's. The numbers are compared with the eager reference on 2 ranks below
    (dp_shard=2 is the one-process math); compiling once more here would add half a minute."""
    cfg = tiny_config(compile=True, activation_checkpointing="none")
    dims = ParallelDims.from_config(cfg.parallel, 1, arch_from_config(cfg.model), GLOBAL_BATCH)
    model = parallelize_model(build_model(cfg.model, device="meta"), dims, cfg, "cpu")
    assert all(getattr(block, "compiled", False) for block in [*model.visual.blocks.values(), *model.text.blocks.values()])
    assert list(model.state_dict()) == list(reference["params"])


@pytest.mark.slow
def test_compiled_blocks_under_fsdp_and_tensor_parallel_match_one_process(reference):
    """Compiled block forwards with FSDP2's and tensor parallel's hooks around them (eager), on 2
    ranks: dp_shard=2, and tp=2 with sequence parallel and full checkpointing (FSDP2 is applied
    under tp too). Two ranks, not four: inductor compiles in every process, and four of them on
    two cores cost a minute and a half for no coverage the eager dp_shard x tp layouts lack."""
    layouts = {
        "dp_shard=2, compiled": (dict(dp_shard=2, compile=True), True, 1),
        "tp=2 (SP), full AC, compiled": (dict(tp=2, compile=True, activation_checkpointing="full"), True, 1),
    }
    results = run_distributed(_run_layouts, 2, (layouts,), timeout=600)
    for label in layouts:
        assert_matches_reference(results[0][label], reference, label)


def test_checkpointing_towers_value_is_checked():
    from flip_scale.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="activation_checkpointing_towers"):
        load_config(None, ["parallel.activation_checkpointing_towers=image"])


# ----------------------------------------------------------------------------- refused layouts

ARCH = arch_from_config(tiny_model_config())


def _dims(world_size=8, arch=ARCH, batch=None, accum=1, **parallel):
    return ParallelDims.from_config(ParallelConfig(**parallel), world_size, arch, batch, accum)


def test_from_config_resolves_dp_shard():
    dims = _dims(world_size=8, tp=2, dp_replicate=2)
    assert (dims.pp, dims.dp_replicate, dims.dp_shard, dims.tp, dims.dp_size) == (1, 2, 2, 2, 4)
    assert "8 ranks" in dims.describe() and "HSDP" in dims.describe()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dp_shard=3, tp=2), "pp=1 x dp_replicate=1 x dp_shard=3 x tp=2 = 6 ranks, but the world size is 8"),
        (dict(tp=3, world_size=6), "model.vision_heads=4 not divisible by parallel.tp=3"),
        (dict(tp=3, world_size=6, arch=dataclasses.replace(ARCH, vision=dataclasses.replace(ARCH.vision, heads=6))),
         "model.vision_mlp_dim=64 not divisible by parallel.tp=3"),
        (dict(tp=2, arch=dataclasses.replace(ARCH, text=dataclasses.replace(ARCH.text, heads=5))),
         "model.text_heads=5 not divisible by parallel.tp=2"),
        (dict(tp=3, world_size=6, arch=dataclasses.replace(
            ARCH, vision=dataclasses.replace(ARCH.vision, heads=6, mlp_dim=66),
            text=dataclasses.replace(ARCH.text, heads=6, mlp_dim=100))),
         "model.text_mlp_dim=100 not divisible by parallel.tp=3"),
        (dict(tp=3, dp_shard=-1), "tp=3 = 3 does not divide the world size 8"),
        (dict(pp=8, microbatches=8, world_size=8),
         "model.vision_layers=2 + model.text_layers=2 = 4 blocks cannot be split over 8 pipeline stages"),
        (dict(pp=4, microbatches=4, pp_schedule="interleaved_1f1b"),
         "= 4 blocks cannot be split over 8 pipeline stages (parallel.pp=4, pp_schedule=interleaved_1f1b)"),
        (dict(pp=2, microbatches=1), "parallel.microbatches=1 < parallel.pp=2"),
        (dict(microbatches=4), "parallel.microbatches=4 applies to pipeline parallel only"),
        (dict(batch=12), "train.global_batch_size=12 is not divisible by the data-parallel size 8"),
        (dict(batch=16, accum=4), "divisible by data-parallel size 8 x parallel.microbatches=1 x optim.grad_accum_steps=4 = 32"),
        (dict(engine="deepspeed", tp=2), "use parallel.engine: fsdp"),
        (dict(engine="deepspeed", pp=2, microbatches=2), "use parallel.engine: fsdp"),
        (dict(engine="deepspeed", dp_replicate=2, dp_shard=4), "zero_hpz_partition_size"),
    ],
)
def test_from_config_refuses_impossible_layouts(kwargs, message):
    with pytest.raises(LayoutError) as info:
        _dims(**kwargs)
    assert message in str(info.value)

