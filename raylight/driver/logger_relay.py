"""The driver's half of ``self.logger`` on the ranks (``rank.logger_view`` is the other).

``describe`` is what each rank needs to build its view of a driver logger; ``replay`` runs
the calls rank 0 recorded (``self.logger.experiment.add_image(...)``, ``self.logger.
log_metrics(...)``) on the real logger, which owns the run folder, storage URI included.
"""

from __future__ import annotations

import inspect
import pickle
import warnings
from typing import Any

import cloudpickle

from raylight.shared.config import MisconfigurationException

_RESOLVED = ("name", "version", "save_dir", "log_dir", "root_dir", "sub_dir")


def describe(loggers: list[Any]) -> list[dict[str, Any]]:
    """Each logger's class, its resolved folders and the methods a rank may call.

    Reading ``version`` here fixes it (a new ``version_N`` is chosen once, on the driver);
    the ranks never list the log folder themselves.
    """
    return [_describe(logger) for logger in loggers]


def _describe(logger: Any) -> dict[str, Any]:
    cls = type(logger)
    resolved = {}
    for attribute in _RESOLVED:
        if isinstance(inspect.getattr_static(cls, attribute, None), property):
            resolved[attribute] = getattr(logger, attribute)
    experiment_cls = _experiment_class(logger)
    return {
        "cls": cls,
        "resolved": resolved,
        "state": _picklable_state(logger),
        "methods": _public_methods(cls),
        "experiment": {
            "methods": None if experiment_cls is None else _public_methods(experiment_cls),
            "attributes": {"log_dir": resolved["log_dir"]} if "log_dir" in resolved else {},
        },
    }


def _experiment_class(logger: Any) -> type | None:
    """The experiment's class without creating one (creating a SummaryWriter opens a file)."""
    find = getattr(logger, "_experiment_class", None)
    if callable(find):
        return find()
    if not hasattr(type(logger), "experiment"):
        return type("NoExperiment", (), {})  # a logger without one: every call is refused
    return None


def _public_methods(cls: type) -> list[str]:
    return [
        name
        for name, member in inspect.getmembers(cls)
        if not name.startswith("_") and inspect.isfunction(member)
    ]


def _picklable_state(logger: Any) -> dict[str, Any]:
    """The logger's attributes that pickle (a live run or writer stays on the driver)."""
    state = logger.__getstate__()
    kept = {}
    for key, value in dict(state or {}).items():
        try:
            cloudpickle.dumps(value)
        except (pickle.PicklingError, TypeError, AttributeError, RuntimeError):
            continue
        kept[key] = value
    return kept


def hyperparameters(model: Any, datamodule: Any) -> dict[str, Any]:
    """What a fit logs as hyperparameters, by Lightning's rule: the module's and the
    datamodule's initial ones (each unless saved with ``logger=False``), merged; a key both
    hold with different values is an error."""
    logged = dict(model.hparams_initial) if model._log_hyperparams else {}
    if datamodule is None or not getattr(datamodule, "_log_hyperparams", False):
        return logged
    extra = dict(datamodule.hparams_initial)
    clashing = sorted(k for k in extra.keys() & logged.keys() if extra[k] != logged[k])
    if clashing:
        raise MisconfigurationException(
            f"Error while merging hparams: the keys {clashing} are present in both the "
            "LightningModule's and LightningDataModule's hparams but have different values."
        )
    return logged | extra


def replay(loggers: list[Any], calls: list[dict[str, Any]]) -> None:
    """Run rank 0's recorded calls on the driver's loggers, in the order they were made."""
    for call in calls:
        logger = loggers[call["logger"]]
        target = logger.experiment if call["target"] == "experiment" else logger
        method = getattr(target, call["method"], None)
        if method is None:
            warnings.warn(
                f"{type(target).__name__} has no method {call['method']!r}: the call made on "
                "rank 0 was dropped.",
                UserWarning,
                stacklevel=2,
            )
            continue
        kwargs = dict(call["kwargs"])
        if "walltime" not in kwargs and _takes(method, "walltime"):
            kwargs["walltime"] = call["walltime"]  # when rank 0 made it, not when it arrived
        method(*call["args"], **kwargs)


def _takes(method: Any, parameter: str) -> bool:
    try:
        return parameter in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
