"""TensorBoardLogger: Lightning's layout, ``save_dir/name/version_N/`` with the event files and
``hparams.yaml``.

``save_dir`` may be a storage URI (``s3://bucket/runs``): the writer then fills a local
staging folder, which is copied to the URI when the logger saves (at the end of every
Trainer call, and at most every ``upload_every_s`` seconds while metrics arrive).
The writer is imported on first use, on the driver only.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
import yaml

from raylight.loggers.csv_logs import _plain
from raylight.loggers.logger import Logger, next_version, version_folder
from raylight.shared import storage


def _writer_package() -> str | None:
    """Lightning's choice: torch's writer when ``tensorboard`` is installed, else tensorboardX's."""
    if importlib.util.find_spec("tensorboard") is not None:
        return "tensorboard"
    if importlib.util.find_spec("tensorboardX") is not None:
        return "tensorboardX"
    return None


def tensorboard_available() -> bool:
    return _writer_package() is not None


class TensorBoardLogger(Logger):
    """Lightning's ``TensorBoardLogger(save_dir, name, version, log_graph, default_hp_metric,
    prefix, sub_dir, **kwargs)``; ``kwargs`` go to the ``SummaryWriter`` (``flush_secs``,
    ``max_queue``, ...). ``log_graph`` is accepted and ignored: the driver never runs the
    model's forward during a run."""

    NAME_HPARAMS_FILE = "hparams.yaml"
    LOGGER_JOIN_CHAR = "-"

    def __init__(
        self,
        save_dir: str | os.PathLike,
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        log_graph: bool = False,
        default_hp_metric: bool = True,
        prefix: str = "",
        sub_dir: str | os.PathLike | None = None,
        upload_every_s: float = 60.0,
        **kwargs: Any,
    ) -> None:
        if not tensorboard_available():
            raise ModuleNotFoundError(
                "TensorBoardLogger needs the `tensorboard` package (or `tensorboardX`): "
                "`pip install tensorboard`, or log with raylight.loggers.CSVLogger."
            )
        if log_graph:
            warnings.warn(
                "TensorBoardLogger(log_graph=True) is ignored: raylight's driver does not run "
                "the model's forward, so there is no graph to trace.",
                UserWarning,
                stacklevel=2,
            )
        self._save_dir = os.fspath(save_dir)
        self._name = name or ""
        self._version = version
        self._sub_dir = None if sub_dir is None else os.fspath(sub_dir)
        self._default_hp_metric = default_hp_metric
        self._prefix = prefix
        self._upload_every_s = upload_every_s
        self._kwargs = kwargs
        self._experiment: Any = None
        self._staging: str | None = None  # the writer's local folder when log_dir is a URI
        self._uploaded_at = 0.0
        self._hparams_written = False
        self.hparams: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> int | str:
        if self._version is None:
            self._version = next_version(self.root_dir)
        return self._version

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def sub_dir(self) -> str | None:
        return self._sub_dir

    @property
    def root_dir(self) -> str:
        return storage.join(self._save_dir, self._name) if self._name else self._save_dir

    @property
    def log_dir(self) -> str:
        version = version_folder(self.version)
        parts = [version] if self._sub_dir is None else [version, self._sub_dir]
        return storage.join(self.root_dir, *parts)

    @property
    def experiment(self) -> Any:
        """The ``SummaryWriter``: ``logger.experiment.add_histogram(...)`` and the like work,
        on the driver and (through ``self.logger``) in the module's hooks on the ranks."""
        if self._experiment is not None:
            return self._experiment
        writer_cls = self._experiment_class()
        if storage.is_uri(self.log_dir):
            self._staging = tempfile.mkdtemp(prefix="raylight-tensorboard-")
            folder = self._staging
        else:
            folder = self.log_dir
        self._experiment = writer_cls(log_dir=folder, **self._kwargs)
        return self._experiment

    def _experiment_class(self) -> type:
        if _writer_package() == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
        else:
            from tensorboardX import SummaryWriter
        return SummaryWriter

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if self._prefix:
            metrics = {f"{self._prefix}{self.LOGGER_JOIN_CHAR}{k}": v for k, v in metrics.items()}
        for name, value in metrics.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            if isinstance(value, dict):
                self.experiment.add_scalars(name, value, step)
                continue
            try:
                self.experiment.add_scalar(name, value, step)
            except Exception as error:
                raise ValueError(
                    f"TensorBoardLogger cannot log {name}={value!r}: log a number, a one-element "
                    "tensor or a dict of them."
                ) from error
        if self._staging and time.monotonic() - self._uploaded_at >= self._upload_every_s:
            self._upload()

    def log_hyperparams(
        self, params: Mapping[str, Any], metrics: Any = None, step: int | None = None
    ) -> None:
        """Record ``params`` in ``hparams.yaml`` and in TensorBoard's HPARAMS tab, with
        Lightning's placeholder ``hp_metric=-1`` unless ``default_hp_metric=False``."""
        params = dict(vars(params) if not isinstance(params, Mapping) else params)
        self.hparams.update(params)
        self._hparams_written = False
        if metrics is None:
            metrics = {"hp_metric": -1} if self._default_hp_metric else None
        elif not isinstance(metrics, dict):
            metrics = {"hp_metric": metrics}
        if not metrics:
            return
        self.log_metrics(metrics, step)
        if _writer_package() == "tensorboard":
            from torch.utils.tensorboard.summary import hparams
        else:
            from tensorboardX.summary import hparams
        experiment, start, end = hparams(_sanitize(_flatten(params)), metrics)
        writer = self.experiment._get_file_writer()
        for summary in (experiment, start, end):
            writer.add_summary(summary, step)

    def save(self) -> None:
        if self._experiment is not None:
            self._experiment.flush()
            if self._staging:
                self._upload()
        if not self._hparams_written and (self._experiment is not None or self.hparams):
            text = yaml.safe_dump(_plain(self.hparams))
            location = storage.join(self.log_dir, self.NAME_HPARAMS_FILE)
            storage.write_bytes(location, text.encode())
            self._hparams_written = True

    def finalize(self, status: str) -> None:
        """Flush, close and (for a URI) upload; a later Trainer call opens a new event file."""
        if self._experiment is not None:
            self._experiment.flush()
            self._experiment.close()
        self.save()
        self._experiment = None
        if self._staging:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def _upload(self) -> None:
        storage.copy_tree(self._staging, self.log_dir)
        self._uploaded_at = time.monotonic()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_experiment"] = None
        return state


def _flatten(params: MutableMapping[Any, Any], parent: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``, as TensorBoard's HPARAMS tab takes them."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{parent}/{key}" if parent else str(key)
        if isinstance(value, MutableMapping):
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


def _sanitize(params: dict[str, Any]) -> dict[str, Any]:
    """TensorBoard's HPARAMS tab takes numbers, strings and booleans; the rest become strings."""
    return {
        k: v if type(v) in (bool, int, float, str, torch.Tensor) else str(v)
        for k, v in params.items()
    }
