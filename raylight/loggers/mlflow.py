"""MLFlowLogger: Lightning's arguments and behaviour, on the driver.

The run is created once, on the driver, the first time it is needed (at the latest when a
Trainer call ships the logger's view to the ranks), and every later Trainer call of the same
logger logs to it, as in Lightning. A fit that restarts after a worker failure logs the
rows of the replayed steps again; the logger skips those it has sent, so each metric's
history keeps one value per step. ``mlflow`` is imported on first use, on the driver only.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import time
import warnings
from argparse import Namespace
from collections.abc import Mapping, MutableMapping
from dataclasses import asdict, is_dataclass
from typing import Any, Literal

import torch

from raylight.loggers.logger import Logger
from raylight.loggers.sent_rows import SentRows
from raylight.shared.config import MisconfigurationException

log = logging.getLogger(__name__)
LOCAL_FILE_URI_PREFIX = "file:"
# Lightning's status words, as MLflow's run states.
_RUN_STATUS = {"success": "FINISHED", "failed": "FAILED", "finished": "FINISHED"}


def _require_mlflow() -> None:
    if importlib.util.find_spec("mlflow") is None:
        raise ModuleNotFoundError(
            "MLFlowLogger needs the `mlflow` package: `pip install mlflow` (or `mlflow-skinny`)."
        )


class MLFlowLogger(Logger):
    """Lightning's ``MLFlowLogger(experiment_name, run_name, tracking_uri, tags, save_dir,
    log_model, prefix, artifact_location, run_id, synchronous, checkpoint_path_prefix)``.

    ``tracking_uri`` defaults to ``MLFLOW_TRACKING_URI``, else ``file:<save_dir>``. Inside the
    module, ``self.logger.experiment`` is the ``MlflowClient``: rank 0's calls
    (``self.logger.experiment.log_text(self.logger.run_id, ...)``) run on the driver's client.
    ``log_model`` is refused: the workers save the checkpoints, and the driver's logger is not
    told of each one (``checkpoint_path_prefix`` only names where log_model would put them).
    """

    LOGGER_JOIN_CHAR = "-"

    def __init__(
        self,
        experiment_name: str = "lightning_logs",
        run_name: str | None = None,
        tracking_uri: str | None = os.getenv("MLFLOW_TRACKING_URI"),
        tags: dict[str, Any] | None = None,
        save_dir: str | None = "./mlruns",
        log_model: Literal[True, False, "all"] = False,
        prefix: str = "",
        artifact_location: str | None = None,
        run_id: str | None = None,
        synchronous: bool | None = None,
        checkpoint_path_prefix: str = "",
    ) -> None:
        _require_mlflow()
        if log_model:
            raise MisconfigurationException(
                f"MLFlowLogger(log_model={log_model!r}) is not supported by raylight: the "
                "workers save the checkpoints and the driver's logger is not told of each one. "
                "Log a checkpoint after the fit instead: `logger.experiment.log_artifact("
                "logger.run_id, trainer.checkpoint_callback.best_model_path)`."
            )
        if not tracking_uri:
            tracking_uri = f"{LOCAL_FILE_URI_PREFIX}{save_dir}"
        self._experiment_name = experiment_name
        self._experiment_id: str | None = None
        self._tracking_uri = tracking_uri
        self._run_name = run_name
        self._run_id = run_id
        self.tags = tags
        self._prefix = prefix
        self._artifact_location = artifact_location
        self._log_batch_kwargs = {} if synchronous is None else {"synchronous": synchronous}
        self._client: Any = None
        self._initialized = False
        self._sent = SentRows()

    @property
    def experiment(self) -> Any:
        """The ``MlflowClient``, with the experiment and run created on first use:
        ``logger.experiment.log_artifact(logger.run_id, path)`` and the like."""
        if self._initialized:
            return self._client
        client = self._mlflow_client()
        if self._run_id is not None:
            self._experiment_id = client.get_run(self._run_id).info.experiment_id
            self._initialized = True
            return client
        if self._experiment_id is None:
            self._experiment_id = self._find_or_create_experiment(client)
        self._run_id = client.create_run(
            experiment_id=self._experiment_id, tags=self._run_tags()
        ).info.run_id
        self._initialized = True
        return client

    def _mlflow_client(self) -> Any:
        if self._client is not None:
            return self._client
        from mlflow.exceptions import MlflowException

        try:
            self._client = self._experiment_class()(self._tracking_uri)
        except MlflowException as error:
            if self.save_dir is None:
                raise
            # Recent mlflow refuses the file store that Lightning's default names.
            raise MisconfigurationException(
                f"MLFlowLogger cannot log to {self._tracking_uri!r}: this mlflow refuses "
                "its file store. Give a database or a tracking server instead, e.g. "
                "MLFlowLogger(tracking_uri='sqlite:///mlflow.db'), or set "
                "MLFLOW_ALLOW_FILE_STORE=true to keep the file store."
            ) from error
        return self._client

    def _experiment_class(self) -> type:
        from mlflow.tracking import MlflowClient

        return MlflowClient

    def _find_or_create_experiment(self, client: Any) -> str:
        experiment = client.get_experiment_by_name(self._experiment_name)
        if experiment is not None and experiment.lifecycle_stage != "deleted":
            return experiment.experiment_id
        log.warning(f"Experiment with name {self._experiment_name} not found. Creating it.")
        return client.create_experiment(
            name=self._experiment_name, artifact_location=self._artifact_location
        )

    def _run_tags(self) -> dict[str, Any]:
        """The given tags with ``run_name`` as ``mlflow.runName``, and MLflow's context tags
        (user, source, git commit) resolved as ``mlflow.start_run`` would."""
        from mlflow.tracking.context.registry import resolve_tags
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

        if self._run_name is not None:
            self.tags = self.tags or {}
            if MLFLOW_RUN_NAME in self.tags:
                log.warning(
                    f"The tag {MLFLOW_RUN_NAME} is found in tags. The value will be overridden "
                    f"by {self._run_name}."
                )
            self.tags[MLFLOW_RUN_NAME] = self._run_name
        return resolve_tags(self.tags)

    @property
    def run_id(self) -> str | None:
        """The run's id (the run is created if it does not exist yet)."""
        _ = self.experiment
        return self._run_id

    @property
    def experiment_id(self) -> str | None:
        """The experiment's id (created if it does not exist yet)."""
        _ = self.experiment
        return self._experiment_id

    @property
    def name(self) -> str | None:
        """The experiment id, as in Lightning."""
        return self.experiment_id

    @property
    def version(self) -> str | None:
        """The run id, as in Lightning."""
        return self.run_id

    @property
    def save_dir(self) -> str | None:
        """The local folder of a ``file:`` tracking URI; None for a tracking server."""
        if self._tracking_uri.startswith(LOCAL_FILE_URI_PREFIX):
            return self._tracking_uri[len(LOCAL_FILE_URI_PREFIX) :]
        return None

    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:
        """Flattened (``{"a": {"b": 1}}`` -> ``a/b``) and stringified, each value cut to
        MLflow's length limit, in batches of MLflow's size limit."""
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        params = _flatten_dict(vars(params) if isinstance(params, Namespace) else params or {})
        params_list = [Param(key=k, value=str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()]
        for start in range(0, len(params_list), MAX_PARAMS_TAGS_PER_BATCH):
            self.experiment.log_batch(
                run_id=self.run_id,
                params=params_list[start : start + MAX_PARAMS_TAGS_PER_BATCH],
                **self._log_batch_kwargs,
            )

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Lightning's rules: string values are dropped, names lose the characters MLflow
        refuses, and a row without a step is logged at step 0."""
        from mlflow.entities import Metric

        if not self._sent.is_new(metrics, step):
            return  # sent before the fit restarted from a checkpoint, with the same values
        if self._prefix:
            metrics = {f"{self._prefix}{self.LOGGER_JOIN_CHAR}{k}": v for k, v in metrics.items()}
        timestamp_ms = int(time.time() * 1000)
        metrics_list = []
        for key, value in metrics.items():
            if isinstance(value, str):
                log.warning(f"Discarding metric with string value {key}={value}.")
                continue
            clean = re.sub("[^a-zA-Z0-9_/. -]+", "", key)
            if clean != key:
                warnings.warn(
                    "MLFlow only allows '_', '/', '.' and ' ' special characters in metric name. "
                    f"Replacing {key} with {clean}.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            if isinstance(value, torch.Tensor):
                value = value.item()
            metrics_list.append(
                Metric(key=clean, value=value, timestamp=timestamp_ms, step=step or 0)
            )
        self.experiment.log_batch(
            run_id=self.run_id, metrics=metrics_list, **self._log_batch_kwargs
        )

    def drop_rows_from(self, step: int) -> None:
        """The fit restarts from a checkpoint at ``step``: the rows of ``step`` and later
        that were sent already are skipped when they are logged again."""
        self._sent.drop_from(step)

    def finalize(self, status: str = "success") -> None:
        """Mark the run with Lightning's status (``"success"`` -> FINISHED, ``"failed"`` ->
        FAILED); a later Trainer call of this logger logs to the same run again."""
        if not self._initialized:
            return
        client = self.experiment
        if client.get_run(self.run_id):
            client.set_terminated(self.run_id, _RUN_STATUS.get(status, status))

    def __getstate__(self) -> dict[str, Any]:
        """The ranks' views and pickled copies keep the run's ids, not the client: only the
        driver talks to the tracking server."""
        state = self.__dict__.copy()
        state["_client"] = None
        state["_initialized"] = False
        return state


def _flatten_dict(params: MutableMapping[Any, Any], parent_key: str = "") -> dict[str, Any]:
    """Lightning's flattening: ``{"a": {"b": 1}}`` -> ``{"a/b": 1}``; dataclasses, namespaces
    and lists of dicts are opened too."""
    result: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{parent_key}/{key}" if parent_key else str(key)
        if is_dataclass(value) and not isinstance(value, type):
            value = asdict(value)
        elif isinstance(value, Namespace):
            value = vars(value)
        if isinstance(value, MutableMapping):
            result.update(_flatten_dict(value, name))
        elif (
            isinstance(value, list) and value and all(isinstance(v, MutableMapping) for v in value)
        ):
            for index, item in enumerate(value):
                result.update(_flatten_dict(item, f"{name}/{index}"))
        else:
            result[name] = value
    return result
