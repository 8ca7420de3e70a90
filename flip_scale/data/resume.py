from typing import Optional


def data_state_for_resume(everyone: list, fresh: dict) -> tuple[Optional[dict], Optional[str]]:
    """The loader state to resume with, and why the stream cannot continue sample for sample (or None).

    `fresh`: the `state_dict()` of a newly built loader of this run. The positions are per sample
    stream (flip_scale/data/loader.py), so the positions every rank saved, merged, continue the
    stream under any layout whose data-parallel size divides the stream count, with the same seed
    and shards. Otherwise the stream restarts at the first epoch no stream of the checkpoint had
    begun, so no sample of an epoch is seen twice (the rest of the epochs in progress is not seen).
    """
    if not everyone:
        return None, None
    first = everyone[0]
    problems = [f"{key} {first.get(key)} -> {fresh.get(key)}" for key in ("version", "seed", "num_shards", "shards_digest")
                if first.get(key) != fresh.get(key)]
    streams = first.get("streams")
    if not problems:
        merged = {str(k): v for state in everyone for k, v in state["positions"].items()}
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

    def started(state) -> list:
        positions = state["positions"]
        return list(positions.values()) if isinstance(positions, dict) else list(positions)

    epoch = max((e + 1 if drawn > 0 else e) for state in everyone for e, drawn in started(state))
    state = dict(fresh, positions={stream: [epoch, 0] for stream in fresh["positions"]}, batches=0)
    reason = (
        f"the checkpoint's data stream cannot continue sample for sample in this run ({'; '.join(problems)}); "
        f"it restarts at epoch {epoch}, the first no stream had begun. To keep the stream across layouts, "
        f"give data.streams a value that every data-parallel size you use divides (e.g. 256)"
    )
    return state, reason


