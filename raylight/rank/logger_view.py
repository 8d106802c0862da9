"""``self.logger`` on a rank: a view of one of the driver's loggers.

Loggers live on the driver, which owns their files and runs. A rank gets a view of each:
an instance of a subclass of the logger's own class (so ``isinstance(self.logger,
TensorBoardLogger)`` holds), carrying the driver's resolved ``name``, ``version``,
``save_dir`` and ``log_dir``. What the module does with it travels to the driver:

- ``self.logger.experiment.add_image(...)`` (any method of the experiment) and the
  logger's own methods (``log_metrics``, ``log_hyperparams``, ...) are recorded on rank 0
  and replayed by the driver on the real logger after the epoch, in the order made;
- on the other ranks they do nothing, as Lightning's rank-zero experiment and
  ``@rank_zero_only`` logger methods do.

Arguments are made portable on the way: tensors are detached and moved to the CPU, and a
matplotlib figure given to ``add_figure`` is drawn into an image array here (as the
SummaryWriter would), so the driver never needs the rank's device or figure backend.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

# What a rank reads from the driver's logger; everything else is the class's own.
_RESOLVED = ("name", "version", "save_dir", "log_dir", "root_dir", "sub_dir")
# The logger's own methods that stay on the driver: a rank never saves or closes a logger.
_DRIVER_ONLY = {"save", "finalize", "after_save_checkpoint"}


def rank_views(descriptions: list[dict[str, Any]], trainer: Any) -> list[Any]:
    """One view per driver logger, in the driver's order (``trainer.loggers``)."""
    return [_view(index, description, trainer) for index, description in enumerate(descriptions)]


def _view(index: int, description: dict[str, Any], trainer: Any) -> Any:
    cls = description["cls"]
    resolved = description["resolved"]
    namespace: dict[str, Any] = {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "experiment": property(lambda self: self._raylight_experiment),
    }
    for attribute, value in resolved.items():
        namespace[attribute] = property(lambda self, value=value: value)
    for method in description["methods"]:
        if method in _DRIVER_ONLY:
            namespace[method] = lambda self, *args, **kwargs: None
        elif method not in namespace:
            namespace[method] = _recorder(trainer, index, "logger", method)
    view_cls = type(cls.__name__, (cls,), namespace)
    view = view_cls.__new__(view_cls)
    view.__dict__.update(description["state"])
    experiment = description["experiment"]
    view._raylight_experiment = (
        _Experiment(trainer, index, experiment["methods"], experiment["attributes"])
        if trainer.is_global_zero
        else _NoExperiment()
    )
    return view


def _recorder(trainer: Any, index: int, target: str, method: str) -> Any:
    def record(self: Any, *args: Any, **kwargs: Any) -> None:
        if trainer.is_global_zero:
            _record(trainer, index, target, method, args, kwargs)

    record.__name__ = method
    return record


def _record(
    trainer: Any, index: int, target: str, method: str, args: tuple, kwargs: dict[str, Any]
) -> None:
    if target == "experiment" and method == "add_figure":
        method, args, kwargs = _figure_as_image(args, kwargs)
    trainer._logger_calls.append(
        {
            "logger": index,
            "target": target,
            "method": method,
            "args": _portable(args),
            "kwargs": _portable(kwargs),
            "walltime": time.time(),
        }
    )


class _Experiment:
    """Rank 0's stand-in for the driver logger's experiment (a ``SummaryWriter``, a run)."""

    def __init__(
        self, trainer: Any, index: int, methods: list[str] | None, attributes: dict[str, Any]
    ) -> None:
        self._trainer, self._index = trainer, index
        self._methods = None if methods is None else set(methods)
        self._attributes = attributes

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name in self._attributes:
            return self._attributes[name]
        if name in ("flush", "close"):
            return lambda *args, **kwargs: None  # the driver flushes and closes its own
        if name == "get_logdir":
            return lambda: self._attributes.get("log_dir")
        if self._methods is not None and name not in self._methods:
            raise AttributeError(
                f"The logger's experiment has no method {name!r}. On raylight's ranks the "
                "experiment's methods are called on the driver's experiment after the epoch; "
                "its other attributes are not available there."
            )

        def call(*args: Any, **kwargs: Any) -> None:
            _record(self._trainer, self._index, "experiment", name, args, kwargs)

        return call


class _NoExperiment:
    """The experiment on ranks other than 0: every call does nothing (Lightning's
    ``DummyExperiment``)."""

    def _nothing(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self._nothing

    def __getitem__(self, index: Any) -> _NoExperiment:
        return self


def _portable(value: Any) -> Any:
    """``value`` with tensors detached on the CPU, so that it pickles for the driver."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _portable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_portable(item) for item in value)
    return value


def _figure_as_image(args: tuple, kwargs: dict[str, Any]) -> tuple[str, tuple, dict[str, Any]]:
    """``add_figure(tag, figure, global_step, close, walltime)`` as the ``add_image(s)`` call
    the SummaryWriter makes of it."""
    names = ("tag", "figure", "global_step", "close", "walltime")
    bound = dict(zip(names, args, strict=False)) | kwargs
    figure, close = bound.pop("figure"), bound.pop("close", True)
    if isinstance(figure, list):
        bound["img_tensor"] = np.stack([_render(one, close) for one in figure])
        bound["dataformats"] = "NCHW"
        return "add_images", (), bound
    bound["img_tensor"] = _render(figure, close)
    bound["dataformats"] = "CHW"
    return "add_image", (), bound


def _render(figure: Any, close: bool) -> np.ndarray:
    """A matplotlib figure as a (3, H, W) uint8 image, drawn off-screen."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[:, :, :3].transpose(2, 0, 1).copy()
    if close:
        import matplotlib.pyplot as plt

        plt.close(figure)
    return image
