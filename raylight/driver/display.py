"""Training progress on the driver: a live bar on a terminal, a plain line now and then
elsewhere (a log file, a CI job), nothing with ``enable_progress_bar=False`` or a progress
bar callback's ``refresh_rate=0``. A ``TQDMProgressBar`` or ``RichProgressBar`` in the
Trainer's callbacks sets how the bar moves (``callbacks.progress``).

The driver reads the run's board (``shared.board.RunBoard``), where rank 0 posts its position
(``rank.poster``), while it waits for the epoch, and moves the bar.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

from raylight.callbacks.progress import ProgressBar, TQDMProgressBar
from raylight.shared.config import MisconfigurationException

PLAIN_LINE_EVERY_S = 30.0  # without a terminal: one line this often, plus one per epoch


def _terminal_width(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0


def progress_bar_of(callbacks: list[Any], enable_progress_bar: bool) -> ProgressBar | None:
    """The progress bar callback among ``callbacks``, checked as Lightning checks it."""
    bars = [callback for callback in callbacks if isinstance(callback, ProgressBar)]
    if len(bars) > 1:
        raise MisconfigurationException(
            "You added multiple progress bar callbacks to the Trainer, but currently only one"
            " progress bar is supported."
        )
    if bars and not enable_progress_bar:
        raise MisconfigurationException(
            "Trainer was configured with `enable_progress_bar=False`"
            f" but found `{type(bars[0]).__name__}` in callbacks list."
        )
    return bars[0] if bars else None


class ProgressDisplay:
    """The driver's side: a tqdm bar on a terminal, plain lines otherwise. ``bar`` is the
    user's progress bar callback, whose settings it follows (Lightning's default bar's
    without one)."""

    def __init__(
        self, enabled: bool, stream: TextIO | None = None, bar: ProgressBar | None = None
    ) -> None:
        self.stream = stream or sys.stderr
        self.settings = bar if bar is not None else TQDMProgressBar()
        self._bar: Any = None
        self._bar_epoch: int | None = None
        self.start(enabled)

    def start(self, enabled: bool) -> None:
        """Ready for a new fit; ``enabled`` is the Trainer's ``enable_progress_bar``."""
        self.close()
        self.enabled = enabled and self.settings.is_enabled
        # A terminal that reports no size (a bare pseudo-terminal) would draw an empty bar.
        self.live = self.enabled and self.stream.isatty() and _terminal_width(self.stream) > 0
        self._last_plain = time.monotonic()

    def show(self, progress: dict[str, Any] | None) -> None:
        """Called several times a second while an epoch runs."""
        if not self.enabled or progress is None:
            return
        if self.live:
            self._move_bar(progress)
        elif time.monotonic() - self._last_plain >= PLAIN_LINE_EVERY_S:
            self._last_plain = time.monotonic()
            total = progress["total"]
            where = f"{progress['batch']}/{total}" if _known(total) else progress["batch"]
            self._print(f"Epoch {progress['epoch']}: batch {where} {self._describe(progress)}")

    def _describe(self, progress: dict[str, Any]) -> str:
        metrics = self.settings._format_metrics(progress["metrics"])
        return (
            f"step={progress['step']} {progress['samples_per_s']:.0f} samples/s {metrics}".rstrip()
        )

    def _move_bar(self, progress: dict[str, Any]) -> None:
        batch, total = progress["batch"], progress["total"]
        # Lightning's rule: the bar moves on every refresh_rate-th batch and the last one.
        shown = (
            batch
            if _known(total) and batch == total
            else batch - batch % self.settings.refresh_rate
        )
        if self._bar is None or self._bar_epoch != progress["epoch"]:
            self._open_bar(progress["epoch"], total)
        elif shown == self._bar.n:
            return
        self._bar.n = shown
        self._bar.set_postfix_str(self._describe(progress), refresh=False)
        self._bar.refresh()

    def _open_bar(self, epoch: int, total: int | float) -> None:
        """A new bar for ``epoch``, or, unless the settings leave each epoch's bar, the
        previous epoch's bar reset (Lightning's single training bar)."""
        if self._bar is None or self.settings.leave:
            from tqdm.auto import tqdm

            self.close()
            self._bar = tqdm(
                file=self.stream, dynamic_ncols=True, leave=True, position=self.settings._position
            )
        self._bar.set_description(f"Epoch {epoch}", refresh=False)
        self._bar.set_postfix_str("", refresh=False)
        self._bar.reset(total=int(total) if _known(total) else None)  # draws it
        self._bar_epoch = epoch

    def end_epoch(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        metrics = self.settings._format_metrics(summary["progress_bar_metrics"])
        if not self.live:
            self._print(
                f"Epoch {summary['epoch']}: step {summary['global_step']} {metrics}".rstrip()
            )
            return
        if self._bar is None or self._bar_epoch != summary["epoch"]:
            self._open_bar(summary["epoch"], summary["num_training_batches"])
        self._bar.n = self._bar.total or self._bar.n
        self._bar.set_postfix_str(f"step={summary['global_step']} {metrics}".rstrip())
        if self.settings.leave:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._bar_epoch = None, None

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


def _known(total: int | float) -> bool:
    return total not in (-1, float("inf"))
