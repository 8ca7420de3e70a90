"""Weighted mixtures of shard sources (`data.sources: [{shards, weight, name}, ...]`).

Each sample stream s (flip_scale/data/sample_stream.py) keeps one sub-stream per source: source j's
shards read as stream s of S, exactly as a single-source stream reads its shards (its own shuffle,
its own epochs, bad samples counted per source). Row i of global batch k (the step, from 0) comes
from the source drawn from (seed, k, i) with the sources' weights; stream s owns the rows
s*B/S .. (s+1)*B/S - 1 and takes each row's sample from that source's sub-stream. So the mixture,
row for row, is the same under every layout, and the state of stream s (the batch index and each
sub-stream's position) resumes it sample for sample under any layout whose data-parallel size
divides S. Each source runs through its own epochs (an epoch of a small source ends sooner and
it starts its next one): samples are drawn without replacement within a source's epoch. A source
with `resampled: true` (default `data.resampled`) draws its shards with replacement instead
(flip_scale.data.shards.resampled_shards); its position counts draws where the other counts epochs.
"""

from __future__ import annotations

import bisect
import random
from typing import Iterator, NamedTuple

import torch

from .shards import derive_seed, expand_shards


class Source(NamedTuple):
    """One source of a mixture: its shards drawn with the weight, per epoch or with replacement."""

    name: str
    weight: float
    shards: list
    resampled: bool = False


def sampling_mode(resampled: bool) -> str:
    return "resampled" if resampled else "epochs"


def sampling_note(resampled: bool, sources: list) -> str:
    """How the shards are drawn, for the start-up log and the dry run (`sources`: a mixture's
    (name, resampled) pairs, or empty)."""
    def one(flag: bool) -> str:
        return ("with replacement (resampled: each draw reads shards chosen from (seed, draw, stream))"
                if flag else "per epoch, without replacement (every shard read once per epoch)")

    if not sources:
        return one(resampled)
    return "; ".join(f"{name}: {one(flag)}" for name, flag in sources)


def check_resampled(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false (true: shards drawn with replacement, webdataset's "
                         f"resampled; false: per-source epochs), got {value!r}")
    return value


def parse_sources(sources, resampled: bool = False) -> list[Source]:
    """The `Source`s of `data.sources`, refusing what cannot be a mixture (`resampled`: the default
    of a source that does not say, `data.resampled`)."""
    return [Source(name, weight, expand_shards(shards), flag)
            for name, weight, shards, flag in source_entries(sources, resampled)]


def source_entries(sources, resampled: bool = False) -> list[tuple]:
    """(name, weight, shard pattern, resampled) of each of `data.sources`, checked, the shards not
    yet expanded (the dry run names the sources without the data at hand)."""
    parsed, names = [], set()
    for i, source in enumerate(sources):
        if not isinstance(source, dict) or "shards" not in source:
            raise ValueError(f"data.sources[{i}]={source!r}: each source is {{shards: PATTERN, weight: W, name: N}}")
        unknown = set(source) - {"shards", "weight", "name", "resampled"}
        if unknown:
            raise ValueError(f"data.sources[{i}]: unknown keys {sorted(unknown)} (valid: shards, weight, name, "
                             f"resampled)")
        name = str(source.get("name", f"source{i}"))
        weight = float(source.get("weight", 1.0))
        if not weight > 0:
            raise ValueError(f"data.sources[{i}] ({name}): weight must be > 0, got {weight}")
        if name in names or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"data.sources[{i}]: name {name!r} must be unique and made of letters, digits, - and _")
        names.add(name)
        flag = check_resampled(source.get("resampled", resampled), f"data.sources[{i}].resampled ({name})")
        parsed.append((name, weight, source["shards"], flag))
    if not parsed:
        raise ValueError("data.sources is empty: give at least one {shards, weight, name}, or use data.train_shards")
    return parsed


def source_of_row(seed: int, batch: int, row: int, cumulative: list[float]) -> int:
    """The source of row `row` of global batch `batch`: drawn with the weights (`cumulative`: their
    running sums, normalised to end at 1)."""
    u = random.Random(derive_seed(seed, "mixture", batch, row)).random()
    return min(bisect.bisect_right(cumulative, u), len(cumulative) - 1)


def iter_mixture(stream_cls, owner, stream: int) -> Iterator[dict]:
    """The chunks of stream `stream` of a mixture (`owner`: the TrainStream holding the sources)."""
    start = owner.mix_start.get(stream) or {"batch": 0, "sources": {}}
    batch = int(start["batch"])
    positions = {source.name: tuple(start["sources"].get(source.name, (0, 0))) for source in owner.sources}
    total = sum(source.weight for source in owner.sources)
    cumulative, running = [], 0.0
    for weight in (source.weight for source in owner.sources):
        running += weight / total
        cumulative.append(running)
    subs = []
    for name, _, shards, resampled in owner.sources:
        sub = stream_cls(shards, owner.data_cfg, owner.transform, owner.tokenizer, [stream], owner.total_streams, 1,
                         owner.seed, 0, start={stream: positions[name]}, resampled=resampled, source=name)
        subs.append(sub.iter_stream(stream))
    names = [source.name for source in owner.sources]
    while True:
        parts, counts, skipped = [], dict.fromkeys(names, 0), dict.fromkeys(names, 0)
        for i in range(owner.chunk_size):
            j = source_of_row(owner.seed, batch, stream * owner.chunk_size + i, cumulative)
            part = next(subs[j])
            positions[names[j]] = tuple(part["_position"])
            counts[names[j]] += 1
            skipped[names[j]] += part["skipped"]
            parts.append(part)
        batch += 1
        kinds: dict = {}
        for part in parts:
            for kind, n in part["skipped_kinds"].items():
                kinds[kind] = kinds.get(kind, 0) + n
        yield {
            "images": [row for p in parts for row in p["images"]],
            "tokens": torch.cat([p["tokens"] for p in parts]),
            "skipped": sum(p["skipped"] for p in parts),
            "skipped_kinds": kinds,
            "samples": len(parts),
            "keys": [k for p in parts for k in p["keys"]],
            "shards": [s for p in parts for s in p["shards"]],
            "source_samples": counts,
            "source_skipped": skipped,
            "_stream": stream,
            "_position": {"batch": batch, "sources": {name: list(p) for name, p in positions.items()}},
        }
