"""TQDMProgressBar and RichProgressBar: Lightning's progress bar callbacks, as settings of
the bar the driver draws (``driver.display``) while rank 0 reports its position.

They run no hooks on the ranks. ``refresh_rate`` is in batches: the bar shows every
``refresh_rate``-th batch (and the epoch's last), and ``refresh_rate=0`` turns it off, as
in Lightning. ``leave=True`` keeps each finished epoch's bar on the terminal; by default one
bar is reused from epoch to epoch. ``RichProgressBar`` takes Lightning's theme, whose
``metrics_format`` and ``metrics_text_delimiter`` format the metrics; raylight draws both
bars with tqdm, so ``rich`` need not be installed and the theme's styles are kept only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raylight.callbacks.callback import Callback


class ProgressBar(Callback):
    """The base of the progress bar callbacks (Lightning's ``ProgressBar``)."""

    def __init__(self) -> None:
        self._refresh_rate = 1
        self._enabled = True
        self._leave = False

    @property
    def refresh_rate(self) -> int:
        return self._refresh_rate

    @property
    def leave(self) -> bool:
        return self._leave

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.refresh_rate > 0

    @property
    def is_disabled(self) -> bool:
        return not self.is_enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _format_metrics(self, metrics: dict[str, float]) -> str:
        return " ".join(f"{name}={value:.4g}" for name, value in sorted(metrics.items()))

    @property
    def _position(self) -> int:
        return 0


class TQDMProgressBar(ProgressBar):
    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False):
        super().__init__()
        self._refresh_rate = refresh_rate
        self._process_position = process_position
        self._leave = leave

    @property
    def process_position(self) -> int:
        return self._process_position

    @property
    def _position(self) -> int:
        return 2 * self._process_position  # Lightning's offset: two lines per process


@dataclass
class RichProgressBarTheme:
    """Lightning's styles for the rich bar's parts, and how its metrics are formatted."""

    description: Any = ""
    progress_bar: Any = "#6206E0"
    progress_bar_finished: Any = "#6206E0"
    progress_bar_pulse: Any = "#6206E0"
    batch_progress: Any = ""
    time: Any = "dim"
    processing_speed: Any = "dim underline"
    metrics: Any = "italic"
    metrics_text_delimiter: str = " "
    metrics_format: str = ".3f"


class RichProgressBar(ProgressBar):
    def __init__(
        self,
        refresh_rate: int = 100,
        leave: bool = False,
        theme: RichProgressBarTheme | None = None,
        console_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self._refresh_rate = refresh_rate
        self._leave = leave
        self.theme = theme if theme is not None else RichProgressBarTheme()
        self._console_kwargs = console_kwargs or {}

    def _format_metrics(self, metrics: dict[str, float]) -> str:
        theme = self.theme
        return theme.metrics_text_delimiter.join(
            f"{name}: {value:{theme.metrics_format}}" for name, value in sorted(metrics.items())
        )
