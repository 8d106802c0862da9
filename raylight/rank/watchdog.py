"""No call hangs: each rank watches its own progress, and the driver hears when one stalls.

A rank is stalled when

- one batch (of any loop) has run longer than ``batch_limit_s``: 20 times the slowest batch
  this rank has finished, and at least ``min(120 s, process_group_timeout_s)``; before its
  first batch has finished (compilation, a cold cache), ``process_group_timeout_s``;
- outside batches (set-up, hooks between batches, a checkpoint's save) it has gone
  ``process_group_timeout_s`` without finishing a batch or the driver's call;
- its heartbeat (every ``HEARTBEAT_S``) has been silent for longer than
  ``process_group_timeout_s``: a frozen process, or a C call that holds Python's lock.

Batches repeat the same code, so the run's own timing bounds them tightly; the work between
them is bounded by the process-group timeout, which is how long any collective would wait
for it anyway. A rank blocked in a collective that a peer never joins (ranks that ran
different numbers of batches, a collective called on some ranks only) or on a stuck
data-loader worker is therefore found within its bound, not left to wait.

The loop only stamps the clock twice per batch. A daemon thread per rank wakes every
second, compares, and reports a stall once to the run's board (``shared.board.RunBoard``); the
driver reads the board while it waits for a call, then stops the group and raises
``StalledRank``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ray

BATCH_FACTOR = 20.0  # a batch may take this many times the slowest one before it
BATCH_FLOOR_S = 120.0  # ...and at least this long (or the process-group timeout, if shorter)
HEARTBEAT_S = 5.0
CHECK_EVERY_S = 1.0
BOARD_WAIT_S = 5.0  # the most a rank waits for the board to take a report


def batch_limit_s(slowest_s: float, timeout_s: float) -> float:
    """How long one batch may run, given the slowest one this rank has finished."""
    if slowest_s <= 0.0:
        return timeout_s  # no timing yet: the first batch may compile, warm caches, ...
    return max(BATCH_FACTOR * slowest_s, min(BATCH_FLOOR_S, timeout_s))


class StallWatch:
    """A rank's side: the loop's stamps, and the thread that compares them with the bounds.

    The stamps are plain attribute writes from the training thread; the watch thread only
    reads them, so a torn read can at worst delay a report by one check.
    """

    def __init__(self, board: Any, rank: int, timeout_s: float) -> None:
        self.board, self.rank, self.timeout_s = board, rank, timeout_s
        self.trainer: Any = None  # the rank's trainer once a stage is set up: says where it is
        self._call: str | None = None
        self._batch_started: float | None = None
        self._last_done = time.monotonic()  # the end of the last batch, or the call's start
        self.slowest_s = 0.0
        self._reported = False
        self._stopped = threading.Event()
        threading.Thread(target=self._run, name="raylight-watch", daemon=True).start()

    # ---- stamps, from the training thread --------------------------------------------------------
    def begin_call(self, name: str) -> None:
        self._call, self._batch_started = name, None
        self._last_done = time.monotonic()

    def end_call(self) -> None:
        self._call, self._batch_started = None, None

    def begin_batch(self) -> None:
        self._batch_started = time.monotonic()

    def end_batch(self) -> None:
        started, now = self._batch_started, time.monotonic()
        if started is not None:
            self.slowest_s = max(self.slowest_s, now - started)
        self._batch_started, self._last_done = None, now

    def stop(self) -> None:
        self._stopped.set()

    def exception_save(self, report: dict[str, Any] | None) -> None:
        """OnExceptionCheckpoint under FSDP: None when this rank starts writing its piece
        (the driver lets it finish before it stops the group), then what it wrote. Waited
        for, so that the board has it before this rank's error reaches the driver."""
        ray.wait([self.board.exception_save.remote(self.rank, report)], timeout=BOARD_WAIT_S)

    # ---- the watch thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        beat_at = 0.0
        while not self._stopped.wait(CHECK_EVERY_S):
            now = time.monotonic()
            try:
                if now - beat_at >= HEARTBEAT_S:
                    beat_at = now
                    self.board.beat.remote(self.rank)
                report = self.check(now)
                if report is not None and not self._reported:
                    self._reported = True
                    self.board.stalled.remote(report)
            except Exception:  # the board is gone: the group is being stopped
                return

    def check(self, now: float) -> dict[str, Any] | None:
        """A stall report when this rank is past a bound now, else None."""
        call, started = self._call, self._batch_started
        if call is None:
            return None  # idle between the driver's calls: nothing to wait for
        if started is not None:
            elapsed, limit = now - started, batch_limit_s(self.slowest_s, self.timeout_s)
            kind = "batch"
        else:
            elapsed, limit = now - self._last_done, self.timeout_s
            kind = "between"
        if elapsed <= limit:
            return None
        return {
            "rank": self.rank,
            "kind": kind,
            "call": call,
            "where": self._where(),
            "elapsed_s": elapsed,
            "limit_s": limit,
            "slowest_s": self.slowest_s,
        }

    def _where(self) -> str:
        trainer = self.trainer
        if trainer is None:
            return "set-up"
        hook = trainer._current_hook or "the loop"
        batch = trainer._batch_idx
        epoch = f"epoch {trainer.current_epoch}"
        return f"{hook} ({epoch}, batch {batch})" if batch is not None else f"{hook} ({epoch})"


class _NoWatch:
    """The stamps' target where no group watches (a rank trainer built in a unit test)."""

    def begin_batch(self) -> None:
        pass

    def end_batch(self) -> None:
        pass

    def exception_save(self, report: dict[str, Any] | None) -> None:
        pass


NO_WATCH = _NoWatch()


def describe(report: dict[str, Any], what: str, timeout_s: float) -> str:
    """The driver's message for a rank's stall report during its call ``what``."""
    rank, where = report["rank"], report["where"]
    if report["kind"] == "batch":
        slowest = report["slowest_s"]
        bound = (
            f"{BATCH_FACTOR:.0f}x the slowest batch it finished ({slowest:.3g} s), at least "
            f"{min(BATCH_FLOOR_S, timeout_s):.0f} s"
            if slowest
            else f"process_group_timeout_s={timeout_s:.0f} before any batch has finished"
        )
        return (
            f"rank {rank} stalled in {where} during {what}: the batch has run "
            f"{report['elapsed_s']:.0f} s, past its bound of {report['limit_s']:.0f} s ({bound}). "
            "A rank waits like this for a peer that never joins the same collective (ranks "
            "running different numbers of batches, a collective called on some ranks only), "
            "or on a stuck data-loader worker or lock. The worker group was stopped."
        )
    return (
        f"rank {rank} stalled in {where} during {what}: "
        f"{report['elapsed_s']:.0f} s without finishing a batch or the call, past "
        f"process_group_timeout_s={timeout_s:.0f}, the bound for work between batches. "
        "If that work is meant to take this long, raise Trainer(process_group_timeout_s=...). "
        "The worker group was stopped."
    )
