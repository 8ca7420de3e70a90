"""The DeepSpeed engine trains exactly as the native engine and as one process (CPU, gloo, fp32).

Each run goes through the trainer's own build (`Trainer(cfg, ...)`, `parallel.engine=deepspeed`):
the same 3 global batches (each rank its rows, mask noise from each sample's global index), and
the losses, gradient norms and parameters after them must equal those of the native engine
(dp_shard=2) and of one process. The refusals and the config merge are checked without DeepSpeed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ds_ops
from dist_utils import run_distributed
from flip_scale.config import Config, ConfigError, ModelConfig, OptimConfig, ParallelConfig, TrainConfig, load_config
from flip_scale.distributed import ProcessInfo
from flip_scale.parallel import LayoutError
from flip_scale.preflight import plan_run

pytest.importorskip("deepspeed")

SEED = 0
GLOBAL_BATCH = 8
STEPS = 3
# fp32 on CPU: the engines differ only in the order of additions (reduce-scatter vs all-reduce).
LOSS_TOL = 1e-5
NORM_RTOL = 1e-4
PARAM_ATOL = 3e-6  # after 3 AdamW steps of lr 1e-3


def tiny_config(engine: str = "fsdp", accum: int = 1, **parallel) -> Config:
    model = ModelConfig(
        name="tiny", vocab_size=64, image_size=16, patch_size=4, context_length=8, mask_ratio=0.5,
        embed_dim=16, vision_width=32, vision_layers=2, vision_heads=4, vision_mlp_dim=64,
        text_width=32, text_layers=2, text_heads=4, text_mlp_dim=64,
    )
    return Config(
        train=TrainConfig(global_batch_size=GLOBAL_BATCH, seed=SEED, precision="fp32", device="cpu"),
        model=model,
        # eps 1e-6: the key bias's gradient is exactly zero in exact arithmetic, and rounding noise
        # normalised by Adam would differ by layout (tests/test_parallel.py says more).
        optim=OptimConfig(lr=1e-3, grad_clip=0.5, weight_decay=0.1, eps=1e-6, grad_accum_steps=accum),
        parallel=ParallelConfig(engine=engine, **parallel),
    )


def _batch(step: int, cfg: Config):
    generator = torch.Generator().manual_seed(1000 + step)
    m = cfg.model
    images = torch.randn(GLOBAL_BATCH, 3, m.image_size, m.image_size, generator=generator)
    tokens = torch.randint(1, m.vocab_size, (GLOBAL_BATCH, m.context_length), generator=generator)
    return images, tokens


def _full_params(trainer) -> dict:
    engine = trainer.engine
    if engine.name == "deepspeed":
        return {name: value.reshape(()) if name == "logit_scale" else value
                for name, value in engine.full_parameters().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if torch.distributed.is_initialized():
        return get_model_state_dict(engine.model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in engine.model.named_parameters()}


def _step(trainer, cfg: Config, step: int, rank: int, world_size: int, nan: bool = False) -> dict:
    """One trainer step on this rank's rows of global batch `step` (a NaN image in them with `nan`);
    the step's outputs, with "loss" the mean over the data-parallel ranks."""
    import torch.distributed as dist

    images, tokens = _batch(step, cfg)
    local = GLOBAL_BATCH // world_size
    rows = slice(rank * local, (rank + 1) * local)
    if nan:
        images = images.clone()
        images[rows.start] = float("nan")
    out = trainer.train_step({"images": images[rows], "tokens": tokens[rows], "sample_index": torch.arange(GLOBAL_BATCH)[rows]})
    trainer.state.step += 1
    loss = out["loss"].detach().clone()
    if world_size > 1:
        dist.all_reduce(loss)
        loss /= world_size
    return {**out, "loss": float(loss)}


def _loss(trainer, cfg: Config, step: int, rank: int, world_size: int) -> float:
    return _step(trainer, cfg, step, rank, world_size)["loss"]


def _train(cfg: Config, run_dir: Path, rank: int, world_size: int, nan_at_step: int = -1) -> dict:
    """STEPS steps of `cfg` through the trainer on this rank's rows of each global batch."""
    from flip_scale.parallel.utils import optimizer_state_bytes

    trainer = _trainer(cfg, run_dir, rank, world_size)
    losses, norms, skipped, lrs = [], [], [], []
    for step in range(STEPS):
        out = _step(trainer, cfg, step, rank, world_size, nan=step == nan_at_step)
        losses.append(out["loss"])
        norms.append(float(out["grad_norm"]))
        skipped.append(bool(out["skipped_step"]))
        lrs.append(out["lr"])
    params = _full_params(trainer)
    engine = trainer.engine
    if engine.name == "deepspeed":
        state_bytes = engine.optimizer_state_bytes()  # fp32 master partition + moments
    else:
        state_bytes = sum(optimizer_state_bytes(o) for o in engine.optimizers.optimizers)
    result = dict(losses=losses, norms=norms, skipped=skipped, lrs=lrs, params=params, state_bytes=state_bytes,
                  logit_scale=trainer.logit_scale(), nonfinite=trainer.state.nonfinite_steps,
                  numel=sum(v.numel() for v in params.values()), local=engine.local_parameter_count(),
                  describe=engine.describe())
    trainer.close()
    return result


def assert_same_run(got: dict, want: dict, label: str) -> None:
    for a, b in zip(got["losses"], want["losses"]):
        assert abs(a - b) <= LOSS_TOL, (label, got["losses"], want["losses"])
    for a, b in zip(got["norms"], want["norms"]):
        assert abs(a - b) <= NORM_RTOL * b, (label, got["norms"], want["norms"])
    assert got["lrs"] == pytest.approx(want["lrs"], rel=1e-12), label
    assert set(got["params"]) == set(want["params"]), label
    for name, value in want["params"].items():
        assert got["params"][name].shape == value.shape, (label, name)
        error = (got["params"][name] - value).abs().max().item()
        assert error <= PARAM_ATOL, f"{label}: {name} differs by {error:.3g} after {STEPS} steps"


RUNS = {
    # label: (engine, grad accumulation, parallel keys)
    "fsdp dp_shard=2": ("fsdp", 1, {}),
    "zero-1": ("deepspeed", 1, dict(zero_stage=1)),
    "zero-2": ("deepspeed", 1, dict(zero_stage=2)),
    "zero-3": ("deepspeed", 1, dict(zero_stage=3)),
    "zero-1, 2 exact micro-batches": ("deepspeed", 2, dict(zero_stage=1)),
    "zero-2, 2 exact micro-batches": ("deepspeed", 2, dict(zero_stage=2)),
    "zero-3, 2 exact micro-batches, full AC": ("deepspeed", 2, dict(zero_stage=3, activation_checkpointing="full")),
    # DeepSpeed's CPU Adam (compiled on first use) steps the offloaded optimizer state.
    "zero-2, optimizer offloaded to the CPU": ("deepspeed", 1, dict(zero_stage=2, offload_optimizer="cpu")),
    "zero-3, optimizer and parameters offloaded": ("deepspeed", 1, dict(zero_stage=3, offload_optimizer="cpu",
                                                                         offload_params="cpu")),
}


def _run_all(rank: int, world_size: int, out_dir: str, runs: dict) -> dict:
    results = {}
    for label, (engine, accum, parallel) in runs.items():
        cfg = tiny_config(engine, accum, **parallel)
        results[label] = _train(cfg, Path(out_dir) / label.replace(" ", "_").replace(",", ""), rank, world_size)
    return results


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return _train(tiny_config(), tmp_path_factory.mktemp("one"), 0, 1)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    ds_ops.wait()  # the offloaded runs step DeepSpeed's CPU Adam
    return run_distributed(_run_all, 2, (str(tmp_path_factory.mktemp("two")), RUNS), timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("label", [label for label in RUNS if label != "fsdp dp_shard=2"])
def test_deepspeed_matches_native_engine_and_one_process(label, two_ranks, one_process):
    ranks = two_ranks
    assert_same_run(ranks[0][label], ranks[0]["fsdp dp_shard=2"], f"{label} vs native")
    assert_same_run(ranks[0][label], one_process, f"{label} vs one process")
    # Every rank ends with the same weights (the replicas never drift apart).
    for name, value in ranks[0][label]["params"].items():
        assert torch.equal(value, ranks[1][label]["params"][name]), (label, name)
    assert ranks[0][label]["logit_scale"] == pytest.approx(one_process["logit_scale"], rel=1e-6)
    assert "engine deepspeed" in ranks[0][label]["describe"][0]
    if "offloaded" in label:
        assert "DeepSpeed CPU Adam" in ranks[0][label]["describe"][0]


@pytest.mark.slow
def test_zero3_halves_the_optimizer_state_and_the_weights_per_rank(two_ranks):
    """Per-rank AdamW state under ZeRO-3 on 2 ranks is about half of one rank's whole state (fp32
    master weights + two moments = 12 bytes per parameter), and so are the weights each rank holds."""
    for rank in (0, 1):
        z3 = two_ranks[rank]["zero-3"]
        whole = 12 * z3["numel"]
        assert 0.45 * whole <= z3["state_bytes"] <= 0.6 * whole, (rank, z3["state_bytes"], whole)
        assert z3["local"] <= 0.6 * z3["numel"], (rank, z3["local"], z3["numel"])
        z1 = two_ranks[rank]["zero-1"]  # ZeRO-1 shards the optimizer state but keeps the whole model
        assert 0.45 * whole <= z1["state_bytes"] <= 0.6 * whole and z1["local"] == z1["numel"]


def _skip_run(rank: int, world_size: int, out_dir: str, stage: int) -> dict:
    return _train(tiny_config("deepspeed", 1, zero_stage=stage), Path(out_dir), rank, world_size, nan_at_step=1)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_a_non_finite_step_is_skipped(tmp_path: Path, two_ranks, stage):
    """A NaN image at step 2: DeepSpeed's step sees a non-finite norm on every rank and skips it; the
    trainer counts it, the lr schedule moves on, the weights stay finite."""
    results = run_distributed(_skip_run, 2, (str(tmp_path), stage), timeout=300)
    for result in results:
        assert result["skipped"] == [False, True, False] and result["nonfinite"] == 1
        assert result["lrs"] == two_ranks[0][f"zero-{stage}"]["lrs"]
        assert all(torch.isfinite(v).all() for v in result["params"].values())
        assert result["losses"][0] == pytest.approx(two_ranks[0][f"zero-{stage}"]["losses"][0], abs=LOSS_TOL)


# ----------------------------------------------------------------------------- refusals and config (no DeepSpeed run)


@pytest.mark.parametrize("keys, fragment", [
    (dict(tp=2), "data parallel only, got parallel.tp=2"),
    (dict(pp=2), "parallel.pp=2"),
    (dict(dp_replicate=2, dp_shard=1), "zero_hpz_partition_size"),
    (dict(cpu_offload=True), "parallel.offload_optimizer: cpu"),
    (dict(zero_stage=2, offload_params="cpu"), "needs parallel.zero_stage=3"),
    (dict(zero_stage=3, offload_params="nvme"), "parallel.nvme_path"),
    (dict(zero_stage=2, offload_optimizer="nvme", nvme_path="/nvme"), "ZeRO-1/2 offload the optimizer to host memory"),
])
def test_layouts_deepspeed_cannot_run_are_refused_before_anything_is_built(keys, fragment):
    cfg = tiny_config("deepspeed", **keys)
    with pytest.raises(LayoutError, match="parallel.engine|ZeRO|zero_stage|nvme") as error:
        plan_run(cfg, 2)
    assert fragment in str(error.value)
    if "tp" in keys or "pp" in keys:
        assert "parallel.engine: fsdp" in str(error.value) and "ZeRO stage <= 1" in str(error.value)


def test_deepspeed_keys_are_refused_under_the_native_engine():
    with pytest.raises(LayoutError, match="applies to parallel.engine=deepspeed only"):
        plan_run(tiny_config("fsdp", offload_optimizer="cpu"), 2)


def test_the_deepspeed_config_is_generated_from_ours_and_merged(tmp_path: Path):
    from flip_scale.parallel.deepspeed_config import deepspeed_config

    cfg = tiny_config("deepspeed", accum=2, zero_stage=3, offload_optimizer="cpu")
    plan = plan_run(cfg, 2)
    ds = plan.engine_config
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is False  # train.precision=fp32
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] >= 8 * 32
    # A JSON for what we do not model is merged; its values win over our defaults.
    extra = {"zero_optimization": {"zero_hpz_partition_size": 2, "zero_quantized_weights": True,
                                   "stage3_prefetch_bucket_size": 1234, "stage": 3},
             "comms_logger": {"enabled": True}, "train_batch_size": 8}
    merged = deepspeed_config(cfg, plan.dims, "fp32", plan.arch, user=extra)
    assert merged["zero_optimization"]["zero_hpz_partition_size"] == 2
    assert merged["zero_optimization"]["stage3_prefetch_bucket_size"] == 1234
    assert merged["comms_logger"] == {"enabled": True} and merged["zero_optimization"]["stage"] == 3
    assert merged["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    # What our YAML has no key for is the JSON's to set (pinned host memory off, say).
    unpinned = deepspeed_config(cfg, plan.dims, "fp32", plan.arch,
                                user={"zero_optimization": {"offload_optimizer": {"pin_memory": False}}})
    assert unpinned["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}


@pytest.mark.parametrize("user, fragment", [
    ({"train_batch_size": 16}, "train_batch_size = 16 contradicts this config's 8 (from train.global_batch_size)"),
    ({"gradient_accumulation_steps": 4}, "optim.grad_accum_steps"),
    ({"gradient_clipping": 1.0}, "gradient_clipping = 1.0 contradicts this config's 0.5"),
    ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage = 2 contradicts this config's 3"),
    ({"bf16": {"enabled": True}}, "bf16.enabled = true contradicts this config's false"),
    ({"fp16": {"enabled": True}}, "fp16.enabled"),
    ({"zero_optimization": {"offload_optimizer": {"device": "nvme"}}}, "parallel.offload_optimizer"),
    ({"optimizer": {"type": "Adam"}}, "the 'optimizer' section is not taken"),
    ({"checkpoint": {"use_node_local_storage": True}}, "the 'checkpoint' section is not taken"),
    ({"managed_gradient_accumulation": False}, "managed_gradient_accumulation = false contradicts"),
    ({"zero_optimization": {"compute_grad_norm": False}}, "zero_optimization.compute_grad_norm = false"),
    ({"scheduler": {"type": "WarmupLR"}}, "the 'scheduler' section is not taken"),
    ({"zero_optimization": {"offload_optimizer": {"ratio": 0.5}}}, "offload_optimizer.ratio=0.5 is not taken"),
])
def test_a_contradicting_deepspeed_config_key_is_refused_with_both_values(tmp_path: Path, user, fragment):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    cfg = tiny_config("deepspeed", zero_stage=3, deepspeed_config=str(path))
    with pytest.raises(ConfigError) as error:
        plan_run(cfg, 2)
    assert fragment in str(error.value) and str(path) in str(error.value)


def test_a_missing_or_broken_deepspeed_config_file_is_named(tmp_path: Path):
    with pytest.raises(ConfigError, match="no such file"):
        plan_run(tiny_config("deepspeed", deepspeed_config=str(tmp_path / "nope.json")), 2)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        plan_run(tiny_config("deepspeed", deepspeed_config=str(tmp_path / "bad.json")), 2)


def test_dry_run_prints_the_generated_deepspeed_config(capsys):
    from flip_scale.train import main

    assert main(["--dry-run", "--world-size", "4", "parallel.engine=deepspeed", "parallel.zero_stage=3"]) == 0
    out = capsys.readouterr().out
    assert "engine: deepspeed, ZeRO-3" in out and '"stage": 3' in out and '"train_batch_size"' in out
    assert "DeepSpeed ZeRO-3" in out
    assert main(["--dry-run", "--world-size", "4", "parallel.engine=deepspeed", "parallel.tp=2"]) == 2
    assert "parallel.engine: fsdp" in capsys.readouterr().err


def test_the_package_imports_without_deepspeed_and_the_engine_names_the_fix():
    """`import deepspeed` happens only when the engine is chosen: without it the rest of the package
    works, and choosing it says how to install it."""
    code = (
        "import sys; sys.modules['deepspeed'] = None\n"
        "import flip_scale.train, flip_scale.evaluate, flip_scale.convert, flip_scale.engine\n"
        "from flip_scale.config import load_config\n"
        "from flip_scale.preflight import plan_run\n"
        "from flip_scale.engine import build_engine\n"
        "cfg = load_config(None, ['parallel.engine=deepspeed', 'train.device=cpu'])\n"
        "try:\n"
        "    build_engine(cfg, plan_run(cfg, 1), 'cpu')\n"
        "except ImportError as error:\n"
        "    print('ERROR', error)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install deepspeed" in out.stdout and "parallel.engine: fsdp" in out.stdout


def test_one_process_runs_the_deepspeed_engine(tmp_path: Path):
    """World size 1 (no launcher): the engine makes its own one-rank process group and trains."""
    code = (
        "import torch, json\n"
        "from pathlib import Path\n"
        "import sys; sys.path.insert(0, %r)\n"
        "from test_deepspeed_engine import tiny_config, _train\n"
        "r = _train(tiny_config('deepspeed', 1, zero_stage=3), Path(%r), 0, 1)\n"
        "print('RESULT', json.dumps(r['losses']))\n"
    ) % (str(Path(__file__).parent), str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    losses = json.loads(out.stdout.split("RESULT", 1)[1])
    assert len(losses) == STEPS and all(loss == loss for loss in losses)


def test_load_config_accepts_the_engine_keys():
    cfg = load_config(None, ["parallel.engine=deepspeed", "parallel.zero_stage=1", "parallel.offload_optimizer=cpu"])
    assert cfg.parallel.zero_stage == 1 and cfg.parallel.offload_optimizer == "cpu"
    with pytest.raises(ConfigError, match="zero_stage"):
        load_config(None, ["parallel.zero_stage=4"])



# ----------------------------------------------------------------------------- checkpoints


def _trainer(cfg: Config, run_dir: Path, rank: int, world_size: int):
    from flip_scale.train import Trainer

    return Trainer(cfg, run_dir, ProcessInfo(rank, world_size, rank, torch.device("cpu")), with_data=False)


def _checkpoint_runs(rank: int, world_size: int, out_dir: str) -> dict:
    """ZeRO-3: 3 steps saving after steps 2 and 3; then a resume from step 2 that takes step 3
    again; the native engine's same 3 steps, saved; a ZeRO-3 start from its consolidated weights
    comes later (test below)."""
    out = Path(out_dir)
    cfg = tiny_config("deepspeed", 1, zero_stage=3)
    trainer = _trainer(cfg, out / "ds3", rank, world_size)
    losses = [_loss(trainer, cfg, step, rank, world_size) for step in range(2)]
    trainer.save()
    losses.append(_loss(trainer, cfg, 2, rank, world_size))
    trainer.save()
    through = _full_params(trainer)
    lr_after = trainer.engine.lr
    trainer.close()

    resumed = _trainer(cfg, out / "ds3_resumed", rank, world_size)
    resumed.resume(out / "ds3" / "step_00000002")
    resumed_step = resumed.state.step
    resumed_loss = _loss(resumed, cfg, 2, rank, world_size)
    resumed_params = _full_params(resumed)
    resumed_lr = resumed.engine.lr
    resumed.close()

    native_cfg = tiny_config("fsdp")
    native = _trainer(native_cfg, out / "native", rank, world_size)
    native_losses = [_loss(native, native_cfg, step, rank, world_size) for step in range(3)]
    native.save()
    native_params = _full_params(native)
    native.close()
    return dict(losses=losses, through=through, lr_after=lr_after, resumed_step=resumed_step, resumed_loss=resumed_loss,
                resumed_params=resumed_params, resumed_lr=resumed_lr, native_losses=native_losses,
                native_params=native_params)


@pytest.fixture(scope="module")
def checkpoint_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    return out, run_distributed(_checkpoint_runs, 2, (str(out),), timeout=600)


@pytest.mark.slow
def test_zero3_resume_is_exact(checkpoint_runs):
    """Resumed from step 2, step 3 gives bitwise the loss and weights of the run that never stopped."""
    out, ranks = checkpoint_runs
    for result in ranks:
        assert result["resumed_step"] == 2
        assert result["resumed_loss"] == result["losses"][2]
        assert result["resumed_lr"] == result["lr_after"]  # the lr schedule continued from step 3
        for name, value in result["through"].items():
            assert torch.equal(result["resumed_params"][name], value), name
    state = json.loads((out / "ds3" / "step_00000003" / "trainer_state.json").read_text())
    assert state["engine"] == "deepspeed" and state["dcp_shards"] is False and state["step"] == 3
    assert not list((out / "ds3" / "step_00000003").glob("*.py"))


def _resume_elsewhere(rank: int, world_size: int, out_dir: str, stage: int) -> dict:
    out = Path(out_dir)
    cfg = tiny_config("deepspeed", 1, zero_stage=stage)
    trainer = _trainer(cfg, out / f"into_{world_size}_zero{stage}", rank, world_size)
    trainer.resume(out / "ds3" / "step_00000002")
    loss = _loss(trainer, cfg, 2, rank, world_size)
    params = _full_params(trainer)
    trainer.close()
    return dict(loss=loss, params=params)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3, 2])
def test_resume_into_another_data_parallel_size(checkpoint_runs, stage):
    """The 2-rank ZeRO-3 checkpoint of step 2 resumed on one rank (ZeRO-3, and ZeRO-2): the weights
    and Adam moments re-sharded from the files, step 3 the same as the 2-rank run's."""
    out, ranks = checkpoint_runs
    (result,) = run_distributed(_resume_elsewhere, 1, (str(out), stage), timeout=300)
    assert abs(result["loss"] - ranks[0]["losses"][2]) <= LOSS_TOL
    for name, value in ranks[0]["through"].items():
        error = (result["params"][name] - value).abs().max().item()
        assert error <= PARAM_ATOL, f"{name} differs by {error:.3g}"


def _odd_config() -> Config:
    """The tiny model with odd widths: most parameters do not divide over 2 ranks (ZeRO-3 pads the
    last rank's partition)."""
    import dataclasses

    cfg = tiny_config("deepspeed", 1, zero_stage=3)
    return dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, embed_dim=15, vision_width=36, vision_heads=3, vision_mlp_dim=65, text_width=33, text_heads=3,
        text_mlp_dim=65))


def _odd_reshard(rank: int, world_size: int, out_dir: str, phase: str) -> dict:
    """"write" (1 rank): 3 steps uninterrupted, saving after step 2. "grow" (2 ranks): resume from
    it, take step 3, save."""
    out = Path(out_dir)
    cfg = _odd_config()
    trainer = _trainer(cfg, out / phase, rank, world_size)
    if phase == "write":
        losses = []
        for step in range(3):
            losses.append(_loss(trainer, cfg, step, rank, world_size))
            if step == 1:
                trainer.save()
    else:
        trainer.resume(out / "write" / "step_00000002")
        losses = [_loss(trainer, cfg, trainer.state.step, rank, world_size)]
        trainer.save()
    params = _full_params(trainer)
    result = dict(losses=losses, params=params, odd=sum(value.numel() % 2 for value in params.values()),
                  step=trainer.state.step)
    trainer.close()
    return result


@pytest.mark.slow
def test_resume_into_more_ranks_with_parameters_that_do_not_divide(tmp_path):
    """ZeRO-3, odd-sized parameters: a 1-rank checkpoint resumed on 2 ranks (the fp32 weights and
    Adam moments re-sharded, the last rank's partitions padded) takes step 3 as the 1-rank run
    did; its own 2-rank checkpoint, padded partitions and all, consolidates to its weights."""
    from safetensors.torch import load_file

    from flip_scale.convert import consolidate

    (write,) = run_distributed(_odd_reshard, 1, (str(tmp_path), "write"), timeout=300)
    grow = run_distributed(_odd_reshard, 2, (str(tmp_path), "grow"), timeout=300)
    assert write["odd"] > 10  # most of them
    assert grow[0]["step"] == 3
    assert abs(grow[0]["losses"][0] - write["losses"][2]) <= LOSS_TOL
    consolidate(tmp_path / "grow" / "step_00000003", tmp_path / "consolidated")
    tensors = load_file(tmp_path / "consolidated" / "model.safetensors")
    for name, value in write["params"].items():
        assert torch.equal(tensors[name].reshape(grow[0]["params"][name].shape), grow[0]["params"][name]), name
        error = (grow[0]["params"][name] - value).abs().max().item()
        assert error <= PARAM_ATOL, f"{name} differs by {error:.3g}"


def _plant(rank: int, world_size: int, out_dir: str) -> str:
    from flip_scale.checkpoint import CheckpointError

    out = Path(out_dir)
    trainer = _trainer(tiny_config("deepspeed", 1, zero_stage=3), out / "victim", rank, world_size)
    try:
        trainer.resume(out / "planted" / "step_00000002")
    except CheckpointError as error:
        return str(error)
    finally:
        trainer.close()
    return "loaded"


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_a_planted_pickle_payload_in_deepspeed_files_is_refused_on_resume(checkpoint_runs, tmp_path):
    out, _ = checkpoint_runs
    planted = out / "planted" / "step_00000002"
    shutil.copytree(out / "ds3" / "step_00000002", planted)
    marker = tmp_path / "payload_ran"
    for rank in (0, 1):
        path = planted / "deepspeed" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        state = torch.load(path, weights_only=False)
        state["optimizer_state_dict"]["evil"] = _Payload(str(marker))
        torch.save(state, path)
    messages = run_distributed(_plant, 2, (str(out),), timeout=300)
    for message in messages:
        assert "system" in message and "not allowed" in message and "optim_states.pt" in message, message
    assert not marker.exists()


@pytest.mark.slow
def test_consolidated_zero3_weights_equal_the_native_engines(checkpoint_runs, tmp_path):
    from safetensors.torch import load_file

    from flip_scale.convert import consolidate

    out, ranks = checkpoint_runs
    consolidate(out / "ds3" / "step_00000003", tmp_path / "ds")
    consolidate(out / "native" / "step_00000003", tmp_path / "native")
    ds, native = load_file(tmp_path / "ds" / "model.safetensors"), load_file(tmp_path / "native" / "model.safetensors")
    assert set(ds) == set(native) and ds["logit_scale"].shape == native["logit_scale"].shape == ()
    for name, value in native.items():
        assert (ds[name] - value).abs().max().item() <= PARAM_ATOL, name
    for name, value in ranks[0]["through"].items():  # the files hold exactly the engine's fp32 weights
        assert torch.equal(ds[name], value), name
    assert ranks[0]["native_losses"] == pytest.approx(ranks[0]["losses"], abs=LOSS_TOL)


def _init_from(rank: int, world_size: int, out_dir: str, engine: str, source: str) -> dict:
    out = Path(out_dir)
    cfg = tiny_config(engine, 1, zero_stage=3) if engine == "deepspeed" else tiny_config("fsdp")
    trainer = _trainer(cfg, out / f"init_{engine}_{Path(source).name}", rank, world_size)
    trainer.init_from(source)
    params = _full_params(trainer)
    if engine == "deepspeed":  # the model's own (gathered) weights follow the fp32 masters
        import deepspeed

        module = dict(trainer.engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(module.values())):
            for name, value in module.items():
                assert torch.equal(value.detach().reshape(params[name].shape), params[name]), name
    trainer.close()
    return params


@pytest.mark.slow
def test_init_from_across_engines_both_ways(checkpoint_runs, tmp_path):
    """The native run's consolidated weights start a ZeRO-3 run, and the ZeRO-3 run's (its step
    directory, or its consolidated weights) start a native one: the weights arrive unchanged."""
    from flip_scale.convert import consolidate

    out, ranks = checkpoint_runs
    consolidate(out / "native" / "step_00000003", out / "native_consolidated")
    consolidate(out / "ds3" / "step_00000003", out / "ds3_consolidated")
    into_ds = run_distributed(_init_from, 2, (str(out), "deepspeed", str(out / "native_consolidated")), timeout=300)
    for name, value in ranks[0]["native_params"].items():
        assert torch.equal(into_ds[0][name], value), name
    for source in (out / "ds3_consolidated", out / "ds3" / "step_00000003"):
        into_native = run_distributed(_init_from, 2, (str(out), "fsdp", str(source)), timeout=300)
        for name, value in ranks[0]["through"].items():
            assert torch.equal(into_native[0][name], value), (source.name, name)


def _clamp_run(rank: int, world_size: int, out_dir: str, engine: str) -> dict:
    import dataclasses

    cfg = tiny_config(engine, 1, zero_stage=3)
    cfg.model = dataclasses.replace(cfg.model, logit_scale_init=5.0)  # above the clamp, log(100)
    return _train(cfg, Path(out_dir) / engine, rank, world_size)


@pytest.mark.slow
def test_the_temperature_clamp_reaches_the_fp32_master_under_zero3(tmp_path):
    """A temperature started above log(100) is clamped after every step, in the optimizer's fp32
    master copy as in the model's, on every rank: as the native engine does."""
    ds = run_distributed(_clamp_run, 2, (str(tmp_path), "deepspeed"), timeout=300)
    native = run_distributed(_clamp_run, 2, (str(tmp_path), "fsdp"), timeout=300)
    for result in ds:
        # Unclamped it would be about exp(5) = 148 after 3 steps of lr 1e-3.
        assert result["logit_scale"] <= 100.0 + 1e-4
        assert result["logit_scale"] == pytest.approx(native[0]["logit_scale"], rel=1e-6)
        assert_same_run(result, native[0], "clamped temperature, zero-3 vs native")


@pytest.mark.slow
def test_a_checkpoint_resumes_only_under_the_engine_that_wrote_it(checkpoint_runs, tmp_path):
    from flip_scale.checkpoint import CheckpointError

    out, _ = checkpoint_runs
    trainer = _trainer(tiny_config("fsdp"), tmp_path / "native", 0, 1)
    with pytest.raises(CheckpointError, match="written by parallel.engine=deepspeed.*--init-from"):
        trainer.resume(out / "ds3" / "step_00000002")
    trainer.close()


# ----------------------------------------------------------------------------- ZeRO-Infinity (NVMe)


def _libaio_problem() -> str | None:
    """None where DeepSpeed's async I/O op can build (libaio's header present, installed with
    apt-get when absent and possible), else the reason."""
    ds_ops.wait()
    return ds_ops.install_libaio()


def _nvme_runs(rank: int, world_size: int, out_dir: str, width: int) -> dict:
    """ZeRO-3 with the optimizer on NVMe: 3 steps saving after steps 2 and 3, then a resume from
    step 2 that takes step 3 again. `width`: the towers' width (0: the tiny model, whose optimizer
    sub-groups are all under DeepSpeed's 1 MiB swap minimum and stay in memory; 128: its decay
    group is swapped to files, the no-decay group stays in memory)."""
    import dataclasses

    out = Path(out_dir)
    cfg = tiny_config("deepspeed", 1, zero_stage=3, offload_optimizer="nvme", nvme_path=str(out / f"swap{rank}"))
    if width:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, vision_width=width, text_width=width, vision_mlp_dim=4 * width, text_mlp_dim=4 * width))
    trainer = _trainer(cfg, out / "nvme", rank, world_size)
    zero = trainer.engine.optimizer
    swapped = [zero._swappable_optimizer_subgroup(group) for group in range(len(zero.fp16_groups))]
    describe = trainer.engine.describe()
    losses = [_loss(trainer, cfg, step, rank, world_size) for step in range(2)]
    trainer.save()
    losses.append(_loss(trainer, cfg, 2, rank, world_size))
    trainer.save()
    through = _full_params(trainer)
    trainer.close()
    resumed = _trainer(cfg, out / "nvme_resumed", rank, world_size)
    resumed.resume(out / "nvme" / "step_00000002")
    resumed_loss = _loss(resumed, cfg, 2, rank, world_size)
    resumed_params = _full_params(resumed)
    resumed.close()
    result = dict(losses=losses, through=through, resumed_loss=resumed_loss, resumed_params=resumed_params,
                  swapped=swapped, describe=describe)
    if width:  # the same checkpoint into an engine whose optimizer stays in host memory
        import dataclasses

        host = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, offload_optimizer="cpu", nvme_path=""))
        elsewhere = _trainer(host, out / "host_resumed", rank, world_size)
        elsewhere.resume(out / "nvme" / "step_00000002")
        result["host_loss"] = _loss(elsewhere, host, 2, rank, world_size)
        result["host_params"] = _full_params(elsewhere)
        elsewhere.close()
    return result


def _needs_async_io() -> None:
    problem = _libaio_problem()
    if problem is not None:
        pytest.skip(problem)
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible():
        pytest.skip("DeepSpeed's async I/O op cannot build here (see ds_report)")


def _assert_nvme_checkpoints(out: Path, result: dict, tmp_path: Path) -> None:
    """Resumed from step 2, step 3 is bitwise the uninterrupted run's; step 3's checkpoint
    consolidates to exactly the engine's fp32 weights."""
    from safetensors.torch import load_file

    from flip_scale.convert import consolidate, inspect_checkpoint

    assert result["resumed_loss"] == result["losses"][2]
    for name, value in result["through"].items():
        assert torch.equal(result["resumed_params"][name], value), name
    info = inspect_checkpoint(out / "nvme" / "step_00000003")
    assert (info["engine"], info["zero_stage"]) == ("deepspeed", 3)
    assert info["params"] == sum(value.numel() for value in result["through"].values())
    consolidate(out / "nvme" / "step_00000003", tmp_path / "consolidated")
    tensors = load_file(tmp_path / "consolidated" / "model.safetensors")
    for name, value in result["through"].items():
        assert torch.equal(tensors[name], value), name
    assert not (out / "nvme" / "step_00000003" / "deepspeed" / "offloaded_tensors").exists()


@pytest.mark.slow
def test_zero3_with_the_optimizer_on_nvme_trains_resumes_exactly_and_consolidates(tmp_path, two_ranks):
    _needs_async_io()
    ranks = run_distributed(_nvme_runs, 2, (str(tmp_path), 0), timeout=600)
    reference = two_ranks[0]["zero-3"]
    for result in ranks:
        assert not any(result["swapped"])  # the tiny model: every sub-group under the swap minimum
        assert "optimizer -> nvme" in result["describe"][0]
        assert result["losses"] == pytest.approx(reference["losses"], abs=LOSS_TOL)
        for name, value in reference["params"].items():
            assert (result["through"][name] - value).abs().max().item() <= PARAM_ATOL, name
    _assert_nvme_checkpoints(tmp_path, ranks[0], tmp_path / "out")


@pytest.mark.slow
def test_nvme_resume_restores_a_swapped_optimizer_sub_group_exactly(tmp_path):
    """One process, a model whose decay group lives in swap files: its fp32 partition and Adam
    moments reach the checkpoint and come back from it (into an NVMe engine exactly, into one with
    the optimizer in host memory too)."""
    _needs_async_io()
    (result,) = run_distributed(_nvme_runs, 1, (str(tmp_path), 128), timeout=300)
    assert result["swapped"] == [True, False]
    _assert_nvme_checkpoints(tmp_path, result, tmp_path / "out")
    assert abs(result["host_loss"] - result["losses"][2]) <= LOSS_TOL  # offload_optimizer=cpu resumes it too
    for name, value in result["through"].items():
        assert (result["host_params"][name] - value).abs().max().item() <= PARAM_ATOL, name

    # What DeepSpeed's own save writes for the swapped sub-group (empty tensors): named, not misread.
    from flip_scale.checkpoint import CheckpointError
    from flip_scale.checkpoint.deepspeed_files import safe_torch_load
    from flip_scale.convert import consolidate

    file = tmp_path / "nvme" / "step_00000002" / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = safe_torch_load(file, mmap=False)
    osd = state["optimizer_state_dict"]
    osd["fp32_flat_groups"][0] = torch.empty(0)
    osd["optimizer_state_dict"]["state"][0].update(exp_avg=torch.empty(0), exp_avg_sq=torch.empty(0))
    torch.save(state, file)
    with pytest.raises(CheckpointError, match="offloaded to NVMe and its swapped partitions are not in the files"):
        consolidate(tmp_path / "nvme" / "step_00000002", tmp_path / "old")


def _exact_resume(rank: int, world_size: int, out_dir: str, stage: int, accum: int) -> bool:
    out = Path(out_dir)
    cfg = tiny_config("deepspeed", accum, zero_stage=stage)
    trainer = _trainer(cfg, out / "run", rank, world_size)
    for step in range(2):
        _loss(trainer, cfg, step, rank, world_size)
    trainer.save()
    loss = _loss(trainer, cfg, 2, rank, world_size)
    through = _full_params(trainer)
    trainer.close()
    resumed = _trainer(cfg, out / "resumed", rank, world_size)
    resumed.resume(out / "run" / "step_00000002")
    same_loss = _loss(resumed, cfg, 2, rank, world_size) == loss
    params = _full_params(resumed)
    resumed.close()
    return same_loss and all(torch.equal(params[name], value) for name, value in through.items())


@pytest.mark.slow
@pytest.mark.parametrize("stage, accum", [(1, 2), (2, 1)])
def test_zero1_and_zero2_resume_exactly_through_deepspeeds_loader(tmp_path, stage, accum):
    assert run_distributed(_exact_resume, 2, (str(tmp_path), stage, accum), timeout=300) == [True, True]


def test_one_process_leaves_no_launcher_variables_behind(tmp_path: Path):
    """A one-process run sets RANK / WORLD_SIZE / LOCAL_RANK for DeepSpeed's construction only: left in
    the environment they would make a later srun job's ranks think they are a world of 1."""
    code = (
        "import os, sys; sys.path.insert(0, %r)\n"
        "from pathlib import Path\n"
        "from test_deepspeed_engine import tiny_config, _trainer\n"
        "t = _trainer(tiny_config('deepspeed', 1, zero_stage=3), Path(%r), 0, 1)\n"
        "t.close()\n"
        "print('LEFT', [k for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK') if k in os.environ])\n"
    ) % (str(Path(__file__).parent), str(tmp_path))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**env, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LEFT []" in out.stdout


def test_on_cuda_fused_adam_is_taken_only_when_prebuilt(monkeypatch):
    """DeepSpeed builds FusedAdam with nvcc on its first use when it was not prebuilt (minutes at the
    start of a job): the engine then takes PyTorch's fused AdamW instead (checked without a GPU)."""
    import types

    import deepspeed.ops.adam

    from flip_scale.config import load_config
    from flip_scale.engine import deepspeed as ds_engine

    class FakeFusedAdam(torch.optim.AdamW):
        def __init__(self, groups, adam_w_mode=True, **kwargs):
            super().__init__(groups, **kwargs)

    monkeypatch.setattr(deepspeed.ops.adam, "FusedAdam", FakeFusedAdam)
    fake = types.SimpleNamespace(cfg=load_config("configs/tiny.yaml", ["parallel.engine=deepspeed"]),
                                 device=torch.device("cuda"))
    model = torch.nn.Linear(4, 4)
    for prebuilt, kind in ((False, "PyTorch AdamW (fused)"), (True, "DeepSpeed FusedAdam (AdamW mode)")):
        monkeypatch.setattr(ds_engine, "fused_adam_prebuilt", lambda prebuilt=prebuilt: prebuilt)
        optimizer = ds_engine.DeepSpeedEngine._build_optimizer(fake, model)
        assert fake.optimizer_kind == kind
        assert isinstance(optimizer, FakeFusedAdam) == prebuilt
    from deepspeed.git_version_info import installed_ops

    monkeypatch.undo()
    assert ds_engine.fused_adam_prebuilt() == bool(installed_ops.get("fused_adam", False))
