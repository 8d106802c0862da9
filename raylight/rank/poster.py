"""Rank 0's side of the driver's progress bar: it posts its position to the run's board
(``shared.board.RunBoard``) a few times a second, without waiting for an answer. The other ranks
post nothing, and no collective is involved. The driver's side is ``driver.display``.
"""

from __future__ import annotations

import time
from typing import Any

POSTS_PER_SECOND = 5.0


class Poster:
    """Rank 0's side: posts at most ``POSTS_PER_SECOND`` times a second."""

    def __init__(self, board: Any) -> None:
        self._board = board
        self._last = 0.0
        self._samples = 0
        self._epoch_started = time.monotonic()

    def start_epoch(self) -> None:
        self._samples, self._epoch_started = 0, time.monotonic()

    def after_batch(self, trainer: Any, batch: Any, batch_idx: int) -> None:
        self._samples += _batch_size(batch) * trainer.world_size
        now = time.monotonic()
        if now - self._last < 1.0 / POSTS_PER_SECOND:
            return
        metrics = {k: float(v) for k, v in trainer.progress_bar_metrics.items()}
        self._last = now
        elapsed = max(now - self._epoch_started, 1e-9)
        self._board.post.remote(
            {
                "epoch": trainer.current_epoch,
                "batch": batch_idx + 1,
                "total": trainer.num_training_batches,
                "step": trainer.global_step,
                "samples_per_s": self._samples / elapsed,
                "metrics": metrics,
            }
        )


def _batch_size(batch: Any) -> int:
    """The length of the batch's first tensor (Lightning's rule for the batch size)."""
    if hasattr(batch, "shape") and len(batch.shape) > 0:
        return int(batch.shape[0])
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, list | tuple):
        for item in batch:
            size = _batch_size(item)
            if size:
                return size
    return 0
