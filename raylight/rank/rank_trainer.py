"""RankTrainer: what ``self.trainer`` is inside a worker, one per rank.

It carries the run's state on this rank (epoch, step, loaders, optimizers, metrics)
and the few services hooks call back into: ``log``, ``manual_backward``,
``all_gather`` and ``strategy`` (the DDP step of ``strategy.py``, which is also
Lightning's ``trainer.strategy``). It holds what a module or callback may read; what
one round trip hands to the next (a restored checkpoint's position) stays on the worker.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from raylight.rank.checkpointing import AsyncWriter, save_from_rank
from raylight.rank.data import request_loaders
from raylight.rank.fsdp import FSDPStrategy
from raylight.rank.logging import MetricLog
from raylight.rank.strategy import DDPStrategy, Precision
from raylight.rank.watchdog import NO_WATCH
from raylight.shared.config import NO_TRAIN_LOADER, MisconfigurationException, TrainerConfig

_REDUCE_OPS = {
    "mean": dist.ReduceOp.SUM,
    "sum": dist.ReduceOp.SUM,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
}


_ENTRY_POINT = (
    "the Trainer's fit, validate, test and predict run on the driver; call them from "
    "the script, not from a hook."
)
_LOOP = (
    "raylight's loops are plain functions, not Lightning's loop objects; read "
    "trainer.current_epoch, trainer.global_step, trainer.max_epochs or trainer.is_last_batch."
)
_DRIVER_ONLY = {
    "fit": _ENTRY_POINT,
    "validate": _ENTRY_POINT,
    "test": _ENTRY_POINT,
    "predict": _ENTRY_POINT,
    "fit_loop": _LOOP,
    "validate_loop": _LOOP,
    "test_loop": _LOOP,
    "predict_loop": _LOOP,
    "state": "use trainer.training / validating / testing / predicting / sanity_checking.",
    "accelerator": "the device is trainer.device (trainer.strategy.root_device).",
    "scaler": "mixed precision is trainer.precision_plugin (its scaler is internal).",
    "init_module": "create the model in the script (or in configure_model).",
}


class _Profiler:
    """``trainer.profiler``: ``with trainer.profiler.profile("name"):`` times a block into
    the simple profiler's table, and does nothing when the Trainer has no profiler."""

    def __init__(self, figures: dict[str, list[float]] | None) -> None:
        self._figures = figures

    @contextlib.contextmanager
    def profile(self, action: str) -> Iterator[None]:
        if self._figures is None:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            figures = self._figures.setdefault(action, [0, 0.0])
            figures[0] += 1
            figures[1] += time.perf_counter() - start


class RankTrainer:
    def __init__(
        self,
        config: TrainerConfig,
        global_rank: int,
        local_rank: int,
        node_rank: int,
        world_size: int,
        device: torch.device,
    ) -> None:
        self.config = config
        self.global_rank, self.local_rank = global_rank, local_rank
        self.node_rank, self.world_size = node_rank, world_size
        self.num_devices = world_size
        self.device = device
        # How this rank steps the model (DDP or FSDP); also Lightning's trainer.strategy.
        self.strategy: DDPStrategy | FSDPStrategy = (
            FSDPStrategy(self, config.precision, device, config.fsdp)
            if config.fsdp is not None
            else DDPStrategy(self, config.precision, device)
        )
        self.lightning_module: Any = None
        self.datamodule: Any = None
        self.callbacks: list[Any] = []
        self.optimizers: list[Any] = []
        self._lightning_optimizers: list[Any] = []
        self.lr_scheduler_configs: list[Any] = []
        self.train_dataloader: Any = None
        self.val_dataloaders: list[Any] = []
        self.test_dataloaders: list[Any] = []
        self.predict_dataloaders: list[Any] = []
        self.num_training_batches: int | float = -1  # unknown until the train loader exists
        self.num_val_batches: list[int] = []
        self._loader_sources: dict[str, Any] = {}
        self._loaders_loaded_at: dict[str, int] = {}  # kind -> the epoch it was last asked for
        self.ckpt_path: str | None = None  # the checkpoint this stage started from
        self._val_requested = False
        self._fitting = False
        self._validation_has_run = False  # a real (not sanity) validation ran in this fit
        self._validation_enabled = False
        self.current_epoch = 0
        self.global_step = 0
        # Batches that ran an optimizer step, over the whole fit: the logger's step axis
        # (Lightning's fit_loop.epoch_loop._batches_that_stepped).
        self._batches_that_stepped = 0
        # The batch stepped and its count is not in _batches_that_stepped yet (Lightning adds
        # it after on_train_batch_end): a checkpoint taken meanwhile resumes counting past it.
        self._step_uncounted = False
        self.should_stop = False
        # Where a checkpoint taken now resumes: (epoch, batches of it done through the
        # latest optimizer step); (next epoch, 0) once an epoch ran all of its batches.
        self._resume_point: tuple[int, int] = (0, 0)
        self._epoch_order: list[int] | None = None  # the samples of a re-partitioned epoch
        self._stop_check: Any = None  # preemption.StopCheck during fit
        self._stopped_at: str | None = None  # the checkpoint of a clean early stop
        self._poster: Any = None  # poster.Poster on rank 0 while the driver shows progress
        self.stage: str | None = None
        self.sanity_checking = False
        self.callback_metrics: dict[str, torch.Tensor] = {}
        self.logged_metrics: dict[str, torch.Tensor] = {}
        self.progress_bar_metrics: dict[str, torch.Tensor] = {}
        self._results: MetricLog | None = None
        self._train_results: MetricLog | None = None  # opened by on_train_start's logs
        self._log_rows: list[tuple[int, dict[str, float]]] = []
        # Views of the driver's loggers; rank 0's calls on them go to the driver's.
        self.loggers: list[Any] = []
        self._logger_calls: list[dict[str, Any]] = []
        self._log_dir = config.default_root_dir  # the driver's trainer.log_dir
        # Rank 0: this epoch's validation runs (metrics, epoch, step), for the driver's reports.
        self._fit_validations: list[dict[str, Any]] = []
        # (stage, dataloader_idx) -> batches seen: the step of evaluation loggers' rows.
        self._evaluation_batches_seen: dict[tuple[str, int], int] = {}
        self._current_hook: str | None = None
        self._writer = AsyncWriter()  # rank 0's checkpoint uploads
        self._hook_targets: dict[tuple[str, str], list[Any]] = {}  # see hooks._targets
        self._batch_hook_owners: dict[str, bool] = {}  # see loops._transfer_hook
        self._batch_idx: int | None = None
        self._is_last_batch = False  # the current training batch is the epoch's last
        # Trainer(profiler="simple"): action -> [calls, seconds] on this rank (hooks.timed).
        self._profile: dict[str, list[float]] | None = {} if config.profiler else None
        self.profiler = _Profiler(self._profile)
        self.num_test_batches: list[int] = []
        self.num_predict_batches: list[int] = []
        self.num_nodes = 1  # set by the worker from its group
        self._watch: Any = NO_WATCH  # watchdog.StallWatch on a rank of a live group
        self._notices: list[str] = []  # rank 0's warnings for the driver to give
        self._noticed: set[str] = set()  # what was already noted in this stage

    # ---- Lightning's read-only trainer attributes ---------------------------------------
    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    @property
    def max_epochs(self) -> int:
        return self.config.max_epochs

    @property
    def min_epochs(self) -> int:
        return self.config.min_epochs

    @property
    def max_steps(self) -> int:
        return self.config.max_steps

    @property
    def default_root_dir(self) -> str:
        return self.config.default_root_dir

    @property
    def log_every_n_steps(self) -> int:
        return self.config.log_every_n_steps

    @property
    def accumulate_grad_batches(self) -> int:
        return self.config.accumulate_grad_batches

    @property
    def precision(self) -> str:
        return self.config.precision

    @property
    def training(self) -> bool:
        return self.stage == "train"

    @property
    def validating(self) -> bool:
        return self.stage == "validate"

    @property
    def testing(self) -> bool:
        return self.stage == "test"

    @property
    def predicting(self) -> bool:
        return self.stage == "predict"

    # Flags as Lightning's trainer exposes them.
    @property
    def check_val_every_n_epoch(self) -> int | None:
        return self.config.check_val_every_n_epoch

    @property
    def val_check_interval(self) -> int | float:
        return self.config.val_check_interval

    @property
    def num_sanity_val_steps(self) -> int:
        return self.config.num_sanity_val_steps

    @property
    def fast_dev_run(self) -> int | bool:
        return self.config.fast_dev_run or False

    @property
    def gradient_clip_val(self) -> float | None:
        return self.config.gradient_clip_val

    @property
    def gradient_clip_algorithm(self) -> str | None:
        return self.config.gradient_clip_algorithm

    @property
    def limit_train_batches(self) -> int | float:
        return self.config.limit_train_batches

    @property
    def limit_val_batches(self) -> int | float:
        return self.config.limit_val_batches

    @property
    def limit_test_batches(self) -> int | float:
        return self.config.limit_test_batches

    @property
    def limit_predict_batches(self) -> int | float:
        return self.config.limit_predict_batches

    @property
    def overfit_batches(self) -> int | float:
        return self.config.overfit_batches

    @property
    def reload_dataloaders_every_n_epochs(self) -> int:
        return self.config.reload_dataloaders_every_n_epochs

    @property
    def barebones(self) -> bool:
        return self.config.barebones

    @property
    def min_steps(self) -> None:
        return None  # Trainer(min_steps=...) is not among raylight's flags

    # What this rank is running.
    @property
    def evaluating(self) -> bool:
        return self.stage in ("validate", "test")

    @property
    def enable_validation(self) -> bool:
        return self._validation_enabled

    @property
    def is_last_batch(self) -> bool:
        return self._is_last_batch

    @property
    def interrupted(self) -> bool:
        return False  # a rank that runs a hook has not been interrupted

    @property
    def received_sigterm(self) -> bool:
        return self._stop_check is not None and self._stop_check.signalled

    @property
    def num_sanity_val_batches(self) -> list[int]:
        steps = self.config.num_sanity_val_steps
        return [n if steps == -1 else min(n, steps) for n in self.num_val_batches]

    @property
    def device_ids(self) -> list[int]:
        return [self.device.index or 0]

    @property
    def distributed_sampler_kwargs(self) -> dict[str, int]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    # The callbacks Lightning looks up by kind.
    @property
    def checkpoint_callbacks(self) -> list[Any]:
        return [cb for cb in self.callbacks if type(cb).__name__ == "ModelCheckpoint"]

    @property
    def checkpoint_callback(self) -> Any:
        callbacks = self.checkpoint_callbacks
        return callbacks[0] if callbacks else None

    @property
    def early_stopping_callbacks(self) -> list[Any]:
        return [cb for cb in self.callbacks if type(cb).__name__ == "EarlyStopping"]

    @property
    def early_stopping_callback(self) -> Any:
        callbacks = self.early_stopping_callbacks
        return callbacks[0] if callbacks else None

    @property
    def progress_bar_callback(self) -> None:
        return None  # the driver draws the bar; ranks have none

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.is_global_zero:
            print(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """Lightning's trainer attributes that have no meaning on a rank: a clear error."""
        if name in _DRIVER_ONLY:
            raise AttributeError(
                f"trainer.{name} is not available inside raylight's workers: {_DRIVER_ONLY[name]}"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def model(self) -> Any:
        """The wrapped module the training step runs through (Lightning's trainer.model)."""
        return self.strategy.model

    @property
    def precision_plugin(self) -> Precision:
        return self.strategy.precision

    @property
    def logger(self) -> Any:
        """A view of the driver's first logger (``rank.logger_view``), or None."""
        return self.loggers[0] if self.loggers else None

    @property
    def log_dir(self) -> str:
        return self._log_dir

    @property
    def estimated_stepping_batches(self) -> int | float:
        if self.train_dataloader is None:  # asked in configure_optimizers: load it now
            self._load_train_loader()
        per_epoch = max(1, -(-self.num_training_batches // self.accumulate_grad_batches))
        total = per_epoch * self.max_epochs
        return min(total, self.max_steps) if self.max_steps != -1 else total

    def _load_train_loader(self) -> None:
        loaders, limits = request_loaders(self, "train")
        if not loaders:
            raise MisconfigurationException(NO_TRAIN_LOADER)
        self.train_dataloader, self.num_training_batches = loaders[0], limits[0]
        self._loaders_loaded_at["train"] = self.current_epoch
        if self.num_training_batches == 0:
            self._notice(
                f"Total length of `{type(loaders[0]).__name__}` across ranks is zero. Please "
                "make sure this was your intention. `Trainer.fit` stopped: No training batches "
                "(an empty dataset, or a batch_size larger than a rank's share of it with "
                "drop_last=True)."
            )

    def _notice(self, text: str, once: str | None = None) -> None:
        """A warning for the user, given by the driver (rank 0's, once each; with ``once``,
        once per stage for every text under that key)."""
        key = once or text
        if self.is_global_zero and key not in self._noticed:
            self._noticed.add(key)
            self._notices.append(text)

    def _take_notices(self) -> list[str]:
        notices, self._notices = self._notices, []
        return notices

    # ---- services for hooks --------------------------------------------------------------
    def _log(self, fx: str | None, name: str, value: Any, **kwargs: Any) -> None:
        if self.config.barebones:
            self._notice(
                "You are trying to `self.log()` but `Trainer(barebones=True)` is configured. "
                "Logging can impact raw speed so it is disabled under this setting."
            )
            return
        if self._results is None:
            raise ValueError(
                f"`self.log({name!r}, ...)` is only allowed inside a training, "
                "validation or test loop."
            )
        self._results.log(fx, name, value, **kwargs)

    def _all_reduce(self, tensor: torch.Tensor, reduce_fx: str) -> torch.Tensor:
        if self.world_size == 1 or not dist.is_initialized():
            return tensor
        dist.all_reduce(tensor, op=_REDUCE_OPS[reduce_fx])
        if reduce_fx == "mean":
            tensor = tensor / self.world_size
        return tensor

    def _all_gather(self, data: Any, sync_grads: bool = False) -> Any:
        if isinstance(data, dict):
            return {k: self._all_gather(v, sync_grads) for k, v in data.items()}
        if isinstance(data, list | tuple):
            return type(data)(self._all_gather(v, sync_grads) for v in data)
        if not isinstance(data, torch.Tensor):
            data = torch.tensor(data, device=self.device)
        if self.world_size == 1 or not dist.is_initialized():
            return data.unsqueeze(0)
        if sync_grads:
            import torch.distributed.nn.functional as dist_nn

            return torch.stack(dist_nn.all_gather(data.contiguous()))
        gathered = [torch.empty_like(data) for _ in range(self.world_size)]
        dist.all_gather(gathered, data.contiguous())
        return torch.stack(gathered)

    def _manual_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        self.strategy.backward(loss, *args, **kwargs)

    def _on_optimizer_stepped(self) -> None:
        self.global_step += 1

    def save_checkpoint(
        self, filepath: str, weights_only: bool = False, storage_options: Any = None
    ) -> None:
        """Lightning's ``trainer.save_checkpoint``, callable from any hook on every rank."""
        save_from_rank(self, filepath, weights_only)
