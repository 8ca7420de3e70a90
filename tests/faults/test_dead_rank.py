"""A rank that dies (SIGKILL) or hangs (SIGSTOP) mid-run: the other rank exits non-zero within the
configured collective timeout with a message naming the step and the rank that stopped, and
`--resume auto` then finishes the run with the losses of an uninterrupted one."""

import re
import signal
import time

import pytest
from fault_runs import Ranks, logged_steps, losses, tiny_overrides, wait_for

pytestmark = pytest.mark.slow

TIMEOUT_S = 4.0
STEPS = 6


def _args(data_dir, *extra):
    return tiny_overrides(data_dir, STEPS, 2, f"train.collective_timeout_seconds={TIMEOUT_S}", *extra)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synthetic_dir):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    ranks = Ranks(run_dir, _args(synthetic_dir))
    assert ranks.wait() == [0, 0], ranks.output()
    return losses(run_dir)


def _fault_and_wait(run_dir, synthetic_dir, victim: int, fault: str):
    """A 2-rank run; after step 3 the `victim` rank gets `fault`: -> (the other rank's exit code,
    seconds from the signal to that exit, its output)."""
    ranks = Ranks(run_dir, _args(synthetic_dir))
    other = 1 - victim
    try:
        wait_for(lambda: logged_steps(run_dir) >= 3, 180, "step 3", ranks, poll=0.01)
        ranks.procs[victim].send_signal(getattr(signal, fault))
        hit = time.monotonic()
        code = ranks.procs[other].wait(timeout=TIMEOUT_S + 30)
        seconds = time.monotonic() - hit
    finally:
        ranks.kill()
    print(f"{fault} of rank {victim} -> rank {other} exited {code} after {seconds:.1f} s (timeout {TIMEOUT_S} s)")
    return code, seconds, ranks.output(other)


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_hung_rank_stops_the_other_which_resumes_to_the_same_losses(tmp_path, synthetic_dir, reference,
                                                                              fault):
    run_dir = tmp_path / "run"
    code, seconds, output = _fault_and_wait(run_dir, synthetic_dir, victim=1, fault=fault)
    assert code != 0, output
    # The process groups wait ~2 s less than the configured timeout, leaving that time for the
    # report and the exit; on a loaded 2-core machine the teardown can take a few seconds more.
    assert seconds < TIMEOUT_S + 4, output
    stopped_at = re.search(r"rank 0 at step (\d+)", output)
    assert stopped_at is not None and int(stopped_at.group(1)) >= 4, output[-3000:]
    assert "rank(s) 1 stopped reporting" in output, output[-3000:]

    resumed = Ranks(run_dir, ["--resume", "auto", *_args(synthetic_dir)])
    assert resumed.wait() == [0, 0], resumed.output()
    assert losses(run_dir) == reference


def test_a_hung_rank_0_whose_store_does_not_answer_does_not_block_the_other_ranks_exit(tmp_path, synthetic_dir):
    """Rank 0 holds the key-value store: stopped, its socket stays open and a read of the store
    would wait for the store's long timeout; the other rank still exits within the limit."""
    code, seconds, output = _fault_and_wait(tmp_path / "run", synthetic_dir, victim=0, fault="SIGSTOP")
    assert code != 0, output
    assert seconds < TIMEOUT_S + 6, output
    assert "rank 1 at step" in output and "rank 0's store does not answer" in output, output[-3000:]
