"""`data.tokenizer: openclip`: OpenCLIP's BPE tokens exactly, through the trainer and evaluation;
a clear error without the open_clip package; no sentencepiece model written or needed for it."""

from __future__ import annotations

import pickle
import random
import sys

import open_clip
import pytest
import torch

from flip_scale.config import load_config
from flip_scale.data import OpenClipTokenizer, TokenizerError, build_tokenizer, build_train_loader
from flip_scale.metrics import read_jsonl
from flip_scale.preflight import tokenizer_vocab_if_present
from flip_scale.train import main as train_main

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

SOT, EOT = 49406, 49407
WORDS = ["a", "photo", "of", "the", "dog", "cat", "on", "red", "car", "Über", "café", "naïve", "東京", "タワー",
         "собака", "кошка", "😀", "🐕‍🦺", "ß", "Ελλάδα", "مرحبا", "a !\"# b", "don't", "it's", "3.14", "1,000",
         "&amp;", "<b>bold</b>", "—", "“quoted”", "ﬁne", "e\u0301", "\u00a0nbsp", "tab\there", "CAPS", "x" * 40]


def captions(count: int = 200, seed: int = 0) -> list:
    """Short, non-ASCII, punctuated, HTML-escaped and over-long captions (a quarter over 77 tokens)."""
    rng = random.Random(seed)
    out = ["", " ", "!!!", "A photo of a dog."]
    while len(out) < count:
        length = rng.choice([3, 8, 15, 120]) if len(out) % 4 else rng.randint(90, 200)
        out.append(" ".join(rng.choice(WORDS) for _ in range(length)))
    return out


def test_tokens_equal_open_clip_on_200_captions():
    texts = captions()
    reference = open_clip.get_tokenizer("ViT-B-16")(texts)
    for spec in ("openclip", "openclip:ViT-B-16", "openclip:ViT-B-16-quickgelu"):
        ours = build_tokenizer(spec, context_length=77)
        assert isinstance(ours, OpenClipTokenizer) and ours.vocab_size == 49408
        tokens = ours(texts)
        assert tokens.dtype == torch.long and tokens.shape == (200, 77)
        assert torch.equal(tokens, reference), spec
    # The sequence rules, checked on the result: SOT first; EOT written over the last token of an
    # over-long caption; padding 0 after EOT.
    lengths = [len(ours.encode(t)) + 2 for t in texts]
    assert sum(n > 77 for n in lengths) >= 50 and any(any(ord(c) > 127 for c in t) for t in texts)
    for row, length in zip(tokens, lengths):
        assert row[0] == SOT
        end = min(length, 77) - 1
        assert row[end] == EOT and (row[end + 1:] == 0).all()
        assert (row[1:end] != EOT).all()
    # Picklable (DataLoader workers), same tokens after; another context length cuts the same way.
    again = pickle.loads(pickle.dumps(build_tokenizer("openclip", context_length=77)))
    assert torch.equal(again(texts), reference)
    short = build_tokenizer("openclip", context_length=32)(texts)
    assert torch.equal(short, open_clip.get_tokenizer("ViT-B-16", context_length=32)(texts))


@pytest.mark.parametrize("spec, named", [
    ("openclip:", "give a model name after 'openclip:'"),
    ("openclip:No-Such-Model", "knows no model 'No-Such-Model'"),
    ("openclip:ViT-B-16-SigLIP", "HF / SigLIP tokenizer"),
    ("openclip:xlm-roberta-base-ViT-B-32", "HF / SigLIP tokenizer (xlm-roberta-base)"),
    ("openclip:hf-hub:timm/ViT-B-16-SigLIP", "nothing is downloaded"),
])
def test_unusable_openclip_tokenizers_are_refused_by_name(spec, named):
    with pytest.raises(TokenizerError, match="data.tokenizer=") as error:
        build_tokenizer(spec)
    assert named in str(error.value)


def test_missing_open_clip_names_the_install_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # `import open_clip` now raises ImportError
    with pytest.raises(TokenizerError) as error:
        build_tokenizer("openclip", context_length=77)
    assert 'pip install "flip_scale[openclip]"' in str(error.value) and "data.tokenizer=openclip" in str(error.value)
    # The same through the command line, before anything is built.
    assert train_main(["--dry-run", "--run-dir", str(tmp_path), "data.tokenizer=openclip", "model.vocab_size=49408",
                       "model.context_length=77"]) == 2
    assert 'pip install "flip_scale[openclip]"' in capsys.readouterr().err


def test_vocab_must_hold_the_openclip_tokenizer(tmp_path, capsys):
    cfg = load_config(None, ["data.tokenizer=openclip", "model.context_length=77"])
    assert tokenizer_vocab_if_present(cfg) == 49408
    assert train_main(["--dry-run", "--run-dir", str(tmp_path), "data.tokenizer=openclip",
                       "model.context_length=77"]) == 2  # tiny's vocab_size 512 < 49408
    error = capsys.readouterr().err
    assert "49408 tokens but model.vocab_size is 512" in error and "model.vocab_size=49408" in error


def test_training_and_zero_shot_with_the_openclip_tokenizer(tmp_path):
    """A tiny model with OpenCLIP's vocabulary and context length, two steps through flip-train on
    synthetic data (written without a sentencepiece model), then zero-shot and retrieval evaluation."""
    data = tmp_path / "data"
    overrides = [
        f"data.synthetic_dir={data}", f"data.train_shards={data}/train-{{000000..000007}}.tar",
        "data.tokenizer=openclip", "data.synthetic_train_samples=64", "data.synthetic_eval_samples=40",
        "data.num_workers=0", "data.shuffle_buffer=16",
        "model.vocab_size=49408", "model.context_length=77", "model.text_width=32", "model.text_heads=2",
        "model.text_mlp_dim=64", "model.text_layers=1", "model.text_causal=true",
        "train.max_steps=2", "train.global_batch_size=8", "train.log_every_steps=1", "checkpoint.every_steps=100",
        f"eval.zero_shot_shards={data}/eval-{{000000..000000}}.tar", f"eval.classnames={data}/classnames.txt",
        f"eval.templates={data}/templates.txt", "eval.batch_size=20",
        f"eval.retrieval_shards={data}/eval-{{000000..000000}}.tar",
    ]
    assert train_main(["--run-dir", str(tmp_path / "run"), *overrides]) == 0
    assert (data / "train-000000.tar").is_file() and not list(data.glob("*.model"))
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    evaluation = read_jsonl(tmp_path / "run" / "eval.jsonl")[-1]
    assert evaluation["classes"] > 1 and 0.0 <= evaluation["zero_shot_top1"] <= 1.0
    assert 0.0 <= evaluation["retrieval_i2t_r1"] <= 1.0 and 0.0 <= evaluation["retrieval_t2i_r1"] <= 1.0
    # The loader's tokens are OpenCLIP's (SOT first, one EOT, ids inside the vocabulary).
    cfg = load_config(None, overrides)
    loader = build_train_loader(cfg.data, 32, build_tokenizer("openclip", 77), 0, 1, 8, seed=0, epochs=1)
    tokens = next(iter(loader))["tokens"]
    assert tokens.shape == (8, 77) and (tokens[:, 0] == SOT).all() and ((tokens == EOT).sum(1) == 1).all()
    assert tokens.max() <= EOT


def test_padding_mask_is_refused_with_the_openclip_tokenizer():
    from flip_scale.config import ConfigError

    with pytest.raises(ConfigError, match="model.text_pad_mask=true with data.tokenizer=openclip"):
        load_config(None, ["data.tokenizer=openclip", "model.text_pad_mask=true"])
