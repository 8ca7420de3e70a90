"""SentencePiece tokenizer with fixed special ids, and the tool that trains one.

Token sequences are `[BOS] + pieces + [EOS]`, cut to `context_length` (EOS stays the last token
when a caption is cut) and padded with id 0, which the text tower treats as padding (PAD_ID = 0 in
`flip_scale.models.text`). The special ids are fixed so that any model trained by
`train_tokenizer` fits that convention: pad=0, unk=1, bos=2, eos=3.

    python tools/train_tokenizer.py captions.txt --vocab-size 32000 --out data/tokenizer.model

`data.tokenizer: openclip` selects OpenCLIP's BPE tokenizer instead (flip_scale/data/openclip_tokenizer.py);
`build_tokenizer` makes whichever a config names.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch

from .openclip_tokenizer import OpenClipTokenizer, is_openclip

log = logging.getLogger("flip_scale.data")

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3


def _import_sentencepiece():
    try:
        import sentencepiece
    except ImportError as error:  # pragma: no cover - sentencepiece is a declared dependency
        raise ImportError("the tokenizer needs the `sentencepiece` package: pip install sentencepiece") from error
    return sentencepiece


class Tokenizer:
    """Captions -> LongTensor [B, context_length] with a SentencePiece model.

    Captions are lower-cased before encoding (the model is trained on lower-cased text).
    Picklable: DataLoader workers receive the serialized model, not a path they must be able to read.
    """

    def __init__(self, model_path: Union[str, os.PathLike], context_length: int = 32):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (room for BOS and EOS), got {context_length}")
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer model '{model_path}' does not exist. Train one with "
                f"`python tools/train_tokenizer.py CAPTIONS.txt --vocab-size N --out {model_path}` "
                f"(or set data.synthetic=true to have synthetic data and a tokenizer written for you)"
            )
        self.model_path = str(model_path)
        self.context_length = int(context_length)
        self._load(path.read_bytes())

    def _load(self, model_proto: bytes) -> None:
        spm = _import_sentencepiece()
        self._model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        specials = {"pad": (self._sp.pad_id(), PAD_ID), "unk": (self._sp.unk_id(), UNK_ID),
                    "bos": (self._sp.bos_id(), BOS_ID), "eos": (self._sp.eos_id(), EOS_ID)}
        wrong = {name: have for name, (have, want) in specials.items() if have != want}
        if wrong:
            raise ValueError(
                f"tokenizer '{self.model_path}' has special ids {wrong}; flip_scale needs pad=0, unk=1, bos=2, eos=3 "
                f"(train one with tools/train_tokenizer.py)"
            )

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    def encode(self, text: str) -> list[int]:
        """Piece ids of one caption, without BOS/EOS and without cutting."""
        return self._sp.encode(text.lower(), out_type=int)

    def __call__(self, texts: Union[str, Sequence[str]]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        length = self.context_length
        tokens = torch.full((len(texts), length), PAD_ID, dtype=torch.long)
        pieces = self._sp.encode([t.lower() for t in texts], out_type=int)
        for row, ids in enumerate(pieces):
            sequence = [BOS_ID] + ids[: length - 2] + [EOS_ID]
            tokens[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        return tokens

    def __getstate__(self) -> dict:
        return {"model_path": self.model_path, "context_length": self.context_length, "model_proto": self._model_proto}

    def __setstate__(self, state: dict) -> None:
        self.model_path = state["model_path"]
        self.context_length = state["context_length"]
        self._load(state["model_proto"])

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path!r}, context_length={self.context_length}, vocab_size={self.vocab_size})"


def build_tokenizer(spec: str, context_length: int = 32) -> Union[Tokenizer, OpenClipTokenizer]:
    """The tokenizer a `data.tokenizer` value names: `openclip` / `openclip:NAME`, else a sentencepiece model file."""
    if is_openclip(spec):
        return OpenClipTokenizer(spec, context_length=context_length)
    return Tokenizer(spec, context_length=context_length)


def train_tokenizer(
    captions: Iterable[str], model_prefix: Union[str, os.PathLike], vocab_size: int, model_type: str = "bpe"
) -> str:
    """Train a SentencePiece model on `captions`; returns the path of `<model_prefix>.model`.

    `vocab_size` is an upper bound (`hard_vocab_limit=false`), so a small corpus yields a smaller
    vocabulary instead of an error. BPE is the default because on a small corpus it still ends with
    whole-word pieces, where a unigram model under a soft limit prunes back to near-characters.
    One thread and the whole corpus make the result deterministic. The files are written under a
    temporary name and renamed, so a reader never sees half a model.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    if vocab_size < 8:
        raise ValueError(f"vocab_size must be >= 8 (4 special tokens plus some pieces), got {vocab_size}")
    spm = _import_sentencepiece()
    prefix = Path(model_prefix)
    if prefix.suffix == ".model":
        prefix = prefix.with_suffix("")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    lines = [line for line in (" ".join(str(c).split()).lower() for c in captions) if line]
    if not lines:
        raise ValueError("train_tokenizer: no non-empty captions to train on")
    with tempfile.TemporaryDirectory(dir=prefix.parent, prefix=f".{prefix.name}.tmp-") as tmp:
        tmp_prefix = Path(tmp) / prefix.name
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines),
                model_prefix=str(tmp_prefix),
                vocab_size=int(vocab_size),
                model_type=model_type,
                character_coverage=1.0,
                hard_vocab_limit=False,
                pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
                num_threads=1,
                minloglevel=2,  # warnings and errors only: training logs hundreds of INFO lines
            )
        except RuntimeError as error:
            raise ValueError(
                f"sentencepiece could not train a {vocab_size}-token model on {len(lines)} captions: {error}"
            ) from error
        for suffix in (".model", ".vocab"):
            os.replace(f"{tmp_prefix}{suffix}", f"{prefix}{suffix}")
    path = f"{prefix}.model"
    log.info("trained a tokenizer on %d captions: %s (%d tokens, asked for at most %d)",
             len(lines), path, spm.SentencePieceProcessor(model_file=path).get_piece_size(), vocab_size)
    return path


def iter_captions(sources: Sequence[str]) -> Iterator[str]:
    """Captions from text files (one per line) and from the `txt` members of tar shards (brace patterns)."""
    from .shards import expand_shards

    for source in sources:
        if source.endswith(".txt"):
            with open(source, encoding="utf-8") as f:
                for line in f:
                    yield line.rstrip("\n")
            continue
        for shard in expand_shards(source):
            with tarfile.open(shard, mode="r|*") as tar:
                for member in tar:
                    if member.isfile() and member.name.rsplit("/", 1)[-1].split(".", 1)[-1].lower() == "txt":
                        data = tar.extractfile(member).read()
                        yield io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="replace").read()


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(
        prog="train_tokenizer",
        description="Train the SentencePiece tokenizer flip_scale uses (pad=0, unk=1, bos=2, eos=3; lower-cased).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  python tools/train_tokenizer.py data/synthetic/captions.txt --vocab-size 512 --out data/synthetic/tokenizer.model\n"
            "  python tools/train_tokenizer.py '/data/laion/{000000..000099}.tar' --vocab-size 32000 "
            "--max-captions 2000000 --out data/laion_tokenizer.model"
        ),
    )
    parser.add_argument("sources", nargs="+",
                        help="caption sources: .txt files (one caption per line) or tar shards / brace patterns")
    parser.add_argument("--vocab-size", type=int, default=512, help="upper bound on the vocabulary (default 512)")
    parser.add_argument("--out", required=True, help="path of the .model file to write (a .vocab is written beside it)")
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe",
                        help="SentencePiece algorithm (default bpe: whole-word pieces even on small corpora)")
    parser.add_argument("--max-captions", type=int, default=0,
                        help="train on the first N captions only (0: all); large corpora need a sample")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    captions: Iterable[str] = iter_captions(args.sources)
    if args.max_captions > 0:
        import itertools

        captions = itertools.islice(captions, args.max_captions)
    path = train_tokenizer(captions, args.out, args.vocab_size, model_type=args.model_type)
    print(path)
    return 0  # an exit status: console scripts run sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
