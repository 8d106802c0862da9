"""Timer: time the training, validation and test loops, and stop training at a time limit.

It runs on every rank, with Lightning 2.x's arguments. Clocks differ per rank, so rank 0's
clock decides when the limit is reached and the decision is broadcast: every rank stops
at the same batch. The driver's copy carries rank 0's times after ``fit``.
"""

from __future__ import annotations

import re
import time
from datetime import timedelta
from typing import Any

from raylight.callbacks.callback import Callback
from raylight.shared.config import MisconfigurationException

_STAGES = ("train", "sanity_check", "validate", "test", "predict")  # Lightning's RunningStage
_INTERVALS = ("step", "epoch")


class Timer(Callback):
    """``Timer(duration="00:12:00:00")``, ``Timer(duration=timedelta(weeks=1))`` or
    ``Timer(duration=dict(weeks=4, days=2))``; then ``timer.time_elapsed("train")``.

    ``interval="step"`` checks after every training batch, ``"epoch"`` after every training
    epoch. Times are in seconds, from ``time.monotonic`` on rank 0.
    """

    def __init__(
        self,
        duration: str | timedelta | dict[str, int] | None = None,
        interval: str = "step",
        verbose: bool = True,
    ) -> None:
        if isinstance(duration, str):
            duration_match = re.fullmatch(r"(\d+):(\d\d):(\d\d):(\d\d)", duration.strip())
            if not duration_match:
                raise MisconfigurationException(
                    f"`Timer(duration={duration!r})` is not a valid duration. "
                    "Expected a string in the format DD:HH:MM:SS."
                )
            days, hours, minutes, seconds = (int(part) for part in duration_match.groups())
            duration = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
        elif isinstance(duration, dict):
            duration = timedelta(**duration)
        if interval not in _INTERVALS:
            raise MisconfigurationException(
                f"Unsupported parameter value `Timer(interval={interval})`. Possible choices are:"
                f" {', '.join(_INTERVALS)}"
            )
        self._duration = duration.total_seconds() if duration is not None else None
        self._interval = interval
        self._verbose = verbose
        self._start_time: dict[str, float | None] = dict.fromkeys(_STAGES)
        self._end_time: dict[str, float | None] = dict.fromkeys(_STAGES)
        self._offset = 0.0  # training time of the run this one resumes

    # ---- queries ----------------------------------------------------------------------------------
    def start_time(self, stage: str = "train") -> float | None:
        """The start time of ``stage`` ("train", "validate", "test", ...), in seconds."""
        return self._start_time[_stage(stage)]

    def end_time(self, stage: str = "train") -> float | None:
        """The end time of ``stage``, in seconds."""
        return self._end_time[_stage(stage)]

    def time_elapsed(self, stage: str = "train") -> float:
        """Seconds spent in ``stage`` (so far, if it is still running)."""
        start, end = self.start_time(stage), self.end_time(stage)
        offset = self._offset if _stage(stage) == "train" else 0
        if start is None:
            return offset
        if end is None:
            return time.monotonic() - start + offset
        return end - start + offset

    def time_remaining(self, stage: str = "train") -> float | None:
        """Seconds left of ``duration`` for ``stage``; None without a duration."""
        if self._duration is not None:
            return self._duration - self.time_elapsed(stage)
        return None

    # ---- hooks ----------------------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._start_time["train"] = time.monotonic()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._end_time["train"] = time.monotonic()

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._start_time["validate"] = time.monotonic()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self._end_time["validate"] = time.monotonic()

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._start_time["test"] = time.monotonic()

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self._end_time["test"] = time.monotonic()

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # Checked whatever the interval: a resumed run's time may already be spent.
        if self._duration is None:
            return
        self._check_time_remaining(trainer)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._interval != "step" or self._duration is None:
            return
        self._check_time_remaining(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._interval != "epoch" or self._duration is None:
            return
        self._check_time_remaining(trainer)

    def _check_time_remaining(self, trainer: Any) -> None:
        # Every rank calls this at the same points, so the broadcast pairs up across ranks.
        should_stop = self.time_elapsed() >= self._duration
        should_stop = trainer.strategy.broadcast(should_stop, src=0)
        trainer.should_stop = trainer.should_stop or should_stop
        if should_stop and self._verbose and trainer.is_global_zero:
            elapsed = timedelta(seconds=int(self.time_elapsed("train")))
            print(f"Time limit reached. Elapsed time is {elapsed}. Signaling Trainer to stop.")

    # ---- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"time_elapsed": {stage: self.time_elapsed(stage) for stage in _STAGES}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        time_elapsed = state_dict.get("time_elapsed", {})
        self._offset = time_elapsed.get("train", 0)


def _stage(stage: str) -> str:
    if stage not in _STAGES:
        # Lightning's RunningStage(stage) raises the same way.
        raise ValueError(f"'{stage}' is not a valid RunningStage; use one of {list(_STAGES)}")
    return stage
