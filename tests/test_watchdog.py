"""No call hangs: the bounds a rank's watch holds it to, and the driver stopping a stalled group."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from models import Classifier, loader

import raylight as pl
from raylight.driver.controller import StalledRank
from raylight.rank import watchdog


class _Recorded:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def remote(self, *args):
        self.calls.append(args)


def _board() -> SimpleNamespace:
    return SimpleNamespace(beat=_Recorded(), stalled=_Recorded())


def test_a_batch_is_bounded_by_the_slowest_one_so_far():
    # No batch has finished yet: the first one may compile; the process-group timeout bounds it.
    assert watchdog.batch_limit_s(0.0, timeout_s=1800) == 1800
    # Fast batches: the floor (120 s, or the timeout when that is shorter).
    assert watchdog.batch_limit_s(0.05, timeout_s=1800) == 120
    assert watchdog.batch_limit_s(0.05, timeout_s=30) == 30
    # Slow batches: 20 times the slowest.
    assert watchdog.batch_limit_s(12.0, timeout_s=1800) == 240


def test_the_watch_reports_a_batch_past_its_bound_and_work_between_batches_past_the_timeout():
    watch = watchdog.StallWatch(_board(), rank=1, timeout_s=300)
    watch.stop()  # the thread's timing is not under test here: check() is called directly
    watch.trainer = SimpleNamespace(_current_hook="training_step", _batch_idx=7, current_epoch=2)
    start = time.monotonic()
    assert watch.check(start) is None  # no driver call running: nothing to wait for
    watch.begin_call("train_epoch")
    watch.begin_batch()
    watch._batch_started = start - 0.5
    watch.end_batch()  # one finished batch of 0.5 s: later batches may take max(10 s, 120 s)
    assert watch.slowest_s == pytest.approx(0.5, abs=0.05)
    watch.begin_batch()
    now = watch._batch_started
    assert watch.check(now + 119) is None
    report = watch.check(now + 121)
    assert report["rank"] == 1 and report["kind"] == "batch"
    assert report["where"] == "training_step (epoch 2, batch 7)"
    assert report["limit_s"] == 120
    message = watchdog.describe(report, "epoch 2", timeout_s=300)
    assert "rank 1 stalled in training_step (epoch 2, batch 7) during epoch 2" in message
    assert "past its bound of 120 s" in message and "different numbers of batches" in message

    watch.end_batch()  # between batches (an epoch-end hook): the timeout bounds it
    watch.trainer._current_hook, watch.trainer._batch_idx = "on_train_epoch_end", None
    done = watch._last_done
    assert watch.check(done + 299) is None
    report = watch.check(done + 301)
    assert report["kind"] == "between" and report["where"] == "on_train_epoch_end (epoch 2)"
    assert "raise Trainer(process_group_timeout_s=...)" in watchdog.describe(report, "x", 300)
    watch.end_call()
    assert watch.check(done + 10_000) is None


def test_the_watch_thread_beats_and_reports_a_stall_once():
    board = _board()
    watch = watchdog.StallWatch(board, rank=0, timeout_s=1.0)
    try:
        watch.begin_call("setup")  # "between batches" for longer than the 1 s timeout
        deadline = time.monotonic() + 10
        while not board.stalled.calls and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.5)  # more checks: still one report
    finally:
        watch.stop()
    assert len(board.stalled.calls) == 1
    assert board.stalled.calls[0][0]["where"] == "set-up"
    assert board.beat.calls and board.beat.calls[0] == (0,)


class StallsAtBatch(Classifier):
    """Rank 0 stops making progress at one batch, as a stuck data-loader worker would."""

    def __init__(self, batch: int, release: str) -> None:
        super().__init__()
        self.batch, self.release = batch, release

    def training_step(self, batch, batch_idx):
        if batch_idx == self.batch and self.current_epoch == 0:
            import os

            while not os.path.exists(self.release):  # ends when the test is over
                time.sleep(0.1)
        return super().training_step(batch, batch_idx)


class StallsAtEpochEnd(Classifier):
    def __init__(self, release: str) -> None:
        super().__init__()
        self.release = release

    def on_train_epoch_end(self):
        import os

        while not os.path.exists(self.release):
            time.sleep(0.1)


def _stall_trainer() -> pl.Trainer:
    return pl.Trainer(
        num_workers=1,  # no peer: no collective would ever time out
        max_epochs=2,
        process_group_timeout_s=12,  # long enough for set-up on a busy machine
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )


@pytest.mark.slow
def test_a_stalled_batch_stops_the_fit_within_its_bound(ray_session, tmp_path):
    release = tmp_path / "release"
    trainer = _stall_trainer()
    started = time.monotonic()
    try:
        with pytest.raises(StalledRank) as info:
            trainer.fit(StallsAtBatch(3, str(release)), loader())
    finally:
        release.touch()
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert "rank 0 stalled in training_step (epoch 0, batch 3) during epoch 0" in message
    assert "past its bound of 12 s" in message
    assert info.value.rank == 0
    assert elapsed < 60  # the bound (12 s) plus worker start and a check, not forever
    assert trainer._group is None or not trainer._group.actors


@pytest.mark.slow
def test_work_between_batches_is_bounded_by_the_process_group_timeout(ray_session, tmp_path):
    release = tmp_path / "release"
    trainer = _stall_trainer()
    try:
        with pytest.raises(StalledRank, match=r"rank 0 stalled in on_train_epoch_end \(epoch 0\)"):
            trainer.fit(StallsAtEpochEnd(str(release)), loader())
    finally:
        release.touch()


def test_the_driver_reads_a_stall_report_or_a_silent_heartbeat_as_a_stalled_rank():
    from raylight.driver.group import _unhealthy

    quiet = {"stalls": [], "silent_s": {0: 2.0, 1: 3.0}}
    assert _unhealthy(quiet, "epoch 1", timeout_s=60, size=2) is None
    report = {"rank": 1, "kind": "between", "where": "setup", "elapsed_s": 61.0,
              "limit_s": 60.0, "slowest_s": 0.0}  # fmt: skip
    stalled = _unhealthy({**quiet, "stalls": [report]}, "epoch 1", timeout_s=60, size=2)
    assert isinstance(stalled, StalledRank) and stalled.rank == 1
    assert str(stalled).startswith("rank 1 stalled in setup during epoch 1: 61 s without")
    silent = {"stalls": [], "silent_s": {0: 2.0, 1: 60 + 2 * watchdog.HEARTBEAT_S + 1}}
    frozen = _unhealthy(silent, "epoch 1", timeout_s=60, size=2)
    assert frozen.rank == 1 and "rank 1 stopped answering during epoch 1" in str(frozen)
    # A rank of an earlier, larger group that beat on the same board is not this group's.
    assert _unhealthy(silent, "epoch 1", timeout_s=60, size=1) is None


@pytest.mark.slow
def test_the_driver_stops_the_group_when_the_board_reports_a_stall(ray_session):
    import ray

    from raylight.driver.group import WorkerGroup
    from raylight.shared.board import RunBoard
    from raylight.shared.config import make_scaling

    board = ray.remote(RunBoard).options(num_cpus=0).remote()
    group = WorkerGroup(make_scaling(2, False, None, None, None, 1, None), 10)
    group.board, group._timeout_s = board, 60
    group.actors = ["rank 0", "rank 1"]  # stand-ins: the check only counts them
    group.shutdown = lambda force=False: setattr(group, "actors", [])

    def checks_until(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            group._check_health("epoch 1")
            time.sleep(0.05)

    checks_until(3)  # nothing reported: nothing raised, and no tick ever waits on the board
    assert group.actors
    report = {"rank": 1, "kind": "between", "where": "setup", "elapsed_s": 61.0,
              "limit_s": 60.0, "slowest_s": 0.0}  # fmt: skip
    ray.get(board.stalled.remote(report))
    with pytest.raises(StalledRank, match="rank 1 stalled in setup during epoch 1") as info:
        checks_until(10)
    assert info.value.rank == 1 and not group.actors  # the group was stopped
    ray.kill(board)


def test_exception_save_reports_are_taken_once_so_a_later_failure_never_waits_on_them():
    import asyncio

    from raylight.shared.board import RunBoard

    async def reports():
        board = RunBoard()
        await board.exception_save(0, None)
        await board.exception_save(1, {"path": "p", "lacking": None})
        seen = await board.exception_saves()
        taken = await board.exception_saves(take=True)
        return seen, taken, await board.exception_saves()

    seen, taken, later = asyncio.run(reports())
    assert seen == taken == {0: None, 1: {"path": "p", "lacking": None}}
    assert later == {}
