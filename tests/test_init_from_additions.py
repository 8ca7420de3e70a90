"""--init-from a checkpoint trained without a training-only addition: MAE's decoder
(loss.mae_weight) or SigLIP's logit bias (loss.kind sigmoid) keep their initial values, logged,
and every other tensor is the source's; a tensor the source lacks otherwise is still refused."""

from __future__ import annotations

import logging

import pytest
import torch

from test_attentive import CPU, _cfg, _train_step

ADDITIONS = ["loss.kind=sigmoid", "loss.mae_weight=0.5", "model.decoder_layers=1", "model.decoder_width=32",
             "model.decoder_heads=4"]


@pytest.fixture(scope="module")
def plain_sources(tmp_path_factory):
    """A contrastive run without a decoder, one step trained: (its DCP step dir, consolidated dir, weights)."""
    from flip_scale.convert import consolidate
    from flip_scale.train import Trainer

    tmp = tmp_path_factory.mktemp("plain")
    cfg = _cfg("model.masking=random")
    trainer = Trainer(cfg, tmp / "run", CPU, with_data=False)
    _train_step(trainer, cfg, 0)
    path = trainer.save()
    trained = {name: p.detach().clone() for name, p in trainer.engine.model.named_parameters()}
    trainer.close()
    consolidate(path, tmp / "consolidated")
    return path, tmp / "consolidated", trained


@pytest.mark.parametrize("kind", ["dcp", "consolidated"])
def test_the_decoder_and_the_logit_bias_keep_their_initial_values(plain_sources, kind, caplog):
    from flip_scale.checkpoint import open_checkpoint
    from flip_scale.engine import build_engine
    from flip_scale.preflight import plan_run

    dcp, consolidated, trained = plain_sources
    cfg = _cfg("model.masking=random", *ADDITIONS)
    engine = build_engine(cfg, plan_run(cfg, 1), "cpu")
    initial = {name: p.detach().clone() for name, p in engine.model.named_parameters()}
    with caplog.at_level(logging.WARNING, logger="flip_scale"):
        engine.load_weights(open_checkpoint(dcp if kind == "dcp" else consolidated))
    assert "has no decoder, logit_bias" in caplog.text and "keep their initial values" in caplog.text
    for name, param in engine.model.named_parameters():
        if name.startswith("decoder.") or name == "logit_bias":
            assert torch.equal(param, initial[name]), name
        else:
            assert torch.equal(param, trained[name]), name
    engine.close()


def test_a_tensor_the_source_lacks_otherwise_is_refused(plain_sources, tmp_path):
    from safetensors.torch import load_file, save_file

    from flip_scale.checkpoint import CheckpointError, open_checkpoint
    from flip_scale.engine import build_engine
    from flip_scale.preflight import plan_run

    _, consolidated, _ = plain_sources
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in consolidated.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    tensors = load_file(broken / "model.safetensors")
    del tensors["text.ln_final.weight"]
    save_file(tensors, broken / "model.safetensors")
    cfg = _cfg("model.masking=random")
    engine = build_engine(cfg, plan_run(cfg, 1), "cpu")
    with pytest.raises(CheckpointError, match="lacks 1 tensors of the model: text.ln_final.weight"):
        engine.load_weights(open_checkpoint(broken))
    engine.close()
