"""One ``Trainer.fit`` on the driver: the run that ``controller.FitController`` drives.

``TrainerFit`` is the controller's ``FitRun``: it starts worker groups through the Trainer,
carries each epoch's results to the Trainer's state, its loggers, its progress bar and Ray
Tune, and knows where the run's checkpoints are. ``run_fit`` sets a fit up (a run id, Ray,
Tune's checkpoint, the signal handlers) and hands it to the controller.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import ray

from raylight.driver.controller import FitController, FitGroup, State
from raylight.shared import checkpoint_index, storage


def in_tune_trial() -> bool:
    if "ray.tune" not in sys.modules:  # a trial's process has imported Tune long before
        return False
    from raylight import tune  # imports Ray Tune: only once a trial is likely

    return tune.in_trial()


def run_fit(
    trainer: Any, model: Any, datamodule: Any, loaders: dict[str, Any], ckpt_path: str | None
) -> dict[str, Any]:
    """Rank 0's final state after the fit; ``SystemExit`` after a stop signal, once the
    ranks saved a checkpoint to resume from."""
    trainer.config.run_id = uuid.uuid4().hex  # tags this fit's entries in the checkpoint index
    trainer._connect()  # before our signal handlers: ray.init installs its own
    fit = TrainerFit(trainer, model, datamodule, loaders)
    given: contextlib.AbstractContextManager[str | None] = contextlib.nullcontext(ckpt_path)
    if fit.in_tune and ckpt_path is None:
        from raylight import tune

        # PBT's exploit, or a restarted trial: held under default_root_dir during the fit.
        given = tune.checkpoint_from_tune(trainer.config.default_root_dir)
    trainer._display.start(trainer.enable_progress_bar)
    with given as ckpt_path, stop_on_signals(fit.on_signal), contextlib.closing(trainer._display):
        controller = FitController(
            fit, ckpt_path, trainer.max_failures, trainer.elastic_check_interval
        )
        final = controller.run()
    if controller.state is State.STOPPED:
        print(
            f"{signal.Signals(fit.signal).name}: saved {storage.redact(controller.stopped_at)} "
            f'at global step {trainer.global_step}; resume with trainer.fit(..., ckpt_path="last").',
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(1)  # as Lightning after a graceful shutdown
    assert final is not None
    return final


@contextlib.contextmanager
def stop_on_signals(on_signal: Callable[[int], None]) -> Iterator[None]:
    """SIGINT and SIGTERM call ``on_signal`` while the fit runs (in the main thread only:
    signal handlers belong to it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        sig: signal.signal(sig, lambda signum, frame: on_signal(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


ROWS_EVERY_S = 1.0  # how often the driver writes the rows rank 0 posted during an epoch


class TrainerFit:
    """A fit's driver side, as ``controller.FitRun`` describes it."""

    def __init__(self, trainer: Any, model: Any, datamodule: Any, loaders: dict[str, Any]) -> None:
        self.trainer = trainer
        self.model, self.datamodule, self.loaders = model, datamodule, loaders
        self.config = trainer.config
        self.sanity_check = self.config.num_sanity_val_steps != 0
        self.elastic = trainer.scaling.elastic
        self.in_tune = trainer._in_tune = in_tune_trial()
        self.signal: int | None = None  # the signal that asked this fit to stop
        self._tune_checkpoint_time = 0.0  # the commit time of the newest checkpoint Tune has
        self._rows_due = 0.0  # when on_tick next writes the rows rank 0 posted

    # ---- the group -----------------------------------------------------------------------------
    def start_group(self, resume: str | None, size: int) -> FitGroup:
        self.trainer._expected_size = size
        return self.trainer._prepare(self.model, self.datamodule, "fit", self.loaders, resume)

    def stop_group(self, force: bool) -> None:
        self.trainer._log_posted_rows()  # before the board goes with the group
        self.trainer.shutdown(force=force)

    def on_signal(self, signum: int) -> None:
        """The first SIGINT/SIGTERM asks the ranks to stop at an agreed batch and save a
        checkpoint; a second one (or one before the ranks run) stops at once."""
        board = self.trainer._board
        if self.signal is not None or board is None:
            raise KeyboardInterrupt
        self.signal = signum
        board.set.remote()
        print(
            f"{signal.Signals(signum).name}: stopping at the next agreed batch and saving "
            "a checkpoint (signal again to stop at once).",
            file=sys.stderr,
            flush=True,
        )

    def signalled(self) -> bool:
        return self.signal is not None

    # ---- results -------------------------------------------------------------------------------
    def absorb(self, summary: dict[str, Any]) -> None:
        self.trainer._absorb(summary)

    def end_epoch(self, summary: dict[str, Any], epochs_done: int) -> None:
        self.trainer._display.end_epoch(summary)
        if self.in_tune:
            self._report_to_tune(summary)
        self.trainer.current_epoch = epochs_done  # Lightning counts completed epochs

    def fit_done(self, epochs_done: int) -> bool:
        trainer, config = self.trainer, self.config
        if config.max_steps != -1 and trainer.global_step >= config.max_steps:
            return True
        if epochs_done >= config.max_epochs or trainer._num_training_batches == 0:
            return True  # Lightning skips fit when there is nothing to train on
        return trainer.should_stop and epochs_done >= config.min_epochs

    def on_tick(self) -> None:
        """Move the progress bar to rank 0's latest post on the board; about once a second,
        write the metric rows posted since, so the loggers follow the epoch as it runs."""
        board, display = self.trainer._board, self.trainer._display
        if board is None:
            return
        now = time.monotonic()
        if now >= self._rows_due:
            self._rows_due = now + ROWS_EVERY_S
            self.trainer._log_posted_rows()
        if not display.enabled:
            return
        try:
            latest = ray.get(board.latest.remote(), timeout=2)
        except ray.exceptions.GetTimeoutError:
            return  # the bar waits for the next tick
        display.show(latest)

    def forget_rows_from(self, step: int) -> None:
        """Rows the resumed run logs again."""
        for logger in self.trainer.loggers:
            if hasattr(logger, "drop_rows_from"):
                logger.drop_rows_from(step)

    def _report_to_tune(self, summary: dict[str, Any]) -> None:
        """One report per validation run of the epoch, in order (per epoch end in a fit
        without validation): the metrics logged by then, ``epoch`` and ``step``, and the
        newest checkpoint committed by then if Tune has not had it or a newer one yet
        (schedulers such as PBT restore trials from it)."""
        from raylight import tune

        points = summary["validations"]
        if not points and not summary["validation_enabled"]:
            points = [summary]
        if points and self.trainer._group is not None and self.trainer._group.actors:
            self.trainer._group.flush_checkpoints()  # so that the index names them
        root = self.config.default_root_dir
        for point in points:
            metrics = {**point["callback_metrics"], "epoch": point["epoch"]}
            metrics["step"] = point["global_step"]
            entry = checkpoint_index.latest_of_run(root, self.config.run_id, point["global_step"])
            fresh = entry is not None and entry["time"] > self._tune_checkpoint_time
            if fresh:
                self._tune_checkpoint_time = entry["time"]
            tune.report(metrics, entry["path"] if fresh else None, root)

    # ---- the run's checkpoints -----------------------------------------------------------------
    def resize_checkpoint(self, epochs_done: int) -> str:
        return storage.join(
            self.config.default_root_dir, "recovery", f"resize-epoch={epochs_done}.ckpt"
        )

    def commit_checkpoint(self, path: str) -> None:
        """Record a checkpoint the ranks wrote at the Trainer's position in the run's index."""
        entry = checkpoint_index.index_entry(
            path,
            epoch=self.trainer.current_epoch,
            global_step=self.trainer.global_step,
            run_id=self.config.run_id,
        )
        checkpoint_index.update_index(self.config.default_root_dir, entry, [])

    def recovery_point(self) -> tuple[str | None, int] | None:
        """The latest full checkpoint this fit committed, with its global step."""
        entry = checkpoint_index.latest_of_run(self.config.default_root_dir, self.config.run_id)
        return (entry["path"], entry["global_step"]) if entry is not None else None
