"""What a user passes to the Trainer, checked and completed on the driver: the fit's
inputs, the default and recovery checkpoints, the loggers, ``ckpt_path``'s "last" and
"best", and the job shipped to the workers (naming the attribute that does not pickle).
"""

from __future__ import annotations

import os
import sys
import warnings
from datetime import timedelta
from typing import Any

import ray
import torch
from ray import cloudpickle

from raylight.callbacks import Callback, ModelCheckpoint
from raylight.datamodule import LightningDataModule
from raylight.loggers import CSVLogger, Logger, TensorBoardLogger
from raylight.loggers.tensorboard import tensorboard_available
from raylight.module import LightningModule
from raylight.rank.data import is_overridden
from raylight.shared import checkpoint_index, shipping, storage
from raylight.shared.config import NO_TRAIN_LOADER, MisconfigurationException


def check_fit_inputs(model: Any, train_dataloaders: Any, datamodule: Any) -> None:
    if not isinstance(model, LightningModule):
        raise MisconfigurationException(
            f"trainer.fit() got a {type(model).__name__}: it takes a raylight.LightningModule."
        )
    if datamodule is not None and not isinstance(datamodule, LightningDataModule):
        raise MisconfigurationException(
            f"trainer.fit(datamodule=...) got a {type(datamodule).__name__}: it takes a "
            "raylight.LightningDataModule."
        )
    if type(model).training_step is LightningModule.training_step:
        raise MisconfigurationException(
            "No `training_step()` method defined. The Trainer expects as minimum a "
            "`training_step()`, `train_dataloader()` and `configure_optimizers()` to be defined."
        )
    has_loader = (
        train_dataloaders is not None
        or is_overridden(datamodule, "train_dataloader")
        or is_overridden(model, "train_dataloader")
    )
    if not has_loader:
        raise MisconfigurationException(NO_TRAIN_LOADER)


def add_default_checkpoint(callbacks: list[Callback], enabled: bool) -> None:
    has_checkpoint = any(isinstance(cb, ModelCheckpoint) for cb in callbacks)
    if has_checkpoint and not enabled:
        raise MisconfigurationException(
            "Trainer was configured with `enable_checkpointing=False` but found "
            "`ModelCheckpoint` in callbacks list: remove it or enable checkpointing."
        )
    if enabled and not has_checkpoint:
        callbacks.append(ModelCheckpoint())


def add_recovery_checkpoint(
    callbacks: list[Callback],
    dirpath: str,
    max_failures: int,
    every_n_train_steps: int | None,
    train_time_interval: timedelta | None,
) -> None:
    """Fault tolerance needs periodic full checkpoints: when none are configured (or a
    recovery interval is asked for), the run takes its own, apart from the user's top k."""
    if max_failures == 0:
        return
    periodic = any(
        isinstance(cb, ModelCheckpoint) and not cb.save_weights_only and cb.save_top_k != 0
        for cb in callbacks
    )
    if periodic and every_n_train_steps is None and train_time_interval is None:
        return
    recovery = ModelCheckpoint(
        dirpath=dirpath,
        filename="recovery-{epoch}-{step}",
        save_top_k=1,
        every_n_train_steps=every_n_train_steps,
        train_time_interval=train_time_interval,
        save_on_train_epoch_end=True,
    )
    recovery._recovery = True  # kept out of checkpoint_callback(s) and out of "best"
    callbacks.append(recovery)


def resolve_loggers(logger: Any, default_root_dir: str) -> list[Logger]:
    """Lightning's rules: True/None gives the default logger, False none, else the given ones."""
    if logger is None or logger is True:
        if tensorboard_available():  # as Lightning: TensorBoard when installed, else CSV
            return [TensorBoardLogger(save_dir=default_root_dir)]
        return [CSVLogger(save_dir=default_root_dir)]
    if logger is False:
        return []
    loggers = list(logger) if isinstance(logger, list | tuple) else [logger]
    for item in loggers:
        if not callable(getattr(item, "log_metrics", None)):
            raise MisconfigurationException(
                f"Trainer(logger=...) got a {type(item).__name__}: a logger needs log_metrics, "
                "log_hyperparams and finalize (see raylight.loggers.Logger)."
            )
    return loggers


def folder_of(path: str) -> str:
    return path.rpartition("/")[0] if storage.is_uri(path) else os.path.dirname(path)


def global_seed() -> int | None:
    seed = os.environ.get("PL_GLOBAL_SEED")
    return int(seed) if seed is not None else None


def put_checked(job: dict[str, Any]) -> Any:
    """Put the job in the object store once; name the attribute that cannot be pickled."""
    try:
        return ray.put(shipping.pack_job(job))
    except Exception as error:
        for key in shipping.USER_OBJECTS:
            path = _unpicklable_path(job[key], key)
            if path is not None:
                raise MisconfigurationException(
                    f"{path} cannot be pickled, so it cannot be shipped to the Ray workers "
                    f"({error}). Create it inside setup()/configure_model() instead of "
                    "__init__, or drop it."
                ) from error
        raise


def _unpicklable_path(obj: Any, path: str, depth: int = 0) -> str | None:
    try:
        cloudpickle.dumps(obj)
        return None
    except Exception:
        pass
    if depth > 4:
        return f"{path} ({type(obj).__name__})"
    children: list[tuple[str, Any]] = []
    if isinstance(obj, dict):
        children = [(f"{path}[{k!r}]", v) for k, v in obj.items()]
    elif isinstance(obj, list | tuple):
        children = [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
    elif hasattr(obj, "__dict__"):
        state = obj.__getstate__() if hasattr(obj, "__getstate__") else vars(obj)
        if isinstance(state, dict):
            name = type(obj).__name__ if depth == 0 else path
            if isinstance(obj, torch.nn.Module):
                state = {k: v for k, v in state.items() if k != "_modules"} | dict(obj._modules)
            children = [(f"{name}.{k}", v) for k, v in state.items()]
    for child_path, child in children:
        found = _unpicklable_path(child, child_path, depth + 1)
        if found is not None:
            return found
    return f"{path} ({type(obj).__name__})"


def print_results(stage: str, results: list[dict[str, float]]) -> None:
    for index, metrics in enumerate(results):
        title = f"{stage} metrics" + (f" (dataloader {index})" if len(results) > 1 else "")
        print(title, file=sys.stderr)
        for name, value in sorted(metrics.items()):
            print(f"  {name:<30} {value:.6g}", file=sys.stderr)


def resolve_ckpt_path(
    ckpt_path: Any, fn: str, root: str, callbacks: list[ModelCheckpoint]
) -> str | None:
    """Lightning's "last" and "best", also from a new driver: they come from this run's
    callbacks if they saved anything, else from the checkpoint index in storage."""
    if ckpt_path not in ("last", "best"):
        if not ckpt_path:
            return None
        return storage.absolute(os.fspath(ckpt_path))
    callback = callbacks[0] if callbacks else None
    if ckpt_path == "best":
        if callback is None:
            raise MisconfigurationException(
                f'.{fn}(ckpt_path="best") is set but `ModelCheckpoint` is not configured.'
            )
        path = callback.best_model_path or (
            checkpoint_index.best_in_index(root, callback.monitor, callback.mode)
            if callback.monitor
            else checkpoint_index.latest_in_index(root)
        )
        if not path:
            raise MisconfigurationException(
                f'.{fn}(ckpt_path="best") is set but `ModelCheckpoint` has not saved any '
                f"checkpoints yet, here or under {storage.redact(root)}."
            )
        return path
    paths = [cb.last_model_path or cb.best_model_path for cb in callbacks]
    path = next((p for p in paths if p), None) or checkpoint_index.latest_in_index(root)
    if path is None:
        warnings.warn(
            f'.{fn}(ckpt_path="last") is set, but there is no last checkpoint under '
            f"{storage.redact(root)}. No checkpoint will be loaded.",
            UserWarning,
            stacklevel=4,
        )
    return path
