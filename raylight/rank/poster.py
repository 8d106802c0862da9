"""Rank 0's side of the driver's progress bar and live logs: it posts its position, and the
metric rows logged since its last post, to the run's board (``shared.board.RunBoard``) a few
times a second, without waiting for an answer. The other ranks post nothing, and no
collective is involved. The driver's side is ``driver.display`` and ``TrainerFit.on_tick``.
"""

from __future__ import annotations

import time
from typing import Any

import ray

POSTS_PER_SECOND = 5.0
SETTLE_S = 5.0  # the most the epoch's end waits for the last post to reach the board


class Poster:
    """Rank 0's side: posts at most ``POSTS_PER_SECOND`` times a second."""

    def __init__(self, board: Any) -> None:
        self._board = board
        self._last = 0.0
        self._samples = 0
        self._epoch_started = time.monotonic()
        self._posted: Any = None  # the last post, until the board has it

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
        rows = list(trainer._log_rows)  # the driver logs them now, not at the epoch's end
        trainer._log_rows.clear()
        self._posted = self._board.post.remote(
            {
                "epoch": trainer.current_epoch,
                "batch": batch_idx + 1,
                "total": trainer.num_training_batches,
                "step": trainer.global_step,
                "samples_per_s": self._samples / elapsed,
                "metrics": metrics,
            },
            rows,
        )

    def settle(self) -> None:
        """Wait (boundedly) until the board has the last post: the driver reads the rows
        posted during the epoch before the epoch's own, which must not overtake them."""
        if self._posted is not None:
            ray.wait([self._posted], timeout=SETTLE_S)
            self._posted = None


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
