"""LightningModule: the user's model, with Lightning 2.x's hooks as no-ops.

This file imports nothing of the engine. Everything that needs the engine
(``log``, ``optimizers``, ``manual_backward``, ``all_gather``) goes through
``self.trainer``, the per-rank trainer view that the worker attaches. The one raylight
import is the ``.ckpt`` format (pure data: torch and storage only), which
``load_from_checkpoint`` reads.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

# The checkpoint formats only, .ckpt files and sharded directories (they import torch and
# storage, nothing of the engine).
from raylight.shared import checkpoint as checkpoint_format
from raylight.shared import sharded


class AttributeDict(dict):
    """A dict whose keys read as attributes, as ``self.hparams`` is in Lightning."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError as err:
            raise AttributeError(f"hparams has no key {key!r}") from err

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value


def move_data_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_data_to_device(x, device) for x in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_data_to_device(x, device) for x in batch)
    if isinstance(batch, defaultdict):
        moved = defaultdict(batch.default_factory)
        moved.update((k, move_data_to_device(v, device)) for k, v in batch.items())
        return moved
    if isinstance(batch, Mapping):
        return type(batch)({k: move_data_to_device(v, device) for k, v in batch.items()})
    return batch


def _missing_loader(hook: str) -> str:
    return (
        f"`{hook}` must be implemented to be used with the Trainer: define it on the "
        "LightningModule or the LightningDataModule, or pass the loaders to the Trainer method."
    )


class LightningModule(nn.Module):
    """Subclass this as you would ``pytorch_lightning.LightningModule``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization: bool = True
        self.strict_loading: bool = True
        self._trainer: Any = None
        self._current_fx_name: str | None = None
        self._hparams: AttributeDict = AttributeDict()
        self._hparams_initial: AttributeDict = AttributeDict()
        self._hparams_name: str | None = None
        self._device = torch.device("cpu")
        self._log_hyperparams = True
        self.prepare_data_per_node = True

    # ---- properties -------------------------------------------------------------------
    @property
    def trainer(self) -> Any:
        if self._trainer is None:
            raise RuntimeError(
                f"{type(self).__name__} is not attached to a Trainer: call trainer.fit(model) first."
            )
        return self._trainer

    @trainer.setter
    def trainer(self, trainer: Any) -> None:
        self._trainer = trainer

    @property
    def current_epoch(self) -> int:
        return self._trainer.current_epoch if self._trainer is not None else 0

    @property
    def global_step(self) -> int:
        return self._trainer.global_step if self._trainer is not None else 0

    @property
    def global_rank(self) -> int:
        return self._trainer.global_rank if self._trainer is not None else 0

    @property
    def local_rank(self) -> int:
        return self._trainer.local_rank if self._trainer is not None else 0

    @property
    def logger(self) -> Any:
        """The trainer's first logger (on a rank, a view of the driver's; see the README)."""
        return self._trainer.logger if self._trainer is not None else None

    @property
    def loggers(self) -> list[Any]:
        return self._trainer.loggers if self._trainer is not None else []

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def hparams(self) -> AttributeDict:
        return self._hparams

    @property
    def hparams_initial(self) -> AttributeDict:
        return AttributeDict(copy.deepcopy(self._hparams_initial))

    @property
    def on_gpu(self) -> bool:
        return self._device.type == "cuda"

    def __getstate__(self) -> dict[str, Any]:
        # The trainer view holds process groups and loaders: never ship it.
        state = self.__dict__.copy()
        state["_trainer"] = None
        return state

    def freeze(self) -> None:
        """Stop training every parameter and switch to eval mode, as Lightning's ``freeze``."""
        for param in self.parameters():
            param.requires_grad = False
        self.eval()

    def unfreeze(self) -> None:
        """Train every parameter again and switch to train mode."""
        for param in self.parameters():
            param.requires_grad = True
        self.train()

    # ---- hyperparameters --------------------------------------------------------------
    def save_hyperparameters(
        self, *args: Any, ignore: str | list[str] | None = None, logger: bool = True
    ) -> None:
        """Collect the caller's ``__init__`` arguments into ``self.hparams``."""
        ignored = {ignore} if isinstance(ignore, str) else set(ignore or [])
        ignored |= {"self", "__class__"}
        frame = inspect.currentframe().f_back  # the subclass's __init__
        info = inspect.getargvalues(frame)
        init_args: dict[str, Any] = {}
        for name in info.args:
            init_args[name] = info.locals[name]
        if info.keywords:  # *args have no names: Lightning leaves them out too
            init_args.update(info.locals[info.keywords])
        del frame

        if len(args) == 1 and isinstance(args[0], Mapping):
            hparams = dict(args[0])
            self._hparams_name = None
        elif len(args) == 1 and not isinstance(args[0], str):
            hparams = dict(vars(args[0]))  # an argparse.Namespace or similar
            self._hparams_name = None
        elif args:
            hparams = {name: init_args[name] for name in args if name not in ignored}
            self._hparams_name = "kwargs"
        else:
            hparams = {k: v for k, v in init_args.items() if k not in ignored}
            self._hparams_name = "kwargs"
        self._hparams = AttributeDict(hparams)
        self._hparams_initial = AttributeDict(copy.deepcopy(hparams))
        self._log_hyperparams = logger

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: str | Any,
        map_location: Any = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> LightningModule:
        """Build the module from a ``.ckpt`` (raylight's or pytorch-lightning's): its saved
        hyperparameters, overridden by ``kwargs``, then its weights. ``weights_only=False``
        unpickles everything the file holds (only for files you trust). A sharded checkpoint
        (a directory, from ``strategy="fsdp"``) is read whole."""
        path = os.fspath(checkpoint_path)
        if sharded.is_sharded(path):
            loaded = sharded.read_full(path, weights_only)
        else:
            loaded = checkpoint_format.load(path, weights_only)
        hparams = {**loaded.get("hyper_parameters", {}), **kwargs}
        model = cls(**hparams)
        model.on_load_checkpoint(loaded)
        checkpoint_format.load_weights(
            model,
            loaded["state_dict"],
            os.fspath(checkpoint_path),
            model.strict_loading if strict is None else strict,
        )
        if map_location is not None:
            model.to(map_location)
        return model

    # ---- engine helpers (delegate to the per-rank trainer view) -------------------------
    def log(
        self,
        name: str,
        value: Any,
        prog_bar: bool = False,
        logger: bool | None = None,
        on_step: bool | None = None,
        on_epoch: bool | None = None,
        reduce_fx: str | Any = "mean",
        enable_graph: bool = False,
        sync_dist: bool = False,
        sync_dist_group: Any = None,
        add_dataloader_idx: bool = True,
        batch_size: int | None = None,
        metric_attribute: str | None = None,
        rank_zero_only: bool = False,
    ) -> None:
        """Record a metric; see Lightning's ``LightningModule.log`` for the semantics."""
        if self._trainer is None:
            return
        self._trainer._log(
            self._current_fx_name,
            name,
            value,
            prog_bar=prog_bar,
            logger=True if logger is None else logger,
            on_step=on_step,
            on_epoch=on_epoch,
            reduce_fx=reduce_fx,
            sync_dist=sync_dist,
            add_dataloader_idx=add_dataloader_idx,
            batch_size=batch_size,
        )

    def log_dict(self, dictionary: Mapping[str, Any], **kwargs: Any) -> None:
        for name, value in dictionary.items():
            self.log(name, value, **kwargs)

    def print(self, *args: Any, **kwargs: Any) -> None:
        """Print from global rank 0 only."""
        if self.global_rank == 0:
            print(*args, **kwargs)

    def optimizers(self, use_pl_optimizer: bool = True) -> Any:
        opts = self.trainer._lightning_optimizers if use_pl_optimizer else self.trainer.optimizers
        return opts[0] if len(opts) == 1 else opts

    def lr_schedulers(self) -> Any:
        schedulers = [config.scheduler for config in self.trainer.lr_scheduler_configs]
        if not schedulers:
            return None
        return schedulers[0] if len(schedulers) == 1 else schedulers

    def manual_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        self.trainer._manual_backward(loss, *args, **kwargs)

    def all_gather(self, data: Any, group: Any = None, sync_grads: bool = False) -> Any:
        """Gather tensors from every rank: each tensor gains a leading world-size dimension."""
        return self.trainer._all_gather(data, sync_grads=sync_grads)

    def toggle_optimizer(self, optimizer: Any) -> None:
        """Kept for Lightning compatibility; DDP here needs no per-optimizer toggling."""

    def untoggle_optimizer(self, optimizer: Any) -> None:
        """Kept for Lightning compatibility."""

    def clip_gradients(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if not gradient_clip_val:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm in (None, "norm"):
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
        elif gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            raise ValueError(
                f"gradient_clip_algorithm={gradient_clip_algorithm!r}: use 'norm' or 'value'."
            )

    # ---- overridable hooks with behaviour -----------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return super().forward(*args, **kwargs)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"{type(self).__name__}.training_step is not defined: trainer.fit needs it."
        )

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        """Optional; validation runs only when a subclass overrides it."""

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        """Optional; trainer.test needs a subclass to override it."""

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        return self(batch)

    def configure_optimizers(self) -> Any:
        raise NotImplementedError(
            f"{type(self).__name__}.configure_optimizers is not defined: trainer.fit needs it."
        )

    def configure_callbacks(self) -> Any:
        return []

    def configure_model(self) -> None:
        pass

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        loss.backward(*args, **kwargs)

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Any = None,
    ) -> None:
        optimizer.step(closure=optimizer_closure)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
        optimizer.zero_grad()

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        if metric is None:
            scheduler.step()
        else:
            scheduler.step(metric)

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        return move_data_to_device(batch, device)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return batch

    def on_validation_model_eval(self) -> None:
        self.eval()

    def on_validation_model_train(self) -> None:
        self.train()

    def on_test_model_eval(self) -> None:
        self.eval()

    def on_test_model_train(self) -> None:
        self.train()

    def on_predict_model_eval(self) -> None:
        self.eval()

    def on_validation_model_zero_grad(self) -> None:
        self.zero_grad(set_to_none=True)

    def train_dataloader(self) -> Any:
        raise NotImplementedError(_missing_loader("train_dataloader"))

    def val_dataloader(self) -> Any:
        raise NotImplementedError(_missing_loader("val_dataloader"))

    def test_dataloader(self) -> Any:
        raise NotImplementedError(_missing_loader("test_dataloader"))

    def predict_dataloader(self) -> Any:
        raise NotImplementedError(_missing_loader("predict_dataloader"))

    # ---- no-op hooks ----------------------------------------------------------------------
    def prepare_data(self) -> None: ...
    def setup(self, stage: str) -> None: ...
    def teardown(self, stage: str) -> None: ...
    def on_fit_start(self) -> None: ...
    def on_fit_end(self) -> None: ...
    def on_train_start(self) -> None: ...
    def on_train_end(self) -> None: ...
    def on_validation_start(self) -> None: ...
    def on_validation_end(self) -> None: ...
    def on_test_start(self) -> None: ...
    def on_test_end(self) -> None: ...
    def on_predict_start(self) -> None: ...
    def on_predict_end(self) -> None: ...
    def on_train_epoch_start(self) -> None: ...
    def on_train_epoch_end(self) -> None: ...
    def on_validation_epoch_start(self) -> None: ...
    def on_validation_epoch_end(self) -> None: ...
    def on_test_epoch_start(self) -> None: ...
    def on_test_epoch_end(self) -> None: ...
    def on_predict_epoch_start(self) -> None: ...
    def on_predict_epoch_end(self) -> None: ...
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any: ...
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None: ...
    def on_validation_batch_start(
        self, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None: ...
    def on_validation_batch_end(
        self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None: ...
    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_test_batch_end(
        self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None: ...
    def on_predict_batch_start(
        self, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None: ...
    def on_predict_batch_end(
        self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None: ...
    def on_before_backward(self, loss: torch.Tensor) -> None: ...
    def on_after_backward(self) -> None: ...
    def on_before_optimizer_step(self, optimizer: Any) -> None: ...
    def on_before_zero_grad(self, optimizer: Any) -> None: ...
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None: ...
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None: ...
