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


def _source_modes(sampling: str, names: list) -> dict:
    """A mixture's sampling string ("epochs", or "laion=epochs,coyo=resampled") as name -> mode."""
    if "=" not in sampling:
        return {name: sampling for name in names}
    return dict(part.split("=", 1) for part in sampling.split(","))


def _sources_redrawn(first: dict, fresh: dict) -> Optional[list]:
    """The mixture sources whose sampling mode changed between the checkpoint and this run, when the
    rest of the stream (the sources, their positions' layout) is the same; None otherwise."""
    positions = list(fresh["positions"].values())
    if not positions or not isinstance(positions[0], dict):
        return None
    names = list(positions[0]["sources"])
    saved = _source_modes(first.get("sampling", SAVED_DEFAULTS["sampling"]), names)
    now = _source_modes(fresh["sampling"], names)
    if sorted(saved) != sorted(now):
        return None
    return [name for name in names if saved[name] != now[name]]


def _layout_problem(first: dict, fresh: dict, merged: dict) -> Optional[str]:
    """Why the saved positions cannot be split over this run's layout (None: they can)."""
    streams = first.get("streams")
    dp_size, global_batch = fresh["dp_size"], fresh["batch_size"] * fresh["dp_size"]
    if not fresh.get("streams_auto", True) and fresh["streams"] != streams:
        return f"data.streams {streams} -> {fresh['streams']}"
    if streams % dp_size:
        return f"its {streams} data streams do not split over {dp_size} data-parallel ranks"
    if global_batch % streams:
        return f"train.global_batch_size={global_batch} is not a multiple of its {streams} data streams"
    if sorted(int(k) for k in merged) != list(range(streams)):
        return f"positions of {streams - len(merged)} of its {streams} streams are missing"
    return None


def data_state_for_resume(blobs: list[dict], fresh: dict) -> tuple[Optional[dict], Optional[str]]:
    """The loader state to resume with, and why the stream cannot continue sample for sample (or None).

    `blobs`: the saved loader states of every data-parallel rank that wrote one, in rank order
    (none: `(None, None)`, the stream starts from its beginning). `fresh`: the `state_dict()` of a
    newly built loader of this run. The merged positions continue the stream under any layout
    whose data-parallel size divides the stream count, with the same seed and shards. Otherwise the
    stream restarts at the first epoch no stream of the checkpoint had begun, so no sample of an
    epoch is seen twice (the rest of the epochs in progress is not seen). In a mixture where only
    some sources' sampling mode changed, only those sources restart; the others, and the mixture's
    row draws, continue.
    """
    if not blobs:
        return None, None
    first = blobs[0]
    def saved(blob, key):
        return blob.get(key, SAVED_DEFAULTS.get(key))

    changed = [key for key in _SAME_STREAM_KEYS if saved(first, key) != saved(fresh, key)]
    problems = [f"{key} {saved(first, key)} -> {saved(fresh, key)}" for key in changed]
    # The positions are read only where they can still mean this run's samples (an older version's
    # may not even be per stream).
    merged = merged_positions(blobs) if not problems or changed == ["sampling"] else {}
    layout = _layout_problem(first, fresh, merged) if not problems or changed == ["sampling"] else None
    if not problems:
        if layout is None:
            return dict(first, positions=merged), None
        problems.append(layout)
    redrawn = _sources_redrawn(first, fresh) if changed == ["sampling"] and layout is None else None
    if redrawn:
        return _restart_sources(blobs, merged, fresh, redrawn)

    epoch = _restart_epoch(blobs)
    def restart(position):
        if isinstance(position, dict):
            return {"batch": 0, "sources": {name: [epoch, 0] for name in position["sources"]}}
        return [epoch, 0]

    state = dict(fresh, positions={stream: restart(p) for stream, p in fresh["positions"].items()}, batches=0)
    if changed == ["sampling"]:
        # Only the sampling mode changed: the saved "epochs" count draws on one side, so the number
        # is only a fresh seed here. The layout advice applies only where the layout also blocked a
        # mixture's unchanged sources from continuing.
        advice = ""
        if layout is not None:
            problems.append(layout)
            advice = (". With a layout the streams split over, a mixture's sources whose mode did not change would "
                      "continue: give data.streams a value that every data-parallel size you use divides (e.g. 256)")
        reason = (
            f"the checkpoint's data was drawn another way ({'; '.join(problems)}): its stream positions mean "
            f"nothing to this run, so the data restarts at epoch {epoch} (a draw or epoch index no stream had "
            f"begun, for a fresh shuffle) for every stream and every source{advice}"
        )
        return state, reason
    reason = (
        f"the checkpoint's data stream cannot continue sample for sample in this run ({'; '.join(problems)}); "
        f"it restarts at epoch {epoch}, the first no stream had begun. To keep the stream across layouts, "
        f"give data.streams a value that every data-parallel size you use divides (e.g. 256)"
    )
    return state, reason


def _restart_sources(blobs: list[dict], merged: dict, fresh: dict, redrawn: list) -> tuple[dict, str]:
    """Continue a mixture whose `redrawn` sources changed their sampling mode: every stream keeps its
    batch index and the other sources' positions; each redrawn source starts at the first epoch (or
    draw) no stream had begun of it."""
    starts = {name: max((epoch + 1 if drawn > 0 else epoch)
                        for position in merged.values() for epoch, drawn in [position["sources"][name]])
              for name in redrawn}
    positions = {stream: {"batch": position["batch"],
                          "sources": {name: ([starts[name], 0] if name in starts else list(pair))
                                      for name, pair in position["sources"].items()}}
                 for stream, position in merged.items()}
    state = dict(blobs[0], positions=positions, sampling=fresh["sampling"])
    names = list(next(iter(merged.values()))["sources"])
    now = _source_modes(fresh["sampling"], names)
    where = ", ".join(f"{name} {'draw' if now[name] == 'resampled' else 'epoch'} {starts[name]}" for name in redrawn)
    rest = ("the other sources and the mixture's rows continue sample for sample" if len(redrawn) < len(names)
            else "the mixture's rows continue as drawn (which source each row takes)")
    reason = (
        f"the checkpoint drew {', '.join(repr(n) for n in redrawn)} another way (sampling "
        f"{blobs[0].get('sampling', SAVED_DEFAULTS['sampling'])} -> {fresh['sampling']}): "
        f"{'that source restarts' if len(redrawn) == 1 else 'those sources restart'} at {where} (an index no "
        f"stream had begun, for a fresh shuffle); {rest}"
    )
    return state, reason
