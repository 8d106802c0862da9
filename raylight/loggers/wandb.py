"""WandbLogger: Lightning's arguments and behaviour, on the driver.

The W&B run is started once, on the driver, at the latest when a Trainer call ships the
logger's view to the ranks, and stays open for the logger's later Trainer calls, as in
Lightning (wandb finishes it when the driver exits; ``logger.experiment.finish()`` ends it
sooner). Inside the module, ``self.logger.experiment.log({...})`` and the logger's own
methods (``log_image``, ``log_table``, ...) made on rank 0 run on the driver's run after the
epoch. A fit that restarts after a worker failure logs the rows of the replayed steps again;
the logger skips those it has sent. ``wandb`` is imported on first use, on the driver only.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import warnings
from argparse import Namespace
from collections.abc import Mapping
from typing import Any, Literal

from raylight.loggers.logger import Logger
from raylight.loggers.sent_rows import SentRows
from raylight.shared.config import MisconfigurationException

# Run methods a rank may not call: watch would hook the driver's copy of the model, which
# never trains (the ranks train theirs), so wandb would record nothing.
_NOT_FROM_RANKS = ("watch", "unwatch")


def _require_wandb() -> None:
    if importlib.util.find_spec("wandb") is None:
        raise ModuleNotFoundError("WandbLogger needs the `wandb` package: `pip install wandb`.")


class WandbLogger(Logger):
    """Lightning's ``WandbLogger(name, save_dir, version, offline, dir, id, anonymous,
    project, log_model, experiment, prefix, checkpoint_name, add_file_policy, **kwargs)``;
    ``kwargs`` go to ``wandb.init`` (``entity``, ``group``, ``tags``, ...).

    ``offline=True`` starts the run with ``mode="offline"`` (``wandb sync`` uploads it later).
    ``log_model`` and ``watch`` are refused: the workers save the checkpoints and train the
    model, where the driver's logger cannot see them (``checkpoint_name`` and
    ``add_file_policy`` only shape what log_model would upload).
    """

    LOGGER_JOIN_CHAR = "-"

    def __init__(
        self,
        name: str | None = None,
        save_dir: str | os.PathLike = ".",
        version: str | None = None,
        offline: bool = False,
        dir: str | os.PathLike | None = None,
        id: str | None = None,
        anonymous: bool | None = None,
        project: str | None = None,
        log_model: Literal["all"] | bool = False,
        experiment: Any = None,
        prefix: str = "",
        checkpoint_name: str | None = None,
        add_file_policy: Literal["mutable", "immutable"] = "mutable",
        **kwargs: Any,
    ) -> None:
        _require_wandb()
        if log_model:
            raise MisconfigurationException(
                f"WandbLogger(log_model={log_model!r}) is not supported by raylight: the workers "
                "save the checkpoints and the driver's logger is not told of each one. Log a "
                "checkpoint after the fit instead: `artifact = wandb.Artifact('model', "
                "type='model'); artifact.add_file(trainer.checkpoint_callback.best_model_path); "
                "logger.experiment.log_artifact(artifact)`."
            )
        self._offline = offline
        self._prefix = prefix
        self._experiment = experiment
        self.add_file_policy = add_file_policy
        save_dir = None if save_dir is None else os.fspath(save_dir)
        dir = None if dir is None else os.fspath(dir)
        self._wandb_init: dict[str, Any] = {
            "name": name,
            "project": project or os.environ.get("WANDB_PROJECT", "lightning_logs"),
            "dir": save_dir or dir,
            "id": version or id,
            "resume": "allow",
        }
        if anonymous:  # wandb warns when the argument is given at all
            self._wandb_init["anonymous"] = "allow"
        self._wandb_init.update(**kwargs)
        self._project = self._wandb_init.get("project")
        self._save_dir = self._wandb_init.get("dir")
        self._name = self._wandb_init.get("name")
        self._id = self._wandb_init.get("id")
        self._sent = SentRows()

    @property
    def experiment(self) -> Any:
        """The ``wandb`` Run, started on first use (``wandb.init`` with ``resume="allow"``),
        with ``trainer/global_step`` as the x-axis of every metric, as in Lightning."""
        if self._experiment is not None:
            return self._experiment
        import wandb

        if wandb.run is not None:
            warnings.warn(
                "There is a wandb run already in progress and newly created instances of "
                "`WandbLogger` will reuse this run. If this is not desired, call "
                "`wandb.finish()` before instantiating `WandbLogger`.",
                UserWarning,
                stacklevel=2,
            )
            self._experiment = wandb.run
            return self._experiment
        arguments = dict(self._wandb_init)
        if self._offline:
            arguments.setdefault("mode", "offline")
        self._experiment = wandb.init(**arguments)
        if getattr(self._experiment, "define_metric", None):
            if self._wandb_init.get("sync_tensorboard"):
                self._experiment.define_metric("*", step_metric="global_step")
            else:
                self._experiment.define_metric("trainer/global_step")
                self._experiment.define_metric(
                    "*", step_metric="trainer/global_step", step_sync=True
                )
        return self._experiment

    def _experiment_class(self) -> type:
        """What a rank's ``self.logger.experiment`` offers: the Run's methods but watch."""
        from wandb.sdk.wandb_run import Run

        methods = {
            name: member
            for name, member in inspect.getmembers(Run, inspect.isfunction)
            if not name.startswith("_") and name not in _NOT_FROM_RANKS
        }
        return type("Run", (), methods)

    @property
    def name(self) -> str | None:
        """The project's name, as in Lightning (the run's own name is ``experiment.name``)."""
        return self._project

    @property
    def version(self) -> str | None:
        """The run's id; the id given to the constructor while no run exists."""
        return self._experiment.id if self._experiment else self._id

    @property
    def save_dir(self) -> str | None:
        return self._save_dir

    def watch(
        self,
        model: Any,
        log: str | None = "gradients",
        log_freq: int = 100,
        log_graph: bool = True,
    ) -> None:
        raise MisconfigurationException(
            "WandbLogger.watch(model) is not supported by raylight: the model trains on the "
            "Ray workers, and the driver's copy never runs a backward pass, so wandb would "
            "record nothing. Log what you need from the module instead, e.g. in "
            "on_after_backward: `self.logger.experiment.log({'grad_norm': norm})` (rank 0's "
            "calls reach the run)."
        )

    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:
        """The run's config, updated (values may change, as in Lightning); callables become
        their names or results, and what JSON cannot hold becomes a string."""
        params = vars(params) if isinstance(params, Namespace) else dict(params or {})
        params = {key: _sanitize_callable(value) for key, value in params.items()}
        params = {k: v if _is_json_serializable(v) else str(v) for k, v in params.items()}
        self.experiment.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """``metrics`` with ``trainer/global_step`` (the x-axis) set to ``step``."""
        if not self._sent.is_new(metrics, step):
            return  # sent before the fit restarted from a checkpoint, with the same values
        if self._prefix:
            metrics = {f"{self._prefix}{self.LOGGER_JOIN_CHAR}{k}": v for k, v in metrics.items()}
        if step is not None and not self._wandb_init.get("sync_tensorboard"):
            self.experiment.log(dict(metrics, **{"trainer/global_step": step}))
        else:
            self.experiment.log(dict(metrics))

    def drop_rows_from(self, step: int) -> None:
        """The fit restarts from a checkpoint at ``step``: the rows of ``step`` and later
        that were sent already are skipped when they are logged again."""
        self._sent.drop_from(step)

    def log_table(
        self,
        key: str,
        columns: list[str] | None = None,
        data: list[list[Any]] | None = None,
        dataframe: Any = None,
        step: int | None = None,
    ) -> None:
        """A ``wandb.Table`` from ``columns`` and ``data``, or from ``dataframe``."""
        import wandb

        table = wandb.Table(columns=columns, data=data, dataframe=dataframe)
        self.log_metrics({key: table}, step)

    def log_text(
        self,
        key: str,
        columns: list[str] | None = None,
        data: list[list[str]] | None = None,
        dataframe: Any = None,
        step: int | None = None,
    ) -> None:
        """Text, as a table."""
        self.log_table(key, columns, data, dataframe, step)

    def log_image(
        self, key: str, images: list[Any], step: int | None = None, **kwargs: Any
    ) -> None:
        """Images (tensors, arrays, PIL images or paths); each keyword is a list with one
        value per image (``caption``, ``masks``, ``boxes``)."""
        import wandb

        self.log_metrics({key: _media(wandb.Image, "images", images, kwargs)}, step)

    def log_audio(
        self, key: str, audios: list[Any], step: int | None = None, **kwargs: Any
    ) -> None:
        """Audio clips (arrays or paths); keywords as in ``log_image`` (``sample_rate``...)."""
        import wandb

        self.log_metrics({key: _media(wandb.Audio, "audios", audios, kwargs)}, step)

    def log_video(
        self, key: str, videos: list[Any], step: int | None = None, **kwargs: Any
    ) -> None:
        """Videos (arrays or paths); keywords as in ``log_image`` (``fps``, ``format``...)."""
        import wandb

        self.log_metrics({key: _media(wandb.Video, "videos", videos, kwargs)}, step)

    def finalize(self, status: str) -> None:
        """Nothing to close: the run stays open for this logger's later Trainer calls, as in
        Lightning (which only uploads checkpoints here, with ``log_model``)."""

    def __getstate__(self) -> dict[str, Any]:
        """The run stays on the driver; a copy (a rank's view) keeps its id and name. As in
        Lightning, the run is started here if it was not yet, so every copy names it."""
        _ = self.experiment
        state = self.__dict__.copy()
        state["_id"] = getattr(self._experiment, "id", None)
        state["_name"] = getattr(self._experiment, "name", None)
        state["_experiment"] = None
        return state


def _media(kind: type, argument: str, items: list[Any], kwargs: dict[str, Any]) -> list[Any]:
    """One ``kind`` (``wandb.Image``, ...) per item, each with its share of ``kwargs``."""
    if not isinstance(items, list):
        raise TypeError(f'Expected a list as "{argument}", found {type(items)}')
    for name, values in kwargs.items():
        if len(values) != len(items):
            raise ValueError(f"Expected {len(items)} items but only found {len(values)} for {name}")
    return [
        kind(item, **{name: values[index] for name, values in kwargs.items()})
        for index, item in enumerate(items)
    ]


def _sanitize_callable(value: Any) -> Any:
    """Lightning's rule: a class is its name; a callable is its result, or its name when
    the result is callable too or calling it fails."""
    if inspect.isclass(value):
        return value.__name__
    if callable(value):
        try:
            result = value()
        except Exception:
            return getattr(value, "__name__", None)
        return value.__name__ if callable(result) else result
    return value


def _is_json_serializable(value: Any) -> bool:
    if value is None or isinstance(value, bool | int | float | str | list | dict):
        return True
    try:
        json.dumps(value)
    except (TypeError, OverflowError):
        return False
    return True
