"""loss.kind sigmoid (SigLIP): the loss and every gradient against a one-process reference written
here as a direct sum over the B x B pairs, through the trainer's own build (preflight's plan,
`build_engine`, its forward_backward) under dp 1/2/4, 4 exact micro-batches (the feature cache) and
pp=2; the config's resolution of the bias; the OpenCLIP export of the bias.

The reference: the one-process model (weights by (seed, name), as every layout's) embeds the whole
global batch with autograd, and the loss is

    -(1/B) sum_i sum_j log sigmoid(z_ij (exp(t) x_i . y_j + b)),   z_ij = 1 if i == j else -1,

summed pair by pair in Python, so it shares no code with flip_scale.loss.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flip_scale.config import Config, ConfigError, LossConfig, ModelConfig, OptimConfig, ParallelConfig, ScheduleConfig
from flip_scale.config import TrainConfig, load_config, validate
from flip_scale.models import build_model
from flip_scale.models.masking import masking_noise

TINY = dict(name="tiny", vocab_size=64, image_size=16, patch_size=4, vision_layers=4, text_layers=2)
GLOBAL_BATCH = 8
SEED = 0
# fp32: the layouts sum the pairs in another order than the Python reference does.
LOSS_TOLERANCE = 1e-5
GRAD_TOLERANCE = 1e-4  # relative to the largest entry of each parameter's gradient


def sigmoid_config(parallel: dict | None = None, accum: int = 1) -> Config:
    return validate(Config(
        train=TrainConfig(global_batch_size=GLOBAL_BATCH, seed=SEED, precision="fp32", device="cpu"),
        model=ModelConfig(mask_ratio=0.5, **TINY), loss=LossConfig(kind="sigmoid"),
        optim=OptimConfig(lr=1e-3, grad_clip=0.0, weight_decay=0.1, eps=1e-6, grad_accum_steps=accum),
        schedule=ScheduleConfig(name="constant"), parallel=ParallelConfig(**(parallel or {})),
    ))


def global_batch():
    generator = torch.Generator().manual_seed(1000)
    images = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=generator)
    tokens = torch.randint(1, 64, (GLOBAL_BATCH, 32), generator=generator)
    noise = masking_noise(SEED, 0, torch.arange(GLOBAL_BATCH), 16)
    return images, tokens, noise


def pairwise_reference() -> dict:
    """Loss and every parameter's gradient of the one-process model, the loss summed pair by pair."""
    cfg = sigmoid_config()
    torch.manual_seed(SEED)
    model = build_model(cfg.model)
    model.train()
    images, tokens, noise = global_batch()
    image_features = F.normalize(model.visual(images, noise), dim=-1)
    text_features = F.normalize(model.text(tokens), dim=-1)
    scale, bias = model.logit_scale.exp(), model.logit_bias
    total = 0.0
    for i in range(GLOBAL_BATCH):
        for j in range(GLOBAL_BATCH):
            sign = 1.0 if i == j else -1.0
            logit = scale * torch.dot(image_features[i], text_features[j]) + bias
            total = total + torch.log(torch.sigmoid(sign * logit))
    loss = -total / GLOBAL_BATCH
    loss.backward()
    return {"loss": loss.item(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def engine_step(parallel: dict, world_size: int, accum: int = 1) -> dict:
    """One forward_backward of the trainer's engine on this rank's data-parallel rows; -> the
    global loss (mean over dp ranks) and every parameter's full gradient."""
    import torch.distributed as dist

    from flip_scale.engine import build_engine
    from flip_scale.preflight import plan_run

    cfg = sigmoid_config(parallel, accum)
    engine = build_engine(cfg, plan_run(cfg, world_size, training=False), torch.device("cpu"))
    dims = engine.dims
    local = GLOBAL_BATCH // dims.dp_size
    rows = slice(dims.dp_rank * local, (dims.dp_rank + 1) * local)
    engine.train()
    loss = engine.forward_backward(*(t[rows] for t in global_batch())).detach().clone()
    grads = {name: _full(param.grad) for part in engine.model_parts for name, param in part.named_parameters()
             if param.grad is not None}
    if dims.dp_group is not None:
        dist.all_reduce(loss, group=dims.dp_group)
        loss /= dims.dp_size
    engine.close()
    return {"loss": loss.item(), "grads": grads}


def _engine_layouts(rank: int, world_size: int, layouts: list) -> list:
    return [engine_step(parallel, world_size, accum) for parallel, accum in layouts]


@pytest.fixture(scope="module")
def reference():
    return pairwise_reference()


def assert_matches(result: dict, reference: dict, label: str, grads: dict | None = None) -> str:
    grads = result["grads"] if grads is None else grads
    assert abs(result["loss"] - reference["loss"]) < LOSS_TOLERANCE, (label, result["loss"], reference["loss"])
    assert set(grads) == set(reference["grads"]), (label, set(reference["grads"]) ^ set(grads))
    worst, worst_name = 0.0, ""
    for name, want in reference["grads"].items():
        assert want.abs().max() > 0, f"{name} got no reference gradient"
        diff = (grads[name].reshape(want.shape) - want).abs().max().item() / want.abs().max().item()
        if diff > worst:
            worst, worst_name = diff, name
    assert worst < GRAD_TOLERANCE, f"{label}: gradient of {worst_name} differs by {worst:.1e} (relative)"
    return f"{label}: loss {abs(result['loss'] - reference['loss']):.1e}, worst grad {worst_name} {worst:.1e}"


# ----------------------------------------------------------------------------- config


def test_sigmoid_loss_gives_the_model_a_bias_with_siglips_init():
    cfg = load_config(None, ["loss.kind=sigmoid"])
    assert cfg.model.logit_bias_init == -10.0 and cfg.model.logit_scale_init == pytest.approx(math.log(10))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    assert model.logit_bias.item() == -10.0 and model.logit_scale.item() == pytest.approx(math.log(10))
    _, _, params = model(None, torch.ones(1, cfg.model.context_length, dtype=torch.long))
    assert params.shape == (2,)
    # A recipe's own temperature init is kept; the default loss has no bias parameter at all.
    assert load_config(None, ["loss.kind=sigmoid", "model.logit_scale_init=1.0"]).model.logit_scale_init == 1.0
    default = build_model(load_config(None, []).model)
    assert "logit_bias" not in dict(default.named_parameters())
    with pytest.raises(ConfigError, match="model.logit_bias_init.*only loss.kind sigmoid"):
        load_config(None, ["model.logit_bias_init=-5"])
    with pytest.raises(ConfigError, match="loss.kind.*contrastive, sigmoid"):
        load_config(None, ["loss.kind=hinge"])


def test_bias_never_decays():
    from flip_scale.optim import param_groups

    model = build_model(sigmoid_config().model, device="meta")
    decay, no_decay = param_groups(model, 0.1)
    assert no_decay["weight_decay"] == 0.0
    assert any(p is model.logit_bias for p in no_decay["params"])
    assert not any(p is model.logit_bias for p in decay["params"])


# ----------------------------------------------------------------------------- equality with the pairwise sum


def test_one_process_and_four_micro_batches_match_the_pairwise_sum(reference):
    """dp 1 through the engine, plainly and through the two-pass feature cache (grad accumulation 4)."""
    report = [assert_matches(engine_step({}, 1), reference, "dp 1"),
              assert_matches(engine_step({}, 1, accum=4), reference, "dp 1, 4 micro-batches")]
    print("\n".join(report))


def test_two_ranks_match_the_pairwise_sum(reference):
    """dp_shard=2 (FSDP2), dp_shard=2 with 4 micro-batches each, and pp=2 (4 pipeline micro-batches)."""
    from dist_utils import run_distributed

    layouts = [(dict(dp_shard=2), 1), (dict(dp_shard=2), 4), (dict(pp=2, dp_shard=1, microbatches=4), 1)]
    results = run_distributed(_engine_layouts, 2, args=(layouts,), timeout=240)
    report = []
    for index, (layout, accum) in enumerate(layouts):
        grads = {}
        for rank in range(2):  # pp: each rank holds its stage's parameters
            grads.update(results[rank][index]["grads"])
        report.append(assert_matches(results[0][index], reference, f"{layout}, accum {accum}", grads))
        assert results[1][index]["loss"] == pytest.approx(results[0][index]["loss"], abs=1e-7)
    print("\n".join(report))


def test_four_ranks_match_the_pairwise_sum(reference):
    from dist_utils import run_distributed

    results = run_distributed(_engine_layouts, 4, args=([(dict(dp_shard=4), 1)],), timeout=240)
    print(assert_matches(results[0][0], reference, "dp_shard=4"))


# ----------------------------------------------------------------------------- the DeepSpeed engine


def engine_steps(parallel: dict, world_size: int, accum: int = 1, steps: int = 2) -> dict:
    """`steps` optimizer steps (forward_backward + clip_and_step) of the engine on this rank's rows;
    -> the global losses and every parameter after them (the temperature and bias shaped ())."""
    import torch.distributed as dist

    from flip_scale.engine import build_engine
    from flip_scale.preflight import plan_run

    cfg = sigmoid_config(parallel, accum)
    engine = build_engine(cfg, plan_run(cfg, world_size, training=False), torch.device("cpu"))
    dims = engine.dims
    local = GLOBAL_BATCH // dims.dp_size
    rows = slice(dims.dp_rank * local, (dims.dp_rank + 1) * local)
    losses = []
    for _ in range(steps):
        engine.train()
        loss = engine.forward_backward(*(t[rows] for t in global_batch())).detach().clone()
        engine.clip_and_step()
        if dims.dp_group is not None:
            dist.all_reduce(loss, group=dims.dp_group)
            loss /= dims.dp_size
        losses.append(loss.item())
    if engine.name == "deepspeed":
        params = engine.full_parameters()
    else:
        params = {name: _full(p) for part in engine.model_parts for name, p in part.named_parameters()}
    engine.close()
    return {"losses": losses, "params": {k: v.reshape(()) if k.startswith("logit_") else v for k, v in params.items()}}


def _deepspeed_runs(rank: int, world_size: int) -> list:
    return [engine_steps(dict(engine="deepspeed", zero_stage=stage), world_size, accum=2) for stage in (1, 3)]


@pytest.mark.slow
def test_deepspeed_engine_matches_one_process():
    """ZeRO-1 and ZeRO-3, 2 ranks x 2 exact micro-batches (the DeepSpeed surrogate carries the
    (1,)-shaped temperature and bias): losses and every parameter after 2 steps equal the native
    engine on one process."""
    pytest.importorskip("deepspeed")
    from dist_utils import run_distributed

    want = engine_steps({}, 1)
    results = run_distributed(_deepspeed_runs, 2, timeout=500)
    for stage, got in zip((1, 3), results[0]):
        assert max(abs(a - b) for a, b in zip(got["losses"], want["losses"])) < LOSS_TOLERANCE, (stage, got["losses"])
        assert set(got["params"]) == set(want["params"])
        # Adam turns round-off in tiny gradient entries into visible steps (test_pipeline.py says
        # more): each parameter moves ~2e-3 in 2 steps at lr 1e-3; they agree to 1e-4.
        worst = max((got["params"][k] - v).abs().max().item() for k, v in want["params"].items())
        assert worst < 1e-4, f"ZeRO-{stage}: parameters after 2 steps differ by {worst:.1e}"
        assert (got["params"]["logit_bias"] - want["params"]["logit_bias"]).abs() < 1e-6
        assert got["params"]["logit_bias"] != -10.0  # the bias trained


# ----------------------------------------------------------------------------- OpenCLIP


def test_openclip_export_loads_strictly_with_the_bias_and_gives_the_same_logits(tmp_path):
    """to-openclip writes init_logit_bias and logit_bias; open_clip.create_model loads it strictly and
    its model(image, text) returns the bias: the same sigmoid logits. from-openclip brings it back."""
    open_clip = pytest.importorskip("open_clip")
    import json

    from safetensors.torch import load_file

    from flip_scale.checkpoint import save_checkpoint
    from flip_scale.convert import consolidate, from_openclip, load_consolidated, read_consolidated_config, to_openclip

    cfg = sigmoid_config()
    torch.manual_seed(1)
    model = build_model(cfg.model)
    with torch.no_grad():  # away from the init values, so a dropped or defaulted tensor shows
        model.logit_bias.fill_(-7.25)
        model.logit_scale.fill_(2.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step_dir = save_checkpoint(
        tmp_path / "run", 1, model, optimizer, None,
        trainer_state={"samples_seen": 8, "layout": "1 ranks = pp 1 x dp_replicate 1 x dp_shard 1 x tp 1",
                       "world_size": 1, "model_arch": model.arch.to_dict()},
        config_yaml=cfg.to_yaml())
    consolidate(step_dir, tmp_path / "consolidated")
    to_openclip(tmp_path / "consolidated", tmp_path / "openclip")
    document = json.loads((tmp_path / "openclip" / "open_clip_config.json").read_text())
    assert document["model_cfg"]["init_logit_bias"] == -10.0
    oc_model = open_clip.create_model(f"local-dir:{tmp_path / 'openclip'}").eval()  # strict load
    assert oc_model.logit_bias.item() == -7.25

    images, tokens, _ = global_batch()
    model.eval()
    with torch.no_grad():
        image_features, text_features, params = model(images, tokens)
        ours = params[0].exp() * image_features @ text_features.t() + params[1]
        oc_image, oc_text, oc_scale, oc_bias = oc_model(images, tokens)
        theirs = oc_scale * oc_image @ oc_text.t() + oc_bias
    difference = (ours - theirs).abs().max().item()
    assert difference < 1e-4, difference

    back = tmp_path / "back"
    from_openclip(tmp_path / "openclip" / "open_clip_model.safetensors", tmp_path / "openclip", back)
    restored = read_consolidated_config(back)
    assert restored.model.logit_bias_init == -10.0 and restored.loss.kind == "sigmoid"
    before, after = load_file(str(tmp_path / "consolidated" / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    reloaded = build_model(restored.model)
    load_consolidated(back, reloaded)
    assert reloaded.logit_bias.item() == -7.25
