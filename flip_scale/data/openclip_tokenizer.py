"""OpenCLIP's BPE tokenizer (`data.tokenizer: openclip`), so that a model imported from OpenCLIP
sees the tokens it was trained with, in training, zero-shot prompts and retrieval alike.

    data.tokenizer: openclip            open_clip's SimpleTokenizer: CLIP's 49,408-token BPE, bundled
                                        with the package (nothing downloaded); what open_clip.get_tokenizer
                                        gives every model of the ViT CLIP family (ViT-B-16, ViT-L-14,
                                        ViT-H-14, ViT-bigG-14, the -quickgelu variants)
    data.tokenizer: openclip:NAME       open_clip.get_tokenizer(NAME): a model name the installed open_clip
                                        knows, or local-dir:PATH; for a model whose text config sets
                                        tokenizer options (e.g. clean: canonicalize). Only SimpleTokenizer
                                        results are accepted: HF and SigLIP tokenizers download files and
                                        use other special ids.

Sequences are OpenCLIP's exactly (the tokenizer itself is called): `[SOT] + BPE + [EOT]`; an over-long
one is cut to `context_length` with EOT written over the last token; padding is id 0. Lengths follow
`model.context_length` (77 for the OpenCLIP family); `model.vocab_size` must be >= 49408.
open_clip is an optional dependency: `pip install "flip_scale[openclip]"`.
"""

from __future__ import annotations

import functools
from typing import Sequence, Union

import torch

OPENCLIP = "openclip"
INSTALL = 'pip install "flip_scale[openclip]"  (the open-clip-torch package)'


class TokenizerError(ValueError):
    """A `data.tokenizer` that cannot be used; the message names the value and what is valid."""


def is_openclip(spec: str) -> bool:
    """Whether a `data.tokenizer` value names OpenCLIP's tokenizer (not a sentencepiece model file)."""
    return spec == OPENCLIP or spec.startswith(OPENCLIP + ":")


def _import_open_clip():
    try:
        import open_clip
    except ImportError as error:
        raise TokenizerError(f"data.tokenizer=openclip needs the open_clip package, which is not installed: "
                             f"{INSTALL}") from error
    return open_clip


def _text_config(open_clip, spec: str, name: str) -> dict:
    """The text config of `name` (a built-in model, or local-dir:PATH), read without building anything."""
    if name.startswith("local-dir:"):
        import json
        from pathlib import Path

        file = Path(name[len("local-dir:"):]) / "open_clip_config.json"
        if not file.is_file():
            raise TokenizerError(f"data.tokenizer={spec!r}: {file} does not exist")
        return json.loads(file.read_text()).get("model_cfg", {}).get("text_cfg", {})
    if ":" in name:
        raise TokenizerError(f"data.tokenizer={spec!r}: only a model name or local-dir:PATH can follow 'openclip:' "
                             f"(nothing is downloaded)")
    config = open_clip.get_model_config(name)
    if config is None:
        raise TokenizerError(f"data.tokenizer={spec!r}: open_clip {open_clip.__version__} knows no model {name!r} "
                             f"(open_clip.list_models() lists them; local-dir:PATH reads PATH/open_clip_config.json)")
    return config.get("text_cfg", {})


@functools.lru_cache(maxsize=8)  # reading the BPE merges takes a second; rebuilt per worker otherwise
def _make(spec: str, context_length: int):
    open_clip = _import_open_clip()
    from open_clip.tokenizer import SimpleTokenizer

    name = spec[len(OPENCLIP) + 1:] if spec != OPENCLIP else ""
    if spec != OPENCLIP and not name:
        raise TokenizerError(f"data.tokenizer={spec!r}: give a model name after 'openclip:' "
                             f"(e.g. openclip:ViT-B-16) or use plain 'openclip'")
    if not name:
        return SimpleTokenizer(context_length=context_length)
    # Refused before open_clip is asked: its HF and SigLIP tokenizers would download files.
    text_cfg = _text_config(open_clip, spec, name)
    if text_cfg.get("hf_tokenizer_name") or "siglip" in name.lower():
        raise TokenizerError(f"data.tokenizer={spec!r}: that model uses an HF / SigLIP tokenizer "
                             f"({text_cfg.get('hf_tokenizer_name') or 'SigLipTokenizer'}); flip_scale uses OpenCLIP's "
                             f"CLIP BPE tokenizer (SimpleTokenizer) only")
    tokenizer = open_clip.get_tokenizer(name, context_length=context_length)
    if type(tokenizer) is not SimpleTokenizer:
        raise TokenizerError(f"data.tokenizer={spec!r} gives open_clip's {type(tokenizer).__name__}; flip_scale uses "
                             f"OpenCLIP's CLIP BPE tokenizer (SimpleTokenizer) only")
    return tokenizer


class OpenClipTokenizer:
    """Captions -> LongTensor [B, context_length] with OpenCLIP's tokenizer (the same interface as
    `flip_scale.data.Tokenizer`). Picklable: workers rebuild it from the spec."""

    def __init__(self, spec: str = OPENCLIP, context_length: int = 77):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (room for SOT and EOT), got {context_length}")
        self.spec = spec
        self.model_path = spec  # what messages print as "the tokenizer"
        self.context_length = int(context_length)
        _import_open_clip()  # outside the cache: a missing package is reported on every build
        self._tokenizer = _make(spec, self.context_length)

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.vocab_size)

    @property
    def eot_id(self) -> int:
        return int(self._tokenizer.eot_token_id)

    def encode(self, text: str) -> list[int]:
        """BPE ids of one caption (cleaned as OpenCLIP cleans it), without SOT/EOT and without cutting."""
        return self._tokenizer.encode(text)

    def __call__(self, texts: Union[str, Sequence[str]]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        return self._tokenizer(list(texts), context_length=self.context_length)

    def __getstate__(self) -> dict:
        return {"spec": self.spec, "context_length": self.context_length}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["spec"], state["context_length"])

    def __repr__(self) -> str:
        return f"OpenClipTokenizer({self.spec!r}, context_length={self.context_length}, vocab_size={self.vocab_size})"
