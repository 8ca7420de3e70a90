"""Where a resumed run's data stream continues, from the positions every rank saved.

Each data-parallel rank saves the `TrainLoader.state_dict()` of its own streams (a "blob"); a
resumed run gets every blob, in rank order, and a freshly built loader's `state_dict()`:

    state, reason = data_state_for_resume(blobs, fresh)   # reason is None: continues sample for sample
    loader.load_state_dict(state)

The positions are per sample stream (flip_scale/data/sample_stream.py), not per rank, so the merge of
every rank's positions continues the stream under any layout whose data-parallel size divides the
stream count. Where it cannot continue (another seed, other shards, a layout the stream count does
not split) the stream restarts at a fresh epoch and `reason` says why.

Here are only the blobs' contents: where they are stored (a checkpoint's `data_rank{r}.json`) is
the checkpoint package's business, which passes them on without looking inside. This module
imports nothing of the package (the data part knows no checkpoint).
"""

from __future__ import annotations

from typing import Optional

# What must be equal for the saved positions to mean the same samples in this run.
_SAME_STREAM_KEYS = ("version", "seed", "num_shards", "shards_digest", "sampling")
# What a checkpoint written before a key existed meant by it (shards drawn per epoch).
SAVED_DEFAULTS = {"sampling": "epochs"}


def merged_positions(blobs: list[dict]) -> dict[str, list]:
    """stream index (a string) -> [epoch, samples drawn], from every rank's blob."""
    return {str(stream): position for blob in blobs for stream, position in blob["positions"].items()}


def _restart_epoch(blobs: list[dict]) -> int:
    """The first epoch that no saved stream had begun (a stream that drew nothing of its epoch has
    not begun it)."""

    def positions(blob) -> list:
        saved = blob["positions"]
        return list(saved.values()) if isinstance(saved, dict) else list(saved)

    def pairs(position) -> list:  # a mixture's position holds one (epoch, drawn) per source
        return list(position["sources"].values()) if isinstance(position, dict) else [position]

    return max((epoch + 1 if drawn > 0 else epoch) for blob in blobs for position in positions(blob)
               for epoch, drawn in pairs(position))


def data_state_for_resume(blobs: list[dict], fresh: dict) -> tuple[Optional[dict], Optional[str]]:
    """The loader state to resume with, and why the stream cannot continue sample for sample (or None).

    `blobs`: the saved loader states of every data-parallel rank that wrote one, in rank order
    (none: `(None, None)`, the stream starts from its beginning). `fresh`: the `state_dict()` of a
    newly built loader of this run. The merged positions continue the stream under any layout
    whose data-parallel size divides the stream count, with the same seed and shards. Otherwise the
    stream restarts at the first epoch no stream of the checkpoint had begun, so no sample of an
    epoch is seen twice (the rest of the epochs in progress is not seen).
    """
    if not blobs:
        return None, None
    first = blobs[0]
    def saved(blob, key):
        return blob.get(key, SAVED_DEFAULTS.get(key))

    changed = [key for key in _SAME_STREAM_KEYS if saved(first, key) != saved(fresh, key)]
    problems = [f"{key} {saved(first, key)} -> {saved(fresh, key)}" for key in changed]
    streams = first.get("streams")
    if not problems:
        merged = merged_positions(blobs)
        dp_size, global_batch = fresh["dp_size"], fresh["batch_size"] * fresh["dp_size"]
        if not fresh.get("streams_auto", True) and fresh["streams"] != streams:
            problems.append(f"data.streams {streams} -> {fresh['streams']}")
        elif streams % dp_size:
            problems.append(f"its {streams} data streams do not split over {dp_size} data-parallel ranks")
        elif global_batch % streams:
            problems.append(f"train.global_batch_size={global_batch} is not a multiple of its {streams} data streams")
        elif sorted(int(k) for k in merged) != list(range(streams)):
            problems.append(f"positions of {streams - len(merged)} of its {streams} streams are missing")
        else:
            return dict(first, positions=merged), None

    epoch = _restart_epoch(blobs)
    def restart(position):
        if isinstance(position, dict):
            return {"batch": 0, "sources": {name: [epoch, 0] for name in position["sources"]}}
        return [epoch, 0]

    state = dict(fresh, positions={stream: restart(p) for stream, p in fresh["positions"].items()}, batches=0)
    if changed == ["sampling"]:
        # Only the sampling mode changed: the saved "epochs" count draws on one side, so the number
        # is only a fresh seed here, and the layout advice does not apply.
        reason = (
            f"the checkpoint's data was drawn another way ({'; '.join(problems)}): its stream positions mean "
            f"nothing to this run, so the data restarts at epoch {epoch} (a draw or epoch index no stream had "
            f"begun, for a fresh shuffle) for every stream and every source"
        )
        return state, reason
    reason = (
        f"the checkpoint's data stream cannot continue sample for sample in this run ({'; '.join(problems)}); "
        f"it restarts at epoch {epoch}, the first no stream had begun. To keep the stream across layouts, "
        f"give data.streams a value that every data-parallel size you use divides (e.g. 256)"
    )
    return state, reason
