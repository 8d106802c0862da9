"""DeviceStatsMonitor: log device statistics at each train, validation and test batch's
start and end, under Lightning's keys ``DeviceStatsMonitor.{hook}/{stat}``.

CPU: ``cpu_percent``, ``cpu_vm_percent`` and ``cpu_swap_percent`` from ``psutil`` (a Ray
dependency); CUDA: ``torch.cuda.memory_stats``. As in Lightning the rows go straight to the
loggers (not through ``self.log``), at the logger step and every ``log_every_n_steps``. They
are rank 0's statistics: on a rank, ``trainer.loggers`` are views whose calls rank 0 sends to
the driver's loggers, where they are written after the epoch.
"""

from __future__ import annotations

from typing import Any

import torch

from raylight.callbacks.callback import Callback
from raylight.shared.config import MisconfigurationException


def get_cpu_stats() -> dict[str, float]:
    import psutil

    return {
        "cpu_vm_percent": psutil.virtual_memory().percent,
        "cpu_percent": psutil.cpu_percent(),
        "cpu_swap_percent": psutil.swap_memory().percent,
    }


def get_device_stats(device: torch.device) -> dict[str, Any]:
    """Lightning's ``trainer.accelerator.get_device_stats(device)``."""
    if device.type == "cuda":
        return torch.cuda.memory_stats(device)
    return get_cpu_stats()


class DeviceStatsMonitor(Callback):
    def __init__(self, cpu_stats: bool | None = None) -> None:
        """``cpu_stats``: None logs CPU statistics only when training on CPU; True always;
        False never."""
        self._cpu_stats = cpu_stats
        self._global_step_at_batch_start = 0

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and not trainer.loggers:
            raise MisconfigurationException(
                "Cannot use `DeviceStatsMonitor` callback with `Trainer(logger=False)`."
            )

    def _get_and_log_device_stats(self, trainer: Any, key: str, batch_idx: int) -> None:
        if not _should_update_logs(trainer, batch_idx):
            return
        device = trainer.strategy.root_device
        if self._cpu_stats is False and device.type == "cpu":
            return
        stats = get_device_stats(device)
        if self._cpu_stats and device.type != "cpu":
            stats.update(get_cpu_stats())
        for logger in trainer.loggers:
            separator = getattr(logger, "group_separator", "/")
            prefix = f"{type(self).__qualname__}.{key}{separator}"
            logger.log_metrics(
                {prefix + name: value for name, value in stats.items()},
                step=self._logger_step(trainer),
            )

    def _logger_step(self, trainer: Any) -> int:
        """Lightning's ``_batches_that_stepped``: a validation in a fit logs at the step of
        the batch before it, which Lightning counts only after that validation (the ranks
        count it before)."""
        step = trainer._batches_that_stepped
        in_fit = trainer.validating and trainer._fitting and not trainer.sanity_checking
        if in_fit and trainer.global_step > self._global_step_at_batch_start:
            step -= 1
        return step

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self._global_step_at_batch_start = trainer.global_step
        self._get_and_log_device_stats(trainer, "on_train_batch_start", batch_idx)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._get_and_log_device_stats(trainer, "on_train_batch_end", batch_idx)

    def on_validation_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._get_and_log_device_stats(trainer, "on_validation_batch_start", batch_idx)

    def on_validation_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._get_and_log_device_stats(trainer, "on_validation_batch_end", batch_idx)

    def on_test_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._get_and_log_device_stats(trainer, "on_test_batch_start", batch_idx)

    def on_test_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._get_and_log_device_stats(trainer, "on_test_batch_end", batch_idx)


def _should_update_logs(trainer: Any, batch_idx: int) -> bool:
    """Lightning's rule: every ``log_every_n_steps`` logger steps in training (counting the
    step about to run), every ``log_every_n_steps`` batches in an evaluation run."""
    every = trainer.log_every_n_steps
    if every == 0:
        return False
    step = trainer._batches_that_stepped + 1 if trainer.training else batch_idx + 1
    return step % every == 0 or trainer.should_stop
