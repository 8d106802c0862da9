"""The fit's controller on its own, without Ray: every transition driven through a fake
worker group and a fake run (the driver's side of a fit)."""

from __future__ import annotations

from typing import Any

import pytest
import ray
import torch.distributed as dist

from raylight.driver.controller import (
    FailureLimitExceeded,
    FitController,
    State,
    WorkerFailure,
    is_system_failure,
)


class FakeGroup:
    """A started worker group: epochs advance the position; ``script`` maps an epoch to the
    exception that epoch raises, or to ``"stop"`` (the ranks stopped and saved)."""

    def __init__(self, run: FakeRun, size: int, resume: str | None) -> None:
        self.run, self.size, self.resume = run, size, resume
        self.calls: list[Any] = []

    def fit_start(self, sanity_check: bool) -> dict[str, Any]:
        self.calls.append(("fit_start", sanity_check))
        if self.run.fail_at_start:
            raise self.run.fail_at_start.pop(0)
        epoch, step = self.run.checkpoints.get(self.resume, (0, self.run.start_step))
        self.run.position = (epoch, step)
        return {"epoch": epoch, "global_step": step}

    def train_epoch(self, epoch: int, on_tick: Any) -> dict[str, Any]:
        self.calls.append(("train_epoch", epoch))
        on_tick()
        event = self.run.script.pop(epoch, None)
        if isinstance(event, BaseException):
            raise event
        step = self.run.position[1] + self.run.steps_per_epoch * self.size
        self.run.position = (epoch + 1, step)
        stopped_at = None
        if event == "stop":
            stopped_at = f"stopped-epoch={epoch}.ckpt"
            self.run.checkpoints[stopped_at] = (epoch + 1, step)
        return {"epoch": epoch, "global_step": step, "stopped_at": stopped_at, "size": self.size}

    def fit_end(self) -> dict[str, Any]:
        return {"state_dict": "weights", "position": self.run.position, "size": self.size}

    def save_checkpoint(self, path: str, weights_only: bool, what: str) -> None:
        self.calls.append(("save_checkpoint", path, weights_only, what))
        self.run.checkpoints[path] = self.run.position

    def could_grow_to(self) -> int:
        return min(self.run.free_workers + self.size, self.run.max_size)


class FakeRun:
    """The driver's side: starts fake groups, records what the controller asked for."""

    def __init__(self, max_epochs: int = 3, elastic: bool = False, max_size: int = 2) -> None:
        self.sanity_check = True
        self.elastic = elastic
        self.max_epochs, self.max_size = max_epochs, max_size
        self.free_workers = max_size  # how many workers of the requested size fit now
        self.steps_per_epoch = 5
        self.start_step = 0
        self.script: dict[int, Any] = {}
        self.fail_at_start: list[BaseException] = []
        self.checkpoints: dict[str | None, tuple[int, int]] = {}  # path -> (epoch, step)
        self.committed: list[str] = []  # the run's index, in commit order
        self.position = (0, 0)
        self.groups: list[FakeGroup] = []
        self.started: list[tuple[str | None, int]] = []
        self.stopped: list[bool] = []
        self.forgotten: list[int] = []
        self.epoch_ends: list[int] = []
        self.absorbed: list[int] = []  # the global step of each summary the Trainer took in
        self.signal = False
        self.ticks = 0

    def start_group(self, resume: str | None, size: int) -> FakeGroup:
        self.started.append((resume, size))
        group = FakeGroup(self, size or min(self.free_workers, self.max_size), resume)
        self.groups.append(group)
        return group

    def stop_group(self, force: bool) -> None:
        self.stopped.append(force)

    def absorb(self, summary: dict[str, Any]) -> None:
        self.absorbed.append(summary["global_step"])

    def end_epoch(self, summary: dict[str, Any], epochs_done: int) -> None:
        self.epoch_ends.append(epochs_done)

    def fit_done(self, epochs_done: int) -> bool:
        return epochs_done >= self.max_epochs

    def on_tick(self) -> None:
        self.ticks += 1

    def resize_checkpoint(self, epochs_done: int) -> str:
        return f"resize-epoch={epochs_done}.ckpt"

    def commit_checkpoint(self, path: str) -> None:
        self.committed.append(path)

    def recovery_point(self) -> tuple[str | None, int] | None:
        if not self.committed:
            return None
        path = self.committed[-1]
        return path, self.checkpoints[path][1]

    def forget_rows_from(self, step: int) -> None:
        self.forgotten.append(step)

    def signalled(self) -> bool:
        return self.signal


def states_of(controller: FitController) -> list[State]:
    seen = [controller.state]
    while controller.state not in (State.FINISHED, State.STOPPED, State.ERRORED):
        seen.append(controller.step())
    return seen


def test_a_fit_runs_every_epoch_then_ends():
    run = FakeRun(max_epochs=3)
    controller = FitController(run, ckpt_path=None)
    assert states_of(controller) == [State.STARTING] + [State.RUNNING] * 4 + [State.FINISHED]
    assert controller.result == {"state_dict": "weights", "position": (3, 30), "size": 2}
    assert run.groups[0].calls == [("fit_start", True)] + [("train_epoch", e) for e in range(3)]
    assert run.epoch_ends == [1, 2, 3] and run.ticks == 3
    assert run.absorbed == [0, 10, 20, 30]  # on_fit_start's summary, then each epoch's
    assert run.stopped == [] and controller.failures == []


def test_a_fit_from_a_checkpoint_skips_the_sanity_check_and_starts_at_its_epoch():
    run = FakeRun(max_epochs=3)
    run.checkpoints["given.ckpt"] = (2, 20)
    assert FitController(run, ckpt_path="given.ckpt").run()["position"] == (3, 30)
    assert run.started == [("given.ckpt", 0)]
    assert run.groups[0].calls == [("fit_start", False), ("train_epoch", 2)]


def test_a_user_error_is_raised_at_once_and_not_counted():
    run = FakeRun()
    run.script[1] = ValueError("bad shape in training_step")
    controller = FitController(run, ckpt_path=None, max_failures=5)
    with pytest.raises(ValueError, match="bad shape"):
        controller.run()
    assert controller.state is State.ERRORED and controller.failures == []
    assert run.stopped == [True]  # the group is killed, not asked to finish
    assert len(run.started) == 1


def test_a_worker_death_restarts_from_the_latest_committed_checkpoint():
    run = FakeRun(max_epochs=4)
    run.checkpoints["epoch=1.ckpt"] = (2, 20)
    run.committed.append("epoch=1.ckpt")
    run.script[2] = WorkerFailure("rank 1 died during epoch 2", 1)
    controller = FitController(run, ckpt_path=None, max_failures=1)
    with pytest.warns(UserWarning, match=r"failure 1 of the run \(WorkerFailure: rank 1 died"):
        seen = states_of(controller)
    assert State.RESTARTING in seen and seen[-1] is State.FINISHED
    assert run.stopped == [True]
    assert run.forgotten == [20]  # the loggers drop rows the new group logs again
    assert run.started == [(None, 0), ("epoch=1.ckpt", 0)]
    assert run.groups[1].calls[0] == ("fit_start", False)  # no sanity check on a resume
    assert [c for c in run.groups[1].calls if c[0] == "train_epoch"] == [
        ("train_epoch", 2),
        ("train_epoch", 3),
    ]
    assert controller.result["position"] == (4, 40)


def test_without_a_committed_checkpoint_a_restart_begins_where_the_fit_began():
    run = FakeRun(max_epochs=2)
    run.checkpoints["user.ckpt"] = (1, 7)
    run.fail_at_start.append(ray.exceptions.ActorDiedError())
    controller = FitController(run, ckpt_path="user.ckpt", max_failures=2)
    with pytest.warns(UserWarning, match=r"restarting the workers from user.ckpt \(global step 0"):
        controller.run()
    assert run.started == [("user.ckpt", 0), ("user.ckpt", 0)]
    assert run.forgotten == [0]


def test_the_limit_names_every_failure():
    run = FakeRun(max_epochs=5)
    run.fail_at_start = [
        WorkerFailure("rank 1 died during epoch 0", 1),
        WorkerFailure("rank 0 died during epoch 3", 0),
        ray.exceptions.ActorDiedError(),
    ]
    controller = FitController(run, ckpt_path=None, max_failures=2)
    with pytest.warns(UserWarning), pytest.raises(FailureLimitExceeded) as info:
        controller.run()
    message = str(info.value)
    assert "failed 3 times" in message and "max_failures=2" in message
    assert "1. WorkerFailure: rank 1 died during epoch 0" in message
    assert "2. WorkerFailure: rank 0 died during epoch 3" in message
    assert "3. ActorDiedError" in message
    assert controller.state is State.ERRORED


def test_without_retries_the_failure_itself_surfaces():
    run = FakeRun()
    run.script[0] = WorkerFailure("rank 1 died", 1)
    controller = FitController(run, ckpt_path=None, max_failures=0)
    with pytest.raises(WorkerFailure, match="rank 1 died"):
        controller.run()
    assert controller.state is State.ERRORED and len(run.started) == 1


def test_unlimited_retries():
    run = FakeRun(max_epochs=1)
    run.fail_at_start = [WorkerFailure("rank 0 died", 0) for _ in range(50)]
    controller = FitController(run, ckpt_path=None, max_failures=-1)
    with pytest.warns(UserWarning):
        assert controller.run()["position"] == (1, 10)
    assert len(controller.failures) == 50 and len(run.started) == 51


def test_a_keyboard_interrupt_is_never_retried():
    run = FakeRun()
    run.script[0] = KeyboardInterrupt()
    controller = FitController(run, ckpt_path=None, max_failures=-1)
    with pytest.raises(KeyboardInterrupt):
        controller.run()
    assert run.stopped == [True] and controller.failures == []


def test_after_a_lost_worker_the_next_group_is_sized_by_what_fits():
    """Shrink: the new group asks for no fixed size and runs with the workers that fit."""
    run = FakeRun(max_epochs=3, elastic=True)
    run.checkpoints["epoch=0.ckpt"] = (1, 10)
    run.committed.append("epoch=0.ckpt")

    run.script[1] = ray.exceptions.ActorDiedError()
    controller = FitController(run, ckpt_path=None, max_failures=1)
    controller.step()  # STARTING -> RUNNING, two workers
    controller.step()  # epoch 0
    run.free_workers = 1  # a node went away with one worker's resources
    with pytest.warns(UserWarning, match="restarting the workers from epoch=0.ckpt"):
        assert controller.run()["size"] == 1
    assert run.started == [(None, 0), ("epoch=0.ckpt", 0)]
    assert [g.size for g in run.groups] == [2, 1]


def test_when_more_workers_fit_the_group_restarts_bigger_at_an_epoch_end():
    now = [0.0]
    run = FakeRun(max_epochs=4, elastic=True, max_size=3)
    run.free_workers = 2
    controller = FitController(run, ckpt_path=None, check_interval_s=10, clock=lambda: now[0])
    controller.step()  # a group of 2
    controller.step()  # epoch 0: the check is not due yet
    assert controller.state is State.RUNNING
    run.free_workers = 1  # one more worker fits now
    now[0] = 11.0
    assert controller.step() is State.RESIZING  # epoch 1 ends with the check due
    with pytest.warns(UserWarning, match=r"resources for 3 workers are free \(running 2\)"):
        assert controller.step() is State.STARTING
    old = run.groups[0]
    assert old.calls[-1] == ("save_checkpoint", "resize-epoch=2.ckpt", False, "resize checkpoint")
    assert run.committed == ["resize-epoch=2.ckpt"]
    assert run.stopped == [False]  # the old group ends cleanly, not killed
    assert controller.run()["size"] == 3
    assert run.started[-1] == ("resize-epoch=2.ckpt", 3)
    assert controller.failures == []  # growing is not a failure


def test_a_new_group_waits_a_whole_interval_before_it_looks_for_room():
    now = [0.0]
    run = FakeRun(max_epochs=4, elastic=True, max_size=3)
    run.free_workers = 2
    run.script[0] = WorkerFailure("rank 1 died", 1)
    controller = FitController(
        run, ckpt_path=None, max_failures=1, check_interval_s=10, clock=lambda: now[0]
    )
    controller.step()  # a group of 2 at t=0
    now[0] = 9.0
    with pytest.warns(UserWarning, match="restarting the workers"):
        assert controller.step() is State.RESTARTING  # its epoch 0 fails
        controller.step()
    assert controller.step() is State.RUNNING  # a new group of 2 at t=9
    run.free_workers = 1  # a third worker fits now
    now[0] = 12.0  # an interval after the fit began, but not after this group did
    assert controller.step() is State.RUNNING
    now[0] = 19.5
    assert controller.step() is State.RESIZING


def test_no_growth_without_elastic_or_once_the_fit_is_done():
    fixed, finishing = (
        FakeRun(max_epochs=2, max_size=4),
        FakeRun(max_epochs=1, elastic=True, max_size=4),
    )
    for run in (fixed, finishing):
        run.free_workers = 2
        controller = FitController(run, ckpt_path=None, check_interval_s=0)
        controller.run()
        assert len(run.started) == 1 and run.committed == []


def test_a_worker_preempted_on_its_node_continues_from_the_saved_checkpoint():
    run = FakeRun(max_epochs=3)
    run.script[1] = "stop"  # a SIGTERM on a worker's node: the ranks stop and save
    controller = FitController(run, ckpt_path=None)
    with pytest.warns(UserWarning, match="continues from it on a new group"):
        result = controller.run()
    assert result["position"] == (3, 30)
    assert run.started == [(None, 0), ("stopped-epoch=1.ckpt", 0)]
    assert run.stopped == [False] and controller.failures == []


def test_a_signal_on_the_driver_ends_the_fit_at_the_saved_checkpoint():
    run = FakeRun(max_epochs=3)
    run.script[0] = "stop"
    run.signal = True
    controller = FitController(run, ckpt_path=None)
    assert controller.run() is None
    assert controller.state is State.STOPPED
    assert controller.stopped_at == "stopped-epoch=0.ckpt"
    assert run.stopped == [False] and len(run.started) == 1
    assert run.epoch_ends == []  # the stopped epoch is not reported as complete


def test_system_failures_are_retried_and_user_errors_are_not():
    assert is_system_failure(WorkerFailure("rank 1 died", 1))
    assert is_system_failure(ray.exceptions.ActorDiedError())
    assert is_system_failure(dist.DistNetworkError("store down"))
    assert is_system_failure(RuntimeError("[gloo/transport/tcp/pair.cc] Connection closed by peer"))
    assert not is_system_failure(ValueError("bad shape in training_step"))
    assert not is_system_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_system_failure(KeyboardInterrupt())
