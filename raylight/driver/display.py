"""Training progress on the driver: a live bar on a terminal, a plain line now and then
elsewhere (a log file, a CI job), nothing with ``enable_progress_bar=False``.

The driver reads the run's board (``shared.board.RunBoard``), where rank 0 posts its position
(``rank.poster``), while it waits for the epoch, and moves the bar.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

PLAIN_LINE_EVERY_S = 30.0  # without a terminal: one line this often, plus one per epoch


def _terminal_width(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0


def _describe(progress: dict[str, Any]) -> str:
    metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(progress["metrics"].items()))
    return f"step={progress['step']} {progress['samples_per_s']:.0f} samples/s {metrics}".rstrip()


class ProgressDisplay:
    """The driver's side: a tqdm bar on a terminal, plain lines otherwise."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        # A terminal that reports no size (a bare pseudo-terminal) would draw an empty bar.
        self.live = enabled and self.stream.isatty() and _terminal_width(self.stream) > 0
        self._bar: Any = None
        self._bar_epoch: int | None = None
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
            where = (
                f"{progress['batch']}/{total}"
                if total not in (-1, float("inf"))
                else progress["batch"]
            )
            self._print(f"Epoch {progress['epoch']}: batch {where} {_describe(progress)}")

    def _move_bar(self, progress: dict[str, Any]) -> None:
        from tqdm.auto import tqdm

        if self._bar is None or self._bar_epoch != progress["epoch"]:
            self.close()
            total = progress["total"]
            self._bar = tqdm(
                total=None if total in (-1, float("inf")) else int(total),
                desc=f"Epoch {progress['epoch']}",
                file=self.stream,
                dynamic_ncols=True,
                leave=True,
            )
            self._bar_epoch = progress["epoch"]
        self._bar.n = progress["batch"]
        self._bar.set_postfix_str(_describe(progress), refresh=False)
        self._bar.refresh()

    def end_epoch(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        metrics = " ".join(
            f"{k}={v:.4g}" for k, v in sorted(summary["progress_bar_metrics"].items())
        )
        if self._bar is not None and self._bar_epoch == summary["epoch"]:
            self._bar.n = self._bar.total or self._bar.n
            self._bar.set_postfix_str(f"step={summary['global_step']} {metrics}".rstrip())
            self.close()
            return
        self._print(f"Epoch {summary['epoch']}: step {summary['global_step']} {metrics}".rstrip())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._bar_epoch = None, None

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)
