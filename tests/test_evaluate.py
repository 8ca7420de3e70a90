"""Zero-shot classification and retrieval: the arithmetic on known features, the datasets, the
data-parallel split (every layout gives the numbers of one process) and `flip-eval`."""

from __future__ import annotations

import importlib.util
import json
import runpy
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed
from flip_scale.config import Config, DataConfig, EvalConfig, ModelConfig, TrainConfig
from flip_scale.evaluate import (
    FLIP_SHORT_TEMPLATES, OPENAI_IMAGENET_TEMPLATES, EvalGroup, build_zero_shot_classifier, classifier_from_text_features,
    correct_at_k, load_templates, lockstep_batches, recall_at_k, run_evaluation, zero_shot_accuracy,
)
from flip_scale.evaluation.group import Field

# ----------------------------------------------------------------------------- templates


def test_templates_match_openai_and_flip_lists():
    # open_clip's metadata module has no imports: run it as a file, without importing open_clip.
    spec = importlib.util.find_spec("open_clip")
    metadata = runpy.run_path(str(Path(spec.submodule_search_locations[0]) / "zero_shot_metadata.py"))
    assert list(OPENAI_IMAGENET_TEMPLATES) == [t("{}") for t in metadata["OPENAI_IMAGENET_TEMPLATES"]]
    assert list(FLIP_SHORT_TEMPLATES) == [t("{}") for t in metadata["SIMPLE_IMAGENET_TEMPLATES"]]
    assert len(load_templates("openai")) == 80 and OPENAI_IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert len(load_templates("flip_short")) == 7


def test_template_file_without_placeholder_is_refused(tmp_path):
    bad = tmp_path / "t.txt"
    bad.write_text("a photo of a {}\nno placeholder here\n")
    with pytest.raises(ValueError, match="no placeholder here"):
        load_templates(str(bad))
    with pytest.raises(FileNotFoundError, match="flip_short, openai"):
        load_templates(str(tmp_path / "missing.txt"))


# ----------------------------------------------------------------------------- arithmetic


def test_zero_shot_is_100_percent_on_planted_features():
    classes, templates, dim = 6, 3, 16
    generator = torch.Generator().manual_seed(0)
    directions = torch.eye(dim)[:classes]
    prompts = directions[:, None, :] + 0.05 * torch.randn(classes, templates, dim, generator=generator)
    classifier = classifier_from_text_features(prompts)
    labels = torch.arange(60) % classes
    images = F.normalize(directions[labels] + 0.1 * torch.randn(60, dim, generator=generator), dim=-1)
    assert correct_at_k(images @ classifier, labels, (1, 5)) == {1: 60, 5: 60}
    # The same images with shuffled labels are not all right: the count is not a constant.
    assert correct_at_k(images @ classifier, (labels + 1) % classes, (1,))[1] == 0


def test_zero_shot_matches_a_hand_computation():
    # Classifier: per class the normalised mean of normalised prompt embeddings.
    prompts = torch.tensor([[[3.0, 4.0], [1.0, 0.0]], [[0.0, 2.0], [0.0, 5.0]]])
    mean0 = torch.tensor([0.8, 0.4])  # mean of (0.6, 0.8) and (1, 0)
    expected = torch.stack([mean0 / mean0.norm(), torch.tensor([0.0, 1.0])]).t()
    torch.testing.assert_close(classifier_from_text_features(prompts), expected)
    logits = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1], [0.4, 0.4, 0.2]])
    labels = torch.tensor([2, 1, 0])
    # row 0: one class above its own -> right at k=2 only; row 1: right; row 2: a tie counts against.
    assert correct_at_k(logits, labels, (1, 2, 5)) == {1: 1, 2: 3, 5: 3}
    assert correct_at_k(logits, labels, (1, 2), valid=torch.tensor([True, True, False])) == {1: 1, 2: 2}
    # A model whose logits are all equal is never right, and NaN logits are never right.
    assert correct_at_k(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0]), (1,)) == {1: 0}
    assert correct_at_k(torch.full((2, 3), float("nan")), torch.tensor([0, 1]), (1, 5)) == {1: 0, 5: 0}


def test_recall_is_perfect_on_planted_pairs_and_matches_a_hand_computation():
    generator = torch.Generator().manual_seed(1)
    features = F.normalize(torch.randn(20, 32, generator=generator), dim=-1)
    perfect = recall_at_k(features, features + 0.01 * torch.randn(20, 32, generator=generator))
    assert perfect["image_to_text"] == {1: 1.0, 5: 1.0, 10: 1.0} and perfect["text_to_image"][1] == 1.0

    # Images = identity, so similarity[i, j] = texts[j, i] = scores[i, j].
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.95, 0.5, 0.2], [0.1, 0.2, 0.3]])
    result = recall_at_k(torch.eye(3), scores.t(), ks=(1, 2))
    # image->text: rows 0 and 2 rank their own caption first, row 1 second.
    assert result["image_to_text"] == {1: pytest.approx(2 / 3), 2: 1.0}
    # text->image: column 0 (0.95 above 0.9) and column 1 (0.8 above 0.5) second, column 2 first.
    assert result["text_to_image"] == {1: pytest.approx(1 / 3), 2: 1.0}
    # Captions 0 and 1 read the same: either counts for images 0 and 1, and both images for it.
    same = recall_at_k(torch.eye(3), scores.t(), ks=(1,), captions=["a red circle", "a red circle", "a blue cross"])
    assert same["image_to_text"][1] == 1.0 and same["text_to_image"][1] == 1.0


def test_lockstep_batches_pad_limit_and_number_the_samples():
    batches = [{"labels": torch.tensor([5, 6, 7])}, {"labels": torch.tensor([8, 9])}, {"labels": torch.tensor([1, 2, 3])}]
    out = list(lockstep_batches(batches, {"labels": Field((), torch.long, -1)}, 3, EvalGroup(), torch.device("cpu"),
                                max_samples=6))
    assert [b["labels"].tolist() for b in out] == [[5, 6, 7], [8, 9, -1], [1, -1, -1]]
    assert [b["valid"].tolist() for b in out] == [[True] * 3, [True, True, False], [True, False, False]]
    assert [b["index"].tolist() for b in out] == [[0, 1, 2], [3, 4, -1], [5, -1, -1]]
    # Rank 1 of 2 keeps the dataset's odd positions; its share of 5 samples is 2.
    group = EvalGroup(None, rank=1, size=2)
    assert group.rank_limit(5) == 2 and EvalGroup(None, 0, 2).rank_limit(5) == 3
    assert group.rank_limit(0) is None


# ----------------------------------------------------------------------------- a model on real shards

MAX_SAMPLES = 149  # uneven over 2 ranks (75 + 74) and not a multiple of the batch
BATCH = 32


def eval_config(data_dir: Path, **parallel) -> Config:
    from flip_scale.config import ParallelConfig

    shards = f"{data_dir}/eval-{{000000..000000}}.tar"
    return Config(
        train=TrainConfig(global_batch_size=8, seed=0, precision="fp32", device="cpu"),
        model=ModelConfig(name="tiny", mask_ratio=0.75, vocab_size=512),
        data=DataConfig(tokenizer=str(data_dir / "tokenizer.model"), num_workers=0),
        eval=EvalConfig(zero_shot_shards=shards, classnames=str(data_dir / "classnames.txt"),
                        templates=str(data_dir / "templates.txt"), retrieval_shards=shards, batch_size=BATCH,
                        max_samples=MAX_SAMPLES),
        parallel=ParallelConfig(**parallel),
    )


def _build(cfg: Config, world_size: int):
    from flip_scale.models import arch_from_config, build_model
    from flip_scale.parallel import ParallelDims, parallelize_model

    dims = ParallelDims.from_config(cfg.parallel, world_size, arch_from_config(cfg.model))
    dims.build_mesh("cpu")
    if dims.pp_enabled:  # the stages behind the one-model interface the evaluation uses
        from flip_scale.parallel import parallelize_pipeline
        from flip_scale.parallel.pipeline import PipelineEvalModel

        _, pipe = parallelize_pipeline(build_model(cfg.model, device="meta"), dims, cfg, "cpu")
        return PipelineEvalModel(pipe, arch_from_config(cfg.model)), dims
    return parallelize_model(build_model(cfg.model, device="meta"), dims, cfg, "cpu"), dims


def _evaluate(cfg: Config, world_size: int) -> dict:
    from flip_scale.data import Tokenizer

    model, dims = _build(cfg, world_size)
    tokenizer = Tokenizer(cfg.data.tokenizer)
    group = EvalGroup.from_dims(dims)
    return {
        "unmasked": run_evaluation(model, tokenizer, cfg, torch.device("cpu"), group),
        "masked": run_evaluation(model, tokenizer, cfg, torch.device("cpu"), group, mask_ratio=0.75),
        "classifier": build_zero_shot_classifier(model, tokenizer, [f"c{i}" for i in range(9)], ["a {}", "the {}"],
                                                 torch.device("cpu"), batch_size=4, group=group),
    }


def _evaluate_layouts(rank: int, world_size: int, data_dir: str, layouts: dict) -> dict:
    return {name: _evaluate(eval_config(Path(data_dir), **parallel), world_size) for name, parallel in layouts.items()}


@pytest.fixture(scope="module")
def one_process(synthetic_dir):
    return _evaluate(eval_config(synthetic_dir), 1)


def test_model_evaluation_counts_the_configured_samples(one_process):
    zero_shot, retrieval = one_process["unmasked"]["zero_shot"], one_process["unmasked"]["retrieval"]
    assert zero_shot["samples"] == MAX_SAMPLES and zero_shot["classes"] == 20
    assert retrieval["samples"] == MAX_SAMPLES
    assert set(retrieval["image_to_text"]) == {1, 5, 10}
    assert all(0.0 <= v <= 1.0 for v in retrieval["text_to_image"].values())
    # Masking changes what the image tower sees, so the numbers are not those of eval mode.
    masked, unmasked = one_process["masked"], one_process["unmasked"]
    assert (masked["zero_shot"]["top1"], masked["retrieval"]["image_to_text"]) != (
        unmasked["zero_shot"]["top1"], unmasked["retrieval"]["image_to_text"])


def test_evaluation_sends_images_tokens_and_noise_through_host_to_device(synthetic_dir, monkeypatch):
    """On a GPU a copy from pageable memory waits for the device's queue: every batch tensor the evaluation
    feeds the model (images, captions, prompts, mask noise, each masked view's noise) goes through
    `runtime.host_to_device` (pinned, non_blocking on CUDA). Checked on the CPU by recording the calls."""
    from flip_scale.data import Tokenizer
    from flip_scale.evaluation import masked_views, runner

    sent = []

    def record(tensor, device):
        sent.append((tensor.dtype, tensor.shape[-1]))
        return tensor.to(device)

    monkeypatch.setattr(runner, "host_to_device", record)
    monkeypatch.setattr(masked_views, "host_to_device", record)
    cfg = eval_config(synthetic_dir)
    cfg.eval.max_samples = 8
    model, dims = _build(cfg, 1)
    tokenizer, cpu = Tokenizer(cfg.data.tokenizer), torch.device("cpu")
    arch = runner._arch(model)
    image_size, context, patches = arch.image_size, arch.context_length, arch.num_patches
    run_evaluation(model, tokenizer, cfg, cpu, EvalGroup.from_dims(dims), mask_ratio=0.5)
    kinds = set(sent)
    assert (torch.float32, image_size) in kinds  # images
    assert (torch.long, context) in kinds  # captions and prompts
    assert (torch.float32, patches) in kinds  # mask noise
    sent.clear()
    views = runner._ImageView(model, None, 0, masked_views=2)
    with views.mode():
        views(torch.zeros(2, 3, image_size, image_size), torch.arange(2), cpu)
    assert sent == [(torch.float32, image_size)] + [(torch.float32, patches)] * 2


@pytest.mark.slow
def test_dp_shard_tp_and_pp_give_the_numbers_of_one_process(synthetic_dir, one_process):
    layouts = {"dp_shard=2": dict(dp_shard=2), "tp=2": dict(dp_shard=1, tp=2),
               "pp=2": dict(dp_shard=1, pp=2, microbatches=2)}
    results = run_distributed(_evaluate_layouts, 2, (str(synthetic_dir), layouts), timeout=240)
    for rank, per_rank in enumerate(results):
        for name, got in per_rank.items():
            for view in ("unmasked", "masked"):
                assert got[view] == one_process[view], (name, rank, view, got[view], one_process[view])
            torch.testing.assert_close(got["classifier"], one_process["classifier"], atol=1e-5, rtol=0)


def _write_image_folder(root: Path, shard: Path, classnames: list[str], count: int) -> None:
    """The first `count` samples of a shard as root/<cNN>/<key>.png (class NN), every class a folder."""
    for index in range(len(classnames)):
        (root / f"c{index:02d}").mkdir(parents=True)
    with tarfile.open(shard) as tar:
        members = {m.name: m for m in tar.getmembers()}
        keys = sorted({name.split(".")[0] for name in members})[:count]
        for key in keys:
            label = int(tar.extractfile(members[f"{key}.cls"]).read())
            (root / f"c{label:02d}" / f"{key}.png").write_bytes(tar.extractfile(members[f"{key}.png"]).read())


def test_image_folder_gives_the_numbers_of_the_same_images_in_shards(synthetic_dir, tmp_path):
    import dataclasses

    from flip_scale.data import Tokenizer
    from flip_scale.evaluation.datasets import open_classification
    from flip_scale.evaluation.runner import run_zero_shot

    cfg = eval_config(synthetic_dir)
    classnames = (synthetic_dir / "classnames.txt").read_text().split("\n")[:20]
    folder = tmp_path / "folder"
    _write_image_folder(folder, synthetic_dir / "eval-000000.tar", classnames, 60)
    model, _ = _build(cfg, 1)
    tokenizer = Tokenizer(cfg.data.tokenizer)
    shards = run_zero_shot(model, tokenizer, dataclasses.replace(cfg.eval, max_samples=60), cfg.data, 32, "cpu")
    # Folder order is class then key; the counts do not depend on the order.
    named = run_zero_shot(model, tokenizer, dataclasses.replace(cfg.eval, zero_shot_shards=str(folder), max_samples=0),
                          cfg.data, 32, "cpu")
    assert named == shards and named["samples"] == 60
    # Without a names file the classes are the sorted folder names; a wrong count of names is refused.
    assert open_classification(str(folder)).classnames == [f"c{i:02d}" for i in range(20)]
    short = tmp_path / "names.txt"
    short.write_text("red circle\nblue cross\n")
    with pytest.raises(ValueError, match="2 class names but .* 20 class folders"):
        open_classification(str(folder), str(short))
    with pytest.raises(ValueError, match="need a class-names file"):
        open_classification(cfg.eval.zero_shot_shards, "")


def test_zero_shot_accuracy_refuses_labels_beyond_the_class_names(synthetic_dir):
    model, _ = _build(eval_config(synthetic_dir), 1)
    classifier = torch.randn(64, 3)
    batches = [(torch.zeros(2, 3, 32, 32), torch.tensor([0, 7]))]
    with pytest.raises(ValueError, match="class 7 but there are only 3 class names"):
        zero_shot_accuracy(model, classifier, batches, "cpu")


def _save_checkpoint(model, cfg: Config, run_dir: Path) -> Path:
    from flip_scale.checkpoint import save_checkpoint
    from flip_scale.models import arch_from_config

    return save_checkpoint(run_dir, 7, [model], [], None, {"model_arch": arch_from_config(cfg.model).to_dict()},
                           cfg.to_yaml())


def test_flip_eval_on_a_checkpoint_matches_the_model(synthetic_dir, tmp_path, one_process, capsys):
    from flip_scale.evaluate import main

    cfg = eval_config(synthetic_dir)
    model, _ = _build(cfg, 1)  # the same seed: the weights of `one_process`
    _save_checkpoint(model, cfg, tmp_path / "run")
    out = tmp_path / "eval.json"
    assert main(["--checkpoint", str(tmp_path / "run"), "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    expected = one_process["unmasked"]
    assert record["step"] == 7 and record["zero_shot_top1"] == expected["zero_shot"]["top1"]
    assert record["retrieval_i2t_r5"] == expected["retrieval"]["image_to_text"][5]
    assert "zero-shot top-1" in capsys.readouterr().out
    # --masked evaluates at the checkpoint's mask ratio (0.75), as in training.
    assert main(["--checkpoint", str(tmp_path / "run"), "--masked", "--json", str(out), "--retrieval",
                 cfg.eval.retrieval_shards]) == 0
    record = json.loads(out.read_text())
    assert record["mask_ratio"] == 0.75 and "zero_shot_top1" not in record
    assert record["retrieval_t2i_r1"] == one_process["masked"]["retrieval"]["text_to_image"][1]
    # A path that is no checkpoint is refused with what would be valid.
    assert main(["--checkpoint", str(tmp_path)]) == 2
    assert "step_XXXXXXXX" in capsys.readouterr().err


def test_flip_eval_help_has_examples(capsys):
    from flip_scale.evaluate import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "examples:" in capsys.readouterr().out


def _flip_eval_rank(rank: int, world_size: int, run_dir: str, overrides: list) -> dict:
    from flip_scale.distributed import ProcessInfo
    from flip_scale.evaluation import log_values
    from flip_scale.evaluation.cli import eval_config as cli_config, evaluate_checkpoint, open_checkpoint, parse_args

    args = parse_args(["--checkpoint", run_dir, *overrides])
    source = open_checkpoint(args.checkpoint)
    proc = ProcessInfo(rank, world_size, 0, torch.device("cpu"))
    return log_values(evaluate_checkpoint(source, cli_config(source, args), proc))


@pytest.mark.slow
def test_flip_eval_under_pipeline_parallel_matches_one_process(synthetic_dir, tmp_path, one_process):
    """flip-eval builds the checkpoint's model as 2 pipeline stages (parallel.pp=2) and gets the
    numbers of one process, on every rank."""
    from flip_scale.evaluation import log_values

    cfg = eval_config(synthetic_dir)
    model, _ = _build(cfg, 1)
    _save_checkpoint(model, cfg, tmp_path / "run")
    overrides = ["parallel.pp=2", "parallel.dp_shard=1", "parallel.microbatches=2"]
    results = run_distributed(_flip_eval_rank, 2, (str(tmp_path / "run"), overrides), timeout=240)
    expected = log_values(one_process["unmasked"])
    assert results == [expected, expected]


def test_long_evaluations_log_progress_with_an_eta(caplog):
    import logging
    import time

    from flip_scale.evaluation.group import EvalProgress

    with caplog.at_level(logging.INFO, logger="flip_scale.eval"):
        quiet = EvalProgress("zero-shot images", total=1000, every=3600)
        quiet.update(500)  # not yet due: nothing
        assert not caplog.records
        progress = EvalProgress("zero-shot images", total=1000, every=0.0)
        time.sleep(0.01)
        progress.update(250)
        EvalProgress("retrieval pairs", every=0.0).update(10)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("zero-shot images: 250 / 1000 (25%)") and "ETA" in lines[0]
    assert lines[1].startswith("retrieval pairs: 10 so far")
