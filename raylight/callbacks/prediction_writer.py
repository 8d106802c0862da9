"""BasePredictionWriter: write predictions from every rank as ``predict`` makes them.

Subclass it and override ``write_on_batch_end`` and/or ``write_on_epoch_end``; both run on
every rank with that rank's predictions, as in Lightning. ``batch_indices`` are the
dataset indices of each batch on this rank: raylight's predict loaders give each rank one
contiguous, unpadded slice of the dataset, so the ranks' indices together cover every
sample exactly once (Lightning's DDP sampler pads with repeats).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from enum import Enum
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader

from raylight.callbacks.callback import Callback
from raylight.module import move_data_to_device
from raylight.shared.config import MisconfigurationException


class WriteInterval(str, Enum):
    BATCH = "batch"
    EPOCH = "epoch"
    BATCH_AND_EPOCH = "batch_and_epoch"

    @property
    def on_batch(self) -> bool:
        return self in (WriteInterval.BATCH, WriteInterval.BATCH_AND_EPOCH)

    @property
    def on_epoch(self) -> bool:
        return self in (WriteInterval.EPOCH, WriteInterval.BATCH_AND_EPOCH)


class BasePredictionWriter(Callback):
    def __init__(
        self, write_interval: Literal["batch", "epoch", "batch_and_epoch"] = "batch"
    ) -> None:
        if write_interval not in [i.value for i in WriteInterval]:
            raise MisconfigurationException(
                f"`write_interval` should be one of {[i.value for i in WriteInterval]}."
            )
        self.interval = WriteInterval(write_interval)
        # this predict run's outputs and batch indices per loader, for write_on_epoch_end
        self._predictions: list[list[Any]] = []
        self._epoch_batch_indices: list[list[list[int]]] = []

    def write_on_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Override with the logic to write a single batch."""
        raise NotImplementedError()

    def write_on_epoch_end(
        self,
        trainer: Any,
        pl_module: Any,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        """Override with the logic to write all batches."""
        raise NotImplementedError()

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        # Lightning wraps every predict loader's batch sampler to record the indices it
        # yields; the loaders are this rank's own copies, used only by this predict call.
        for loader in trainer.predict_dataloaders:
            _record_indices(loader)
        count = len(trainer.predict_dataloaders)
        self._predictions = [[] for _ in range(count)]
        self._epoch_batch_indices = [[] for _ in range(count)]

    def on_predict_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        batch_indices = _batch_indices(trainer.predict_dataloaders[dataloader_idx], batch_idx)
        if self.interval.on_epoch:
            self._predictions[dataloader_idx].append(
                move_data_to_device(outputs, torch.device("cpu"))
            )
            if batch_indices is not None:
                self._epoch_batch_indices[dataloader_idx].append(batch_indices)
        if self.interval.on_batch:
            self.write_on_batch_end(
                trainer, pl_module, outputs, batch_indices, batch, batch_idx, dataloader_idx
            )

    def on_predict_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self.interval.on_epoch:
            return
        # Lightning's trainer.predict_loop.predictions: one loader's list, else one per loader
        predictions = self._predictions[0] if len(self._predictions) == 1 else self._predictions
        self.write_on_epoch_end(trainer, pl_module, predictions, self._epoch_batch_indices)
        self._predictions, self._epoch_batch_indices = [], []


class _IndexRecorder:
    """A batch sampler that remembers the batches of indices it gave in this pass."""

    def __init__(self, batch_sampler: Any) -> None:
        self.batch_sampler = batch_sampler
        self.seen_batch_indices: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        self.seen_batch_indices = []
        for batch in self.batch_sampler:
            self.seen_batch_indices.append(list(batch))
            yield batch

    def __len__(self) -> int:
        return len(self.batch_sampler)


def _record_indices(loader: Any) -> None:
    if not isinstance(loader, DataLoader) or loader.batch_sampler is None:
        return  # no sampler to ask (an IterableDataset, batch_size=None): no indices
    if not isinstance(loader.batch_sampler, _IndexRecorder):
        # DataLoader refuses to set batch_sampler after __init__; its iterators read it anew
        object.__setattr__(loader, "batch_sampler", _IndexRecorder(loader.batch_sampler))


def _batch_indices(loader: Any, batch_idx: int) -> list[int] | None:
    recorder = getattr(loader, "batch_sampler", None)
    if not isinstance(recorder, _IndexRecorder) or batch_idx >= len(recorder.seen_batch_indices):
        return None
    return recorder.seen_batch_indices[batch_idx]
