"""DeepSpeed step directories: real ZeRO-1/2/3 checkpoints of the tiny FLIP model, written on 2 gloo
ranks by `deepspeed.initialize` + `save_checkpoint` inside a flip_scale step directory (through the
CheckpointManager, as the DeepSpeed engine writes them), read back by flip_scale.

The reference values are DeepSpeed's own, taken in the run that wrote the files:
`safe_get_full_fp32_param` and `safe_get_full_optimizer_state` of every parameter (collective; they
gather the ZeRO partitions). What flip_scale assembles from the files must equal them bit for bit.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dist_utils import run_distributed
from flip_scale.checkpoint import (
    DS_TAG, CheckpointError, CheckpointManager, DeepSpeedFiles, check_source_architecture, checkpoint_problem,
    deepspeed_files_problem, find_latest, load_weights, open_checkpoint, resolve_init_from,
)
from flip_scale.config import CheckpointConfig, Config, ModelConfig, TrainConfig
from flip_scale.convert import UnsupportedCheckpoint, checkpoint_kind, consolidate, inspect_checkpoint, main
from flip_scale.models import build_model
from flip_scale.optim import param_groups

pytest.importorskip("deepspeed")

STATES = ("fp32", "exp_avg", "exp_avg_sq")
LAYOUT = "2 ranks = deepspeed ZeRO data parallel 2"
STEPS = 2


def tiny_cfg(**model) -> Config:
    return Config(
        train=TrainConfig(device="cpu", precision="fp32", global_batch_size=4),
        model=ModelConfig(**{"name": "tiny", "vocab_size": 64, "vision_layers": 1, "text_layers": 1, **model}),
    )


# ----------------------------------------------------------------------------- writing real checkpoints


def _allow_zero_dim_parameters() -> None:
    """DeepSpeed 0.19.8 broadcasts every parameter as `p.data.view(torch.uint8)` (the engine's
    `_broadcast_model`, ZeRO-3's `Init._zero_init_param`), which fails on a 0-dim tensor such as
    FLIP's logit_scale ("self.dim() cannot be 0 to view Float as Byte"). The same broadcasts,
    over a 1-element view of the parameter."""
    import deepspeed.comm as ds_comm
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.partition_parameters import Init, ZeroParamStatus
    from deepspeed.utils import groups

    def _broadcast_model(self):
        for param in self.module.parameters():
            if hasattr(param, "ds_status") and param.ds_status is not ZeroParamStatus.AVAILABLE:
                continue
            ds_comm.broadcast(param.data.reshape(-1).view(torch.uint8), groups._get_broadcast_src_rank(),
                              group=self.seq_data_parallel_group)

    def _zero_init_param(self, param):
        self._convert_to_deepspeed_param(param)
        ds_comm.broadcast(param.data.reshape(-1).view(torch.uint8), 0, self.get_partition_dp_group(param))
        param.partition()

    DeepSpeedEngine._broadcast_model = _broadcast_model
    Init._zero_init_param = _zero_init_param


class _DeepSpeedFilesState:
    """The "files" component the DeepSpeed engine gives the CheckpointManager."""

    checkpoint_kind = "files"

    def __init__(self, engine):
        self.engine = engine

    def save_files(self, tmp_dir: Path) -> None:
        import torch.distributed as dist

        self.engine.save_checkpoint(str(tmp_dir), tag=DS_TAG, save_latest=False)
        if dist.get_rank() == 0:  # the rank that copied DeepSpeed's recovery scripts into tmp_dir
            for script in ("zero_to_fp32.py", "zero_to_torch.py"):
                (tmp_dir / script).unlink(missing_ok=True)

    def load_files(self, step_dir: Path) -> None:  # not read back by these tests
        raise NotImplementedError


class _TrainerState:
    checkpoint_kind = "json"

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        pass


class _DataPosition:
    checkpoint_kind = "rank_blobs"
    blob_prefix = "data_rank"

    def __init__(self, rank: int):
        self.blob_name = f"data_rank{rank}"
        self.rank = rank

    def state_dict(self) -> dict:
        return {"dp_rank": self.rank, "positions": {}}

    def load_state_dict(self, blobs) -> None:
        pass


def _write_checkpoint(rank: int, world_size: int, run_dir: str, stage: int, precision: str, extra: dict,
                      freeze: bool) -> dict:
    """Two optimizer steps of the tiny FLIP model under DeepSpeed ZeRO-`stage`, saved as a step
    directory; returns (rank 0) every parameter's full fp32 weights and Adam moments, DeepSpeed's."""
    import logging

    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    deepspeed.utils.logger.setLevel(logging.WARNING)
    _allow_zero_dim_parameters()
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    if freeze:  # a parameter DeepSpeed does not optimize: saved among the model states
        model.text.token_embedding.weight.requires_grad_(False)
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=0.1), lr=1e-2)
    ds_config = {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage, **extra.pop("zero", {})}, "bf16": {"enabled": precision == "bf16"},
        **extra,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    arch = model.arch
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for step in range(STEPS):
        generator = torch.Generator().manual_seed(100 * step + rank)
        images = torch.randn(2, 3, arch.image_size, arch.image_size, generator=generator).to(dtype)
        tokens = torch.randint(0, arch.vocab_size, (2, arch.context_length), generator=generator)
        image_features, text_features, logit_scale = engine(images, tokens)
        logits = logit_scale.float().exp() * image_features.float() @ text_features.float().T
        labels = torch.arange(2)
        engine.backward((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)
        engine.step()

    trainer = _TrainerState({
        "samples_seen": 4 * STEPS, "world_size": world_size, "engine": "deepspeed", "layout": LAYOUT,
        "model_arch": arch.to_dict(), "scheduler": None,
    })
    states = {"engine": _DeepSpeedFilesState(engine), "trainer": trainer, "data": _DataPosition(rank)}
    CheckpointManager(run_dir, CheckpointConfig(keep_last=0), states, config_yaml=cfg.to_yaml()).save(STEPS)

    # DeepSpeed 0.19.8's ZeRO-1/2 optimizer links each parameter to its Adam state after the first
    # parameter group's first step, when the other groups have no state yet, and never again:
    # safe_get_full_optimizer_state then fails for their parameters. Link again, now that all have one.
    if hasattr(engine.optimizer, "_hp_optimizer_states_linked"):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    expected = {}
    for name, param in engine.module.named_parameters():  # collective: every rank, in the same order
        if param.requires_grad:
            expected[name] = {"fp32": safe_get_full_fp32_param(param),
                              **{state: safe_get_full_optimizer_state(param, state) for state in STATES[1:]}}
        else:
            with deepspeed.zero.GatheredParameters([param], enabled=stage == 3):
                expected[name] = {"fp32": param.detach().float().clone()}
    return expected if rank == 0 else None


# Each checkpoint: (ZeRO stage, precision, extra DeepSpeed config, a frozen parameter).
VARIANTS = {
    "zero1-fp32": (1, "fp32", {}, False),
    "zero1-bf16": (1, "bf16", {}, False),
    "zero2-fp32": (2, "fp32", {}, False),
    "zero2-bf16": (2, "bf16", {}, False),
    "zero3-fp32": (3, "fp32", {}, False),
    "zero3-bf16": (3, "bf16", {}, False),
    # DeepSpeed's BF16_Optimizer (ZeRO-1, bf16, fp32 accumulation): padded slices, no zero_stage key;
    # and a frozen parameter, which ZeRO-1 keeps only in the module state.
    "zero1-bf16-fp32acc-frozen": (1, "bf16", {"data_types": {"grad_accum_dtype": "fp32"}}, True),
    # Alignment padding after each parameter, one state dict per group (elastic), frozen fragments.
    "zero2-aligned-elastic-frozen": (2, "fp32", {"zero": {"parameter_alignment": True, "elastic_checkpoint": True}},
                                     True),
    # Several flat groups per rank (sub-groups), frozen fragments partitioned over the ranks.
    "zero3-subgroups-frozen": (3, "fp32", {"zero": {"sub_group_size": 20000}}, True),
}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """variant -> (its run directory, its step directory, DeepSpeed's full values); written once."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            stage, precision, extra, freeze = VARIANTS[variant]
            run_dir = tmp_path_factory.mktemp(variant.replace("-", "_"))
            results = run_distributed(_write_checkpoint, 2, args=(str(run_dir), stage, precision, dict(extra), freeze),
                                      timeout=240)
            cache[variant] = (run_dir, run_dir / f"step_{STEPS:08d}", results[0])
        return cache[variant]

    return get


def _copy_step(step_dir: Path, to: Path) -> Path:
    shutil.copytree(step_dir, to)
    return to


# ----------------------------------------------------------------------------- the values


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_streamed_weights_and_moments_equal_deepspeeds(written, variant):
    run_dir, step_dir, expected = written(variant)
    stage, precision, _, freeze = VARIANTS[variant]
    assert checkpoint_problem(step_dir) is None and find_latest(run_dir) == step_dir
    assert not list(step_dir.rglob("zero_to_*.py"))

    files = DeepSpeedFiles(step_dir).validate()
    assert (files.zero_stage, files.dp_world_size, files.bf16) == (stage, 2, precision == "bf16")
    assert files.adam_step == STEPS
    assert list(files.shapes) == list(files.trainable) + list(files.frozen)
    assert set(files.shapes) == set(expected)
    assert list(files.frozen) == (["text.token_embedding.weight"] if freeze else [])
    assert files.buffers() == {}  # FLIP's only buffer (the image position embedding) is not persistent
    groups = files.optimizer_param_groups  # (an elastic checkpoint stores the moments alone)
    assert {group["weight_decay"] for group in groups} == (set() if "elastic" in variant else {0.1, 0.0})

    seen = []
    # release_bytes=1: the memory maps are dropped after every parameter and reopened for the next.
    for name, values in DeepSpeedFiles(step_dir, release_bytes=1).parameters(STATES):
        seen.append(name)
        assert set(values) == set(expected[name]), name
        for state, tensor in values.items():
            assert tensor.dtype == torch.float32 and tensor.shape == files.shapes[name], (name, state)
            assert torch.equal(tensor, expected[name][state]), (name, state)
    assert seen == list(files.shapes)
    weights = dict(files.weights())
    assert all(torch.equal(weights[name], expected[name]["fp32"]) for name in expected)


def test_weights_only_callers_do_not_touch_the_moments(written, monkeypatch):
    _, step_dir, expected = written("zero2-fp32")
    files = DeepSpeedFiles(step_dir)
    read = []
    original = files._read
    monkeypatch.setattr(files, "_read", lambda name, state: read.append(state) or original(name, state))
    assert {name: tensor for name, tensor in files.weights()}.keys() == expected.keys()
    assert set(read) == {"fp32"}
    with pytest.raises(ValueError, match="valid are fp32, exp_avg, exp_avg_sq"):
        next(files.parameters(("momentum",)))


# ----------------------------------------------------------------------------- safety and completeness


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_payload_is_refused_and_never_runs(written, tmp_path, capsys):
    _, step_dir, _ = written("zero2-fp32")
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control)))  # the payload is live: plain unpickling runs it
    assert control.exists()

    marker = tmp_path / "marker"
    evil = _copy_step(step_dir, tmp_path / "run" / step_dir.name)
    optim = evil / DS_TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    state = torch.load(optim, weights_only=False)
    state["optimizer_state_dict"]["loss_scaler"] = _Payload(marker)
    torch.save(state, optim)
    assert checkpoint_problem(evil) is None  # complete as files go; refused when read

    with pytest.raises(CheckpointError) as refused:
        DeepSpeedFiles(evil).validate()
    message = str(refused.value)
    assert str(optim) in message and "posix.system" in message, message
    assert "deepspeed.runtime.fp16.loss_scaler.LossScaler" in message and "refused without unpickling" in message
    assert main(["consolidate", str(evil), "--out", str(tmp_path / "out")]) == 2
    assert "posix.system" in capsys.readouterr().err
    # The model states file too (read without deepspeed's classes: none of them is admitted there).
    model_states = evil / DS_TAG / "mp_rank_00_model_states.pt"
    state = torch.load(model_states, weights_only=False)
    state["param_shapes"] = _Payload(marker)
    torch.save(state, model_states)
    with pytest.raises(CheckpointError, match="posix.system"):
        DeepSpeedFiles(evil)
    assert main(["inspect", str(evil)]) == 2
    assert not marker.exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_incomplete_deepspeed_files_are_skipped_by_resume(written, tmp_path, caplog):
    _, step_dir, _ = written("zero3-fp32")
    run = tmp_path / "run"
    older = _copy_step(step_dir, run / "step_00000001")
    state = json.loads((older / "trainer_state.json").read_text())
    (older / "trainer_state.json").write_text(json.dumps(dict(state, step=1)))
    newer = _copy_step(step_dir, run / "step_00000002")
    (run / "latest").write_text("step_00000002\n")
    assert find_latest(run) == newer

    optim = newer / DS_TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = optim.read_bytes()
    optim.unlink()
    problem = deepspeed_files_problem(newer, 2)
    assert problem == "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt (or its bf16_ name) is missing " \
                      "(written by 2 ranks)"
    assert checkpoint_problem(newer) == problem
    with caplog.at_level("WARNING"):
        assert find_latest(run) == older  # --resume auto and `latest` fall back to the complete one
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in caplog.text
    with pytest.raises(CheckpointError, match="rank 1's .* is missing"):
        DeepSpeedFiles(newer)
    with pytest.raises(CheckpointError, match="incomplete DeepSpeed training checkpoint: deepspeed/zero_pp_rank_1"):
        open_checkpoint(newer)

    optim.write_bytes(data[: len(data) // 2])  # a copy cut short
    assert deepspeed_files_problem(newer, 2) == "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt is truncated " \
                                                "(not a complete torch.save archive)"
    optim.write_bytes(b"")
    assert deepspeed_files_problem(newer, 2) == "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt is empty"
    optim.write_bytes(data)
    (newer / DS_TAG / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    assert "zero_pp_rank_1_mp_rank_00_model_states.pt is missing" in deepspeed_files_problem(newer, 2)
    assert deepspeed_files_problem(newer, 1).startswith("deepspeed/ holds optimizer files of rank 1, but the "
                                                        "checkpoint was written by 1 ranks")
    shutil.rmtree(newer / DS_TAG)
    assert deepspeed_files_problem(newer, 2) == "deepspeed/ (the DeepSpeed engine's files) is missing"


def test_a_missing_deepspeed_package_is_named(written, monkeypatch):
    import flip_scale.checkpoint.deepspeed_files as module

    _, step_dir, _ = written("zero1-fp32")
    real_import = module.importlib.import_module

    def no_deepspeed(name, *args):
        if name.startswith("deepspeed"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args)

    monkeypatch.setattr(module.importlib, "import_module", no_deepspeed)
    files = DeepSpeedFiles(step_dir)  # the model states need none of deepspeed's classes
    assert files.zero_stage == 1 and inspect_checkpoint(step_dir)["zero_stage"] == 1
    with pytest.raises(CheckpointError, match=r"needs the deepspeed package.*pip install deepspeed"):
        files.validate()


def test_the_package_imports_without_deepspeed():
    code = ("import sys; import flip_scale.checkpoint, flip_scale.convert; "
            "assert 'deepspeed' not in sys.modules, 'deepspeed imported'")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# ----------------------------------------------------------------------------- what a path is


def test_checkpoint_kind_of_deepspeed_directories(written, tmp_path):
    run_dir, step_dir, _ = written("zero1-bf16")
    for path in (step_dir, step_dir / DS_TAG, run_dir):
        assert checkpoint_kind(path) == ("deepspeed", step_dir), path
    source = open_checkpoint(run_dir)
    assert (source.kind, source.path, source.step, source.samples_seen) == ("deepspeed", step_dir, STEPS, 4 * STEPS)
    assert source.config_tree["model"]["name"] == "tiny"
    assert "DeepSpeed training checkpoint, step 2" in source.describe()

    # DeepSpeed's files alone (another trainer's checkpoint: no config to rebuild the model from).
    raw_run = tmp_path / "raw_run"
    shutil.copytree(step_dir / DS_TAG, raw_run / "global_step2")
    (raw_run / "latest").write_text("global_step2")
    for path in (raw_run, raw_run / "global_step2"):
        with pytest.raises(UnsupportedCheckpoint, match="DeepSpeed checkpoint of another trainer .* no flip_scale "
                                                        "trainer_state.json and config.yaml"):
            checkpoint_kind(path)
        with pytest.raises(CheckpointError, match="DeepSpeed checkpoint of another trainer"):
            open_checkpoint(path)
        assert main(["consolidate", str(path), "--out", str(tmp_path / "out")]) == 2
        assert main(["inspect", str(path)]) == 2


# ----------------------------------------------------------------------------- conversion


def test_consolidate_then_to_openclip(written, tmp_path, capsys):
    run_dir, step_dir, expected = written("zero3-bf16")
    out = tmp_path / "consolidated"
    assert main(["consolidate", str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"consolidated step {STEPS}: {len(expected)} tensors" in printed and "peak RSS" in printed, printed
    tensors = load_file(out / "model.safetensors")
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[name], expected[name]["fp32"]) for name in expected)
    model = build_model(tiny_cfg().model)
    assert {name: tuple(t.shape) for name, t in model.state_dict().items()} == \
           {name: tuple(t.shape) for name, t in tensors.items()}

    report = consolidate(step_dir, tmp_path / "bf16", dtype="bf16")
    assert report["source_format"] == "deepspeed" and report["peak_rss_mib"] >= report["rss_before_mib"] > 0
    halves = load_file(tmp_path / "bf16" / "model.safetensors")
    assert all(torch.equal(halves[name], expected[name]["fp32"].bfloat16()) for name in expected)

    assert main(["to-openclip", str(out), "--out", str(tmp_path / "openclip")]) == 0
    assert (tmp_path / "openclip" / "open_clip_model.safetensors").is_file()
    assert (tmp_path / "openclip" / "open_clip_config.json").is_file()


def test_inspect_a_deepspeed_checkpoint(written, capsys):
    _, step_dir, expected = written("zero3-bf16")
    assert main(["inspect", str(step_dir)]) == 0
    printed = capsys.readouterr().out
    params = sum(t["fp32"].numel() for t in expected.values())
    for text in ("(deepspeed training checkpoint)", f"step         {STEPS}",
                 "engine       deepspeed ZeRO-3, dp world size 2, bf16, DeepSpeed 0.",
                 f"params       {params:,}",
                 "files        deepspeed/ bf16_zero_pp_rank_{0..1}_mp_rank_00_optim_states.pt (2 files); "
                 "zero_pp_rank_{0..1}_mp_rank_00_model_states.pt (2 files)"):
        assert text in printed, (text, printed)
    info = inspect_checkpoint(step_dir)
    assert (info["engine"], info["zero_stage"], info["dp_world_size"], info["params"]) == ("deepspeed", 3, 2, params)
    assert "deepspeed/zero_pp_rank_1_mp_rank_00_model_states.pt" in info["files"] and "trainer_state.json" in info["files"]


# ----------------------------------------------------------------------------- --init-from


def test_init_from_loads_the_fp32_weights_into_a_plain_model(written):
    run_dir, step_dir, expected = written("zero2-bf16")
    source = resolve_init_from(str(run_dir))
    assert (source.kind, source.path) == ("deepspeed", step_dir)
    check_source_architecture(source, tiny_cfg().model)
    with pytest.raises(CheckpointError, match="different model architecture"):
        check_source_architecture(source, tiny_cfg(vision_layers=2).model)
    model = build_model(tiny_cfg().model)
    load_weights(source, model)
    state = model.state_dict()
    assert all(torch.equal(state[name], expected[name]["fp32"]) for name in expected)

    # A pipeline stage (whole_model=False): the parts it does not hold are gone; only its own
    # tensors are assembled and loaded.
    stage = build_model(tiny_cfg().model)
    stage.text = None
    own = set(stage.state_dict())
    assert own and not any(name.startswith("text.") for name in own)
    assert {name for name, _ in DeepSpeedFiles(step_dir).weights(own)} == own
    load_weights(source, [stage], whole_model=False)
    assert all(torch.equal(tensor, expected[name]["fp32"]) for name, tensor in stage.state_dict().items())


def _load_into_fsdp(rank: int, world_size: int, step_dir: str) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from flip_scale.parallel.fsdp import apply_fsdp

    model = apply_fsdp(build_model(tiny_cfg().model), init_device_mesh("cpu", (world_size,)))
    load_weights(open_checkpoint(step_dir), model, broadcast_from_rank0=True)  # rank 0 reads, broadcasts
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return full if rank == 0 else None


def test_init_from_into_fsdp_shards_broadcast_from_rank0(written):
    _, step_dir, expected = written("zero3-fp32")
    full = run_distributed(_load_into_fsdp, 2, args=(str(step_dir),))[0]
    assert full.keys() == expected.keys()
    assert all(torch.equal(full[name], expected[name]["fp32"]) for name in expected)


# ----------------------------------------------------------------------------- into a live DeepSpeed engine


def _load_into_live_engine(rank: int, world_size: int, step_dir: str, stage: int, precision: str) -> dict:
    """A fresh DeepSpeed engine on `world_size` ranks given the files' fp32 weights, moments and step
    (written by another data-parallel size: DeepSpeed's own loader refuses that for ZeRO-1/2/3)."""
    import logging

    import deepspeed
    from deepspeed.utils import (
        safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_set_full_fp32_param, safe_set_full_optimizer_state,
    )

    deepspeed.utils.logger.setLevel(logging.WARNING)
    _allow_zero_dim_parameters()
    model = build_model(tiny_cfg().model)
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": stage}, "bf16": {"enabled": precision == "bf16"}}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2),
                                           config=ds_config)
    files = DeepSpeedFiles(step_dir)
    zero = engine.optimizer
    # Adam's state exists only after a first step: made here, on each flat fp32 partition, with the
    # files' step count, and the parameters linked to it again (see _write_checkpoint).
    flats = zero.fp32_partitioned_groups_flat if stage == 3 else zero.single_partition_of_fp32_groups
    for flat in flats:
        zero.optimizer.state[flat] = {"step": torch.tensor(float(files.adam_step)), "exp_avg": torch.zeros_like(flat),
                                      "exp_avg_sq": torch.zeros_like(flat)}
    if stage < 3:
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    params = dict(engine.module.named_parameters())
    for name, values in files.parameters(STATES):
        safe_set_full_fp32_param(params[name], values["fp32"])
        for state in STATES[1:]:
            safe_set_full_optimizer_state(params[name], values[state], state)
    # The module's own (low-precision) weights follow the fp32 ones only at the next step: copied now.
    if stage == 3:
        for sub_group in range(len(zero.fp16_groups)):
            zero._reassign_or_swap_out_partitioned_parameters(sub_group)
    else:
        zero.update_lp_params()
    loaded = {}
    for name, param in params.items():
        with deepspeed.zero.GatheredParameters([param], enabled=stage == 3):
            module_weight = param.detach().float().clone()
        loaded[name] = {"fp32": safe_get_full_fp32_param(param), "module": module_weight,
                        **{state: safe_get_full_optimizer_state(param, state) for state in STATES[1:]}}
    return loaded


@pytest.mark.parametrize("variant", ["zero2-bf16", "zero3-bf16"])
def test_files_load_into_a_live_engine_of_another_data_parallel_size(written, variant):
    _, step_dir, expected = written(variant)  # written by 2 ranks, loaded by 1
    stage, precision, _, _ = VARIANTS[variant]
    loaded = run_distributed(_load_into_live_engine, 1, args=(str(step_dir), stage, precision))[0]
    assert loaded.keys() == expected.keys()
    for name, values in loaded.items():
        for state in STATES:
            assert torch.equal(values[state], expected[name][state]), (name, state)
        assert torch.equal(values["module"], expected[name]["fp32"].bfloat16().float()), name
