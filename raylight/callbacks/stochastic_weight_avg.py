"""StochasticWeightAveraging: average the weights of the last epochs (Izmailov et al., 2018).

Lightning's names, arguments and behaviour: from ``swa_epoch_start`` a ``SWALR`` scheduler
replaces the user's, the average (``torch.optim.swa_utils``'s rule) takes the weights at the
start of every epoch from then to the last, and at the end of the fit the averaged weights go
into the module. Every rank holds the same weights under DDP, so every rank keeps the same
average; nothing is exchanged for it.

Where raylight differs: Lightning recomputes the batch norm statistics of the averaged
weights in one extra epoch (``max_epochs + 1``, no backward, no optimizer step). raylight
runs that pass in ``on_train_end`` instead, over the same train loader and through the
same ``training_step`` (its ``self.log`` calls are dropped: there is no epoch for them),
and then averages the statistics over the ranks, so that all ranks end with the same
weights and the pass has one collective per batch norm buffer on every rank. The fit's
``current_epoch`` therefore ends at ``max_epochs``, not ``max_epochs + 1``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from copy import deepcopy
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import SWALR

from raylight.callbacks.callback import Callback
from raylight.shared.config import MisconfigurationException
from raylight.utilities.rank_zero import rank_zero_info, rank_zero_warn

_AVG_FN = Callable[[Tensor, Tensor, Tensor], Tensor]


class StochasticWeightAveraging(Callback):
    """Average the model's weights from ``swa_epoch_start`` (an epoch, from 1, or a fraction of
    ``max_epochs``) to the end of training, with the learning rate annealed to ``swa_lrs``
    over ``annealing_epochs`` (``"cos"`` or ``"linear"``). ``avg_fn(averaged, current,
    num_averaged)`` replaces the equal-weight mean; ``device`` holds the average (None: the
    module's device)."""

    def __init__(
        self,
        swa_lrs: float | list[float],
        swa_epoch_start: int | float = 0.8,
        annealing_epochs: int = 10,
        annealing_strategy: Literal["cos", "linear"] = "cos",
        avg_fn: _AVG_FN | None = None,
        device: torch.device | str | None = torch.device("cpu"),  # noqa: B008 (Lightning's default)
    ) -> None:
        err_msg = "swa_epoch_start should be a >0 integer or a float between 0 and 1."
        if isinstance(swa_epoch_start, int) and swa_epoch_start < 1:
            raise MisconfigurationException(err_msg)
        if isinstance(swa_epoch_start, float) and not (0 <= swa_epoch_start <= 1):
            raise MisconfigurationException(err_msg)
        wrong_type = not isinstance(swa_lrs, (float, list))
        wrong_float = isinstance(swa_lrs, float) and swa_lrs <= 0
        wrong_list = isinstance(swa_lrs, list) and not all(
            isinstance(lr, float) and lr > 0 for lr in swa_lrs
        )
        if wrong_type or wrong_float or wrong_list:
            raise MisconfigurationException(
                "The `swa_lrs` should a positive float, or a list of positive floats"
            )
        if avg_fn is not None and not callable(avg_fn):
            raise MisconfigurationException("The `avg_fn` should be callable.")
        if device is not None and not isinstance(device, (torch.device, str)):
            raise MisconfigurationException(
                f"device is expected to be a torch.device or a str. Found {device}"
            )
        self.n_averaged: Tensor | None = None
        self._swa_epoch_start = swa_epoch_start
        self._swa_lrs = swa_lrs
        self._annealing_epochs = annealing_epochs
        self._annealing_strategy = annealing_strategy
        self._avg_fn = avg_fn or self.avg_fn
        self._device = device
        self._model_contains_batch_norm: bool | None = None
        self._average_model: nn.Module | None = None
        self._initialized = False
        self._swa_scheduler: Any = None
        self._scheduler_state: dict | None = None
        self._init_n_averaged = 0
        self._latest_update_epoch = -1
        self.momenta: dict[nn.modules.batchnorm._BatchNorm, float | None] = {}
        self._max_epochs: int

    @property
    def swa_start(self) -> int:
        assert isinstance(self._swa_epoch_start, int)
        return max(self._swa_epoch_start - 1, 0)  # 0-based

    @property
    def swa_end(self) -> int:
        if self._max_epochs == -1:
            return float("inf")  # type: ignore[return-value]
        return self._max_epochs - 1  # 0-based

    @staticmethod
    def pl_module_contains_batch_norm(pl_module: Any) -> bool:
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in pl_module.modules())

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # A copy before the module moves to its device; the trainer is shared, not copied.
        memo = {id(pl_module._trainer): pl_module._trainer}
        self._average_model = deepcopy(pl_module, memo)

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """A checkpoint taken after SWA started holds SWALR's state in place of the user's
        scheduler: drop the user's now, before raylight loads the schedulers' states (right
        after the callbacks'), and build SWALR with that state at the next epoch start (what
        Lightning does in ``on_fit_start``, before it loads them)."""
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state and state.get("scheduler_state") is not None and trainer.lr_scheduler_configs:
            trainer.lr_scheduler_configs.clear()

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if len(trainer.optimizers) != 1:
            raise MisconfigurationException("SWA currently works with 1 `optimizer`.")
        if len(trainer.lr_scheduler_configs) > 1:
            raise MisconfigurationException(
                "SWA currently not supported for more than 1 `lr_scheduler`."
            )
        if isinstance(self._swa_epoch_start, float):
            if trainer.max_epochs == -1:
                raise MisconfigurationException(
                    "SWA with `swa_epoch_start` as a float is not supported when "
                    "`max_epochs=-1`. Please provide `swa_epoch_start` as an integer."
                )
            self._swa_epoch_start = int(trainer.max_epochs * self._swa_epoch_start)
        self._model_contains_batch_norm = self.pl_module_contains_batch_norm(pl_module)
        self._max_epochs = trainer.max_epochs

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        epoch = trainer.current_epoch
        if not self._initialized and self.swa_start <= epoch <= self.swa_end:
            self._initialized = True
            self._start_swa(trainer, pl_module)
        if self.swa_start <= epoch <= self.swa_end and epoch > self._latest_update_epoch:
            assert self.n_averaged is not None and self._average_model is not None
            self.update_parameters(self._average_model, pl_module, self.n_averaged, self._avg_fn)
            self._latest_update_epoch = epoch

    def _start_swa(self, trainer: Any, pl_module: Any) -> None:
        """Move the average to its device and swap the user's scheduler for SWALR."""
        from raylight.rank.optim import LRSchedulerConfig  # the rank's scheduler record

        assert self._average_model is not None
        self._average_model = self._average_model.to(self._device or pl_module.device)
        optimizer = trainer.optimizers[0]
        if isinstance(self._swa_lrs, float):
            self._swa_lrs = [self._swa_lrs] * len(optimizer.param_groups)
        for lr, group in zip(self._swa_lrs, optimizer.param_groups, strict=False):
            group["initial_lr"] = lr
        self._swa_scheduler = SWALR(
            optimizer,
            swa_lr=self._swa_lrs,  # type: ignore[arg-type]
            anneal_epochs=self._annealing_epochs,
            anneal_strategy=self._annealing_strategy,
            last_epoch=self._lightning_max_epochs() if self._annealing_strategy == "cos" else -1,
        )
        if self._scheduler_state is not None:
            self._swa_scheduler.load_state_dict(self._scheduler_state)
        elif trainer.current_epoch != self.swa_start:
            rank_zero_warn(
                "SWA is initializing after swa_start without any checkpoint data. "
                "This may be caused by loading a checkpoint from an older version of "
                "PyTorch Lightning."
            )
        swa_config = LRSchedulerConfig(self._swa_scheduler)
        if trainer.lr_scheduler_configs:
            config = trainer.lr_scheduler_configs[0]
            if config.interval != "epoch" or config.frequency != 1:
                rank_zero_warn(f"SWA is currently only supported every epoch. Found {config}")
            rank_zero_info(
                f"Swapping scheduler `{config.scheduler.__class__.__name__}`"
                f" for `{self._swa_scheduler.__class__.__name__}`"
            )
            trainer.lr_scheduler_configs[0] = swa_config
        else:
            trainer.lr_scheduler_configs.append(swa_config)
        if self.n_averaged is None:
            self.n_averaged = torch.tensor(
                self._init_n_averaged, dtype=torch.long, device=pl_module.device
            )

    def _lightning_max_epochs(self) -> int:
        """``trainer.max_epochs`` as Lightning's SWA sees it: one more for its batch norm epoch."""
        extra = self._model_contains_batch_norm and self._max_epochs != -1
        return self._max_epochs + 1 if extra else self._max_epochs

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        # The fit ran through the last SWA epoch (not stopped early), or has no end.
        finished = self._latest_update_epoch == self.swa_end
        if not (finished or self._max_epochs == -1) or self._average_model is None:
            return
        self.transfer_weights(self._average_model, pl_module)
        if self._model_contains_batch_norm and self._max_epochs != -1:
            self.reset_batch_norm_and_save_state(pl_module)
            try:
                _update_batch_norm(trainer, pl_module)
            finally:
                self.reset_momenta()

    @staticmethod
    def transfer_weights(src_pl_module: nn.Module, dst_pl_module: nn.Module) -> None:
        # In place: the DDP wrapper holds these very tensors, so it needs no re-wrap.
        for src_param, dst_param in zip(
            src_pl_module.parameters(), dst_pl_module.parameters(), strict=False
        ):
            dst_param.detach().copy_(src_param.to(dst_param.device))

    def reset_batch_norm_and_save_state(self, pl_module: Any) -> None:
        """Fresh statistics, and ``momentum=None`` so that the pass takes their plain mean."""
        self.momenta = {}
        for module in pl_module.modules():
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                continue
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean = torch.zeros_like(module.running_mean, device=pl_module.device)
            module.running_var = torch.ones_like(module.running_var, device=pl_module.device)
            self.momenta[module] = module.momentum
            module.momentum = None
            assert module.num_batches_tracked is not None
            module.num_batches_tracked *= 0

    def reset_momenta(self) -> None:
        for bn_module in self.momenta:
            bn_module.momentum = self.momenta[bn_module]

    @staticmethod
    def update_parameters(
        average_model: nn.Module, model: nn.Module, n_averaged: Tensor, avg_fn: _AVG_FN
    ) -> None:
        for p_swa, p_model in zip(average_model.parameters(), model.parameters(), strict=False):
            device = p_swa.device
            p_swa_ = p_swa.detach()
            p_model_ = p_model.detach().to(device)
            src = p_model_ if n_averaged == 0 else avg_fn(p_swa_, p_model_, n_averaged.to(device))
            p_swa_.copy_(src)
        n_averaged += 1

    @staticmethod
    def avg_fn(
        averaged_model_parameter: Tensor, model_parameter: Tensor, num_averaged: Tensor
    ) -> Tensor:
        return averaged_model_parameter + (model_parameter - averaged_model_parameter) / (
            num_averaged + 1
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "n_averaged": 0 if self.n_averaged is None else self.n_averaged.item(),
            "latest_update_epoch": self._latest_update_epoch,
            "scheduler_state": None
            if self._swa_scheduler is None
            else self._swa_scheduler.state_dict(),
            "average_model_state": None
            if self._average_model is None
            else self._average_model.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._init_n_averaged = state_dict["n_averaged"]
        self._latest_update_epoch = state_dict["latest_update_epoch"]
        self._scheduler_state = state_dict["scheduler_state"]
        if self._average_model is not None and state_dict["average_model_state"] is not None:
            self._average_model.load_state_dict(state_dict["average_model_state"])


def _update_batch_norm(trainer: Any, pl_module: Any) -> None:
    """One forward pass of ``training_step`` over this rank's train batches (no backward),
    then the mean of the ranks' statistics. Every rank runs the same number of batches (the
    distributed sampler pads) and the same all-reduces, so the collectives stay matched."""
    from raylight.rank import hooks, loops  # rank-side engine; callbacks run on the ranks

    was_training = pl_module.training
    pl_module.train()
    limit = trainer.num_training_batches
    with torch.no_grad(), _logging_dropped(trainer):
        for batch_idx, batch in enumerate(trainer.train_dataloader):
            if batch_idx >= limit:
                break
            batch = loops.transfer_batch(trainer, batch, 0)
            hooks.call_module(trainer, "training_step", batch, batch_idx)
    pl_module.train(was_training)
    for module in pl_module.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for name in ("running_mean", "running_var"):
                buffer = getattr(module, name)
                buffer.copy_(trainer._all_reduce(buffer.clone(), "mean"))


@contextlib.contextmanager
def _logging_dropped(trainer: Any) -> Iterator[None]:
    trainer._log = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del trainer._log
