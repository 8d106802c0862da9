"""The strategy seam: how a rank runs one step of the user's model under DDP.

Everything between a batch and ``optimizer.step()`` that is not the user's code lives
here: wrapping the module, autocast and the gradient scaler, backward, gradient sync
(``no_sync`` for accumulation, the reducer for manual optimization), the clipping hook
and the optimizer step. The loops call these methods and never branch on the strategy.

It is also Lightning's ``trainer.strategy`` (``root_device``, ``barrier``, ``broadcast``,
``reduce_boolean_decision``), the part user code reaches for. Sharded training (FSDP2) is
``fsdp.py``: a second class with the same methods; the two share ``StrategyCommon``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.parallel.distributed import _find_tensors

from raylight.rank import hooks
from raylight.shared.checkpoint import load_weights

if TYPE_CHECKING:  # types only: rank_trainer builds the strategy
    from raylight.module import LightningModule
    from raylight.rank.optim import LightningOptimizer
    from raylight.rank.rank_trainer import RankTrainer


# torch's DDP raises this in the next forward when some parameters got no gradient.
_UNFINISHED_REDUCTION = "Expected to have finished reduction in the prior iteration"
_UNUSED_PARAMETERS = (
    "It looks like your LightningModule has parameters that were not used in producing the loss "
    "returned by training_step. If this is intentional, you must enable the detection of unused "
    "parameters in DDP, either by setting the string value "
    "`strategy='ddp_find_unused_parameters_true'` or by setting the flag in the strategy with "
    "`strategy=DDPStrategy(find_unused_parameters=True)` (from raylight.strategies)."
)


class Precision:
    """Autocast for the forward pass and, for '16-mixed', the gradient scaler."""

    def __init__(self, precision: str, device: torch.device) -> None:
        self.precision = precision
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "bf16-mixed":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.precision == "16-mixed":
            return torch.autocast(self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale(self, optimizer: Any) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
        if self.scaler is None:
            return optimizer.step(closure=closure, **kwargs)
        result = closure()  # the scaler cannot step through a closure
        self.scaler.step(optimizer, **kwargs)
        self.scaler.update()
        return result


class _TrainingStepModule(nn.Module):
    """DDP wraps this, so ``training_step`` runs inside DDP's forward and backward syncs."""

    def __init__(self, module: LightningModule, trainer: RankTrainer) -> None:
        super().__init__()
        self.module = module
        self._trainer = trainer

    def forward(self, batch: Any, batch_idx: int) -> Any:
        output = hooks.call_module(self._trainer, "training_step", batch, batch_idx)
        if not self.module.automatic_optimization:
            # manual_backward already ran (and synced) inside this forward; DDP must not arm
            # its reducer for another backward on the way out. after_manual_step re-enables it.
            self._trainer.strategy.model.require_backward_grad_sync = False
        return output


class StrategyCommon:
    """What every strategy shares: Lightning's ``trainer.strategy`` methods that user code
    calls, autocast, and the optimizer step around the user's closure (a strategy sets
    ``_trainer`` and ``precision``)."""

    _trainer: RankTrainer
    precision: Precision

    @property
    def root_device(self) -> torch.device:
        return self._trainer.device

    @property
    def world_size(self) -> int:
        return self._trainer.world_size

    def barrier(self, name: str | None = None) -> None:
        if dist.is_initialized():
            dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not dist.is_initialized():
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=src)
        return holder[0]

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        flag = torch.tensor(int(decision), device=self._trainer.device)
        flag = self._trainer._all_reduce(flag, "sum")
        return bool(flag == self._trainer.world_size) if all else bool(flag > 0)

    # ---- the step, around the user's code ------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return self.precision.autocast()

    def after_closure(self, optimizer: LightningOptimizer) -> None:
        """Between backward and the optimizer step: unscale, hook, clip (Lightning's order).
        Under FSDP ``clip_grad_norm_`` over DTensor gradients reduces the norm across the
        shards, so the clip is the one whole tensors would get."""
        trainer = self._trainer
        self.precision.unscale(optimizer.optimizer)
        hooks.call(trainer, "on_before_optimizer_step", optimizer.optimizer)
        if trainer.lightning_module.automatic_optimization:
            hooks.call_module(
                trainer,
                "configure_gradient_clipping",
                optimizer.optimizer,
                trainer.config.gradient_clip_val,
                trainer.config.gradient_clip_algorithm,
            )

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
        """The real step (through the gradient scaler when there is one)."""
        return self.precision.step(optimizer, closure, **kwargs)


class DDPStrategy(StrategyCommon):
    """Data parallel: every rank holds the whole model; backward all-reduces gradients."""

    sharded_checkpoints = False  # checkpoints are whole .ckpt files, built on rank 0

    def __init__(self, trainer: RankTrainer, precision: str, device: torch.device) -> None:
        self._trainer = trainer
        self.precision = Precision(precision, device)
        self.model: Any = None  # the DDP-wrapped training-step module, once set up
        self._static_graph_first_reduce_done = False

    # ---- the step ------------------------------------------------------------------------------
    def place(self, module: LightningModule, fitting: bool) -> None:
        module.to(self._trainer.device)

    def setup_module(self, module: LightningModule, find_unused_parameters: bool) -> None:
        """Wrap ``module`` (already on its device) so that its training step syncs gradients.

        The rest of ``Trainer(strategy=DDPStrategy(...))`` (static_graph, bucket_cap_mb, ...)
        comes with the run's config, checked on the driver."""
        device = self._trainer.device
        self.model = DistributedDataParallel(
            _TrainingStepModule(module, self._trainer),
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
            **self._trainer.config.ddp_kwargs,
        )
        self._static_graph_first_reduce_done = False  # a new wrapper starts at iteration one

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        # Through the DDP wrapper, so that backward all-reduces the gradients.
        try:
            with self.precision.autocast():
                return self.model(batch, batch_idx)
        except RuntimeError as error:
            if _UNFINISHED_REDUCTION not in str(error):
                raise
            unused = RuntimeError(_UNUSED_PARAMETERS)
            hooks.tag_error(unused, "training_step")
            raise unused from error

    def evaluation_context(self) -> contextlib.AbstractContextManager[Any]:
        """Lightning's ``Trainer(inference_mode)``: inference mode, or no_grad."""
        return torch.inference_mode() if self._trainer.config.inference_mode else torch.no_grad()

    def evaluation_step(self, step_name: str, *args: Any) -> Any:
        """A validation, test or predict step: straight to the module (DDP has nothing to sync)."""
        with self.precision.autocast():
            return hooks.call_module(self._trainer, step_name, *args)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward inside accumulates gradients locally; they sync on a window's last batch."""
        with self.model.no_sync():
            yield

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """The backward hooks around the (scaled) loss's backward, in Lightning's order."""
        trainer = self._trainer
        manual = not trainer.lightning_module.automatic_optimization
        if manual:
            self._prepare_reducer_for_manual_backward(loss)
        hooks.call(trainer, "on_before_backward", loss)
        hooks.call_module(trainer, "backward", self.precision.scale(loss), *args, **kwargs)
        hooks.call(trainer, "on_after_backward")
        if manual:
            self._static_graph_first_reduce()

    def after_manual_step(self) -> None:
        """After a manual-optimization training_step: DDP syncs the next forward again."""
        self.model.require_backward_grad_sync = True
        self.model.require_forward_param_sync = True

    def _prepare_reducer_for_manual_backward(self, loss: torch.Tensor) -> None:
        """In manual optimization backward runs inside DDP's forward (inside training_step),
        before DDP's own post-forward set-up: arm the reducer for this backward now, and
        build its buckets first so that the next forward does not try to (as Lightning does)."""
        model = self.model
        if not isinstance(model, DistributedDataParallel) or not torch.is_grad_enabled():
            return
        if not model.require_backward_grad_sync:
            model.require_forward_param_sync = False
            return
        model.require_forward_param_sync = True
        used = list(_find_tensors(loss)) if model.find_unused_parameters else []
        model.reducer._rebuild_buckets()
        model.reducer.prepare_for_backward(used)

    def _static_graph_first_reduce(self) -> None:
        """With ``static_graph``, DDP all-reduces its first iteration's gradients at the end of
        the backward that passes through its forward's output. A manual backward runs inside
        the forward instead, so start that all-reduce here, once (as Lightning does)."""
        model = self.model
        if not isinstance(model, DistributedDataParallel) or not model.static_graph:
            return
        if not self._static_graph_first_reduce_done:
            model.reducer._delay_all_reduce()
            self._static_graph_first_reduce_done = True

    # ---- state dicts ---------------------------------------------------------------------------
    def model_state_dict(self, shards: bool = False) -> dict[str, Any]:
        """The whole weights on CPU (``shards``, each rank's own part, is FSDP's)."""
        module = self._trainer.lightning_module
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}

    def optimizer_state_dicts(self, shards: bool = False) -> list[dict[str, Any]]:
        return [optimizer.state_dict() for optimizer in self._trainer.optimizers]

    def load_model_state_dict(
        self, state_dict: dict[str, Any], filepath: str, strict: bool
    ) -> None:
        load_weights(self._trainer.lightning_module, state_dict, filepath, strict)

    def load_optimizer_state_dicts(self, states: list[dict[str, Any]]) -> None:
        for optimizer, state in zip(self._trainer.optimizers, states, strict=False):
            optimizer.load_state_dict(state)

    def wait_for_save(self) -> None:
        """Nothing: rank 0's writer holds whole files, waited for by ``AsyncWriter``."""

    def final_weights(self) -> dict[str, Any] | None:
        """The weights for the driver's model (rank 0's; every rank holds them whole)."""
        return self.model_state_dict()
