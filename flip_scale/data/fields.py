"""Which fields of a sample are its image, caption and class, and why a sample cannot be used.

A sample's fields are named by the suffix of its tar members (`000123.jpg`, `000123.txt`,
`000123.json`). `data.image_keys` lists the image fields tried in order (default
`jpg;jpeg;png;webp`); `data.caption_key` is a field whose text is the caption (`txt`) or a JSON
member and a path in it (`json:caption`, `json:meta.caption`), as LAION and DataComp shards
written by img2dataset carry. Every sample that cannot be used is counted under one kind
(`SKIP_KINDS`), logged and kept in the run's counters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from .shards import CLASS_FIELD, IMAGE_FIELDS, MemberRef, RawSample
from .urls import local_path

# The kinds of skipped samples, as the run's counters name them (skipped_<kind>).
UNDECODABLE_IMAGE = "undecodable_image"
BAD_CAPTION = "bad_caption"  # empty, not UTF-8, not a string in the JSON
MISSING_FIELD = "missing_field"  # no image, no caption, no class
BAD_SHARD = "bad_shard"  # truncated or unreadable shard, a remote shard that failed its retries
SMALL_IMAGE = "small_image"  # below data.min_image_size
SKIP_KINDS = (UNDECODABLE_IMAGE, BAD_CAPTION, MISSING_FIELD, BAD_SHARD, SMALL_IMAGE)


@dataclass(frozen=True)
class SampleFormat:
    image_keys: tuple = IMAGE_FIELDS
    caption_key: str = "txt"

    @classmethod
    def from_config(cls, data_cfg) -> "SampleFormat":
        keys = getattr(data_cfg, "image_keys", ";".join(IMAGE_FIELDS))
        keys = tuple(k.strip().lower() for k in (keys.split(";") if isinstance(keys, str) else keys) if k.strip())
        if not keys:
            raise ValueError("data.image_keys names no field: give e.g. 'jpg;jpeg;png;webp'")
        caption = str(getattr(data_cfg, "caption_key", "txt")).strip()
        field_name, _, path = caption.partition(":")
        if not field_name or (caption.count(":") and not path):
            raise ValueError(f"data.caption_key={caption!r}: give a field ('txt') or a JSON field and path "
                             f"('json:caption', 'json:meta.caption')")
        return cls(keys, caption)

    @property
    def caption_field(self) -> str:
        return self.caption_key.partition(":")[0].lower()

    def image_field(self, sample: RawSample) -> Optional[str]:
        return next((name for name in self.image_keys if name in sample.fields), None)


DEFAULT_FORMAT = SampleFormat()


def check_train_sample(sample: RawSample, fmt: SampleFormat = DEFAULT_FORMAT) -> Optional[tuple[str, str]]:
    """(kind, why) a training sample cannot be used, or None: it needs an image and a caption."""
    if fmt.image_field(sample) is None:
        return MISSING_FIELD, f"no image in {'/'.join(fmt.image_keys)} (fields: {_names(sample)})"
    if fmt.caption_field not in sample.fields:
        return MISSING_FIELD, f"no caption field '{fmt.caption_field}' (fields: {_names(sample)})"
    caption, problem = _caption(sample, fmt)
    if problem is not None:
        return problem
    if not caption:
        return BAD_CAPTION, "empty caption"
    return None


def check_eval_sample(sample: RawSample, fmt: SampleFormat = DEFAULT_FORMAT) -> Optional[tuple[str, str]]:
    """(kind, why) an evaluation sample cannot be used: it needs an image and an integer class."""
    if fmt.image_field(sample) is None:
        return MISSING_FIELD, f"no image in {'/'.join(fmt.image_keys)} (fields: {_names(sample)})"
    if class_index(sample) is None:
        return MISSING_FIELD, f"no integer class in '{CLASS_FIELD}'"
    return None


def _names(sample: RawSample) -> str:
    return ", ".join(sorted(sample.fields)) or "none"


def _caption(sample: RawSample, fmt: SampleFormat) -> tuple[Optional[str], Optional[tuple[str, str]]]:
    try:
        text = sample.fields[fmt.caption_field].decode("utf-8")
    except UnicodeDecodeError:
        return None, (BAD_CAPTION, "caption is not UTF-8")
    _, _, path = fmt.caption_key.partition(":")
    if path:
        try:
            value = json.loads(text)
        except ValueError:
            return None, (BAD_CAPTION, f"'{fmt.caption_field}' is not JSON")
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            return None, (MISSING_FIELD, f"no '{path}' in '{fmt.caption_field}'")
        if not isinstance(value, str):
            return None, (BAD_CAPTION, f"'{path}' in '{fmt.caption_field}' is a {type(value).__name__}, not text")
        text = value
    return " ".join(text.split()), None


def caption_text(sample: RawSample, fmt: SampleFormat = DEFAULT_FORMAT) -> Optional[str]:
    return _caption(sample, fmt)[0]


def class_index(sample: RawSample) -> Optional[int]:
    try:
        return int(sample.fields[CLASS_FIELD].decode("utf-8").strip())
    except (KeyError, UnicodeDecodeError, ValueError):
        return None


def image_bytes(sample: RawSample, fmt: SampleFormat = DEFAULT_FORMAT) -> bytes:
    name = fmt.image_field(sample)
    if name is None:
        raise KeyError(f"sample {sample.key} of {sample.shard} has no image field ({', '.join(fmt.image_keys)})")
    value = sample.fields[name]
    if isinstance(value, MemberRef):  # read lazily: now it is needed
        with open(local_path(sample.shard), "rb") as file:
            file.seek(value.offset)
            data = file.read(value.size)
        if len(data) != value.size:
            raise EOFError(f"{sample.shard} ends inside the image of {sample.key!r} "
                           f"({len(data)} of {value.size} bytes)")
        return data
    return value
