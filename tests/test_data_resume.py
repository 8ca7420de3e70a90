"""The data stream position of a resumed run, from every rank's saved loader state
(flip_scale/data/resume.py): merged into any layout the stream count splits, or restarted at a
fresh epoch with the reason."""

from __future__ import annotations

from flip_scale.data.resume import data_state_for_resume, merged_positions


def _state(rank, dp, positions, **changes):
    return dict({"version": 2, "streams": 4, "streams_auto": True, "positions": positions, "batches": 7,
                 "seed": 0, "num_shards": 8, "dp_rank": rank, "dp_size": dp, "batch_size": 8 // dp}, **changes)


SAVED = [_state(0, 2, {"0": [1, 5], "1": [1, 0]}), _state(1, 2, {"2": [0, 9], "3": [1, 2]})]


def test_data_positions_merge_across_layouts_or_restart_at_a_fresh_epoch():
    """Per-stream positions of every rank merge into any layout the stream count splits; a layout
    it does not split, or a changed seed, restarts at the first epoch no stream had begun."""
    # dp 4 (and dp 1) continue every stream where it stopped.
    for dp in (4, 1):
        fresh = _state(0, dp, {str(s): [0, 0] for s in range(4 // dp)})
        merged, reason = data_state_for_resume(SAVED, fresh)
        assert reason is None and merged["positions"] == {"0": [1, 5], "1": [1, 0], "2": [0, 9], "3": [1, 2]}
        assert merged["batches"] == 7 and merged["dp_rank"] == 0  # the rest is the first rank's blob
    # dp 3 cannot split 4 streams; a changed seed has other streams altogether.
    for fresh, why in [(_state(0, 3, {"0": [0, 0]}, streams=3, batch_size=4), "do not split over 3"),
                       (_state(0, 2, {"0": [0, 0], "1": [0, 0]}, seed=1), "seed 0 -> 1")]:
        restarted, reason = data_state_for_resume(SAVED, fresh)
        assert why in reason and "restarts at epoch 2" in reason  # stream 0 and 3 had begun epoch 1
        assert set(restarted["positions"]) == set(fresh["positions"])
        assert all(position == [2, 0] for position in restarted["positions"].values())
        assert restarted["batches"] == 0


def test_missing_streams_restart_and_no_blobs_start_from_the_beginning():
    # Only rank 0's blob (rank 1 wrote none, or it was lost): streams 2 and 3 have no position.
    fresh = _state(0, 1, {str(s): [0, 0] for s in range(4)})
    restarted, reason = data_state_for_resume(SAVED[:1], fresh)
    assert "positions of 2 of its 4 streams are missing" in reason and "restarts at epoch 2" in reason
    assert restarted["positions"] == {str(s): [2, 0] for s in range(4)}
    # A stream that drew nothing of epoch 1 has not begun it: the restart is at epoch 1.
    _, reason = data_state_for_resume([_state(0, 1, {"0": [1, 0], "1": [0, 3]})], dict(fresh, seed=5))
    assert "restarts at epoch 1" in reason
    assert data_state_for_resume([], fresh) == (None, None)
    assert merged_positions(SAVED) == {"0": [1, 5], "1": [1, 0], "2": [0, 9], "3": [1, 2]}


def test_a_version_1_state_with_positions_as_a_list_restarts_at_a_fresh_epoch():
    """Version 1 saved one rank's positions as a list (not per stream): it cannot continue, and the
    positions are not merged (they have no stream keys), only read for the restart epoch."""
    old = dict(_state(0, 1, None), version=1, positions=[[1, 3], [0, 2]])
    fresh = _state(0, 1, {str(s): [0, 0] for s in range(4)})
    restarted, reason = data_state_for_resume([old], fresh)
    assert "version 1 -> 2" in reason and "restarts at epoch 2" in reason
    assert restarted["positions"] == {str(s): [2, 0] for s in range(4)}


def _mixture(rank, dp, sampling, positions, **changes):
    return _state(rank, dp, {s: {"batch": 3, "sources": dict(p)} for s, p in positions.items()}, sampling=sampling,
                  **changes)


def test_mixture_mode_changes_name_what_restarts_and_what_blocks_the_rest():
    saved = [_mixture(0, 1, "epochs", {str(s): {"a": [0, 4], "b": [1, 2]} for s in range(4)})]
    # Every source changed: each restarts (a draw index for the resampled one); the rows' draws continue.
    fresh = _mixture(0, 1, "a=resampled,b=resampled", {str(s): {"a": [0, 0], "b": [0, 0]} for s in range(4)})
    state, reason = data_state_for_resume(saved, fresh)
    assert "those sources restart at a draw 1, b draw 2" in reason and "other sources" not in reason
    assert all(p == {"batch": 3, "sources": {"a": [1, 0], "b": [2, 0]}} for p in state["positions"].values())
    # One source changed but data.streams was changed too: everything restarts, and the layout is named.
    fresh = _mixture(0, 1, "a=epochs,b=resampled", {str(s): {"a": [0, 0], "b": [0, 0]} for s in range(8)},
                     streams=8, streams_auto=False)
    state, reason = data_state_for_resume(saved, fresh)
    assert "data.streams 4 -> 8" in reason and "for every stream and every source" in reason
    assert "sources whose mode did not change would continue" in reason
    assert all(p == {"batch": 0, "sources": {"a": [2, 0], "b": [2, 0]}} for p in state["positions"].values())
