"""The type names Lightning code annotates hooks with (``pytorch_lightning.utilities.types``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer
from torch.utils.data import DataLoader

STEP_OUTPUT = torch.Tensor | Mapping[str, Any] | None
TRAIN_DATALOADERS = Any  # a loader, or any collection of them
EVAL_DATALOADERS = DataLoader | Sequence[DataLoader] | Any
OptimizerLRScheduler = Optimizer | Sequence[Optimizer] | Mapping[str, Any] | Sequence[Any] | None

__all__ = ["EVAL_DATALOADERS", "STEP_OUTPUT", "TRAIN_DATALOADERS", "OptimizerLRScheduler"]
