"""Trainer: the public face on the driver. It holds the flags, Lightning's methods and the
results; ``driver.controller`` runs each fit, and ``driver.group`` talks to the workers.

The driver never touches training tensors during a run: it ships the module,
datamodule and callbacks to the workers once per call, asks every rank to run one
epoch at a time, and after ``fit`` loads rank 0's weights into the user's own module.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import ray
import torch

from raylight.callbacks import Callback, ModelCheckpoint, ModelSummary, OnExceptionCheckpoint
from raylight.datamodule import LightningDataModule
from raylight.driver import connect, lightning_flags, logger_relay, profile_report, sharing
from raylight.driver.display import ProgressDisplay, progress_bar_of
from raylight.driver.fit import in_tune_trial, run_fit
from raylight.driver.group import WorkerGroup
from raylight.driver.inputs import (
    add_default_checkpoint,
    add_recovery_checkpoint,
    check_fit_inputs,
    folder_of,
    global_seed,
    print_results,
    put_checked,
    resolve_ckpt_path,
    resolve_loggers,
)
from raylight.loggers import CSVLogger, Logger, TensorBoardLogger
from raylight.module import LightningModule
from raylight.seed import capture_rng
from raylight.shared import attributes, storage
from raylight.shared.board import RunBoard
from raylight.shared.config import (
    MisconfigurationException,
    check_run_flags,
    make_config,
    make_scaling,
)
from raylight.strategies.ddp import DDPStrategy, ddp_settings
from raylight.strategies.fsdp import FSDPStrategy, driver_weights_bytes, fsdp_settings, is_fsdp

_STAGE_LOADER = {"validate": "val", "test": "test", "predict": "predict"}
_BOARD_READ_S = 5.0  # the most the driver waits for the board's rows


class Trainer:
    worker_group_cls = WorkerGroup

    def __init__(
        self,
        *,
        max_epochs: int | None = None,
        min_epochs: int | None = None,
        max_steps: int = -1,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        limit_test_batches: int | float | None = None,
        limit_predict_batches: int | float | None = None,
        val_check_interval: int | float | None = None,
        check_val_every_n_epoch: int | None = 1,
        num_sanity_val_steps: int | None = None,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
        precision: str | int = "32-true",
        log_every_n_steps: int | None = None,
        fast_dev_run: int | bool = False,
        deterministic: bool | None = None,
        callbacks: list[Callback] | Callback | None = None,
        default_root_dir: str | os.PathLike | None = None,
        enable_progress_bar: bool | None = None,
        enable_checkpointing: bool | None = None,
        enable_model_summary: bool | None = None,
        logger: Any = None,
        use_distributed_sampler: bool = True,
        inference_mode: bool = True,
        num_workers: int | None = None,
        use_gpu: bool | None = None,
        resources_per_worker: dict[str, float] | None = None,
        accelerator: str | None = None,
        devices: int | str | list[int] | None = None,
        num_nodes: int = 1,
        gpus: int | None = None,
        strategy: str | DDPStrategy | FSDPStrategy | None = None,
        placement_timeout_s: float = 60.0,
        process_group_timeout_s: float = 1800.0,
        max_failures: int = 0,
        elastic_check_interval: float = 60.0,
        recovery_every_n_train_steps: int | None = None,
        recovery_train_time_interval: timedelta | None = None,
        ray_init_kwargs: dict[str, Any] | None = None,
        max_time: str | timedelta | dict[str, int] | None = None,
        overfit_batches: int | float = 0.0,
        reload_dataloaders_every_n_epochs: int = 0,
        sync_batchnorm: bool = False,
        benchmark: bool | None = None,
        detect_anomaly: bool = False,
        profiler: str | None = None,
        barebones: bool = False,
        max_driver_weights_gb: float = 8.0,
    ) -> None:
        if barebones:
            flags = lightning_flags.apply_barebones(
                {
                    "enable_checkpointing": enable_checkpointing,
                    "logger": logger,
                    "enable_progress_bar": enable_progress_bar,
                    "log_every_n_steps": log_every_n_steps,
                    "enable_model_summary": enable_model_summary,
                    "num_sanity_val_steps": num_sanity_val_steps,
                    "fast_dev_run": fast_dev_run,
                    "detect_anomaly": detect_anomaly,
                    "profiler": profiler,
                }
            )
            enable_checkpointing, logger = flags["enable_checkpointing"], flags["logger"]
            enable_progress_bar = flags["enable_progress_bar"]
            log_every_n_steps = flags["log_every_n_steps"]
            enable_model_summary = flags["enable_model_summary"]
            num_sanity_val_steps = flags["num_sanity_val_steps"]
        limit_train_batches, limit_val_batches = lightning_flags.overfit_limits(
            overfit_batches, limit_train_batches, limit_val_batches
        )
        if default_root_dir is None and in_tune_trial():
            from raylight import tune

            default_root_dir = tune.trial_root()  # Tune's storage holds the trial's files
        self.config = make_config(
            max_epochs=max_epochs,
            min_epochs=min_epochs,
            max_steps=max_steps,
            limit_train_batches=limit_train_batches,
            limit_val_batches=limit_val_batches,
            limit_test_batches=limit_test_batches,
            limit_predict_batches=limit_predict_batches,
            val_check_interval=val_check_interval,
            check_val_every_n_epoch=check_val_every_n_epoch,
            num_sanity_val_steps=2 if num_sanity_val_steps is None else num_sanity_val_steps,
            accumulate_grad_batches=accumulate_grad_batches,
            gradient_clip_val=gradient_clip_val,
            gradient_clip_algorithm=gradient_clip_algorithm,
            precision=precision,
            log_every_n_steps=50 if log_every_n_steps is None else log_every_n_steps,
            fast_dev_run=fast_dev_run,
            deterministic=bool(deterministic),
            default_root_dir=default_root_dir,
            use_distributed_sampler=use_distributed_sampler,
            inference_mode=inference_mode,
            process_group_timeout_s=process_group_timeout_s,
            overfit_batches=overfit_batches,
            reload_dataloaders_every_n_epochs=reload_dataloaders_every_n_epochs,
            sync_batchnorm=sync_batchnorm,
            benchmark=benchmark,
            detect_anomaly=detect_anomaly,
            profiler=lightning_flags.check_profiler(profiler),
            barebones=barebones,
        )
        self.scaling = make_scaling(
            num_workers, use_gpu, resources_per_worker, accelerator, devices, num_nodes, gpus
        )
        self._set_strategy(strategy)
        self.config.max_driver_weights_bytes = driver_weights_bytes(max_driver_weights_gb)
        if self.scaling.use_gpu is False and sync_batchnorm:
            raise MisconfigurationException(
                "Trainer(sync_batchnorm=True) needs GPU workers: torch's SyncBatchNorm works "
                "only with GPU modules under DDP. Use use_gpu=True, or leave it off on CPU."
            )
        if self.scaling.use_gpu is False and self.config.precision == "16-mixed":
            raise MisconfigurationException(
                "Trainer(precision='16-mixed') needs GPUs: use 'bf16-mixed' on CPU, or use_gpu=True."
            )
        if isinstance(callbacks, Callback):
            callbacks = [callbacks]
        if callbacks is not None and not isinstance(callbacks, list | tuple):
            raise MisconfigurationException(
                f"Trainer(callbacks={callbacks!r}): it takes a Callback or a list of them."
            )
        self.callbacks: list[Callback] = list(callbacks or [])
        lightning_flags.add_max_time(self.callbacks, max_time)
        for callback in self.callbacks:
            if not isinstance(callback, Callback):
                raise MisconfigurationException(
                    f"Trainer(callbacks=...) got a {type(callback).__name__}: callbacks must "
                    "subclass raylight.Callback."
                )
        self.enable_progress_bar = True if enable_progress_bar is None else enable_progress_bar
        progress_bar = progress_bar_of(self.callbacks, self.enable_progress_bar)
        self.enable_checkpointing = enable_checkpointing is not False
        if enable_model_summary is not False and not any(
            isinstance(cb, ModelSummary) for cb in self.callbacks
        ):
            self.callbacks.append(ModelSummary())  # Lightning's default; the driver prints it
        add_default_checkpoint(self.callbacks, self.enable_checkpointing)
        check_run_flags(
            placement_timeout_s,
            elastic_check_interval,
            max_failures,
            recovery_every_n_train_steps,
            recovery_train_time_interval,
            ray_init_kwargs,
        )
        self.max_failures = max_failures
        self.elastic_check_interval = elastic_check_interval
        add_recovery_checkpoint(
            self.callbacks,
            storage.join(self.config.default_root_dir, "recovery"),
            max_failures,
            recovery_every_n_train_steps,
            recovery_train_time_interval,
        )
        self.loggers = resolve_loggers(logger, self.config.default_root_dir)
        self.placement_timeout_s = placement_timeout_s
        # Entry point: the environment is read here and nowhere deeper.
        self._ray_address = os.environ.get("RAY_ADDRESS")
        self._ray_init_kwargs = dict(ray_init_kwargs or {})
        self._group: WorkerGroup | None = None
        self._last_stage: str | None = None
        self._expected_size = 0  # elastic: the size the next group should try first
        self._removed_pgs: list[Any] = []  # placement groups whose removal may not have held
        self._version_warnings: set[str] = set()  # package mismatches already reported
        self._warned: set[str] = set()  # other one-time warnings already given
        self._board: Any = None  # shared.board.RunBoard actor while this Trainer holds workers
        self._busy = False  # inside one of the Trainer's calls (sharing leaves it alone then)
        self._released = False  # a fit's workers were stopped for another Trainer's sake
        self.ckpt_path: str | None = None  # the checkpoint the latest call started from
        self._display = ProgressDisplay(self.enable_progress_bar, bar=progress_bar)
        self._in_tune = False  # this fit runs inside a Ray Tune trial
        self.lightning_module: LightningModule | None = None
        self.datamodule: LightningDataModule | None = None
        self.current_epoch = 0
        self.global_step = 0
        self._batches_that_stepped = 0  # the loggers' step axis, as on the ranks
        self._optimizers: list[Any] | None = None  # rank 0's, rebuilt on the model after fit
        self.should_stop = False
        self._num_training_batches: int | float = -1  # unknown until fit starts
        self.callback_metrics: dict[str, torch.Tensor] = {}
        self.logged_metrics: dict[str, torch.Tensor] = {}
        self.progress_bar_metrics: dict[str, torch.Tensor] = {}

    # ---- Lightning's read-only attributes ----------------------------------------------------
    @property
    def max_epochs(self) -> int:
        return self.config.max_epochs

    @property
    def max_steps(self) -> int:
        return self.config.max_steps

    @property
    def num_workers(self) -> int:
        return self.world_size

    @property
    def world_size(self) -> int:
        """The running group's size (an elastic group may run with fewer than its max)."""
        if self._group is not None and self._group.actors:
            return self._group.size
        return self.scaling.num_workers

    @property
    def default_root_dir(self) -> str:
        return self.config.default_root_dir

    @property
    def is_global_zero(self) -> bool:
        return True  # the driver speaks for rank 0

    @property
    def optimizers(self) -> list[Any]:
        """After fit: rank 0's optimizers, state included, over your model's parameters."""
        if self._optimizers is None:
            raise AttributeError(
                "trainer.optimizers on the driver holds rank 0's optimizers once a fit has "
                "ended (rebuilt over your model's parameters when their class takes its param "
                "groups alone). Before that, for an optimizer that cannot be rebuilt, or after a "
                "sharded (strategy='fsdp') fit, whose optimizer state stays in its checkpoints, "
                "read self.trainer.optimizers in a hook, or the checkpoint's optimizer_states."
            )
        return self._optimizers

    # ---- entry points -----------------------------------------------------------------------------
    def fit(
        self,
        model: LightningModule,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        datamodule: LightningDataModule | None = None,
        ckpt_path: str | None = None,
    ) -> None:
        """Train ``model`` on the workers; afterwards ``model`` holds the trained weights."""
        if isinstance(train_dataloaders, LightningDataModule):
            datamodule, train_dataloaders = train_dataloaders, None
        check_fit_inputs(model, train_dataloaders, datamodule)
        ckpt_path = self.ckpt_path = self._resolve_ckpt_path(ckpt_path, "fit")
        if ckpt_path is None and self._nothing_to_fit():
            return
        loaders = {"train": train_dataloaders, "val": val_dataloaders}
        for callback in self.callbacks:
            callback._on_driver_fit_start(self, model)
        with self._in_call(), self._logging_run():
            started = time.monotonic()
            hparams = logger_relay.hyperparameters(model, datamodule)
            if hparams:
                for logger in self.loggers:
                    logger.log_hyperparams(hparams)
            final = run_fit(self, model, datamodule, loaders, ckpt_path)
            self._report_profile("fit", started)
        for callback, trained in zip(self.callbacks, final["callbacks"], strict=True):
            callback.__dict__.update(trained.__dict__)
        self._take_weights(model, final["state_dict"])  # its warning names their checkpoints
        attributes.apply(model, final["attributes"])  # as if model were rank 0's, as in Lightning
        self._optimizers = attributes.rebuild_optimizers(model, final["optimizers"])

    def _take_weights(self, model: LightningModule, weights: dict[str, Any] | None) -> None:
        if weights is not None:
            model.load_state_dict(weights)
            return
        # A sharded fit whose whole weights exceed the budget: the driver never holds them.
        callback = self.checkpoint_callback
        saved = callback and (callback.last_model_path or callback.best_model_path)
        where = (
            f"load them from the checkpoint {storage.redact(saved)} with "
            f"{type(model).__name__}.load_from_checkpoint(...)"
            if saved
            else "save a checkpoint with ModelCheckpoint to load them from"
        )
        warnings.warn(
            "The trained weights are larger than Trainer(max_driver_weights_gb="
            f"{self.config.max_driver_weights_bytes / 2**30:g}), so the driver's model was left "
            f"as it was: {where}, or raise max_driver_weights_gb.",
            UserWarning,
            stacklevel=3,
        )

    def _set_strategy(self, strategy: Any) -> None:
        """Lightning's strategy names, a DDPStrategy or an FSDPStrategy: their settings reach
        the ranks' wrapper through the run's config."""
        config, use_gpu = self.config, self.scaling.use_gpu
        if is_fsdp(strategy):
            fsdp, config.process_group_timeout_s = fsdp_settings(
                strategy, use_gpu, config.process_group_timeout_s
            )
            config.fsdp = fsdp
            return
        if config.precision == "bf16-true":
            raise MisconfigurationException(
                "Trainer(precision='bf16-true') is supported with strategy='fsdp' only: use "
                "'bf16-mixed' with DDP."
            )
        ddp = ddp_settings(strategy, use_gpu, config.process_group_timeout_s)
        config.find_unused_parameters = ddp.find_unused_parameters
        config.ddp_kwargs = ddp.ddp_kwargs
        config.process_group_timeout_s = ddp.process_group_timeout_s

    def _nothing_to_fit(self) -> bool:
        """Lightning's do-nothing fits, found before any worker starts: say so and return."""
        config = self.config
        reason = None
        if config.max_steps != -1 and self.global_step >= config.max_steps:
            reason = f"`max_steps={config.max_steps}` reached."
        elif self.current_epoch >= config.max_epochs:
            reason = f"`max_epochs={config.max_epochs}` reached."
        elif config.limit_train_batches == 0:
            reason = "No training batches (`limit_train_batches=0`)."
        if reason is not None:
            print(f"`Trainer.fit` stopped: {reason}", file=sys.stderr, flush=True)
        return reason is not None

    @contextlib.contextmanager
    def _in_call(self) -> Iterator[None]:
        self._busy = True
        try:
            yield
        finally:
            self._busy = False

    def validate(
        self,
        model: LightningModule | None = None,
        dataloaders: Any = None,
        ckpt_path: str | None = None,
        verbose: bool = True,
        datamodule: LightningDataModule | None = None,
    ) -> list[dict[str, float]]:
        return self._evaluate("validate", model, dataloaders, ckpt_path, verbose, datamodule)

    def test(
        self,
        model: LightningModule | None = None,
        dataloaders: Any = None,
        ckpt_path: str | None = None,
        verbose: bool = True,
        datamodule: LightningDataModule | None = None,
    ) -> list[dict[str, float]]:
        return self._evaluate("test", model, dataloaders, ckpt_path, verbose, datamodule)

    def predict(
        self,
        model: LightningModule | None = None,
        dataloaders: Any = None,
        datamodule: LightningDataModule | None = None,
        return_predictions: bool = True,
        ckpt_path: str | None = None,
    ) -> list[Any] | None:
        """Predictions of every rank, in dataset order (each rank reads a contiguous slice)."""
        model, datamodule = self._resolve_eval_inputs("predict", model, dataloaders, datamodule)
        ckpt_path = self.ckpt_path = self._resolve_ckpt_path(ckpt_path, "predict")
        with self._in_call():
            started = time.monotonic()
            group = self._prepare(model, datamodule, "predict", {"predict": dataloaders}, ckpt_path)
            per_rank = group.predict()
            self._report_profile("predict", started)
            if self.loggers:  # what predict_step logged through self.logger
                logger_relay.replay(self.loggers, group.metrics()["logger_calls"])
        merged = [sum((rank[i] for rank in per_rank), []) for i in range(len(per_rank[0]))]
        if not return_predictions:
            return None
        return merged[0] if len(merged) == 1 else merged

    def save_checkpoint(self, filepath: str | os.PathLike, weights_only: bool = False) -> None:
        if self._released:
            raise RuntimeError(
                "save_checkpoint needs the workers of this Trainer's fit, but they were stopped "
                "when another Trainer in this script needed their resources. Call "
                "save_checkpoint right after fit, or load the checkpoint the fit's "
                "ModelCheckpoint wrote (trainer.checkpoint_callback.best_model_path)."
            )
        if self._group is None or not self._group.actors or self._last_stage != "fit":
            raise RuntimeError(
                "save_checkpoint needs the workers of a completed trainer.fit: call it after "
                "fit (and before validate/test/predict, which set the workers up anew)."
            )
        path = storage.absolute(os.fspath(filepath))
        with self._in_call():
            self._group.share_local_storage(self.config.default_root_dir, [folder_of(path)], [])
            self._group.save_checkpoint(path, weights_only, what="save_checkpoint")

    def shutdown(self, force: bool = False) -> None:
        """Stop the workers. The Trainer does this itself when it is garbage-collected."""
        if self._group is not None:
            self._group.shutdown(force=force)
            self._group = None
        if self._board is not None and ray.is_initialized():
            ray.kill(self._board, no_restart=True)
        self._board = None
        sharing.let_go(self)

    def _holds_workers(self) -> bool:
        return self._group is not None and bool(self._group.actors)

    def _release_workers(self) -> None:
        """Stop this idle Trainer's workers for another Trainer of the script (``sharing``);
        its next call starts new ones."""
        self._released = self._last_stage == "fit"
        self.shutdown()

    def __del__(self) -> None:
        try:
            if ray.is_initialized():
                self.shutdown(force=True)
        except Exception:  # interpreter shutdown: Ray may already be gone
            pass

    @property
    def checkpoint_callbacks(self) -> list[ModelCheckpoint]:
        """The user's ModelCheckpoints (the run's own recovery checkpoints are not among them)."""
        return [
            cb
            for cb in self.callbacks
            if isinstance(cb, ModelCheckpoint) and not getattr(cb, "_recovery", False)
        ]

    @property
    def checkpoint_callback(self) -> ModelCheckpoint | None:
        callbacks = self.checkpoint_callbacks
        return callbacks[0] if callbacks else None

    @property
    def logger(self) -> Logger | None:
        return self.loggers[0] if self.loggers else None

    @property
    def log_dir(self) -> str | None:
        """Lightning's rule: a TensorBoard or CSV logger's version folder, another logger's
        ``save_dir``, else ``default_root_dir``."""
        if self.logger is None:
            return self.config.default_root_dir
        if isinstance(self.logger, TensorBoardLogger | CSVLogger):
            return self.logger.log_dir
        return self.logger.save_dir

    @contextlib.contextmanager
    def _logging_run(self) -> Iterator[None]:
        """Loggers are finalized after every Trainer call, with Lightning's status strings."""
        try:
            yield
        except BaseException:
            for logger in self.loggers:
                logger.finalize("failed")
            raise
        for logger in self.loggers:
            logger.finalize("success")

    # ---- internals ---------------------------------------------------------------------------
    def _resolve_ckpt_path(self, ckpt_path: Any, fn: str) -> str | None:
        return resolve_ckpt_path(
            ckpt_path, fn, self.config.default_root_dir, self.checkpoint_callbacks
        )

    def _evaluate(
        self,
        stage: str,
        model: Any,
        dataloaders: Any,
        ckpt_path: str | None,
        verbose: bool,
        datamodule: Any,
    ) -> list[dict[str, float]]:
        model, datamodule = self._resolve_eval_inputs(stage, model, dataloaders, datamodule)
        loaders = {_STAGE_LOADER[stage]: dataloaders}
        ckpt_path = self.ckpt_path = self._resolve_ckpt_path(ckpt_path, stage)
        with self._in_call(), self._logging_run():
            started = time.monotonic()
            group = self._prepare(model, datamodule, stage, loaders, ckpt_path)
            results = group.evaluate(stage)
            self._report_profile(stage, started)
            self._absorb(group.metrics(), progress=False)
        if verbose and self.enable_progress_bar:
            print_results(stage, results)
        return results

    def _resolve_eval_inputs(
        self, stage: str, model: Any, dataloaders: Any, datamodule: Any
    ) -> tuple[Any, Any]:
        if isinstance(dataloaders, LightningDataModule):
            datamodule, dataloaders = dataloaders, None
        model = model if model is not None else self.lightning_module
        if model is None:
            raise MisconfigurationException(
                f"trainer.{stage}() needs a model: pass one, or call it after trainer.fit(model)."
            )
        if not isinstance(model, LightningModule):
            raise MisconfigurationException(
                f"trainer.{stage}() got a {type(model).__name__}: it takes a raylight.LightningModule."
            )
        if datamodule is None and dataloaders is None and model is self.lightning_module:
            datamodule = self.datamodule
        return model, datamodule

    def _prepare(
        self,
        model: LightningModule,
        datamodule: Any,
        stage: str,
        loaders: dict[str, Any],
        ckpt_path: str | None,
    ) -> WorkerGroup:
        """Start the workers if needed, then ship this call's objects to them once."""
        self.lightning_module, self.datamodule = model, datamodule
        self._last_stage = stage
        for callback in (cb for cb in self.callbacks if isinstance(cb, ModelCheckpoint)):
            # Lightning's default: the logger's version directory, else default_root_dir.
            if callback.dirpath is None:
                root = (self.log_dir if self.loggers else None) or self.config.default_root_dir
                callback.dirpath = storage.join(root, "checkpoints")
            callback.dirpath = storage.absolute(callback.dirpath)
            storage.check_reachable(callback.dirpath)
        group = self._ensure_group()
        root = self.config.default_root_dir
        folders = [root] + [cb.dirpath for cb in self.callbacks if isinstance(cb, ModelCheckpoint)]
        blind = group.share_local_storage(root, folders, [ckpt_path] if ckpt_path else [])
        if blind:
            warnings.warn(
                f"The workers of ranks {blind} run on nodes that cannot see "
                f"default_root_dir={self.config.default_root_dir!r}, a path local to the "
                "driver's node: their checkpoint files travel through the driver's node. For "
                "large models give default_root_dir a location every node shares (NFS mounted "
                "at the same path, or s3://..., gs://...).",
                stacklevel=3,
            )
        self.config.global_seed = global_seed()
        fitting = stage == "fit"
        job = {
            "stage": stage,
            "config": self.config,
            "use_gpu": self.scaling.use_gpu,
            "module": model,
            "datamodule": datamodule,
            "callbacks": self.callbacks,
            "loaders": loaders,
            "ckpt_path": os.fspath(ckpt_path) if ckpt_path else None,
            "user_ckpt_path": self.ckpt_path,
            "rng_states": capture_rng(),
            "loggers": logger_relay.describe(self.loggers),
            "log_dir": self.log_dir,
            "position": (self.current_epoch, self.global_step, self._batches_that_stepped),
            "stop_flag": self._board if fitting else None,
            # Rank 0 posts its progress for the bar, and its rows for the loggers.
            "progress_board": (
                self._board if fitting and (self._display.enabled or self.loggers) else None
            ),
        }
        job_ref = put_checked(job)
        self._warn_notices(group.setup(job_ref, stage))
        return group

    def _ensure_group(self) -> WorkerGroup:
        if self._group is not None and self._group.actors:
            return self._group
        self._connect()
        if not self._in_tune:  # a trial's workers have their own bundles
            sharing.make_room(self, self.scaling.bundle(), self.scaling.num_workers)
        self._released = False
        # Held before it starts, so that shutdown() reaches a half-started group too.
        group = self._group = self.worker_group_cls(self.scaling, self.placement_timeout_s)
        sharing.holds_workers(self)
        group.held_here = sharing.total_held(sharing.others(self))
        if self._board is None:
            self._board = ray.remote(RunBoard).options(num_cpus=0).remote()
        group.board = self._board
        # Under FSDP its ranks write their pieces while the first error travels here.
        group.exception_saves = self.config.fsdp is not None and any(
            isinstance(cb, OnExceptionCheckpoint) for cb in self.callbacks
        )
        group.expected_size, self._expected_size = self._expected_size, 0
        group.removed_pgs = self._removed_pgs  # shared across this Trainer's groups
        group.version_warnings = self._version_warnings
        if self._in_tune:
            from raylight import tune

            group.trial_pg = tune.trial_placement_group()
        backend = "nccl" if self.scaling.use_gpu else "gloo"
        try:
            group.start(
                backend,
                self.config.process_group_timeout_s,
                {"OMP_NUM_THREADS": str(self.scaling.cpus_per_worker)},
            )
        except BaseException:
            group.shutdown(force=True)
            raise
        return group

    def _connect(self) -> None:
        """Join the cluster Ray's conventions point to, or start an embedded local one
        (``connect`` has the rules); joining ships the driver's uninstalled modules."""
        needed = self.scaling.num_workers * self.scaling.bundle().get("CPU", 1.0)
        connect.connect(self._ray_address, self._ray_init_kwargs, needed, self._warned)

    def _absorb(self, summary: dict[str, Any], progress: bool = True) -> None:
        """Take in a rank-0 summary; ``progress`` is False for validate/test, which leave the
        fit's epoch and step as they are."""
        if progress:
            self.current_epoch = summary["epoch"]
            self.global_step = summary["global_step"]
            self._batches_that_stepped = summary["batches_that_stepped"]
            self.should_stop = summary["should_stop"]
            self._num_training_batches = summary["num_training_batches"]
        for name in ("callback_metrics", "logged_metrics", "progress_bar_metrics"):
            setattr(self, name, {k: torch.tensor(v) for k, v in summary[name].items()})
        self._warn_notices(summary["notices"])
        self._log_posted_rows()  # the epoch's earlier rows first
        self._log_rows(summary["log_rows"])
        logger_relay.replay(self.loggers, summary["logger_calls"])

    def _log_posted_rows(self) -> None:
        """Write the metric rows rank 0 posted to the board during the epoch (live logs); rows
        not yet taken when the board is gone are the ones a restart logs again."""
        if self._board is None or not self.loggers:
            return
        try:
            rows = ray.get(self._board.take_rows.remote(), timeout=_BOARD_READ_S)
        except ray.exceptions.RayError:  # gone with a failed group, or busy: no live rows
            return
        self._log_rows(rows)

    def _log_rows(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        for step, row in rows:
            for logger in self.loggers:
                logger.log_metrics(row, step)

    def _report_profile(self, stage: str, started: float) -> None:
        """Trainer(profiler="simple"): the table of this call's hook timings on every rank."""
        if self.config.profiler is None or self._group is None or not self._group.actors:
            return
        profile_report.print_report(stage, self._group.profile(), time.monotonic() - started)

    def _warn_notices(self, notices: list[str] | None) -> None:
        """Rank 0's warnings (Lightning's, for fits that would otherwise do nothing
        silently), given once each by the driver, where the user sees them."""
        for notice in notices or []:
            if notice not in self._warned:
                self._warned.add(notice)
                warnings.warn(notice, UserWarning, stacklevel=4)
