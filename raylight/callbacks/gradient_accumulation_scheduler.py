"""GradientAccumulationScheduler: change how many batches accumulate into one optimizer step,
by epoch: ``GradientAccumulationScheduler(scheduling={4: 2})`` accumulates 2 batches from
the fifth epoch (epochs count from 0). As in Lightning, the epoch's last batch always steps.

The factor lives in the rank's own copy of the run's configuration, which the training
loop reads at every batch; every rank sets it at the same epoch start. A resumed fit sets
the factor of the epoch it resumes in at ``on_train_start``, because a mid-epoch resume
does not run that epoch's ``on_train_epoch_start`` again.
"""

from __future__ import annotations

from typing import Any

from raylight.callbacks.callback import Callback
from raylight.module import LightningModule
from raylight.rank.hooks import overrides
from raylight.shared.config import MisconfigurationException
from raylight.utilities.rank_zero import rank_zero_warn


class GradientAccumulationScheduler(Callback):
    def __init__(self, scheduling: dict[int, int]) -> None:
        if not scheduling:
            raise TypeError("Empty dict cannot be interpreted correct")
        if any(not isinstance(key, int) or key < 0 for key in scheduling):
            raise MisconfigurationException(
                f"Epoch should be an int greater than or equal to 0. Got {list(scheduling.keys())}."
            )
        if any(not isinstance(value, int) or value < 1 for value in scheduling.values()):
            raise MisconfigurationException(
                "Accumulation factor should be an int greater than 0. "
                f"Got {list(scheduling.values())}."
            )
        if min(scheduling) != 0:  # no factor given for the first epochs: 1, as Lightning
            scheduling.update({0: 1})
        self.scheduling = scheduling
        self.epochs = sorted(scheduling)

    def going_to_accumulate_grad_batches(self) -> bool:
        return any(value > 1 for value in self.scheduling.values())

    def get_accumulate_grad_batches(self, epoch: int) -> int:
        for first_epoch in reversed(self.epochs):
            if epoch >= first_epoch:
                return self.scheduling[first_epoch]
        return 1

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "Automatic gradient accumulation and the `GradientAccumulationScheduler` is not "
                "supported for manual optimization. Please remove the callback or switch to "
                "automatic optimization."
            )
        overridden = overrides(pl_module, LightningModule, "optimizer_step") or overrides(
            pl_module, LightningModule, "optimizer_zero_grad"
        )
        if overridden and self.going_to_accumulate_grad_batches():
            rank_zero_warn(
                "When using `Trainer(accumulate_grad_batches != 1)` and overriding "
                "`LightningModule.optimizer_{step,zero_grad}`, the hooks will not be called on "
                "every batch (rather, they are called on every optimization step)."
            )
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "You have set `accumulate_grad_batches` and are using the "
                "`GradientAccumulationScheduler` callback. Either remove `accumulate_grad_batches` "
                "from the Trainer or remove the callback."
            )
        trainer.config.accumulate_grad_batches = self.get_accumulate_grad_batches(
            trainer.current_epoch
        )

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        trainer.config.accumulate_grad_batches = self.get_accumulate_grad_batches(
            trainer.current_epoch
        )
