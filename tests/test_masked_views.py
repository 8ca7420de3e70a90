"""Masked-view ensemble at inference (eval.masked_views, flip-eval --masked-views; FLIP Table 1d):
complementary masks, the ensemble embedding, the reports beside the full-image numbers, layouts."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed
from flip_scale.config import ConfigError, load_config
from flip_scale.evaluation import log_values, run_evaluation
from flip_scale.evaluation.masked_views import view_keep_count, view_noises
from flip_scale.evaluation.runner import _ImageView
from flip_scale.models import build_model, masking_noise
from flip_scale.models.masking import RandomMasking, ratio_keeping
from test_evaluate import _build, _save_checkpoint, eval_config

VIEWS = 4


def _view_keeps(num_patches: int, views: int, keep: int, index: torch.Tensor) -> list:
    """Each view's kept patches, as the image tower's masking picks them from the view's noise."""
    masking = RandomMasking(ratio_keeping(num_patches, keep))
    masking.train()
    return [masking.keep_indices(len(index), num_patches, noise) for noise in view_noises(3, index, num_patches, views, keep)]


@pytest.mark.parametrize("num_patches,views", [(64, 4), (64, 3), (196, 4), (256, 2)])
def test_the_views_masks_are_complementary(num_patches, views):
    index = torch.tensor([0, 5, 77])
    keep = view_keep_count(num_patches, views)
    assert keep == num_patches // views
    keeps = _view_keeps(num_patches, views, keep, index)
    perm = masking_noise(3, 0, index, num_patches).argsort(dim=1, stable=True)
    for row in range(len(index)):
        sets = [set(k[row].tolist()) for k in keeps]
        assert all(len(s) == keep for s in sets)
        assert sum(len(s) for s in sets) == len(set().union(*sets))  # disjoint
        union = set().union(*sets)
        assert len(union) == views * keep  # all patches when N divides L (64 / 3: one left out)
        for k, s in enumerate(sets):  # view k is the k-th block of the sample's permutation
            assert s == set(perm[row, k * keep:(k + 1) * keep].tolist())
    if num_patches % views == 0:
        assert all(len(set().union(*[set(k[r].tolist()) for k in keeps])) == num_patches for r in range(len(index)))
    # A function of the sample's index: the same views in another batch.
    alone = _view_keeps(num_patches, views, keep, index[1:2])
    assert all(torch.equal(a[0], k[1]) for a, k in zip(alone, keeps))


def test_a_given_ratio_overlaps_the_views_and_bad_counts_are_refused():
    keep = view_keep_count(64, 2, 0.25)  # 48 patches per view: 32 shared
    assert keep == 48
    first, second = (set(k[0].tolist()) for k in _view_keeps(64, 2, keep, torch.tensor([4])))
    assert len(first | second) == 64 and len(first & second) == 32
    with pytest.raises(ConfigError, match="eval.masked_views: must be 0 \\(off\\) or >= 2 views, got 1"):
        load_config(None, ["eval.masked_views=1"])
    with pytest.raises(ConfigError, match="eval.masked_view_ratio: 1.5 is outside"):
        load_config(None, ["eval.masked_views=2", "eval.masked_view_ratio=1.5"])
    with pytest.raises(ValueError, match="4 views of an image of 2 patches"):
        view_keep_count(2, 4)


def test_the_ensemble_embedding_is_the_renormalised_mean_of_the_views():
    cfg = load_config(None, ["model.mask_ratio=0.75"])
    model = build_model(cfg.model)
    model.eval()
    images = torch.randn(3, 3, 32, 32)
    index = torch.tensor([2, 9, 11])
    view = _ImageView(model, None, 3, masked_views=VIEWS)
    with view.mode():
        ensemble = view(images, index, "cpu")
    assert not model.training and not model.visual.masking.training and model.visual.mask_ratio == 0.75  # restored
    # By hand: each view's patches (the k-th quarter of the permutation) through the tower's parts.
    visual = model.visual
    perm = masking_noise(3, 0, index, 64).argsort(dim=1, stable=True)
    views = []
    with torch.no_grad():
        for k in range(VIEWS):
            ids = perm[:, 16 * k:16 * (k + 1)]
            x = visual.patch_embed(images, ids) + visual.pos_embed[ids]
            x = torch.cat([visual.cls_token.expand(3, 1, -1), x], dim=1)
            for block in visual.blocks.values():
                x = block(x)
            views.append(F.normalize(visual.head(x), dim=-1))
    by_hand = F.normalize(torch.stack(views).mean(dim=0), dim=-1)
    torch.testing.assert_close(ensemble, by_hand, atol=1e-6, rtol=1e-5)
    full = F.normalize(model.encode_image(images), dim=-1)
    assert (ensemble - full).abs().max() > 1e-3  # the views are not the whole image
    with pytest.raises(ValueError, match="exclude each other"):
        _ImageView(model, 0.5, 3, masked_views=VIEWS)


def _evaluate_with_views(rank: int, world_size: int, data_dir: str, layouts: dict) -> dict:
    from pathlib import Path

    from flip_scale.data import Tokenizer
    from flip_scale.evaluation import EvalGroup

    out = {}
    for name, parallel in layouts.items():
        cfg = eval_config(Path(data_dir), **parallel)
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, masked_views=VIEWS, max_samples=60))
        model, dims = _build(cfg, world_size)
        image_tokens = Counter()  # rows seen by the first image block, by token count (one process)
        if world_size == 1:
            model.visual.blocks["0"].register_forward_pre_hook(
                lambda module, args, seen=image_tokens: seen.update({args[0].shape[1]: args[0].shape[0]}))
        out[name] = run_evaluation(model, Tokenizer(cfg.data.tokenizer), cfg, torch.device("cpu"),
                                   EvalGroup.from_dims(dims))
        if world_size == 1:
            out["image_tokens"] = dict(image_tokens)
    return out


@pytest.fixture(scope="module")
def views_one_process(synthetic_dir):
    out = _evaluate_with_views(0, 1, str(synthetic_dir), {"one": {}})
    return out["one"], out["image_tokens"]


def test_run_evaluation_reports_the_ensemble_beside_the_full_image(views_one_process):
    results, image_tokens = views_one_process
    # Every image went through the image tower's masked path 4 times, with 1 + 64 / 4 tokens.
    assert set(image_tokens) == {65, 17} and image_tokens[17] == VIEWS * image_tokens[65]
    ensemble = results[f"masked_views_{VIEWS}"]
    assert ensemble["zero_shot"]["samples"] == results["zero_shot"]["samples"] == 60
    assert ensemble["retrieval"]["samples"] == 60
    values = log_values(results)
    assert {"zero_shot_top1", f"masked_views_{VIEWS}/zero_shot_top1", f"masked_views_{VIEWS}/retrieval_t2i_r5"} <= set(values)
    assert all(f"masked_views_{VIEWS}/{key}" in values for key in values if "/" not in key)
    # (A random-weight model embeds every image nearly alike, so the counts may coincide.)


@pytest.mark.slow
def test_masked_views_under_two_rank_layouts_give_the_numbers_of_one_process(synthetic_dir, views_one_process):
    layouts = {"dp_shard=2": dict(dp_shard=2), "tp=2": dict(dp_shard=1, tp=2),
               "pp=2": dict(dp_shard=1, pp=2, microbatches=2)}
    results = run_distributed(_evaluate_with_views, 2, (str(synthetic_dir), layouts), timeout=240)
    for rank, per_rank in enumerate(results):
        for name, got in per_rank.items():
            assert got == views_one_process[0], (name, rank)


def test_flip_eval_masked_views_reports_both(synthetic_dir, tmp_path, views_one_process, capsys):
    from flip_scale.evaluate import main

    cfg = eval_config(synthetic_dir)
    model, _ = _build(cfg, 1)
    _save_checkpoint(model, cfg, tmp_path / "run")
    out = tmp_path / "eval.json"
    assert main(["--checkpoint", str(tmp_path / "run"), "--masked-views", str(VIEWS), "--max-samples", "60",
                 "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    expected = log_values(views_one_process[0])
    for key, value in expected.items():
        assert record[key] == value, key
    assert f"ensemble of {VIEWS} masked views: zero-shot top-1" in capsys.readouterr().out
    assert main(["--checkpoint", str(tmp_path / "run"), "--masked-views", "1"]) == 2
    assert "eval.masked_views: must be 0 (off) or >= 2 views, got 1" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "run"), "--masked-views", "2", "--masked"]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_in_training_evaluation_reports_the_ensemble(synthetic_dir, tmp_path):
    """flip-train's own evaluation (Trainer.evaluate) writes both sets of metrics to eval.jsonl."""
    from flip_scale.metrics import read_jsonl
    from flip_scale.train import main

    run_dir = tmp_path / "run"
    assert main(["--run-dir", str(run_dir),
                 f"data.synthetic_dir={synthetic_dir}", f"data.train_shards={synthetic_dir}/train-{{000000..000007}}.tar",
                 f"data.tokenizer={synthetic_dir}/tokenizer.model", "data.num_workers=0",
                 f"eval.zero_shot_shards={synthetic_dir}/eval-{{000000..000000}}.tar",
                 f"eval.classnames={synthetic_dir}/classnames.txt", f"eval.templates={synthetic_dir}/templates.txt",
                 "eval.max_samples=32", "eval.batch_size=32", "eval.masked_views=2", "train.max_steps=1",
                 "train.global_batch_size=8", "checkpoint.every_steps=0", "logging.tensorboard=false"]) == 0
    record = read_jsonl(run_dir / "eval.jsonl")[-1]
    assert record["samples"] == 32 and record["masked_views_2/samples"] == 32
    assert 0.0 <= record["masked_views_2/zero_shot_top1"] <= 1.0 and "zero_shot_top1" in record
