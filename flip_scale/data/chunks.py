"""How the chunks of a rank's sample streams become its batch (flip_scale/data/loader.py).

A chunk is what one stream gives one batch: a dict of `images` (a list of n [3,H,W] tensors: they
are stacked once, when the chunks become a part, not once per chunk and again per part), `tokens`
[n,T], the counts of the samples and of the bad samples met, the samples' keys and shards, and the stream's
id and position after it (`_stream`, `_position`). A loader worker joins the chunks of its streams
into one part per batch (`join_chunks`, rows in stream order); the main process merges the parts
of its workers (`merge_chunks`). Joining in the worker hands the main process one part per worker
and batch: fewer tensors passed between processes, and no copy at all in the main process when
there is one worker (the main process shares the machine's cores with the workers and the model).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch.utils.data import get_worker_info


def sum_kinds(counts: Iterable[dict]) -> dict[str, int]:
    total: dict[str, int] = {}
    for count in counts:
        for kind, n in count.items():
            total[kind] = total.get(kind, 0) + n
    return total


def stack_rows(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """`rows` stacked into one tensor; in a DataLoader worker, straight into shared memory, so that
    handing it to the main process copies nothing more (as torch's default collate does)."""
    if get_worker_info() is None:
        return torch.stack(list(rows))
    first = rows[0]
    storage = first._typed_storage()._new_shared(len(rows) * first.numel(), device=first.device)
    return torch.stack(list(rows), out=first.new(storage).resize_(len(rows), *first.shape))


def pinned_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """Page-locked host memory (needs CUDA): a batch joined into it goes to the GPU asynchronously."""
    return torch.empty(shape, dtype=dtype, pin_memory=True)


def _cat(tensors: list, pin: bool) -> torch.Tensor:
    if not pin:
        return torch.cat(tensors)
    out = pinned_empty((sum(t.shape[0] for t in tensors), *tensors[0].shape[1:]), tensors[0].dtype)
    return torch.cat(tensors, out=out)


def merge_chunks(items: Sequence[dict], pin: bool = False) -> dict:
    """Chunks or parts, in row order, as one: images stacked (chunks hold lists) or concatenated
    (parts hold tensors; one part is taken as it is, not copied), counts summed; the stream
    bookkeeping (`_`-keys) is left out. `pin`: parts are joined straight into page-locked memory
    (the DataLoader's own pinning of each part would be lost in the join)."""
    if isinstance(items[0]["images"], list):
        images = stack_rows([row for item in items for row in item["images"]])
    elif len(items) == 1:
        images = items[0]["images"].pin_memory() if pin else items[0]["images"]
    else:
        images = _cat([item["images"] for item in items], pin)
    if len(items) == 1:
        merged = {name: value for name, value in items[0].items() if not name.startswith("_")}
        merged["images"] = images
        if pin:
            merged["tokens"] = merged["tokens"].pin_memory()
        merged.setdefault("source_samples", {})
        merged.setdefault("source_skipped", {})
        return merged
    return {
        "images": images,
        "tokens": _cat([item["tokens"] for item in items], pin),
        "skipped": sum(item["skipped"] for item in items),
        "skipped_kinds": sum_kinds(item["skipped_kinds"] for item in items),
        # A mixture's samples and bad samples per source (empty for one source).
        "source_samples": sum_kinds(item.get("source_samples", {}) for item in items),
        "source_skipped": sum_kinds(item.get("source_skipped", {}) for item in items),
        "samples": sum(item["samples"] for item in items),
        "keys": [key for item in items for key in item["keys"]],
        "shards": [shard for item in items for shard in item["shards"]],
    }


def join_chunks(chunks: Sequence[dict]) -> dict:
    """The chunks of consecutive streams (in stream order) of one batch as one part, each stream's
    position kept (`_streams`, `_positions`: what the main process records for resuming)."""
    part = merge_chunks(chunks)
    part["_streams"] = [chunk["_stream"] for chunk in chunks]
    part["_positions"] = [chunk["_position"] for chunk in chunks]
    return part
