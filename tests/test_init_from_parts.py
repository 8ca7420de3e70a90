"""`train.init_from_parts`: flip-train --init-from a from-openclip directory keeping only some towers.
The kept tower equals the source bitwise, the other equals a fresh initialisation (not the source);
under dp_shard=2 likewise; bad values and the DeepSpeed engine are refused by name."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from flip_scale.config import Config, ConfigError, validate
from flip_scale.convert import from_openclip, main as convert_main

open_clip = pytest.importorskip("open_clip")

from dist_utils import run_distributed  # noqa: E402
from test_openclip_family import TINY_OC, _perturb, _train_rank  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:No pretrained weights loaded", "ignore:torch.distributed is disabled")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts_oc")
    torch.manual_seed(7)
    model = open_clip.model.CLIP(**json.loads(json.dumps(TINY_OC))).eval()
    _perturb(model)
    (root / "src").mkdir()
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(root / "src" / "w.safetensors"))
    (root / "src" / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OC, "preprocess_cfg": {}}))
    from_openclip(root / "src" / "w.safetensors", root / "src", root / "flip", mask_ratio=0.5)
    return root / "flip"


def _argv(out, run_dir, synthetic_dir, *extra, init=True) -> list:
    # lr 0 (and so no weight decay): the weights at the end are the weights after --init-from.
    return ["--config", str(out / "flip_config.yaml"), "--run-dir", str(run_dir),
            *(["--init-from", str(out)] if init else []),
            "data.synthetic=true", f"data.synthetic_dir={synthetic_dir}",
            f"data.train_shards={synthetic_dir}/train-{{000000..000007}}.tar",
            f"data.tokenizer={synthetic_dir}/tokenizer.model", "train.device=cpu", "train.precision=fp32",
            "train.max_steps=1", "train.global_batch_size=8", "checkpoint.every_steps=1000", "data.num_workers=0",
            "eval.at_end=false", "eval.every_steps=0", "logging.tensorboard=false", "optim.lr=0", *extra]


def _weights(run_dir, tmp_path) -> dict:
    out = tmp_path / f"{run_dir.name}_consolidated"
    assert convert_main(["consolidate", str(run_dir), "--out", str(out)]) == 0
    return load_file(str(out / "model.safetensors"))


def _check(kept: dict, source: dict, fresh: dict, tower: str) -> None:
    assert set(kept) == set(source) == set(fresh)
    for name, tensor in kept.items():
        if name.split(".")[0] == tower:
            assert torch.equal(tensor, source[name]), name
        else:
            assert torch.equal(tensor, fresh[name]), name
            if tensor.numel() > 1:
                assert not torch.equal(tensor, source[name]), name
    assert any(name.startswith(tower + ".") for name in kept)


def test_kept_tower_is_the_source_and_the_other_a_fresh_init(source, synthetic_dir, tmp_path):
    from flip_scale.train import main as train_main

    src = load_file(str(source / "model.safetensors"))
    assert train_main(_argv(source, tmp_path / "fresh", synthetic_dir, init=False)) == 0
    fresh = _weights(tmp_path / "fresh", tmp_path)
    for tower in ("visual", "text"):
        run = tmp_path / f"keep_{tower}"
        assert train_main(_argv(source, run, synthetic_dir, f"train.init_from_parts=[{tower}]")) == 0
        _check(_weights(run, tmp_path), src, fresh, tower)


@pytest.mark.slow  # 2 ranks of flip-train
def test_kept_tower_under_dp_shard_2(source, synthetic_dir, tmp_path):
    from flip_scale.train import main as train_main

    src = load_file(str(source / "model.safetensors"))
    assert train_main(_argv(source, tmp_path / "fresh", synthetic_dir, init=False)) == 0
    fresh = _weights(tmp_path / "fresh", tmp_path)
    run = tmp_path / "dp2"
    run_distributed(_train_rank, 2, (_argv(source, run, synthetic_dir, "train.init_from_parts=[visual]",
                                           "parallel.dp_shard=2"),), timeout=400)
    _check(_weights(run, tmp_path), src, fresh, "visual")


@pytest.mark.parametrize("parts, message", [(["vision"], "valid entries: visual, text"),
                                            (["visual", "visual"], "not a list of distinct towers")])
def test_bad_parts_are_refused_by_name(parts, message):
    cfg = Config()
    cfg.train.init_from_parts = parts
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_deepspeed_engine_is_refused_with_the_reason():
    cfg = Config()
    cfg.train.init_from_parts = ["visual"]
    cfg.parallel.engine = "deepspeed"
    with pytest.raises(ConfigError, match="needs parallel.engine=fsdp"):
        validate(cfg)


def test_to_openclip_note_names_the_models_own_tokenizer(source, tmp_path, capsys):
    """The exported config's note (and the printed line) follow data.tokenizer: open_clip's BPE for an
    imported model, sentencepiece only where the model was trained with it."""
    from flip_scale.convert.openclip import tokenizer_note

    import shutil

    notes = {}
    for tokenizer in ("sentencepiece", "openclip"):
        directory = tmp_path / tokenizer
        shutil.copytree(source, directory)
        if tokenizer == "openclip":  # this tiny import has a 512-token vocabulary: the file says openclip
            text = (directory / "flip_config.yaml").read_text()
            lines = [line if not line.strip().startswith("tokenizer:") else line.split("tokenizer:")[0] + "tokenizer: openclip"
                     for line in text.splitlines()]
            (directory / "flip_config.yaml").write_text("\n".join(lines) + "\n")
        assert convert_main(["to-openclip", str(directory), "--out", str(tmp_path / f"{tokenizer}_oc")]) == 0
        document = json.loads((tmp_path / f"{tokenizer}_oc" / "open_clip_config.json").read_text())
        notes[tokenizer] = document["flip_scale"]["note"]
        assert f"note: {notes[tokenizer]}" in capsys.readouterr().out
    assert "open_clip's default CLIP BPE" in notes["openclip"] and "sentencepiece" not in notes["openclip"]
    assert "sentencepiece" in notes["sentencepiece"]
    assert "get_tokenizer('ViT-B-16')" in tokenizer_note("openclip:ViT-B-16")
    assert "sentencepiece tokenizer /data/spm.model" in tokenizer_note("/data/spm.model")
