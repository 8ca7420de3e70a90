"""The chaos run: a 2-rank tiny run whose whole job is SIGKILLed at 5 random moments (one of them in
the middle of a checkpoint save), resumed with --resume auto each time. The final weights equal the
uninterrupted run's bitwise, every sample of every epoch is trained on exactly once (by its key),
and no checkpoint in the run directory is half-written."""

import json
import random
import signal
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from fault_runs import Ranks, logged_steps, tiny_overrides, wait_for
from safetensors.torch import load_file

from flip_scale.checkpoint import checkpoint_problem, find_latest, list_checkpoints
from flip_scale.convert.checkpoints import consolidate
from flip_scale.data.synthetic import _add_member, make_sample

pytestmark = pytest.mark.slow

SHARDS, PER_SHARD, BATCH = 4, 16, 16  # 64 samples: an epoch is 4 steps
STEPS, EVERY = 16, 2  # 4 epochs
RECORD = [str(Path(__file__).with_name("record_keys.py"))]


def _data(tmp: Path) -> list[str]:
    paths = []
    for shard in range(SHARDS):
        path = tmp / f"chaos-{shard}.tar"
        with tarfile.open(path, "w") as tar:
            for index in range(PER_SHARD):
                image, caption, _ = make_sample(random.Random(shard * 1000 + index), 32)
                key = f"s{shard}-{index:03d}"
                _add_member(tar, f"{key}.png", image)
                _add_member(tar, f"{key}.txt", caption.encode())
        paths.append(str(path))
    return paths


def _args(shards, synthetic_dir):
    return tiny_overrides(synthetic_dir, STEPS, EVERY, f"data.train_shards={json.dumps(shards)}", "data.synthetic=false",
                          f"train.global_batch_size={BATCH}", "data.streams=2", "checkpoint.keep_last=2")


def _weights(run_dir: Path, out: Path) -> dict:
    consolidate(find_latest(run_dir), out)
    return load_file(str(out / "model.safetensors"))


def _trained_keys(run_dir: Path) -> dict:
    """step -> the keys of its batch, over both ranks; a step run again after a resume replaces
    the killed run's (only the run that went on from it counts)."""
    steps: dict = {}
    for rank in (0, 1):
        for line in (run_dir / f"keys_rank{rank}.jsonl").read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
            steps.setdefault(record["step"], {})[rank] = record["keys"]
    return {step: by_rank[0] + by_rank[1] for step, by_rank in steps.items()}


def test_killed_five_times_the_run_ends_as_if_never_killed(tmp_path, synthetic_dir):
    shards = _data(tmp_path)
    reference_dir = tmp_path / "reference"
    ranks = Ranks(reference_dir, _args(shards, synthetic_dir), entry=RECORD)
    assert ranks.wait() == [0, 0], ranks.output()

    rng = random.Random(12)
    # Kill moments, each in a run that is going on: after 3 or 4 more logged steps (4 times: a
    # checkpoint of the run has been committed, so the next run resumes from it), and
    # once in the middle of the run's first save (held there 30 s, after every file is written and
    # before the rename).
    moments = [("steps", rng.choice([3, 4])) for _ in range(4)]
    moments.insert(rng.randrange(len(moments) + 1), ("mid-save", 0))
    run_dir = tmp_path / "chaos"
    kills = []
    for what, more in moments:
        env = {"FLIP_SCALE_TEST_PAUSE": "mid_save:30"} if what == "mid-save" else None
        logged = logged_steps(run_dir)
        log0 = run_dir / "rank0.log"
        offset = log0.stat().st_size if log0.exists() else 0
        ranks = Ranks(run_dir, ["--resume", "auto", *_args(shards, synthetic_dir)], env=env, entry=RECORD)
        try:
            if what == "mid-save":
                wait_for(lambda log0=log0, offset=offset: "pausing 30 s at mid_save" in
                         log0.read_text(errors="replace")[offset:], 180, "a save", ranks)
            else:
                wait_for(lambda target=logged + more: logged_steps(run_dir) >= target, 180, f"{more} more steps", ranks)
        finally:
            for proc in ranks.procs:
                proc.send_signal(signal.SIGKILL)
            ranks.kill()
        latest = find_latest(run_dir)
        half_written = sorted(p.name for p in run_dir.glob("*.tmp"))
        kills.append((what, logged_steps(run_dir) - logged, latest.name if latest else None, half_written))
    ranks = Ranks(run_dir, ["--resume", "auto", *_args(shards, synthetic_dir)], entry=RECORD)
    assert ranks.wait() == [0, 0], ranks.output()
    print("kills (moment, step, latest after the kill):", kills)
    assert len(kills) == 5
    # The mid-save kill left a half-written step directory; the resumes started from checkpoints.
    assert any(what == "mid-save" and tmp for what, _, _, tmp in kills), kills
    assert len({latest for _, _, latest, _ in kills if latest}) >= 3, kills

    # Nothing half-written: every step directory is complete, no .tmp left.
    assert not list(run_dir.glob("*.tmp"))
    assert all(checkpoint_problem(path) is None for path in list_checkpoints(run_dir))
    # Bitwise the uninterrupted run's weights.
    want, got = _weights(reference_dir, tmp_path / "w_ref"), _weights(run_dir, tmp_path / "w_chaos")
    assert set(want) == set(got) and all(want[k].equal(got[k]) for k in want)
    # Every sample of every epoch exactly once, in the uninterrupted run's batches.
    trained, reference = _trained_keys(run_dir), _trained_keys(reference_dir)
    assert sorted(trained) == list(range(1, STEPS + 1)) and trained == reference
    per_epoch = STEPS * BATCH // (SHARDS * PER_SHARD)
    steps_per_epoch = STEPS // per_epoch
    for epoch in range(per_epoch):
        seen = Counter(k for s in range(epoch * steps_per_epoch + 1, (epoch + 1) * steps_per_epoch + 1)
                       for k in trained[s])
        assert len(seen) == SHARDS * PER_SHARD and set(seen.values()) == {1}, (epoch, seen.most_common(3))
