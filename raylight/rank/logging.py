"""``self.log`` results on one rank: step values, epoch aggregation, ``sync_dist``.

Lightning's rules, kept here in one place:
- the hook decides the ``on_step`` / ``on_epoch`` defaults (``_DEFAULTS``);
- an epoch value is the batch-size-weighted mean (or sum / max / min per ``reduce_fx``);
- with both ``on_step`` and ``on_epoch``, loggers see ``name_step`` and ``name_epoch``
  and ``callback_metrics`` holds all three keys;
- ``sync_dist`` reduces across ranks: at log time for step values, at epoch end for
  epoch values (a mean becomes the global weighted mean);
- a ``torchmetrics.Metric`` logs its ``forward`` value of the batch as the step value and
  ``compute()`` (which syncs its states across ranks itself) as the epoch value; the loop
  resets it once its epoch is over (``reset_metrics``).
Values stay tensors on their device until the driver needs floats, so logging adds no
host synchronisation to the per-batch path.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

# hook -> (default on_step, default on_epoch); a hook missing here may not log.
_STEP = (True, False)
_EPOCH = (False, True)
_DEFAULTS: dict[str, tuple[bool, bool]] = {
    **dict.fromkeys(
        [
            "training_step",
            "on_train_batch_start",
            "on_train_batch_end",
            "on_before_backward",
            "on_after_backward",
            "on_before_optimizer_step",
            "on_before_zero_grad",
            "optimizer_step",
            "optimizer_zero_grad",
            "backward",
            "configure_gradient_clipping",
        ],
        _STEP,
    ),
    **dict.fromkeys(
        [
            "on_train_start",
            "on_train_epoch_start",
            "on_train_epoch_end",
            "on_validation_start",
            "on_validation_epoch_start",
            "on_validation_epoch_end",
            "on_validation_batch_start",
            "on_validation_batch_end",
            "validation_step",
            "on_test_start",
            "on_test_epoch_start",
            "on_test_epoch_end",
            "on_test_batch_start",
            "on_test_batch_end",
            "test_step",
        ],
        _EPOCH,
    ),
}
_REDUCE_FX = {"mean", "sum", "max", "min"}


def extract_batch_size(batch: Any) -> int:
    """The size of the first tensor's leading dimension in a (nested) batch; 1 if none."""
    size = _first_tensor_size(batch)
    return 1 if size is None else size


def _first_tensor_size(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return 1 if batch.ndim == 0 else len(batch)
    if isinstance(batch, str):
        return None
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, list | tuple):
        for item in batch:
            size = _first_tensor_size(item)
            if size is not None:
                return size
    return None


@dataclass
class _Entry:
    name: str
    on_step: bool
    on_epoch: bool
    reduce_fx: str
    sync_dist: bool
    prog_bar: bool
    logger: bool
    step_value: torch.Tensor | None = None
    total: torch.Tensor | None = None  # weighted sum for "mean", running value otherwise
    weight: float = 0.0
    metric: Any = None  # a logged torchmetrics.Metric: it keeps its own epoch state
    computed: torch.Tensor | None = None  # its compute(), until it is logged again

    @property
    def forked(self) -> bool:
        return self.on_step and self.on_epoch


class MetricLog:
    """All ``self.log`` results of one loop (a training epoch, or one evaluation run)."""

    def __init__(
        self,
        all_reduce: Callable[[torch.Tensor, str], torch.Tensor],
        device: torch.device | None = None,
    ) -> None:
        self._all_reduce = all_reduce
        self.device = device
        self._entries: dict[str, _Entry] = {}
        self.batch: Any = None  # the current batch, for batch-size inference
        self.dataloader_idx: int | None = None  # set when there are several eval loaders

    def reset(self) -> None:
        self._entries.clear()

    def log(  # noqa: C901 - one check per Lightning rule, in order
        self,
        fx: str | None,
        name: str,
        value: Any,
        *,
        prog_bar: bool,
        logger: bool,
        on_step: bool | None,
        on_epoch: bool | None,
        reduce_fx: Any,
        sync_dist: bool,
        add_dataloader_idx: bool,
        batch_size: int | None,
    ) -> None:
        if fx not in _DEFAULTS:
            raise ValueError(
                f"You can't `self.log({name!r}, ...)` inside `{fx}`: logging is supported in "
                "the step methods and the train/validation/test hooks."
            )
        default_step, default_epoch = _DEFAULTS[fx]
        on_step = default_step if on_step is None else on_step
        on_epoch = default_epoch if on_epoch is None else on_epoch
        reduce_fx = _reduce_name(reduce_fx)
        metric = value if _is_metric(value) else None
        if metric is None:
            value = _to_scalar_tensor(name, value, self.device)
        if add_dataloader_idx and self.dataloader_idx is not None:
            name = f"{name}/dataloader_idx_{self.dataloader_idx}"

        entry = self._entries.get(name)
        if entry is None:
            entry = _Entry(name, on_step, on_epoch, reduce_fx, sync_dist, prog_bar, logger)
            self._entries[name] = entry
        if metric is not None:
            self._log_metric(entry, metric)
            return
        if on_step:
            step_value = value
            if sync_dist:
                step_value = self._all_reduce(value.clone(), reduce_fx)
            entry.step_value = step_value
        if on_epoch:
            if reduce_fx == "mean":
                weight = batch_size if batch_size is not None else extract_batch_size(self.batch)
                weighted = value * weight
                entry.total = weighted if entry.total is None else entry.total + weighted
                entry.weight += weight
            elif entry.total is None:
                entry.total = value
            elif reduce_fx == "sum":
                entry.total = entry.total + value
            else:
                entry.total = (
                    torch.maximum(entry.total, value)
                    if reduce_fx == "max"
                    else (torch.minimum(entry.total, value))
                )

    @staticmethod
    def _log_metric(entry: _Entry, metric: Any) -> None:
        """Lightning's rules for a Metric: the step value is its latest ``forward`` result,
        the epoch value its ``compute()``; ``sync_dist`` and ``reduce_fx`` do not apply."""
        entry.metric, entry.computed = metric, None
        if entry.on_step:
            cache = metric._forward_cache  # None when only update() was called
            if cache is not None:
                entry.step_value = _metric_scalar(entry.name, cache, "forward")

    def reset_metrics(self) -> None:
        """Reset the Metric objects logged in this loop, as Lightning does once the loop's
        epoch values are out."""
        for entry in self._entries.values():
            if entry.metric is not None:
                entry.metric.reset()
                entry.computed = None

    def clear_step_values(self) -> None:
        for entry in self._entries.values():
            entry.step_value = None

    def step_metrics(
        self,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(callback, logger, progress bar) metrics of the latest step."""
        callback, logged, bar = {}, {}, {}
        for entry in self._entries.values():
            if not entry.on_step or entry.step_value is None:
                continue
            key = f"{entry.name}_step" if entry.forked else entry.name
            callback[entry.name] = callback[key] = entry.step_value
            if entry.logger:
                logged[key] = entry.step_value
            if entry.prog_bar:
                bar[key] = entry.step_value
        return callback, logged, bar

    def epoch_metrics(
        self,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(callback, logger, progress bar) metrics at the end of the loop.

        With ``sync_dist`` or a Metric every rank must reach this point: it runs collectives.
        """
        callback, logged, bar = {}, {}, {}
        for entry in self._entries.values():
            if not entry.on_epoch or (entry.total is None and entry.metric is None):
                continue
            value = self._epoch_value(entry)
            key = f"{entry.name}_epoch" if entry.forked else entry.name
            callback[entry.name] = callback[key] = value
            if entry.logger:
                logged[key] = value
            if entry.prog_bar:
                bar[key] = value
        return callback, logged, bar

    def _epoch_value(self, entry: _Entry) -> torch.Tensor:
        if entry.metric is not None:
            # Cached: the epoch's metrics are read twice around on_train_epoch_end, and each
            # compute() is a collective that every rank must run equally often.
            if entry.computed is None:
                entry.computed = _metric_scalar(entry.name, entry.metric.compute(), "compute")
            return entry.computed
        if entry.reduce_fx != "mean":
            total = entry.total.clone()
            return self._all_reduce(total, entry.reduce_fx) if entry.sync_dist else total
        total = entry.total.double()
        weight = torch.tensor(entry.weight, dtype=torch.float64, device=total.device)
        if entry.sync_dist:
            total = self._all_reduce(total, "sum")
            weight = self._all_reduce(weight, "sum")
        return (total / weight).to(entry.total.dtype)


def _reduce_name(reduce_fx: Any) -> str:
    names = {torch.mean: "mean", torch.sum: "sum", torch.max: "max", torch.min: "min"}
    name = names.get(reduce_fx, reduce_fx)
    if name not in _REDUCE_FX:
        raise ValueError(
            f"reduce_fx={reduce_fx!r} is not supported: use one of {sorted(_REDUCE_FX)}."
        )
    return name


def _to_scalar_tensor(name: str, value: Any, device: torch.device | None = None) -> torch.Tensor:
    if isinstance(value, bool | int | float):  # on the rank's device: NCCL reduces only there
        return torch.tensor(float(value), device=device)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"`self.log({name!r}, value)` got a tensor of shape {tuple(value.shape)}: "
                "log scalars only (e.g. `value.mean()`)."
            )
        value = value.detach().reshape(())
        return value if value.is_floating_point() else value.float()
    raise ValueError(
        f"`self.log({name!r}, value)` got a {type(value).__name__}: log a number, a "
        "one-element tensor or a torchmetrics.Metric."
    )


def _is_metric(value: Any) -> bool:
    # A Metric exists only once torchmetrics is imported: no import needed to recognise one.
    torchmetrics = sys.modules.get("torchmetrics")
    return torchmetrics is not None and isinstance(value, torchmetrics.Metric)


def _metric_scalar(name: str, value: Any, method: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ValueError(
            f"The `.{method}()` return of the metric logged as {name!r} must be a one-element "
            f"tensor, got {value!r:.80}: log a metric that reduces to a scalar (e.g. "
            "average='micro' or 'macro'), or log its values one by one."
        )
    return _to_scalar_tensor(name, value).clone()  # a state tensor may change in place later


def to_floats(metrics: Mapping[str, torch.Tensor]) -> dict[str, float]:
    return {name: float(value) for name, value in metrics.items()}
