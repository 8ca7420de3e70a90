"""The chaos run: a 2-rank tiny run whose whole job is SIGKILLed 5 times, resumed with --resume auto
each time: twice after a few more steps, and once at each named point of a save
(checkpoint/faultpoints.py, the ranks paused there until the kill): inside DCP's write (shards
written, no `.metadata`), after every file and before the rename, after the rename and before
`latest`. The final weights equal the uninterrupted run's bitwise, every sample of every epoch is
trained on exactly once (by its key), nothing half-written is ever chosen (each kill's `latest`
names a complete checkpoint older than the save killed), and the next run removes the `.tmp` left,
saying so."""

import json
import random
import re
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
    # Kill moments, each in a run that is going on: after 3 or 4 more logged steps, or with the
    # ranks paused at a point of the run's first save (the renamed point is rank 0's alone).
    moments = [("steps", rng.choice([3, 4])), ("dcp_write", 0), ("steps", rng.choice([3, 4])), ("renamed", 0),
               ("mid_save", 0)]
    run_dir = tmp_path / "chaos"
    kills = []
    for what, more in moments:
        env = {"FLIP_SCALE_TEST_PAUSE": f"{what}:60"} if what != "steps" else None
        logged = logged_steps(run_dir)
        latest_before = (run_dir / "latest").read_text().strip() if (run_dir / "latest").exists() else None
        offsets = [(run_dir / f"rank{r}.log").stat().st_size if (run_dir / f"rank{r}.log").exists() else 0
                   for r in (0, 1)]

        def paused(rank, what=what, offsets=offsets):
            text = (run_dir / f"rank{rank}.log").read_text(errors="replace")[offsets[rank]:]
            found = re.search(rf"pausing 60 s at {what} of step (\d+)", text)
            return int(found.group(1)) if found else None

        ranks = Ranks(run_dir, ["--resume", "auto", *_args(shards, synthetic_dir)], env=env, entry=RECORD)
        try:
            if what == "steps":
                wait_for(lambda target=logged + more: logged_steps(run_dir) >= target, 180, f"{more} more steps", ranks)
            else:
                on = (0,) if what == "renamed" else (0, 1)
                wait_for(lambda on=on: all(paused(r) for r in on), 180, f"the ranks at {what}", ranks)
        finally:
            for proc in ranks.procs:
                proc.send_signal(signal.SIGKILL)
            ranks.kill()
        latest = find_latest(run_dir)
        half_written = sorted(p.name for p in run_dir.glob("*.tmp"))
        kills.append((what, logged_steps(run_dir) - logged, latest.name if latest else None, half_written))
        if what == "steps":
            continue
        # A save killed at a named point: `latest` is untouched, complete, and what resume picks.
        step = paused(0)
        assert latest is not None and latest.name == latest_before and checkpoint_problem(latest) is None, kills
        assert step > int(latest.name.split("_")[1]), (step, latest)
        tmp = run_dir / f"step_{step:08d}.tmp"
        if what == "dcp_write":  # both ranks' shard files, no metadata: DCP's write half-done
            assert {p.name for p in tmp.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
            assert not (tmp / ".metadata").exists() and checkpoint_problem(tmp) is not None
        elif what == "mid_save":  # every file written, not renamed
            assert (tmp / ".metadata").is_file() and tmp.name in half_written
        else:  # renamed and complete, but `latest` still names the older one, which resume takes
            assert not tmp.exists() and checkpoint_problem(run_dir / f"step_{step:08d}") is None
    ranks = Ranks(run_dir, ["--resume", "auto", *_args(shards, synthetic_dir)], entry=RECORD)
    assert ranks.wait() == [0, 0], ranks.output()
    # Every .tmp a kill left was removed by the next run, with a line naming it.
    log0 = (run_dir / "rank0.log").read_text(errors="replace")
    for _, _, _, half_written in kills:
        for name in half_written:
            assert f"removing {run_dir / name}: a checkpoint save that never finished" in log0, name
    ranks = Ranks(run_dir, ["--resume", "auto", *_args(shards, synthetic_dir)], entry=RECORD)
    assert ranks.wait() == [0, 0], ranks.output()
    print("kills (moment, step, latest after the kill):", kills)
    assert len(kills) == 5 and sum(bool(tmp) for *_, tmp in kills) >= 2, kills
    assert len({latest for _, _, latest, _ in kills if latest}) >= 2, kills

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
