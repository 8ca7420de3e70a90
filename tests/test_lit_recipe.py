"""configs/openclip_vit_b16_lit.yaml: the LiT recipe validates, its model is OpenCLIP ViT-B-16's as
from-openclip writes it, and it builds with the image tower locked; a tiny analogue (a tiny OpenCLIP
config imported, 3 steps of flip-train with the recipe's LiT keys) keeps the image tower bitwise while
the text tower trains."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from flip_scale.config import load_config
from flip_scale.convert import main as convert_main, model_config_from_openclip
from flip_scale.models import arch_from_config, build_model

open_clip = pytest.importorskip("open_clip")

from test_init_from_parts import _argv, source  # noqa: E402,F401  (the module fixture)

pytestmark = pytest.mark.filterwarnings("ignore:No pretrained weights loaded", "ignore:torch.distributed is disabled")

RECIPE = "configs/openclip_vit_b16_lit.yaml"
LIT_KEYS = ("train.init_from_parts=[visual]", "model.lock_vision=true")


def test_recipe_validates_and_builds_with_the_image_tower_locked():
    from flip_scale.models.lock import apply_locks

    cfg = load_config(RECIPE)
    assert cfg.train.init_from_parts == ["visual"] and cfg.model.lock_vision and not cfg.model.lock_text
    assert cfg.data.tokenizer == "openclip" and cfg.model.mask_ratio == 0.5
    imported = model_config_from_openclip(open_clip.get_model_config("ViT-B-16"))
    assert arch_from_config(cfg.model) == arch_from_config(imported)  # the shape and every OpenCLIP option
    model = build_model(cfg.model, device="meta")
    arch = arch_from_config(cfg.model)
    layers = {"visual": arch.vision.layers, "text": arch.text.layers}
    frozen = apply_locks(model, cfg.model, layers)
    vision = sum(p.numel() for n, p in model.named_parameters() if n.startswith("visual."))
    assert frozen == vision > 80e6
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("visual."))


def test_tiny_lit_keeps_the_image_tower_and_trains_the_text_tower(source, synthetic_dir, tmp_path):  # noqa: F811
    from flip_scale.train import main as train_main

    src = load_file(str(source / "model.safetensors"))
    runs = {}
    for name, extra in (("init", ("train.max_steps=1", "optim.lr=0")), ("lit", ("train.max_steps=3", "optim.lr=1e-3"))):
        run = tmp_path / name
        assert train_main(_argv(source, run, synthetic_dir, *LIT_KEYS, *extra)) == 0
        assert convert_main(["consolidate", str(run), "--out", str(tmp_path / f"{name}_c")]) == 0
        runs[name] = load_file(str(tmp_path / f"{name}_c" / "model.safetensors"))
    for name, tensor in runs["lit"].items():
        if name.startswith("visual."):
            assert torch.equal(tensor, src[name]), name
    text = [n for n in runs["lit"] if n.startswith("text.")]
    assert text and all(not torch.equal(runs["lit"][n], src[n]) for n in text if runs["lit"][n].numel() > 1)
    changed = [n for n in text if not torch.equal(runs["lit"][n], runs["init"][n])]
    assert len(changed) > len(text) // 2, changed  # the text tower trains from its fresh start
