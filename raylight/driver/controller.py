"""The fit's controller: a small state machine that owns the run, with one ``step()`` per
transition, in the manner of Ray Train v2's ``TrainController``.

    STARTING ──► RUNNING ──► (epochs) ──► FINISHED
       ▲  ▲         │ │ └─ stop signal: checkpoint saved ──► STOPPED (or STARTING, for a
       │  │         │ │    worker's node being preempted)
       │  │         │ └─── more workers fit (elastic) ──► RESIZING ──► STARTING
       │  └─────────┴──── system failure ──► RESTARTING ──► STARTING
       └─────────────────  user error, or retries used up ──► ERRORED (raised)

It makes no Ray call of its own. What it drives comes in through two seams, so that a test
can run every transition with fakes and no cluster:

- a worker group (``FitGroup``: ``driver.group.WorkerGroup``'s calls to the ranks);
- the run (``FitRun``: ``driver.fit.FitRun``, which starts groups and carries the
  results to the Trainer, its loggers, its progress bar and Tune).

System failures are retried: a worker process or node that died, a lost object, a collective
that broke or timed out because a peer went away, a rank that stalled. Exceptions raised by
user code are not: running the same code again would raise them again.
"""

from __future__ import annotations

import enum
import time
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import ray
import torch.distributed as dist

from raylight.shared import storage


class WorkerFailure(RuntimeError):
    """A worker process or its node died (as opposed to user code raising)."""

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.rank = rank


class StalledRank(WorkerFailure):
    """A rank went past its bound without progress (``rank.watchdog`` has the bounds)."""


class FailureLimitExceeded(RuntimeError):
    """The run failed more often than ``Trainer(max_failures=...)`` allows."""


# What gloo and the TCP store say when a peer of a collective went away or never answered.
_COLLECTIVE_BROKEN = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Timed out waiting",
    "Socket Timeout",
)


def collective_broke(error: BaseException) -> bool:
    if isinstance(error, dist.DistError):  # DistBackendError, DistNetworkError, DistStoreError
        return True
    return isinstance(error, RuntimeError) and any(s in str(error) for s in _COLLECTIVE_BROKEN)


def is_system_failure(error: BaseException) -> bool:
    """True for failures of the machinery (retried), False for errors of user code."""
    if isinstance(error, WorkerFailure):
        return True
    if isinstance(
        error,
        ray.exceptions.RayActorError
        | ray.exceptions.ObjectLostError
        | ray.exceptions.OwnerDiedError
        | ray.exceptions.NodeDiedError
        | ray.exceptions.RaySystemError,
    ):
        return True
    return collective_broke(error)


def describe(error: BaseException) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first_line}"[:300]


class FitGroup(Protocol):
    """The calls the controller makes on a started worker group (every rank takes part)."""

    size: int

    def fit_start(self, sanity_check: bool) -> dict[str, Any]: ...

    def train_epoch(self, epoch: int, on_tick: Callable[[], None]) -> dict[str, Any]: ...

    def fit_end(self) -> dict[str, Any]: ...

    def save_checkpoint(self, path: str, weights_only: bool, what: str) -> None: ...

    def could_grow_to(self) -> int: ...


class FitRun(Protocol):
    """The driver's side of a fit, as the controller sees it."""

    sanity_check: bool  # the flags ask for a sanity check before a fresh fit
    elastic: bool

    def start_group(self, resume: str | None, size: int) -> FitGroup: ...

    def stop_group(self, force: bool) -> None: ...

    def absorb(self, summary: dict[str, Any]) -> None: ...

    def end_epoch(self, summary: dict[str, Any], epochs_done: int) -> None: ...

    def fit_done(self, epochs_done: int) -> bool: ...

    def on_tick(self) -> None: ...

    def resize_checkpoint(self, epochs_done: int) -> str: ...

    def commit_checkpoint(self, path: str) -> None: ...

    def recovery_point(self) -> tuple[str | None, int] | None: ...

    def forget_rows_from(self, step: int) -> None: ...

    def signalled(self) -> bool: ...


class State(enum.Enum):
    STARTING = "starting"  # start a group, set it up, run on_fit_start
    RUNNING = "running"  # run the next epoch, or end the fit
    RESIZING = "resizing"  # more workers fit: checkpoint, then start a bigger group
    RESTARTING = "restarting"  # a system failure: pick the recovery point
    STOPPED = "stopped"  # a signal on the driver stopped the fit at a saved checkpoint
    FINISHED = "finished"
    ERRORED = "errored"


TERMINAL = (State.STOPPED, State.FINISHED, State.ERRORED)


class FitController:
    """Owns one ``Trainer.fit``: ``run()`` steps until a terminal state; a failure that must
    surface is raised from ``step()``."""

    def __init__(
        self,
        run: FitRun,
        ckpt_path: str | None,
        max_failures: int = 0,
        check_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fit_run = run
        self.max_failures = max_failures  # system failures retried (-1: any number)
        self.check_interval_s = check_interval_s  # elastic: how often to look for more room
        self.clock = clock
        self.state = State.STARTING
        self.failures: list[str] = []
        self.group: FitGroup | None = None
        self.ckpt_path = ckpt_path  # where the fit started (the user's checkpoint, or None)
        self.resume = ckpt_path  # where the next group starts
        self.size = 0  # the next group's size (0: as many as fit, up to the max)
        self.epoch = 0  # the epoch the group runs next
        self.first_step: int | None = None  # the global step the fit started at
        self.stopped_at: str | None = None  # the checkpoint a stop signal left
        self.result: dict[str, Any] | None = None
        self._checked = clock()

    def run(self) -> dict[str, Any] | None:
        """Step to the end: rank 0's final state, or None when a stop signal ended the fit
        (``stopped_at`` names the checkpoint the ranks saved)."""
        while self.state not in TERMINAL:
            self.step()
        return self.result

    def step(self) -> State:
        """One transition. A failure is classified here: a system failure moves to
        RESTARTING, anything else ends the run in ERRORED and is raised."""
        try:
            {
                State.STARTING: self._start,
                State.RUNNING: self._run_epoch,
                State.RESIZING: self._resize,
                State.RESTARTING: self._restart,
            }[self.state]()
        except BaseException as error:
            self._failed(error)
        return self.state

    # ---- transitions ---------------------------------------------------------------------------
    def _start(self) -> None:
        self.group = self.fit_run.start_group(self.resume, self.size)
        sanity_check = self.fit_run.sanity_check and not self.resume
        summary = self.group.fit_start(sanity_check)
        self.fit_run.absorb(summary)
        self.epoch = summary["epoch"]
        if self.first_step is None:
            self.first_step = summary["global_step"]
        self._checked = self.clock()  # a new group waits a whole interval before growing
        self.state = State.RUNNING

    def _run_epoch(self) -> None:
        assert self.group is not None
        if self.fit_run.fit_done(self.epoch):
            self.result = self.group.fit_end()
            self.state = State.FINISHED
            return
        summary = self.group.train_epoch(self.epoch, self.fit_run.on_tick)
        self.fit_run.absorb(summary)
        if summary["stopped_at"]:
            self._stopped(summary["stopped_at"])
            return
        self.epoch += 1  # Lightning counts completed epochs once one ends
        self.fit_run.end_epoch(summary, self.epoch)
        if self.clock() - self._checked >= self.check_interval_s:
            self._checked = self.clock()
            self._look_for_room()

    def _stopped(self, path: str) -> None:
        """The ranks stopped at an agreed batch and saved ``path``: end the fit when the
        driver was signalled, else (a worker's node was being preempted) go on from there."""
        self.fit_run.stop_group(force=False)
        self.group = None
        if self.fit_run.signalled():
            self.stopped_at, self.state = path, State.STOPPED
            return
        warnings.warn(
            f"a worker was asked to stop (SIGTERM on its node); the run saved "
            f"{storage.redact(path)} and continues from it on a new group.",
            stacklevel=4,
        )
        self.resume, self.size, self.state = path, 0, State.STARTING

    def _look_for_room(self) -> None:
        assert self.group is not None
        if not self.fit_run.elastic or self.fit_run.fit_done(self.epoch):
            return
        target = self.group.could_grow_to()
        if target > self.group.size:
            self.size, self.state = target, State.RESIZING

    def _resize(self) -> None:
        """Checkpoint at the epoch boundary and start the group again, bigger."""
        assert self.group is not None
        path = self.fit_run.resize_checkpoint(self.epoch)
        self.group.save_checkpoint(path, False, "resize checkpoint")
        self.fit_run.commit_checkpoint(path)
        warnings.warn(
            f"resources for {self.size} workers are free (running {self.group.size}): "
            f"restarting the group bigger from {storage.redact(path)}.",
            stacklevel=4,
        )
        self.fit_run.stop_group(force=False)
        self.group, self.resume, self.state = None, path, State.STARTING

    def _failed(self, error: BaseException) -> None:
        self.fit_run.stop_group(force=True)  # no rank may outlive a failed attempt
        self.group = None
        if not is_system_failure(error) or self.max_failures == 0:
            self.state = State.ERRORED
            raise error  # no retries asked for: the failure itself, as it happened
        self.failures.append(describe(error))
        if self.max_failures != -1 and len(self.failures) > self.max_failures:
            self.state = State.ERRORED
            history = "\n".join(f"  {i + 1}. {f}" for i, f in enumerate(self.failures))
            raise FailureLimitExceeded(
                f"the run failed {len(self.failures)} times, more than "
                f"Trainer(max_failures={self.max_failures}) allows:\n{history}\n"
                "Raise max_failures (-1 retries without limit) or fix what kills the workers."
            ) from error
        self.state = State.RESTARTING

    def _restart(self) -> None:
        """Go on from the latest full checkpoint this fit committed; without one, from
        where the fit started. The loggers forget the rows the new group logs again."""
        point = self.fit_run.recovery_point()
        self.resume, step = point if point else (self.ckpt_path, self.first_step or 0)
        self.size = 0
        self.fit_run.forget_rows_from(step)
        warnings.warn(
            f"failure {len(self.failures)} of the run ({self.failures[-1]}); restarting the "
            f"workers from {storage.redact(self.resume) if self.resume else 'the start'} "
            f"(global step {step}).",
            stacklevel=4,
        )
        self.state = State.STARTING
