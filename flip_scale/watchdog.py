"""A dead or hung rank stops the whole job, fast, with a message that names the step and the rank.

    watchdog = Watchdog(rank, world_size, first_limit_s=3600, limit_s=300)
    watchdog.start()
    ... watchdog.progress(step) after every step; with watchdog.long_phase("checkpoint save"): ...
    watchdog.step_done(1) -> set_collective_timeouts(300): the long start-up allowance ends
    watchdog.stop()   # the checks end; the heartbeat goes on until watchdog.close() or the exit

Two guards, one per way a peer can be lost:

- **The collective timeout.** A peer killed outright closes its connections: the others' next
  collective fails at once. A peer that hangs (stopped, deadlocked, stuck in a file system) keeps
  them open: the others wait in a collective until the process group's timeout. Start-up, the
  first step (compilation, the data workers, a resume's checkpoint read) and evaluations skew the
  ranks by minutes; a training step does not. So the process group starts with the long timeout
  (`train.init_timeout_minutes`) and every group known after the first step gets the short one
  (`train.collective_timeout_minutes` / `_seconds`), as torchtitan does.
- **The watchdog thread.** A rank that waits outside any collective (a data worker that never
  answers, a hung write) would wait forever. The loop reports progress after every step; a thread
  checks it and, when no step has finished within the limit (the long one during start-up, a
  checkpoint save and an evaluation), logs what it knows and exits the process with EXIT_CODE.

Which rank: each rank's thread bumps a counter in the process group's key-value store every
second. On a failure the counters are read twice; the ranks whose counter did not move have
stopped (a killed rank 0 takes the store with it: then the store itself is unreachable, which
names rank 0).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
import threading
import time
import traceback
from typing import Optional

log = logging.getLogger("flip_scale.watchdog")

EXIT_CODE = 1  # a failure: the Slurm templates requeue it (they never requeue 2, the usage errors)
TICK_S = 1.0
EXIT_MARGIN_S = 2.0  # the failing rank's report, traceback and process-group teardown
_KEY = "flip_scale/heartbeat/"
_PROBED = "flip_scale/probed/"  # a rank's probe of the others is done


_SETTER_MISSING_LOGGED = []


def _timeout_setter():
    """torch's per-group timeout setter: `dist.set_timeout` in recent torch, the private
    `_set_pg_timeout` before; None when neither exists."""
    import torch.distributed as dist

    setter = getattr(dist, "set_timeout", None)
    if setter is None:
        setter = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    return setter


def set_collective_timeouts(seconds: float, groups: Optional[list] = None) -> list:
    """Give `groups` (default: every process group of this rank) the timeout `seconds`; returns
    the groups that were set. Groups created later (the asynchronous checkpoint writer's own,
    made with the long timeout) keep their own."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return []
    setter = _timeout_setter()
    if setter is None:
        if not _SETTER_MISSING_LOGGED:
            _SETTER_MISSING_LOGGED.append(True)
            log.warning("this torch cannot change a process group's timeout: the groups keep their start-up "
                        "timeout and the watchdog thread is the guard against a hung peer")
        return []
    if groups is None:
        groups = list(getattr(dist.distributed_c10d._world, "pg_map", {}) or [dist.group.WORLD])
    timeout = datetime.timedelta(seconds=seconds)
    done = []
    for group in groups:
        try:
            setter(timeout, group)
            done.append(group)
        except (ValueError, RuntimeError, AssertionError, AttributeError) as error:
            # not a member, a backend without timeouts, or a torch whose groups lack the setter
            log.debug("collective timeout of a group left as it was: %s", error)
    return done


def _default_store():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):
        return None


class Watchdog:
    """Per-rank progress guard (module docstring). `limit_s`: the most a step may take after the
    first; `first_limit_s`: before the first step has finished, and during long phases."""

    def __init__(self, rank: int, world_size: int, first_limit_s: float, limit_s: float, store=None,
                 tick_s: float = TICK_S):
        self.rank, self.world_size = rank, world_size
        self.first_limit_s, self.limit_s = float(first_limit_s), float(limit_s)
        self.tick_s = min(tick_s, max(0.05, self.limit_s / 10))
        self.store = store if store is not None else (_default_store() if world_size > 1 else None)
        self.step = 0  # the last finished step
        self.first_done = False
        self.phase: Optional[str] = None
        self._last = time.monotonic()
        self._beats = 0
        self._stop = threading.Event()  # ends the checks
        self._stop_beats = threading.Event()  # ends the heartbeat (close): a live rank reports until then
        self._fired = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._beater: Optional[threading.Thread] = None
        self._short_groups: list = []  # the process groups the first step gave the short timeout
        self._stopped: Optional[list] = None  # the ranks this rank's last probe found stopped

    # ------------------------------------------------------------------ the loop's side
    def start(self, step: int = 0) -> "Watchdog":
        self.step, self._last = step, time.monotonic()
        self._stop.clear()
        self._stop_beats.clear()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="flip-watchdog", daemon=True)
            self._thread.start()
        if self.store is not None and (self._beater is None or not self._beater.is_alive()):
            # Its own thread: a store write blocked by a hung rank 0 must not stall the checks.
            self._beater = threading.Thread(target=self._beat_loop, name="flip-watchdog-beat", daemon=True)
            self._beater.start()
        return self

    def progress(self, step: int) -> None:
        """Step `step` has finished on this rank."""
        self.step, self._last = step, time.monotonic()
        if not self.first_done:
            self.first_done = True
            if self.world_size == 1:
                return
            self._short_groups = set_collective_timeouts(self.collective_timeout_s)
            log.info("first step done: collective timeout now %.1f s (%d process groups), watchdog limit %.1f s",
                     self.collective_timeout_s, len(self._short_groups), self.limit_s)

    @contextlib.contextmanager
    def long_phase(self, what: str):
        """A phase that may take longer than a step (a checkpoint save, an evaluation): the start-up
        limit applies while it runs, to the watchdog thread and to the process groups the first
        step shortened (given the long timeout on entry, the short one back on exit)."""
        previous, self.phase = self.phase, what
        self._last = time.monotonic()
        lengthen = previous is None and bool(self._short_groups)
        if lengthen:
            set_collective_timeouts(self.first_limit_s, self._short_groups)
        try:
            yield
        finally:
            if lengthen:
                set_collective_timeouts(self.collective_timeout_s, self._short_groups)
            self.phase, self._last = previous, time.monotonic()

    def stop(self) -> None:
        """End the checks. The heartbeat goes on: a rank that is failing (the loop ended by an
        exception, `report` naming the stopped peer) is alive, and its peers' probes, run at the
        same moment, must not name it among the ranks that stopped reporting."""
        self._stop.set()

    def close(self) -> None:
        """End the checks and the heartbeat (the run is over on this rank)."""
        self._stop.set()
        self._stop_beats.set()

    @property
    def collective_timeout_s(self) -> float:
        """The process groups' timeout after the first step: the limit less what naming the stopped
        peer and exiting take (the probe, ~2 s), so that the job is gone within the configured
        time; at least half of it."""
        return max(self.limit_s / 2, self.limit_s - 1.5 * self.tick_s - EXIT_MARGIN_S)

    @property
    def current_limit_s(self) -> float:
        return self.first_limit_s if (not self.first_done or self.phase) else self.limit_s

    # ------------------------------------------------------------------ reports
    def where(self) -> str:
        doing = f"in the {self.phase}, " if self.phase else ""
        return f"rank {self.rank} at step {self.step + 1} ({doing}step {self.step} was the last finished)"

    def stopped_peers(self, wait_s: Optional[float] = None) -> str:
        """Which ranks stopped reporting, as a sentence ('' with one rank or without a store).
        The store lives in rank 0's process: a hung rank 0 keeps its socket open and a read would
        wait for the store's (start-up) timeout, so the probe runs in a daemon thread given about
        two ticks more than its own wait; one that does not return names rank 0."""
        if self.store is None or self.world_size < 2:
            return ""
        wait_s = wait_s if wait_s is not None else 1.5 * self.tick_s
        answer: list[str] = []
        probe = threading.Thread(target=lambda: answer.append(self._probe(wait_s)), name="flip-watchdog-probe",
                                 daemon=True)
        probe.start()
        probe.join(wait_s + 2 * self.tick_s + 1.0)
        return answer[0] if answer else "rank 0's store does not answer (rank 0 dead or hung)"

    def _probe(self, wait_s: float) -> str:
        others = [r for r in range(self.world_size) if r != self.rank]
        keys = [f"{_KEY}{r}" for r in others]
        try:
            first = [self.store.get(key) for key in keys]
            time.sleep(wait_s)
            second = [self.store.get(key) for key in keys]
        except Exception as error:  # noqa: BLE001 - a store that is gone is an answer too
            return f"the process group's store (on rank 0) does not answer ({error}): rank 0 is gone"
        still = [r for r, a, b in zip(others, first, second) if a == b]
        # A rank that has run its own probe was alive at the failure and reported it itself; it may
        # have ended since (only rank 0 lingers), which a late probe (a loaded machine) would
        # otherwise read as a rank that stopped reporting.
        ended: list[int] = []
        with contextlib.suppress(Exception):
            ended = [r for r in still if self.store.check([f"{_PROBED}{r}"])]
        still = [r for r in still if r not in ended]
        self._stopped = still
        with contextlib.suppress(Exception):  # rank 0 waits for this before it ends (linger_for_peers)
            self.store.set(f"{_PROBED}{self.rank}", "1")
        also = (f"; {'ranks' if len(ended) > 1 else 'rank'} {', '.join(map(str, ended))} reported the failure "
                f"{'themselves' if len(ended) > 1 else 'itself'} and ended") if ended else ""
        if not still:
            return "every other rank still reports (the fault is on this rank or in the network)" + also
        return "rank(s) " + ", ".join(map(str, still)) + " stopped reporting (dead or hung)" + also

    def report(self, error: Optional[BaseException] = None) -> str:
        """The sentence a failing rank logs: where it was, what failed, which peer stopped."""
        self.stop()
        if not self._fired.acquire(blocking=False):
            time.sleep(60)  # the thread is reporting and exiting the process
        what = f"a collective or the step failed: {error}" if error is not None else "no progress"
        peers = self.stopped_peers()
        return f"{self.where()}: {what}" + (f"; {peers}" if peers else "")

    def linger_for_peers(self) -> None:
        """Rank 0, about to end after a failure: the store lives in this process, and the other
        live ranks may still be probing it (they fail at about the same moment). Wait, beating,
        until each rank that this rank's probe found alive has finished its probe, at most one
        probe's time (~2.5 s); an exit before would make them report rank 0 as the one gone."""
        if self.rank != 0 or self.store is None or self._stopped is None:
            return
        waiting = [f"{_PROBED}{r}" for r in range(1, self.world_size) if r not in self._stopped]
        deadline = time.monotonic() + 1.5 * self.tick_s + 1.0
        while waiting and time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                waiting = [key for key in waiting if not self.store.check([key])]
            time.sleep(0.05)

    def on_failure(self, error: BaseException, expected: tuple = ()) -> None:
        """A failed run on one of several ranks: arm a timer that ends this rank after `limit_s`
        whatever its teardown waits on (an asynchronous checkpoint write in a collective, the
        process group's shutdown, blocked by a dead or hung peer); for an error not of the
        `expected` kinds (a peer's death surfaces as a failed collective) name the step and the rank
        that stopped and exit now. Returns (for the caller to re-raise) only for expected kinds."""
        if self.world_size <= 1:
            return
        guard = threading.Timer(self.limit_s, os._exit, (1,))
        guard.daemon = True
        guard.start()
        if not isinstance(error, expected):
            log.error("flip_scale: %s", self.report(error))
            self.exit_after_report(error)

    def exit_after_report(self, error: BaseException) -> None:
        """End this rank now, with EXIT_CODE, after `report` has named the lost peer: the process
        group cannot be torn down (its destroy waits on the dead or unreachable peer; the heartbeat
        thread, still in a store call, aborts the interpreter's exit with "terminate called without
        an active exception", exit 134, as seen after a silent network loss). The traceback is
        printed first; rank 0 lingers for the others' probes."""
        traceback.print_exception(error)
        _flush()
        self.linger_for_peers()
        os._exit(EXIT_CODE)

    # ------------------------------------------------------------------ the thread
    def _beat(self) -> None:
        if self.store is None:
            return
        self._beats += 1
        try:
            self.store.set(f"{_KEY}{self.rank}", f"{self._beats} {self.step}")
        except Exception:  # noqa: BLE001 - a store that is gone: the loop's collectives will say so
            pass

    def _beat_loop(self) -> None:
        while not self._stop_beats.wait(self.tick_s):
            self._beat()

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            idle = time.monotonic() - self._last
            limit = self.current_limit_s if self.phase or not self.first_done else self.collective_timeout_s
            if idle > limit and self._fired.acquire(blocking=False):
                self._fire(idle, limit)
                return

    def _fire(self, idle: float, limit: float) -> None:
        peers = self.stopped_peers()
        message = (f"flip_scale watchdog: {self.where()}: no progress for {idle:.1f} s, more than the limit of "
                   f"{limit:.1f} s (train.collective_timeout_*, train.init_timeout_minutes before the first step): "
                   f"{peers or 'a rank is dead or hung'}; exiting with code {EXIT_CODE} so that the job can be "
                   f"requeued and resumed from its last checkpoint")
        log.error("%s", message)
        print(message, file=sys.stderr, flush=True)
        _flush()
        self.linger_for_peers()
        os._exit(EXIT_CODE)



def _flush() -> None:
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
