"""LearningRateMonitor: log every optimizer's learning rate, with Lightning 2.x's names.

Keys are Lightning's: ``lr-SGD``, ``lr-SGD-1`` for a second SGD, ``lr-Adam/pg1`` and
``lr-Adam/pg2`` for parameter groups (or their ``name``), a scheduler config's ``name`` in
place of ``lr-<Optimizer>``, and ``<key>-momentum`` / ``<key>-weight_decay`` when asked.

It runs on every rank and records its values on each one (``lrs``, ``callback_metrics``);
rank 0 sends the rows to the driver's loggers, with the training rows, at Lightning's step
(the count of optimizer steps so far).
"""

from __future__ import annotations

import itertools
import warnings
from collections import defaultdict
from typing import Any

import torch

from raylight.callbacks.callback import Callback
from raylight.shared.config import MisconfigurationException

_INTERVALS = (None, "step", "epoch")


class LearningRateMonitor(Callback):
    """``logging_interval=None`` logs each scheduler at its own ``interval`` (optimizers
    without a scheduler at every logged step); ``"step"`` or ``"epoch"`` logs all of them
    at that interval. Step rows follow ``Trainer(log_every_n_steps=...)``."""

    def __init__(
        self,
        logging_interval: str | None = None,
        log_momentum: bool = False,
        log_weight_decay: bool = False,
    ) -> None:
        if logging_interval not in _INTERVALS:
            raise MisconfigurationException(
                "logging_interval should be `step` or `epoch` or `None`."
            )
        self.logging_interval = logging_interval
        self.log_momentum = log_momentum
        self.log_weight_decay = log_weight_decay
        self.lrs: dict[str, list[float]] = {}
        self.last_momentum_values: dict[str, float | None] = {}
        self.last_weight_decay_values: dict[str, float | None] = {}

    def _on_driver_fit_start(self, trainer: Any, model: Any) -> None:
        # Loggers live on the driver, so this is where Lightning's check can be made.
        if not trainer.loggers:
            raise MisconfigurationException(
                "Cannot use `LearningRateMonitor` callback with `Trainer` that has no logger."
            )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.log_momentum and _lacks("momentum", trainer) and _lacks("betas", trainer):
            if trainer.is_global_zero:
                warnings.warn(
                    "You have set log_momentum=True, but some optimizers do not have momentum. "
                    "This will log a value 0 for the momentum.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        names = [group for group, _, _ in self._named_optimizers(trainer)]
        flat = list(itertools.chain.from_iterable(names))
        self.lrs = {name: [] for name in flat}
        self.last_momentum_values = {f"{name}-momentum": None for name in flat}
        self.last_weight_decay_values = {f"{name}-weight_decay": None for name in flat}

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.logging_interval == "epoch" or not _should_update_logs(trainer):
            return
        self._log(trainer, "step" if self.logging_interval is None else "any")

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.logging_interval == "step":
            return
        self._log(trainer, "epoch" if self.logging_interval is None else "any")

    def _log(self, trainer: Any, interval: str) -> None:
        stats = self._extract_stats(trainer, interval)
        if stats and trainer.is_global_zero:
            # The driver writes rank 0's rows to its loggers, at Lightning's step.
            trainer._log_rows.append((trainer._batches_that_stepped, stats))

    def _extract_stats(self, trainer: Any, interval: str) -> dict[str, float]:
        stats: dict[str, float] = {}
        for names, optimizer, config in self._named_optimizers(trainer):
            # Optimizers without a scheduler are logged whatever the interval, as in Lightning.
            if config is not None and interval not in (config.interval, "any"):
                continue
            for name in names:
                self.lrs.setdefault(name, [])
            stats.update(self._optimizer_stats(optimizer, names))
        trainer.callback_metrics.update(
            {name: torch.tensor(value, device=trainer.device) for name, value in stats.items()}
        )
        return stats

    def _optimizer_stats(self, optimizer: Any, names: list[str]) -> dict[str, float]:
        stats: dict[str, float] = {}
        use_betas = "betas" in optimizer.defaults
        for group, name in zip(optimizer.param_groups, names, strict=False):
            stats[name] = group["lr"]
            self.lrs[name].append(group["lr"])
            if self.log_momentum:
                momentum = group["betas"][0] if use_betas else group.get("momentum", 0)
                stats[f"{name}-momentum"] = self.last_momentum_values[f"{name}-momentum"] = momentum
            if self.log_weight_decay:
                decay = group["weight_decay"]
                stats[f"{name}-weight_decay"] = decay
                self.last_weight_decay_values[f"{name}-weight_decay"] = decay
        return stats

    def _named_optimizers(self, trainer: Any) -> list[tuple[list[str], Any, Any]]:
        """(names of each parameter group, optimizer, scheduler config or None): scheduled
        optimizers first, in the schedulers' order, then the others, as Lightning names them."""
        seen: list[Any] = []
        seen_types: defaultdict[type, int] = defaultdict(int)
        named = []
        for config in trainer.lr_scheduler_configs:
            optimizer = config.scheduler.optimizer
            name = config.name if config.name is not None else f"lr-{type(optimizer).__name__}"
            names = _group_names(optimizer, name, seen, seen_types, config.name)
            named.append((names, optimizer, config))
        for optimizer in trainer.optimizers:
            if any(optimizer is other for other in seen):
                continue
            name = f"lr-{type(optimizer).__name__}"
            named.append((_group_names(optimizer, name, seen, seen_types, None), optimizer, None))
        return named


def _group_names(
    optimizer: Any,
    name: str,
    seen: list[Any],
    seen_types: defaultdict[type, int],
    scheduler_name: str | None,
) -> list[str]:
    """``lr-Adam``, ``lr-Adam-1`` for a second Adam, ``/pgN`` (or the group's ``name``) per
    parameter group when there are several."""
    seen.append(optimizer)
    optimizer_type = type(optimizer)
    if scheduler_name is None:
        seen_types[optimizer_type] += 1
    groups = optimizer.param_groups
    group_names = [g.get("name", f"pg{i}") for i, g in enumerate(groups, start=1)]
    duplicates = {n for n in group_names if group_names.count(n) > 1}
    if duplicates:
        raise MisconfigurationException(
            "A single `Optimizer` cannot have multiple parameter groups with identical "
            f"`name` values. {name} has duplicated parameter group names {duplicates}"
        )
    count = seen_types.get(optimizer_type, 0)
    if count > 1:
        name = f"{name}-{count - 1}"
    if len(groups) > 1:
        return [f"{name}/{g.get('name', f'pg{i}')}" for i, g in enumerate(groups, start=1)]
    group_name = groups[0].get("name")
    return [f"{name}/{group_name}" if group_name else name]


def _lacks(key: str, trainer: Any) -> bool:
    if trainer.lr_scheduler_configs:
        return any(
            key not in config.scheduler.optimizer.defaults
            for config in trainer.lr_scheduler_configs
        )
    return any(key not in optimizer.defaults for optimizer in trainer.optimizers)


def _should_update_logs(trainer: Any) -> bool:
    """Lightning's rule: a step row is due when the coming optimizer step is a logging one."""
    every = trainer.log_every_n_steps
    if every == 0:
        return False
    return (trainer._batches_that_stepped + 1) % every == 0 or trainer.should_stop
