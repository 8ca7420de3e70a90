"""`convert_ckpt to-timm`: the image tower as a timm VisionTransformer, loaded strictly by timm,
with the same pooled features and image embedding as flip_scale's tower (eval: no masking)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from flip_scale.config import Config, ModelConfig, TrainConfig
from flip_scale.convert import main as convert_main
from flip_scale.convert.checkpoints import write_config
from flip_scale.convert.timm import timm_model_args, to_timm
from flip_scale.models import build_model



pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

ATOL = 1e-5
# B/16's image tower as trained; its text tower is cut down (to-timm exports the image tower only).
B16_SMALL_TEXT = dict(name="B/16", vocab_size=64, text_width=64, text_layers=1, text_heads=2, text_mlp_dim=128)


def write_consolidated(directory: Path, seed: int = 0, **model) -> torch.nn.Module:
    """A consolidated directory (model.safetensors + flip_config.yaml) of a random-weight model."""
    cfg = Config(train=TrainConfig(device="cpu", precision="fp32"), model=ModelConfig(**model))
    torch.manual_seed(seed)
    flip = build_model(cfg.model).eval()
    with torch.no_grad():  # non-trivial norms and CLS, so a swapped or dropped tensor shows
        for name, tensor in flip.named_parameters():
            if "ln" in name or "cls_token" in name:
                tensor.add_(0.1 * torch.randn_like(tensor))
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in flip.state_dict().items()}, str(directory / "model.safetensors"))
    write_config(cfg, directory, "test model")
    return flip


def timm_from(out: Path, local_dir: bool = True) -> torch.nn.Module:
    """timm.create_model(name, pretrained=False, **model_args) + a strict load of the export; with
    `local_dir`, also timm's own loader of the directory, which must give the same tensors."""
    document = json.loads((out / "config.json").read_text())
    model = timm.create_model("vit_base_patch16_224", pretrained=False, **document["model_args"]).eval()
    model.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    if local_dir:
        again = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        assert list(again.state_dict()) == list(model.state_dict())
        for name, tensor in again.state_dict().items():
            assert torch.equal(tensor, model.state_dict()[name]), name
    return model


def assert_same_features(flip, model, image_size: int, batch: int) -> None:
    """Pooled features (the projection's input) and the embedding, ours against timm's."""
    images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    captured = {}
    hook = flip.visual.proj.register_forward_hook(lambda module, args, out: captured.update(pooled=args[0]))
    with torch.no_grad():
        ours_embedding = flip.encode_image(images, normalize=False)
        features = model.forward_features(images)
        theirs_pooled = model.forward_head(features, pre_logits=True)
        theirs_embedding = model.forward_head(features)
    hook.remove()
    pooled_diff = (captured["pooled"] - theirs_pooled).abs().max().item()
    embed_diff = (ours_embedding - theirs_embedding).abs().max().item()
    print(f"max |difference|: pooled {pooled_diff:.2e}, embedding {embed_diff:.2e}")
    assert pooled_diff < ATOL and embed_diff < ATOL, (pooled_diff, embed_diff)
    assert theirs_pooled.abs().max() > 0.1 and ours_embedding.abs().max() > 0.01  # features, not zeros


@pytest.mark.parametrize("pool", ["avg_patches", "cls"])
def test_tiny_to_timm_loads_strictly_with_the_same_features(pool, tmp_path):
    flip = write_consolidated(tmp_path / "ckpt", name="tiny", vocab_size=64, vision_pool=pool)
    assert convert_main(["to-timm", str(tmp_path / "ckpt"), "--out", str(tmp_path / "timm")]) == 0
    document = json.loads((tmp_path / "timm" / "config.json").read_text())
    args = document["model_args"]
    assert (args["global_pool"], args["fc_norm"], args["no_embed_class"], args["class_token"], args["pre_norm"]) == (
        {"avg_patches": "avg", "cls": "token"}[pool], False, True, True, False)
    assert (args["embed_dim"], args["depth"], args["num_heads"], args["num_classes"]) == (96, 4, 4, 64)
    model = timm_from(tmp_path / "timm")
    assert_same_features(flip, model, 32, batch=3)


def test_no_head_writes_the_projection_beside_a_backbone(tmp_path):
    flip = write_consolidated(tmp_path / "ckpt", name="tiny", vocab_size=64)
    # The source may also be named by its model.safetensors file, as for to-openclip.
    report = to_timm(tmp_path / "ckpt" / "model.safetensors", tmp_path / "timm", head=False)
    model = timm_from(tmp_path / "timm")
    assert report["model_args"]["num_classes"] == 0 and isinstance(model.head, torch.nn.Identity)
    projection = load_file(report["projection"])["proj.weight"]
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        embedding = model(images) @ projection.T
        assert torch.allclose(embedding, flip.encode_image(images, normalize=False), atol=ATOL)


def test_b16_to_timm_loads_strictly_with_the_same_features(tmp_path):
    flip = write_consolidated(tmp_path / "ckpt", **B16_SMALL_TEXT)
    to_timm(tmp_path / "ckpt", tmp_path / "timm")
    model = timm_from(tmp_path / "timm", local_dir=False)
    assert sum(p.numel() for p in model.parameters()) == (
        sum(p.numel() for n, p in flip.named_parameters() if n.startswith("visual.")) + 768 * 196 + 768 + 512)
    assert_same_features(flip, model, 224, batch=1)


@pytest.mark.parametrize("change, named", [
    ({"vision_pool": "avg_all"}, "model.vision_pool='avg_all'"),
    ({"norm_eps": 1e-5}, "model.norm_eps=1e-05"),
])
def test_to_timm_refuses_what_timm_cannot_express(change, named, tmp_path, capsys):
    write_consolidated(tmp_path / "ckpt", name="tiny", vocab_size=64, **change)
    assert convert_main(["to-timm", str(tmp_path / "ckpt"), "--out", str(tmp_path / "timm")]) == 2
    error = capsys.readouterr().err
    assert named in error and "to-timm" in error, error
    assert not (tmp_path / "timm" / "model.safetensors").exists()


def test_options_not_mapped_yet_are_refused_by_name():
    cfg = ModelConfig(name="tiny")
    for key, value in (("vision_pos_embed", "learned"), ("vision_ln_pre", True), ("act", "quick_gelu")):
        changed = ModelConfig(name="tiny")
        object.__setattr__(changed, key, value)
        with pytest.raises(Exception, match=f"model.{key}="):
            timm_model_args(changed)
    assert timm_model_args(cfg)["act_layer"] == "gelu"


@pytest.mark.parametrize("name", ["L/16", "H/14", "G/14"])
def test_large_towers_have_the_same_parameter_count_in_timm(name):
    """On the meta device (nothing allocated): timm's tower from the exported args holds exactly our
    image tower's parameters plus the tensors timm adds (the pos_embed table, zero patch and head
    biases); G/14's MLP width 8192 comes back from timm's int(width * mlp_ratio)."""
    args = timm_model_args(ModelConfig(name=name))
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, **args)
    ours = build_model(ModelConfig(name=name, vocab_size=64), device="meta")
    vision = sum(p.numel() for n, p in ours.named_parameters() if n.startswith("visual."))
    width, patches = args["embed_dim"], (args["img_size"] // args["patch_size"]) ** 2
    assert sum(p.numel() for p in model.parameters()) == vision + patches * width + width + args["num_classes"]
    assert model.blocks[0].mlp.fc1.out_features == ours.visual.blocks["0"].mlp.fc1.out_features
