"""Checkpoint conversion: DCP -> consolidated safetensors, consolidated <-> OpenCLIP, inspect,
refusals, and loading that never unpickles code."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from flip_scale.checkpoint import save_checkpoint
from flip_scale.config import Config, ModelConfig, ParallelConfig, TrainConfig
from flip_scale.convert import (
    ConvertError, UnsupportedCheckpoint, consolidate, from_openclip, load_consolidated, main,
    model_config_from_openclip, read_consolidated_config, read_dcp_metadata, safe_torch_load, to_openclip,
)
from flip_scale.convert.checkpoints import write_config
from flip_scale.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from flip_scale.models import arch_from_config, build_model

open_clip = pytest.importorskip("open_clip")

from dist_utils import run_distributed  # noqa: E402

# dcp.save without a process group says it assumes one process: it is one process.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

VOCAB = 64
LAYOUT = "1 ranks = pp 1 x dp_replicate 1 x dp_shard 1 x tp 1"
ATOL = 1e-5


def tiny_cfg(**model) -> Config:
    return Config(
        train=TrainConfig(device="cpu", precision="fp32", global_batch_size=8),
        model=ModelConfig(name="tiny", vocab_size=VOCAB, **model),
    )


def random_tokens(arch, batch: int, generator=None, tokenizer_like: bool = False) -> torch.Tensor:
    """Random token ids; `tokenizer_like`: [BOS] pieces [EOS] then padding, as flip_scale's tokenizer."""
    length = arch.context_length
    if not tokenizer_like:
        return torch.randint(0, arch.vocab_size, (batch, length), generator=generator)
    tokens = torch.full((batch, length), PAD_ID, dtype=torch.long)
    for row in range(batch):
        pieces = int(torch.randint(0, length - 1, (1,), generator=generator))
        body = torch.randint(EOS_ID + 1, arch.vocab_size, (pieces,), generator=generator)
        sequence = torch.cat([torch.tensor([BOS_ID]), body, torch.tensor([EOS_ID])])
        tokens[row, : len(sequence)] = sequence
    return tokens


def train_one_step(cfg: Config, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    arch = model.arch
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    images = torch.randn(4, 3, arch.image_size, arch.image_size)
    image_features, text_features, logit_scale = model(images, random_tokens(arch, 4))
    logits = logit_scale.exp() * image_features @ text_features.T
    labels = torch.arange(4)
    ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2).backward()
    optimizer.step()
    model.clamp_logit_scale()
    return model, optimizer


def make_checkpoint(run_dir: Path, cfg: Config, step: int = 1, seed: int = 0):
    model, optimizer = train_one_step(cfg, seed)
    path = save_checkpoint(
        run_dir, step, model, optimizer, None,
        trainer_state={"samples_seen": 4 * step, "layout": LAYOUT, "world_size": 1, "model_arch": model.arch.to_dict()},
        config_yaml=cfg.to_yaml(),
    )
    return path, {name: t.detach().clone() for name, t in model.state_dict().items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    path, state = make_checkpoint(run_dir, tiny_cfg())
    return {"run_dir": run_dir, "path": path, "state": state, "cfg": tiny_cfg()}


@pytest.fixture(scope="module")
def consolidated(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("consolidated")
    report = consolidate(trained["path"], out)
    return out, report


def flip_model_from(directory) -> torch.nn.Module:
    model = build_model(read_consolidated_config(directory).model)
    load_consolidated(directory, model)
    return model.eval()


def assert_same_embeddings(flip_model, oc_model, arch, tokenizer_like=False):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(6, 3, arch.image_size, arch.image_size, generator=generator)
    tokens = random_tokens(arch, 6, generator, tokenizer_like=tokenizer_like)
    with torch.no_grad():
        ours_image, theirs_image = flip_model.encode_image(images, normalize=False), oc_model.encode_image(images)
        ours_text, theirs_text = flip_model.encode_text(tokens, normalize=False), oc_model.encode_text(tokens)
    image_diff = (ours_image - theirs_image).abs().max().item()
    text_diff = (ours_text - theirs_text).abs().max().item()
    print(f"max |difference|: image {image_diff:.2e}, text {text_diff:.2e}")
    assert image_diff < ATOL and text_diff < ATOL, (image_diff, text_diff)
    assert torch.equal(flip_model.logit_scale, oc_model.logit_scale)


# ----------------------------------------------------------------------------- consolidate


def test_consolidate_matches_model_and_config_rebuilds_it(trained, consolidated):
    out, report = consolidated
    tensors = load_file(str(out / "model.safetensors"))
    assert list(tensors) == list(trained["state"])
    for name, want in trained["state"].items():
        assert tensors[name].dtype == torch.float32 and torch.equal(tensors[name], want), name
    assert report["step"] == 1 and report["tensors"] == len(trained["state"])
    assert report["params"] == sum(t.numel() for t in trained["state"].values())
    assert report["peak_rss_mib"] >= report["rss_before_mib"] > 0
    cfg = read_consolidated_config(out)
    assert arch_from_config(cfg.model) == arch_from_config(trained["cfg"].model)
    assert cfg.model.vision_width == 96 and cfg.model.mask_ratio == trained["cfg"].model.mask_ratio
    rebuilt = flip_model_from(out)
    for name, want in trained["state"].items():
        assert torch.equal(rebuilt.state_dict()[name], want), name


def test_consolidate_bf16_from_run_dir_via_cli(trained, tmp_path, capsys):
    out = tmp_path / "bf16"
    assert main(["consolidate", str(trained["run_dir"]), "--out", str(out), "--dtype", "bf16"]) == 0
    printed = capsys.readouterr().out
    assert "consolidated step 1" in printed and "peak RSS" in printed
    tensors = load_file(str(out / "model.safetensors"))
    for name, want in trained["state"].items():
        assert tensors[name].dtype == torch.bfloat16 and torch.equal(tensors[name], want.to(torch.bfloat16)), name
    # A bf16 file loads into an fp32 model (cast on load).
    model = build_model(read_consolidated_config(out).model)
    load_consolidated(out, model)
    assert torch.equal(model.visual.proj.weight, trained["state"]["visual.proj.weight"].to(torch.bfloat16).float())


def test_consolidate_streams_tensors(tmp_path):
    # A model-only checkpoint of ~70 MB, consolidated in a fresh process: the peak RSS grows by far
    # less than the model while the tensors are read and written.
    import torch.distributed.checkpoint as dcp

    cfg = tiny_cfg(vision_width=512, vision_layers=6, vision_heads=8, vision_mlp_dim=2048)
    model = build_model(cfg.model)
    step_dir = tmp_path / "run" / "step_00000003"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(step_dir))
    (step_dir / "trainer_state.json").write_text(json.dumps({"step": 3, "layout": LAYOUT, "world_size": 1}))
    (step_dir / "config.yaml").write_text(cfg.to_yaml())
    script = (
        "import json, sys; from flip_scale.convert import consolidate; "
        "print(json.dumps(consolidate(sys.argv[1], sys.argv[2], group_bytes=2**20)))"
    )
    result = subprocess.run([sys.executable, "-c", script, str(step_dir), str(tmp_path / "out")],
                            capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    report = json.loads(result.stdout.strip().splitlines()[-1])
    growth = report["peak_rss_mib"] - report["rss_before_mib"]
    model_mib = report["file_bytes"] / 2**20
    print(f"model {model_mib:.0f} MiB, largest tensor {report['largest_tensor_bytes'] / 2**20:.1f} MiB: peak RSS "
          f"{report['peak_rss_mib']:.0f} MiB, +{growth:.0f} MiB while streaming")
    assert growth < 0.4 * model_mib
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(tensors[n], t) for n, t in model.state_dict().items())


def _sharded_worker(rank, world_size, consolidated_dir, run_root):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from flip_scale.parallel import parallelize_model
    from flip_scale.parallel.dims import ParallelDims

    results = {}
    for label, parallel in (("fsdp", dict(dp_shard=2)), ("tp", dict(dp_shard=1, tp=2))):
        cfg = dataclasses.replace(tiny_cfg(), parallel=ParallelConfig(**parallel))
        dims = ParallelDims.from_config(cfg.parallel, world_size, arch_from_config(cfg.model))
        dims.build_mesh("cpu")
        model = parallelize_model(build_model(cfg.model, device="meta"), dims, cfg, "cpu")
        load_consolidated(consolidated_dir, model)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        path = save_checkpoint(Path(run_root) / label, 7, model, optimizer, None,
                               trainer_state={"layout": dims.describe(), "world_size": world_size},
                               config_yaml=cfg.to_yaml())
        results[label] = ({k: v.detach().clone() for k, v in full.items()}, str(path))
    return results


def test_sharded_load_and_sharded_checkpoint(consolidated, tmp_path):
    # load_consolidated into FSDP2- and tensor-parallel-sharded models on 2 ranks; the checkpoints
    # those write (sharded DCP) consolidate back to the same tensors.
    out, _ = consolidated
    want = load_file(str(out / "model.safetensors"))
    results = run_distributed(_sharded_worker, 2, (str(out), str(tmp_path)), timeout=240)
    for label, (full, path) in results[0].items():
        for name, tensor in want.items():
            assert torch.equal(full[name], tensor), f"{label}: {name}"
        again = consolidate(path, tmp_path / f"again_{label}")
        tensors = load_file(str(tmp_path / f"again_{label}" / "model.safetensors"))
        assert again["step"] == 7 and all(torch.equal(tensors[n], t) for n, t in want.items()), label
    assert json.loads(main_json(["inspect", results[0]["tp"][1], "--json"]))["world_size"] == 2


def main_json(argv) -> str:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(argv) == 0
    return buffer.getvalue()


# ----------------------------------------------------------------------------- to OpenCLIP


VARIANTS = {
    "default": None,
    # Another shape: CLS pooling, 6x6 grid, MLP ratio 2.5 / 3, head widths 16 and 24, eps 1e-5.
    "cls_pool": dict(vision_pool="cls", image_size=24, patch_size=4, embed_dim=48, vision_width=64, vision_layers=2,
                     vision_heads=4, vision_mlp_dim=160, text_width=48, text_layers=3, text_heads=2,
                     text_mlp_dim=144, context_length=16, norm_eps=1e-5),
    # Causal text, exported with pool_type eos: equal on tokenizer-shaped sequences.
    "causal_eos": dict(text_causal=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_to_openclip_gives_the_same_embeddings(variant, consolidated, tmp_path):
    if VARIANTS[variant] is None:
        source, _ = consolidated
    else:
        step_dir, _ = make_checkpoint(tmp_path / "run", tiny_cfg(**VARIANTS[variant]), seed=3)
        source = tmp_path / "consolidated"
        consolidate(step_dir, source)
    out = tmp_path / "openclip"
    causal = variant == "causal_eos"
    report = to_openclip(source, out, text_eos_pool=causal)
    document = json.loads((out / "open_clip_config.json").read_text())
    vision, text = document["model_cfg"]["vision_cfg"], document["model_cfg"]["text_cfg"]
    assert vision["pos_embed_type"] == "sin_cos_2d" and vision["no_ln_pre"] is True
    assert vision["pool_type"] == ("tok" if variant == "cls_pool" else "avg")
    assert text["no_causal_mask"] is (not causal) and text["pool_type"] == ("eos" if causal else "first")
    oc_model = open_clip.create_model(f"local-dir:{out}").eval()  # strict load of open_clip_model.safetensors
    flip_model = flip_model_from(source)
    arch = flip_model.arch
    assert_same_embeddings(flip_model, oc_model, arch, tokenizer_like=causal)
    # Our exported position table is OpenCLIP's own sin-cos table, bit for bit.
    from open_clip.pos_embed import get_2d_sincos_pos_embed

    table = torch.from_numpy(get_2d_sincos_pos_embed(arch.vision.width, arch.grid_size, cls_token=True)).float()
    assert torch.equal(oc_model.visual.positional_embedding, table)
    assert report["tensors"] == len(oc_model.state_dict())


@pytest.mark.parametrize("option, value", [("text_pad_mask", True), ("vision_pool", "avg_all"), ("text_causal", True)])
def test_to_openclip_refuses_what_openclip_cannot_represent(option, value, consolidated, tmp_path, capsys):
    source, _ = consolidated
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(source / "model.safetensors", bad / "model.safetensors")
    cfg = read_consolidated_config(source)
    write_config(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **{option: value})), bad, "test")
    assert main(["to-openclip", str(bad), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert f"model.{option}" in error, error
    assert not (tmp_path / "out" / "open_clip_model.safetensors").exists()


# ----------------------------------------------------------------------------- from OpenCLIP


OC_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 64, "head_width": 16, "mlp_ratio": 4.0,
                   "no_ln_pre": True, "pos_embed_type": "sin_cos_2d", "pool_type": "avg"},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 48, "heads": 4, "layers": 2,
                 "no_causal_mask": True, "pool_type": "first"},
}


@pytest.fixture(scope="module")
def openclip_export(tmp_path_factory):
    """A randomly initialised (then perturbed) OpenCLIP model of a representable config, saved."""
    torch.manual_seed(5)
    model = open_clip.model.CLIP(**json.loads(json.dumps(OC_CFG))).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "visual.positional_embedding":
                param.add_(0.05 * torch.randn_like(param))
    root = tmp_path_factory.mktemp("openclip_src")
    state = {name: t.detach().clone().contiguous() for name, t in model.state_dict().items()}
    save_file(state, str(root / "weights.safetensors"))
    (root / "model.json").write_text(json.dumps(OC_CFG))
    return model, state, root


def test_from_openclip_loads_and_round_trips_exactly(openclip_export, tmp_path):
    oc_model, state, root = openclip_export
    back = tmp_path / "flip"
    report = from_openclip(root / "weights.safetensors", root / "model.json", back)
    cfg = read_consolidated_config(back)
    assert (cfg.model.norm_eps, cfg.model.vision_heads, cfg.model.vision_mlp_dim, cfg.model.context_length) == (1e-5, 4, 256, 16)
    assert report["tensors"] == len(state) - 1  # the sin-cos table is not a flip_scale tensor
    flip_model = flip_model_from(back)
    assert_same_embeddings(flip_model, oc_model, flip_model.arch)
    # OpenCLIP -> flip_scale -> OpenCLIP: bitwise equal.
    to_openclip(back, tmp_path / "openclip")
    again = load_file(str(tmp_path / "openclip" / "open_clip_model.safetensors"))
    assert again.keys() == state.keys()
    for name, tensor in state.items():
        assert again[name].dtype == tensor.dtype and torch.equal(again[name], tensor), name
    # An OpenCLIP training checkpoint (.pt: {'state_dict': {'module.' + name: ...}}), weights_only.
    torch.save({"epoch": 3, "name": "test", "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "epoch_3.pt")
    from_openclip(tmp_path / "epoch_3.pt", root / "model.json", tmp_path / "from_pt")
    first, second = load_file(str(back / "model.safetensors")), load_file(str(tmp_path / "from_pt" / "model.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in first) and first.keys() == second.keys()


def test_flip_to_openclip_to_flip_is_exact(trained, consolidated, tmp_path):
    source, _ = consolidated
    assert main(["to-openclip", str(source), "--out", str(tmp_path / "oc"), "--format", "bin"]) == 0
    weights = tmp_path / "oc" / "open_clip_pytorch_model.bin"
    assert main(["from-openclip", str(weights), "--config", str(tmp_path / "oc" / "open_clip_config.json"),
                 "--out", str(tmp_path / "back")]) == 0
    before, after = load_file(str(source / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert list(before) == list(after)
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name
    assert read_consolidated_config(tmp_path / "back").model == read_consolidated_config(source).model


def _with(section, changes):
    cfg = json.loads(json.dumps(OC_CFG))
    (cfg if section is None else cfg[section]).update(changes)
    return cfg


@pytest.mark.parametrize("section, changes, named", [
    ("vision_cfg", {"pos_embed_type": "none"}, "pos_embed_type"),
    ("vision_cfg", {"ls_init_value": 1e-5}, "ls_init_value"),
    ("vision_cfg", {"attentional_pool": True}, "attentional_pool"),
    ("vision_cfg", {"qk_norm": True}, "qk_norm"),
    ("vision_cfg", {"final_ln_after_pool": True}, "final_ln_after_pool"),
    ("vision_cfg", {"layers": [3, 4, 6, 3]}, "ResNet"),
    ("vision_cfg", {"timm_model_name": "vit_base_patch16_224"}, "timm_model_name"),
    ("text_cfg", {"hf_model_name": "bert-base-uncased"}, "hf_model_name"),
    ("text_cfg", {"embed_cls": True}, "embed_cls"),
    ("text_cfg", {"no_causal_mask": False, "pool_type": "last"}, "pool_type=last"),
    ("text_cfg", {"proj_bias": True}, "proj_bias"),
    ("text_cfg", {"norm_kwargs": {"eps": 1e-6}}, "eps"),
    (None, {"quick_gelu": "yes"}, "quick_gelu"),
    (None, {"custom_text": True}, "custom_text"),
    (None, {"multimodal_cfg": {}}, "multimodal_cfg"),
])
def test_from_openclip_refuses_unrepresentable_configs(section, changes, named):
    with pytest.raises(ConvertError, match=named):
        model_config_from_openclip(_with(section, changes))


def test_from_openclip_refuses_unrepresentable_weights(openclip_export, tmp_path):
    _, state, root = openclip_export
    biased = dict(state, logit_bias=torch.tensor(-10.0))
    save_file(biased, str(tmp_path / "biased.safetensors"))
    with pytest.raises(ConvertError, match="logit_bias"):
        from_openclip(tmp_path / "biased.safetensors", root / "model.json", tmp_path / "out1")
    learned = dict(state, **{"visual.positional_embedding": state["visual.positional_embedding"] + 0.01})
    save_file(learned, str(tmp_path / "learned.safetensors"))
    with pytest.raises(ConvertError, match="sin-cos"):
        from_openclip(tmp_path / "learned.safetensors", root / "model.json", tmp_path / "out2")
    assert not (tmp_path / "out1" / "model.safetensors").exists() and not (tmp_path / "out2" / "model.safetensors").exists()


# ----------------------------------------------------------------------------- flip-train --init-from


@pytest.fixture(scope="module")
def openclip_init(openclip_export, synthetic_dir, tmp_path_factory):
    """`from-openclip` output, and the training overrides to run its config (`--config
    DIR/flip_config.yaml`) on the session's synthetic shards with a tokenizer that fits its 100-token
    vocabulary (trained once here)."""
    from flip_scale.config import load_config
    from flip_scale.data import ensure_synthetic_data

    _, _, root = openclip_export
    out = tmp_path_factory.mktemp("oc_init") / "flip"
    from_openclip(root / "weights.safetensors", root / "model.json", out)
    overrides = [
        "data.synthetic=true", f"data.synthetic_dir={synthetic_dir}",
        f"data.train_shards={synthetic_dir}/train-{{000000..000007}}.tar",
        f"data.tokenizer={out.parent}/tokenizer.model",
        "train.device=cpu", "train.precision=fp32", "train.max_steps=1", "train.global_batch_size=8",
        "train.log_every_steps=1", "checkpoint.every_steps=1000", "data.num_workers=0",
        "eval.at_end=false", "eval.every_steps=0", "logging.tensorboard=false",
    ]
    cfg = load_config(out / "flip_config.yaml", overrides)
    ensure_synthetic_data(cfg.data, image_size=32, vocab_size=cfg.model.vocab_size)
    return out, overrides


def _init_from_rank(rank, world_size, argv):
    """`flip-train` (the real `main`); returns the full model state right after `Trainer.init_from`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    import flip_scale.train as train

    train.shutdown = lambda: None  # under run_distributed the process group is the test's
    captured = {}
    original = train.Trainer.init_from

    def init_from(self, path):
        original(self, path)
        for part in self.model_parts:
            full = get_model_state_dict(part, options=StateDictOptions(full_state_dict=True))
            captured.update({name: t.detach().cpu().clone() for name, t in full.items()})

    train.Trainer.init_from = init_from
    try:
        assert train.main(argv) == 0
    finally:
        train.Trainer.init_from = original
    return captured


def test_flip_train_init_from_openclip_conversion(openclip_init, tmp_path):
    """from-openclip -> `flip-train --config DIR/flip_config.yaml --init-from DIR`: the model starts
    from exactly the converted tensors and trains; another architecture is refused naming the key;
    other pooling is only logged (a fine-tune may intend it); a non-checkpoint names --init-from."""
    from flip_scale.checkpoint import CheckpointError
    from flip_scale.checkpoint import check_source_architecture, resolve_init_from
    from flip_scale.metrics import read_jsonl

    out, overrides = openclip_init
    want = load_file(str(out / "model.safetensors"))
    run_dir = tmp_path / "run"
    argv = ["--config", str(out / "flip_config.yaml"), "--run-dir", str(run_dir), "--init-from", str(out), *overrides]
    got = _init_from_rank(0, 1, argv)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name  # bitwise
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1]

    # Another architecture: refused before anything is loaded or trained, naming the key.
    from flip_scale.train import main as train_main

    other = ["--config", str(out / "flip_config.yaml"), "--run-dir", str(tmp_path / "other"), "--init-from", str(out),
             *overrides, "model.text_layers=3"]
    with pytest.raises(CheckpointError) as error:
        train_main(other)
    message = str(error.value)
    assert "text.layers: 2 in the checkpoint, 3 now" in message and "model.text_layers" in message, message
    assert str(out) in message and "flip_config.yaml" in message
    assert not (tmp_path / "other" / "metrics.jsonl").exists()

    # Other pooling / text mask options (same shapes): a warning naming them for --init-from, refused otherwise.
    source = resolve_init_from(out / "model.safetensors")
    assert source.kind == "consolidated" and source.path == out
    changed = dataclasses.replace(read_consolidated_config(out).model, vision_pool="cls", text_pad_mask=True)
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # on the module's logger: flip-train's logging setup replaced the root's handlers
    logging.getLogger("flip_scale.checkpoint").addHandler(handler)
    try:
        check_source_architecture(source, changed, functional="warn")
    finally:
        logging.getLogger("flip_scale.checkpoint").removeHandler(handler)
    text = " ".join(record.getMessage() for record in records)
    assert "model.vision_pool ('avg_patches' in the checkpoint, 'cls' now)" in text, text
    assert "model.text_pad_mask (False in the checkpoint, True now)" in text, text
    with pytest.raises(CheckpointError, match="model.vision_pool"):
        check_source_architecture(source, changed)

    # Neither a training checkpoint nor a consolidated directory: the error names --init-from.
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as error:
        resolve_init_from(tmp_path / "empty")
    assert str(error.value).startswith(f"--init-from {tmp_path / 'empty'}:") and "consolidated directory" in str(error.value)
    assert "--resume" not in str(error.value)


def _init_from_layouts_worker(rank, world_size, out, overrides, run_root):
    import safetensors.torch

    original_load_file = safetensors.torch.load_file
    if rank != 0:  # without pipeline stages only rank 0 reads the consolidated file
        def refuse(*args, **kwargs):
            raise AssertionError(f"rank {rank} read the consolidated file")

        safetensors.torch.load_file = refuse
    results = {}
    for label, layout in (("fsdp", ["parallel.dp_shard=2"]), ("tp", ["parallel.dp_shard=1", "parallel.tp=2"])):
        argv = ["--config", str(Path(out) / "flip_config.yaml"), "--run-dir", str(Path(run_root) / label),
                "--init-from", str(out), *overrides, *layout]
        results[label] = _init_from_rank(rank, world_size, argv)
    # Pipeline stages: every rank reads the file and loads its own stage's tensors.
    safetensors.torch.load_file = original_load_file
    argv = ["--config", str(Path(out) / "flip_config.yaml"), "--run-dir", str(Path(run_root) / "pp"),
            "--init-from", str(out), *overrides, "parallel.dp_shard=1", "parallel.pp=2", "parallel.microbatches=2"]
    results["pp"] = _init_from_rank(rank, world_size, argv)
    return results


def test_flip_train_init_from_consolidated_into_sharded_layouts(openclip_init, tmp_path):
    # 2 ranks, FSDP2- and tensor-parallel-sharded: only rank 0 reads the file, the tensors are
    # broadcast, and every rank's model gathers back to exactly the file's tensors; under 2 pipeline
    # stages each rank loads its own stage's.
    out, overrides = openclip_init
    want = load_file(str(out / "model.safetensors"))
    results = run_distributed(_init_from_layouts_worker, 2, (str(out), overrides, str(tmp_path)), timeout=300)
    for rank, by_layout in enumerate(results):
        for label, got in by_layout.items():
            if label == "pp":
                continue
            assert sorted(got) == sorted(want), (rank, label)
            for name, tensor in want.items():
                assert torch.equal(got[name], tensor), f"rank {rank} {label}: {name}"
    # 2 pipeline stages: the two ranks' tensors together are the file's, each exactly.
    stages = [results[0]["pp"], results[1]["pp"]]
    assert stages[0] and stages[1] and not set(stages[0]) & set(stages[1])
    got = {**stages[0], **stages[1]}
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), f"pp: {name}"


# ----------------------------------------------------------------------------- inspect


def test_inspect_training_and_consolidated(trained, consolidated, capsys):
    params = sum(t.numel() for t in trained["state"].values())
    assert main(["inspect", str(trained["path"])]) == 0
    text = capsys.readouterr().out
    for expected in ("step         1", f"{params:,}", LAYOUT, "world_size 1", "mask_ratio   0.5", "model        tiny",
                     "visual.blocks.0.attn.qkv.weight", "(288, 96)", "text.proj.weight", "optimizer"):
        assert expected in text, expected
    out, _ = consolidated
    info = json.loads(main_json(["inspect", str(out), "--json"]))
    assert info["step"] == 1 and info["params"] == params and LAYOUT in info["layout"]
    assert [t["name"] for t in info["tensors"]] == list(trained["state"])


# ----------------------------------------------------------------------------- safety


class _Payload:
    """Unpickling this runs a shell command that writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_refused_and_never_runs(openclip_export, trained, tmp_path, capsys):
    _, state, root = openclip_export
    # The payload is live: plain unpickling runs it.
    control = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists()

    marker = tmp_path / "marker"
    evil = tmp_path / "evil.bin"
    torch.save({**state, "extra": _Payload(marker)}, evil)
    assert main(["from-openclip", str(evil), "--config", str(root / "model.json"), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "arbitrary Python objects" in error and "safetensors" in error, error
    with pytest.raises(ConvertError, match="will not be loaded"):
        safe_torch_load(evil)
    # DCP metadata is a pickle too: read with a restricted unpickler.
    step_dir = tmp_path / "run" / "step_00000001"
    shutil.copytree(trained["path"], step_dir)
    (step_dir / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ConvertError, match="not part of a DCP checkpoint"):
        read_dcp_metadata(step_dir)
    with pytest.raises(ConvertError, match="not part of a DCP checkpoint"):
        consolidate(step_dir, tmp_path / "out2")
    assert not marker.exists()


def test_deepspeed_checkpoint_of_another_trainer_is_refused(tmp_path):
    # DeepSpeed's own layout (run/latest -> global_step10/), without flip_scale's trainer_state.json
    # and config.yaml: nothing to rebuild the model from. (flip_scale's own DeepSpeed step
    # directories convert: tests/test_deepspeed_files.py.)
    run = tmp_path / "ds_run"
    (run / "global_step10").mkdir(parents=True)
    (run / "global_step10" / "mp_rank_00_model_states.pt").write_bytes(b"")
    (run / "latest").write_text("global_step10")
    # DeepSpeed's files in a step directory whose trainer_state.json is unreadable: not ours either.
    ours = tmp_path / "flip_run"
    (ours / "step_00000010").mkdir(parents=True)
    for name in ("bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "trainer_state.json", "config.yaml"):
        (ours / "step_00000010" / name).write_bytes(b"")
    (ours / "latest").write_text("step_00000010\n")
    for path in (run, run / "global_step10", ours, ours / "step_00000010"):
        with pytest.raises(UnsupportedCheckpoint, match="DeepSpeed checkpoint of another trainer .* not supported"):
            consolidate(path, tmp_path / "out")
    assert main(["inspect", str(run)]) == 2 and main(["inspect", str(ours / "step_00000010")]) == 2
    assert not (tmp_path / "out").exists()


def test_help_shows_examples(capsys):
    for command in ("consolidate", "to-openclip", "from-openclip", "inspect"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "examples:" in capsys.readouterr().out, command


@pytest.mark.parametrize("name", ["B/16", "L/16", "H/14", "G/14"])
def test_openclip_mapping_covers_the_recipe_sizes(name):
    # On the meta device (no memory): OpenCLIP's model built from our exported config has exactly
    # the tensors, with the shapes, that our mapping produces from the flip_scale model.
    from flip_scale.convert import key_pairs, openclip_model_config

    model_cfg = ModelConfig(name=name)
    with torch.device("meta"):
        oc_model = open_clip.model.CLIP(**openclip_model_config(model_cfg))
    flip_state = build_model(model_cfg, device="meta").state_dict()
    arch = arch_from_config(model_cfg)
    mapped = {}
    for pair in key_pairs(arch):
        mapped[pair.openclip] = ((arch.num_patches + 1, arch.vision.width) if pair.flip is None
                                 else tuple(pair.to_openclip(flip_state[pair.flip]).shape))
    assert mapped == {k: tuple(v.shape) for k, v in oc_model.state_dict().items()}


def test_consolidate_reports_progress_on_long_conversions(trained, tmp_path, capsys, monkeypatch):
    import flip_scale.convert.checkpoints as checkpoints_module

    monkeypatch.setattr(checkpoints_module, "PROGRESS_EVERY_S", 0.0)  # every tensor, as if each took long
    consolidate(trained["path"], tmp_path / "out")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("consolidate: ")]
    assert lines and "GiB (" in lines[-1] and "ETA" in lines[-1]
    assert "(100%)" in lines[-1]


def _load_other_architecture(rank: int, world_size: int, directory: str) -> str:
    from flip_scale.convert import ConvertError

    cfg = read_consolidated_config(directory)
    model = build_model(dataclasses.replace(cfg.model, text_layers=cfg.model.text_layers + 1))
    try:
        load_consolidated(directory, model, broadcast_from_rank0=True)
    except ConvertError as error:
        return str(error)
    return "loaded"


def test_a_refused_broadcast_load_is_refused_on_every_rank(consolidated):
    """Only rank 0 reads the file: its verdict reaches the others before any collective, so they
    raise too instead of waiting in a broadcast that never comes."""
    from dist_utils import run_distributed

    results = run_distributed(_load_other_architecture, 2, (str(consolidated[0]),), timeout=120)
    assert all("lacks" in message and "text.blocks" in message for message in results), results
