"""``configure_optimizers`` in all of Lightning's return forms, and the optimizer wrapper."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from raylight.shared.config import MisconfigurationException

_SCHEDULER_KEYS = {
    "scheduler",
    "interval",
    "frequency",
    "monitor",
    "strict",
    "name",
    "reduce_on_plateau",
}


@dataclass
class LRSchedulerConfig:
    scheduler: Any
    interval: str = "epoch"
    frequency: int = 1
    monitor: str | None = None
    strict: bool = True
    name: str | None = None
    reduce_on_plateau: bool = False


def _is_optimizer(obj: Any) -> bool:
    return isinstance(obj, torch.optim.Optimizer)


def _bad_return(output: Any) -> MisconfigurationException:
    return MisconfigurationException(
        f"configure_optimizers returned {type(output).__name__} ({output!r:.120}); expected "
        "an optimizer, a list of optimizers, a tuple ([optimizers], [schedulers]), a dict "
        "with an 'optimizer' key (and optionally 'lr_scheduler'), or a list of such dicts."
    )


def parse_optimizers(output: Any) -> tuple[list[Any], list[LRSchedulerConfig]]:
    """Turn any ``configure_optimizers`` return into (optimizers, scheduler configs)."""
    if output is None:
        return [], []
    if _is_optimizer(output):
        return [output], []
    if isinstance(output, Mapping):
        return _parse_dicts([output])
    if isinstance(output, Sequence) and not isinstance(output, str):
        items = list(output)
        if len(items) == 2 and isinstance(items[0], Sequence):
            optimizers = list(items[0])
            if not optimizers or not all(_is_optimizer(o) for o in optimizers):
                raise _bad_return(output)
            schedulers = items[1]
            if not isinstance(schedulers, Sequence):  # one scheduler or config, as Lightning allows
                schedulers = [schedulers]
            return optimizers, [_scheduler_config(s) for s in schedulers]
        if items and all(_is_optimizer(o) for o in items):
            return items, []
        if items and all(isinstance(o, Mapping) for o in items):
            return _parse_dicts(items)
    raise _bad_return(output)


def _parse_dicts(dicts: list[Mapping[str, Any]]) -> tuple[list[Any], list[LRSchedulerConfig]]:
    optimizers, schedulers = [], []
    for entry in dicts:
        if not _is_optimizer(entry.get("optimizer")):
            raise MisconfigurationException(
                f"configure_optimizers returned a dict without a valid 'optimizer': {dict(entry)!r:.200}"
            )
        optimizers.append(entry["optimizer"])
        if entry.get("lr_scheduler") is not None:
            schedulers.append(_scheduler_config(entry["lr_scheduler"], entry.get("monitor")))
    return optimizers, schedulers


def _scheduler_config(scheduler: Any, monitor: str | None = None) -> LRSchedulerConfig:
    """``monitor`` is the top-level key of Lightning's ``{"optimizer", "lr_scheduler", "monitor"}``."""
    if isinstance(scheduler, Mapping):
        unknown = set(scheduler) - _SCHEDULER_KEYS
        if unknown or "scheduler" not in scheduler:
            raise MisconfigurationException(
                f"lr_scheduler config {dict(scheduler)!r:.200} is invalid: it needs a "
                f"'scheduler' key and may have only {sorted(_SCHEDULER_KEYS)}."
            )
        config = LRSchedulerConfig(**scheduler)
    else:
        config = LRSchedulerConfig(scheduler=scheduler, monitor=monitor)
    if config.interval not in ("epoch", "step"):
        raise MisconfigurationException(
            f"lr_scheduler interval={config.interval!r}: use 'epoch' or 'step'."
        )
    plateau = isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    config.reduce_on_plateau = config.reduce_on_plateau or plateau
    if config.reduce_on_plateau and config.monitor is None:
        raise MisconfigurationException(
            "ReduceLROnPlateau needs a metric to monitor: return "
            "{'optimizer': opt, 'lr_scheduler': {'scheduler': sched, 'monitor': 'val_loss'}}."
        )
    return config


class LightningOptimizer:
    """What ``self.optimizers()`` returns: ``step`` runs the Lightning hooks around the real step.

    ``after_closure`` runs once the closure's backward is done (unscale, the
    ``on_before_optimizer_step`` hook, gradient clipping); ``run_step`` performs the
    optimizer step itself (through the AMP scaler when there is one).
    """

    def __init__(
        self,
        optimizer: Any,
        after_closure: Callable[[Any], None],
        run_step: Callable[[Any, Callable[[], Any]], Any],
        on_stepped: Callable[[], None],
    ) -> None:
        self.optimizer = optimizer
        self._after_closure = after_closure
        self._run_step = run_step
        self._on_stepped = on_stepped

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        def closure_then_hooks() -> Any:
            result = closure() if closure is not None else None
            self._after_closure(self)
            return result

        output = self._run_step(self.optimizer, closure_then_hooks, **kwargs)
        self._on_stepped()
        return output

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)
