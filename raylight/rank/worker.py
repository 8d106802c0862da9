"""The worker: one rank of the run, a plain class that ``group.py`` turns into a Ray actor.

Each public method is one round trip from the driver. Setting a stage up follows
Lightning's ``Trainer._run``: configure_callbacks -> prepare_data (local rank 0, then a
barrier) -> setup -> configure_model -> device and the strategy's wrapper ->
configure_optimizers -> checkpoint restore, whose ``Resume`` the worker keeps for the
first ``train_epoch``; the loops then run in ``loops.py``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from raylight.module import LightningModule
from raylight.rank import checkpointing, hooks, loops
from raylight.rank.data import request_loaders
from raylight.rank.logger_view import rank_views
from raylight.rank.optim import LightningOptimizer, parse_optimizers
from raylight.rank.poster import Poster
from raylight.rank.preemption import StopCheck
from raylight.rank.rank_trainer import RankTrainer
from raylight.rank.watchdog import StallWatch
from raylight.seed import restore_rng
from raylight.shared import attributes, shipping, storage
from raylight.shared.config import MisconfigurationException, TrainerConfig
from raylight.utilities.rank_zero import set_rank


def _with_rank_context(method: Callable[..., Any]) -> Callable[..., Any]:
    """Add the rank, hook and batch to any exception, and run the ``on_exception`` hooks."""

    @functools.wraps(method)
    def wrapper(self: Worker, *args: Any, **kwargs: Any) -> Any:
        watch = self._watch
        if watch is not None:
            watch.begin_call(method.__name__)
        try:
            return method(self, *args, **kwargs)
        except BaseException as error:
            trainer = self.trainer
            where = getattr(error, "_raylight_hook", None) or method.__name__
            batch = trainer._batch_idx if trainer is not None else None
            epoch = trainer.current_epoch if trainer is not None else None
            detail = f"rank {self.rank} raised {type(error).__name__} in {where}"
            if batch is not None:
                detail += f" (epoch {epoch}, batch {batch})"
            tb = "".join(traceback.format_exception(error))
            if hasattr(error, "add_note"):
                error.add_note(f"{detail}; traceback on that rank:\n{tb}")
            if trainer is not None and trainer.lightning_module is not None:
                try:
                    hooks.call_callbacks(trainer, "on_exception", error)
                except Exception as hook_error:  # the original error matters more
                    error.add_note(f"on_exception also raised: {hook_error!r}")
            raise
        finally:
            if watch is not None:
                watch.end_call()

    return wrapper


class Worker:
    def __init__(self, driver_sys_path: list[str] | None = None, rank: int = -1) -> None:
        # The user's classes are pickled by reference when they live in an importable
        # module (a script's sibling file, a test helper): make the driver's import
        # roots importable here too, before any job is unpickled.
        missing = [p for p in driver_sys_path or [] if p not in sys.path and os.path.isdir(p)]
        sys.path[:0] = missing
        self.rank = rank  # from the placement group's layout; init_process_group confirms it
        self.trainer: RankTrainer | None = None
        self._user_callbacks: list[Any] = []
        self._group_info: dict[str, int] = {}
        self._rendezvous: socket.socket | None = None  # rank 0's listener until the store takes it
        self._watch: StallWatch | None = None  # set once the process group exists
        self._resume: checkpointing.Resume | None = None  # from setup to the first train_epoch

    def __repr__(self) -> str:
        # Ray prefixes this worker's stdout with its repr: "(rank=1 pid=...)".
        return f"rank={self.rank}"

    # ---- process group ----------------------------------------------------------------------
    def node_info(self) -> dict[str, Any]:
        import ray

        context = ray.get_runtime_context()
        return {
            "node_ip": ray.util.get_node_ip_address(),
            "node_id": context.get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "pid": os.getpid(),
            "versions": shipping.versions(),
        }

    def sees_path(self, path: str) -> bool:
        return os.path.exists(path)

    def route_storage(self, proxy: Any) -> None:
        storage.route_local_paths(proxy)

    def open_rendezvous(self, host: str) -> int:
        """Rank 0: listen for the other ranks on ``host`` (loopback when the whole group is
        on this node), on a free port that stays ours until the store takes it."""
        listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        listener.bind((host, 0))
        listener.listen(128)
        self._rendezvous = listener
        return listener.getsockname()[1]

    def init_process_group(
        self,
        ranks: dict[str, int],
        master_addr: str,
        master_port: int,
        backend: str,
        timeout_s: float,
        cpus: int,
        board: Any = None,
    ) -> None:
        """Join the group; every rank must call this at about the same time. A group on one
        node talks over loopback only: the store listens there, and gloo's and NCCL's
        sockets use the loopback interface unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME
        say otherwise."""
        self.rank = ranks["RANK"]
        self._group_info = ranks
        set_rank(self.rank)  # rank_zero_only (raylight's and Lightning's) before user code runs
        os.environ.update({name: str(value) for name, value in ranks.items()})
        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), OMP_NUM_THREADS=str(cpus)
        )
        if _is_loopback(master_addr):
            interface = _loopback_interface()
            os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
        torch.set_num_threads(cpus)
        timeout = timedelta(seconds=timeout_s)
        if self.rank == 0:
            listener = self._rendezvous
            store = dist.TCPStore(
                master_addr,
                master_port,
                ranks["WORLD_SIZE"],
                is_master=True,
                timeout=timeout,
                wait_for_workers=False,
                master_listen_fd=listener.detach(),  # the store owns the socket from here
            )
        else:
            store = dist.TCPStore(master_addr, master_port, ranks["WORLD_SIZE"], timeout=timeout)
        dist.init_process_group(
            backend, store=store, rank=self.rank, world_size=ranks["WORLD_SIZE"], timeout=timeout
        )
        if board is not None:
            self._watch = StallWatch(board, self.rank, timeout_s)

    def shutdown(self) -> None:
        if self._watch is not None:
            self._watch.stop()
        if dist.is_initialized():
            dist.destroy_process_group()

    # ---- stage set-up --------------------------------------------------------------------------
    @_with_rank_context
    def setup(self, job: dict[str, Any]) -> list[str]:
        """Build this rank's trainer view for ``job['stage']`` (fit/validate/test/predict);
        returns rank 0's warnings for the driver."""
        job = shipping.unpack_job(job)  # the user's objects, their numpy arrays this rank's own
        config: TrainerConfig = job["config"]
        # Start from the driver's generator states, as each process of a DDP script would.
        restore_rng(job["rng_states"])
        if config.deterministic:
            # Lightning's Trainer(deterministic=True): deterministic kernels, or an error.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        if config.benchmark is not None:
            torch.backends.cudnn.benchmark = config.benchmark
        # Lightning's detect_anomaly covers the whole run on each rank.
        torch.autograd.set_detect_anomaly(config.detect_anomaly)
        info = self._group_info
        device = _device(job["use_gpu"])
        trainer = self.trainer = RankTrainer(
            config, info["RANK"], info["LOCAL_RANK"], info["NODE_RANK"], info["WORLD_SIZE"], device
        )
        if self._watch is not None:
            trainer._watch = self._watch
            self._watch.trainer = trainer
        trainer._loader_sources = job["loaders"]
        trainer.ckpt_path = job.get("user_ckpt_path")
        trainer.loggers = rank_views(job["loggers"], trainer)
        trainer._log_dir = job["log_dir"]
        trainer.num_nodes = info["GROUP_WORLD_SIZE"]
        if job["stage"] != "fit":  # evaluation after a fit logs at the fit's position
            trainer.current_epoch, trainer.global_step, trainer._batches_that_stepped = job[
                "position"
            ]
        module: LightningModule = job["module"]
        trainer.lightning_module, trainer.datamodule = module, job["datamodule"]
        self._user_callbacks = list(job["callbacks"])
        trainer.callbacks = list(self._user_callbacks)
        module.trainer = trainer
        if trainer.datamodule is not None:
            trainer.datamodule.trainer = trainer
        trainer.callbacks = _ordered_callbacks(trainer.callbacks + _model_callbacks(trainer))
        trainer._hook_targets.clear()
        stage = job["stage"]
        trainer._fitting = stage == "fit"
        self._prepare_data(trainer)
        _call_setup(trainer, stage)
        hooks.call_module(trainer, "configure_model")
        trainer.strategy.place(module, fitting=stage == "fit")
        module._device = device
        if stage == "fit":
            trainer._stop_check = StopCheck(job.get("stop_flag"), trainer.world_size)
            if job.get("progress_board") is not None and trainer.is_global_zero:
                trainer._poster = Poster(job["progress_board"])
            with contextlib.suppress(ValueError):  # signals reach only the main thread
                trainer._stop_check.install_sigterm()
            if config.sync_batchnorm:  # before DDP wraps it, as Lightning does
                _check_sync_batchnorm(device)
                module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
            trainer.strategy.setup_module(module, config.find_unused_parameters)
            self._configure_optimizers(trainer)
        # Where a restored fit continues, kept for the first train_epoch.
        self._resume = None
        if job.get("ckpt_path"):
            self._resume = checkpointing.restore(trainer, job["ckpt_path"], stage)
        return trainer._take_notices()

    def _prepare_data(self, trainer: RankTrainer) -> None:
        # Once per node (or once per cluster when prepare_data_per_node is False).
        for owner in (trainer.datamodule, trainer.lightning_module):
            if owner is None:
                continue
            per_node = getattr(owner, "prepare_data_per_node", True)
            if (trainer.local_rank if per_node else trainer.global_rank) == 0:
                if owner is trainer.datamodule:
                    hooks.call_datamodule(trainer, "prepare_data")
                else:
                    hooks.call_module(trainer, "prepare_data")
        trainer.strategy.barrier("prepare_data")

    def _configure_optimizers(self, trainer: RankTrainer) -> None:
        module = trainer.lightning_module
        output = hooks.call_module(trainer, "configure_optimizers")
        if output is None:
            trainer._notice(
                "`LightningModule.configure_optimizers` returned `None`, this fit will run "
                "with no optimizer"
            )
        trainer.optimizers, trainer.lr_scheduler_configs = parse_optimizers(output)
        if module.automatic_optimization and len(trainer.optimizers) > 1:
            raise MisconfigurationException(
                "Training with multiple optimizers is only supported with manual optimization: "
                "set `self.automatic_optimization = False` and step them in training_step."
            )
        trainer._lightning_optimizers = [
            LightningOptimizer(
                opt,
                trainer.strategy.after_closure,
                trainer.strategy.optimizer_step,
                trainer._on_optimizer_stepped,
            )
            for opt in trainer.optimizers
        ]

    # ---- loops -------------------------------------------------------------------------------
    @_with_rank_context
    def fit_start(self, sanity_check: bool) -> dict[str, Any]:
        loops.fit_start(self.trainer, sanity_check)
        return loops.epoch_summary(self.trainer)

    @_with_rank_context
    def train_epoch(self, epoch: int) -> dict[str, Any]:
        resume, self._resume = self._resume, None
        if self.trainer._profile is not None:  # Lightning's name for a whole training epoch
            run = loops.train_epoch
            return hooks.timed(
                self.trainer._profile, "run_training_epoch", run, self.trainer, epoch, resume
            )
        return loops.train_epoch(self.trainer, epoch, resume)

    @_with_rank_context
    def fit_end(self) -> dict[str, Any] | None:
        """End the fit; rank 0 returns the trained weights and the callbacks' states."""
        trainer = self.trainer
        loops.fit_end(trainer)
        _call_teardown(trainer, "fit")
        trainer._writer.wait()  # fit ends once every checkpoint is committed
        weights = trainer.strategy.final_weights()  # a collective under FSDP
        if not trainer.is_global_zero:
            return None
        sharding = trainer.config.fsdp is not None
        return {
            "state_dict": weights,
            # The user's callbacks as rank 0 left them (best_model_path and the like).
            "callbacks": self._user_callbacks,
            "attributes": attributes.collect(trainer.lightning_module),
            # Sharded optimizer state stays on the ranks (it is in the checkpoints).
            "optimizers": None
            if sharding
            else attributes.collect_optimizers(trainer.lightning_module, trainer.optimizers),
        }

    @_with_rank_context
    def evaluate(self, stage: str) -> list[dict[str, float]]:
        trainer = self.trainer
        trainer.lightning_module.zero_grad(set_to_none=True)
        loaders, limits = request_loaders(trainer, "val" if stage == "validate" else "test")
        if stage == "validate":
            trainer.val_dataloaders, trainer.num_val_batches = loaders, limits
        else:
            trainer.test_dataloaders, trainer.num_test_batches = loaders, limits
        results = loops.run_evaluation(trainer, stage, loaders, limits)
        _call_teardown(trainer, stage)
        return results

    @_with_rank_context
    def predict(self) -> list[list[Any]]:
        trainer = self.trainer
        trainer.lightning_module.zero_grad(set_to_none=True)
        loaders, limits = request_loaders(trainer, "predict")
        trainer.predict_dataloaders, trainer.num_predict_batches = loaders, limits
        predictions = loops.run_predict(trainer, loaders, limits)
        _call_teardown(trainer, "predict")
        return predictions

    @_with_rank_context
    def metrics(self) -> dict[str, Any]:
        return loops.epoch_summary(self.trainer)

    @_with_rank_context
    def profile(self) -> dict[str, list[float]]:
        """This rank's timings since the last call (Trainer(profiler="simple"))."""
        figures = self.trainer._profile
        if figures is None:
            return {}
        taken = {action: list(values) for action, values in figures.items()}
        figures.clear()  # the dict trainer.profiler writes into stays the same object
        return taken

    @_with_rank_context
    def flush_checkpoints(self) -> None:
        """Return once every checkpoint this rank wrote is committed."""
        self.trainer._writer.wait()

    @_with_rank_context
    def save_checkpoint(self, filepath: str, weights_only: bool) -> None:
        self.trainer.save_checkpoint(filepath, weights_only)
        self.trainer._writer.wait()  # the driver's call returns once the file exists


# ---- helpers ---------------------------------------------------------------------------------
def _is_loopback(address: str) -> bool:
    return address.startswith("127.") or address == "::1"


def _loopback_interface() -> str:
    """The name of this node's loopback interface (``lo`` on Linux, ``lo0`` on macOS)."""
    import psutil  # a Ray dependency

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address.startswith("127.") for a in addresses):
            return name
    return "lo"


def _check_sync_batchnorm(device: torch.device) -> None:
    if device.type != "cuda":
        raise MisconfigurationException(
            "Trainer(sync_batchnorm=True) needs GPU workers: torch's SyncBatchNorm works only "
            "with GPU modules under DDP. Use use_gpu=True, or leave sync_batchnorm off on CPU."
        )


def _device(use_gpu: bool) -> torch.device:
    if use_gpu:
        # Ray sets CUDA_VISIBLE_DEVICES to this worker's GPU, which is then device 0.
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)
    return torch.device("cpu")


def _ordered_callbacks(callbacks: list[Any]) -> list[Any]:
    """Lightning runs checkpoint callbacks last; keep the rest in the user's order."""
    monitoring = [cb for cb in callbacks if getattr(cb, "_saves_checkpoints", False)]
    return [cb for cb in callbacks if cb not in monitoring] + monitoring


def _model_callbacks(trainer: RankTrainer) -> list[Any]:
    """``configure_callbacks`` replaces Trainer callbacks of the same type, as in Lightning."""
    extra = hooks.call_module(trainer, "configure_callbacks") or []
    if not isinstance(extra, list | tuple):
        extra = [extra]
    types = {type(cb) for cb in extra}
    trainer.callbacks[:] = [cb for cb in trainer.callbacks if type(cb) not in types]
    return list(extra)


def _call_setup(trainer: RankTrainer, stage: str) -> None:
    trainer.strategy.barrier("pre_setup")
    hooks.call_datamodule(trainer, "setup", stage)
    hooks.call(trainer, "setup", stage)
    trainer.strategy.barrier("post_setup")


def _call_teardown(trainer: RankTrainer, stage: str) -> None:
    hooks.call_datamodule(trainer, "teardown", stage)
    hooks.call(trainer, "teardown", stage)
