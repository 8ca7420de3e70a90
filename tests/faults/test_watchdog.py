"""The watchdog thread alone: a rank that makes no progress outside any collective exits non-zero
within the limit, naming its step; a long phase gets the long allowance."""

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent

_STUCK = """
import time
from flip_scale.watchdog import Watchdog
dog = Watchdog(rank=3, world_size=1, first_limit_s=30, limit_s=0.5).start(step=6)
dog.progress(7)          # the first step after start: the short limit from now on
with dog.long_phase("checkpoint save"):
    time.sleep(1.0)      # longer than the short limit: allowed in a long phase
dog.progress(8)
print("after the save", flush=True)
time.sleep(30)           # stuck outside any collective
"""


def test_a_rank_stuck_outside_collectives_exits_within_the_limit_naming_its_step():
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _STUCK], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    seconds = time.monotonic() - started
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "after the save" in proc.stdout
    assert "rank 3 at step 9 (step 8 was the last finished): no progress" in proc.stderr, proc.stderr
    assert seconds < 10, seconds


def _one_rank_group():
    import torch.distributed as dist

    sys.path.insert(0, str(REPO / "tests"))
    from dist_utils import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def test_collective_timeouts_are_set_through_whichever_setter_this_torch_has(monkeypatch, caplog):
    import torch.distributed as dist

    from flip_scale import watchdog

    _one_rank_group()
    try:
        seen = []
        monkeypatch.delattr(dist, "set_timeout", raising=False)
        monkeypatch.setattr(dist.distributed_c10d, "_set_pg_timeout", lambda timeout, group: seen.append(timeout))
        assert len(watchdog.set_collective_timeouts(7)) >= 1 and seen[0].total_seconds() == 7  # the older torch's setter
        monkeypatch.delattr(dist.distributed_c10d, "_set_pg_timeout")
        monkeypatch.setattr(watchdog, "_SETTER_MISSING_LOGGED", [])
        with caplog.at_level("WARNING", logger="flip_scale.watchdog"):
            assert watchdog.set_collective_timeouts(7) == []
            assert watchdog.set_collective_timeouts(7) == []
        said = [r.message for r in caplog.records if "cannot change a process group's timeout" in r.message]
        assert len(said) == 1 and "watchdog thread is the guard" in said[0]
    finally:
        dist.destroy_process_group()


def test_a_long_phase_gives_the_shortened_groups_the_long_timeout_and_the_short_one_back(monkeypatch):
    """The first step shortens every group; a save or an evaluation may skew the ranks, so the
    groups get the start-up timeout back while it runs (a group made later is never touched)."""
    import torch.distributed as dist

    from flip_scale import watchdog

    _one_rank_group()
    try:
        timeouts = {}
        monkeypatch.setattr(watchdog, "_timeout_setter",
                            lambda: lambda timeout, group: timeouts.__setitem__(group, timeout.total_seconds()))
        dog = watchdog.Watchdog(rank=0, world_size=2, first_limit_s=600, limit_s=20, store=object())
        with dog.long_phase("checkpoint save"):  # before the first step: nothing shortened, nothing to lengthen
            assert timeouts == {}
        dog.progress(1)
        short = dog.collective_timeout_s
        assert timeouts and set(timeouts.values()) == {short}
        shortened = set(timeouts)
        with dog.long_phase("checkpoint save"):
            assert set(timeouts.values()) == {600}
            with dog.long_phase("evaluation"):  # nested: the outer phase restores
                pass
            assert set(timeouts.values()) == {600}
            timeouts["made during the save"] = 600.0  # the writer's own group, made with the long timeout
        assert {g: t for g, t in timeouts.items() if g in shortened} == dict.fromkeys(shortened, short)
        assert timeouts["made during the save"] == 600
    finally:
        dist.destroy_process_group()


def test_ranks_failing_together_do_not_name_each_other_among_the_stopped():
    """A node dies: the ranks left on the other node fail at the same moment, their loops end
    (`stop`) and each probes the heartbeats. A live rank that is failing too keeps beating, so
    only the dead ranks are named (rank 0 was once named by rank 1: the end of the loop had
    stopped rank 0's heartbeat), and rank 0 lingers until the others' probes are done."""
    import threading

    import torch.distributed as dist

    from flip_scale.watchdog import Watchdog

    store = dist.HashStore()
    dogs = [Watchdog(rank, 4, first_limit_s=60, limit_s=60, store=store, tick_s=0.1).start(step=3) for rank in range(4)]
    time.sleep(0.3)
    for dead in dogs[2:]:  # the other node's ranks: gone
        dead.close()
    time.sleep(0.2)
    reports = {}
    for dog in dogs[:2]:
        dog.stop()  # the loop ended by the failed collective (Trainer.fit's finally)
    threads = [threading.Thread(target=lambda d=dog: reports.__setitem__(d.rank, d.report(RuntimeError("peer gone"))))
               for dog in dogs[:2]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    # Rank 0 (the store's process) ends only once rank 1, alive by its probe, has probed too;
    # rank 1 has, so at once. Before, rank 0 gone first made rank 1 name it "gone".
    started = time.monotonic()
    dogs[0].linger_for_peers()
    assert time.monotonic() - started < 0.5
    store.delete_key("flip_scale/probed/1")
    started = time.monotonic()
    dogs[0].linger_for_peers()  # a rank 1 still probing: waited for, at most one probe's time
    assert 0.9 < time.monotonic() - started < 3
    for dog in dogs:
        dog.close()
    assert reports[0].endswith("rank(s) 2, 3 stopped reporting (dead or hung)"), reports
    assert reports[1].endswith("rank(s) 2, 3 stopped reporting (dead or hung)"), reports
    assert reports[1].startswith("rank 1 at step 4 (step 3 was the last finished): a collective or the step failed")


def test_a_late_probe_names_a_rank_that_reported_and_ended_as_such():
    """On a loaded machine rank 0 may probe after rank 1 has reported the same failure and ended:
    rank 1's heartbeat has stopped by then, but it is not among the dead or hung."""
    import torch.distributed as dist

    from flip_scale.watchdog import Watchdog

    store = dist.HashStore()
    dogs = [Watchdog(rank, 4, first_limit_s=60, limit_s=60, store=store, tick_s=0.1).start(step=3) for rank in range(4)]
    time.sleep(0.3)
    for dead in dogs[2:]:
        dead.close()
    dogs[1].stop()
    first = dogs[1].report(RuntimeError("peer gone"))
    dogs[1].close()  # rank 1 ends (os._exit in a run)
    time.sleep(0.2)
    dogs[0].stop()
    late = dogs[0].report(RuntimeError("peer gone"))
    dogs[0].close()
    assert first.endswith("rank(s) 2, 3 stopped reporting (dead or hung)"), first
    assert late.endswith("rank(s) 2, 3 stopped reporting (dead or hung); rank 1 reported the failure itself and ended"), late
    started = time.monotonic()
    dogs[0].linger_for_peers()  # nobody left to wait for
    assert time.monotonic() - started < 0.5
