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
