"""BaseFinetuning and BackboneFinetuning: freeze modules before training and unfreeze them
at a chosen epoch, adding their parameters to the optimizer as a new param group.

Lightning's names, arguments and behaviour, with two fixes that data parallel training
needs (Lightning issue #20340):

- DDP registers only the parameters that require grad when it wraps the module, so
  parameters unfrozen mid-fit would train on each rank's own gradients and the ranks'
  weights would drift apart. When an epoch's ``finetune_function`` changes which
  parameters train, the module is wrapped again (every rank does so at the same epoch).
- A resumed fit gets back the param groups added before the checkpoint, and which
  parameters were trainable, before the optimizer's state is loaded, so it continues as
  the uninterrupted fit would.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterable
from typing import Any

import torch
from torch.nn import Module, ModuleDict
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.optimizer import Optimizer

from raylight.callbacks.callback import Callback
from raylight.shared.config import MisconfigurationException
from raylight.utilities.rank_zero import rank_zero_warn

log = logging.getLogger(__name__)

Modules = Module | Iterable[Module | Iterable]


def multiplicative(epoch: int) -> float:
    return 2.0


class BaseFinetuning(Callback):
    """Override ``freeze_before_training`` (called in ``setup``, before
    ``configure_optimizers``) and ``finetune_function`` (called at every train epoch start,
    once per optimizer) with your own logic. Build the optimizer from the parameters that
    require grad: ``Adam(filter(lambda p: p.requires_grad, self.parameters()))``."""

    def __init__(self) -> None:
        # optimizer index -> its param groups, with parameter names instead of tensors
        self._internal_optimizer_metadata: dict[int, list[dict[str, Any]]] = {}
        # What finetune_function left frozen, for a resumed fit (raylight's addition).
        self._frozen: dict[str, list[str]] | None = None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"internal_optimizer_metadata": self._internal_optimizer_metadata}
        if self._frozen is not None:
            state["frozen"] = self._frozen
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "internal_optimizer_metadata" in state_dict:  # noqa: SIM401
            self._internal_optimizer_metadata = state_dict["internal_optimizer_metadata"]
        else:  # Lightning's checkpoints from before 1.6 hold the metadata itself
            self._internal_optimizer_metadata = state_dict  # type: ignore[assignment]
        self._frozen = state_dict.get("frozen")

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Rebuild the saved param groups now: raylight loads the optimizers' states right
        after the callbacks' states (Lightning does this in ``on_fit_start``, before it
        loads them). Also unfreeze what was unfrozen before the checkpoint, which
        ``freeze_before_training`` froze again in ``setup``."""
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if not state:
            return
        metadata = state.get("internal_optimizer_metadata", state)
        named_parameters = dict(pl_module.named_parameters())
        for opt_idx, optimizer in enumerate(trainer.optimizers):
            if opt_idx in metadata:
                optimizer.param_groups = self._apply_mapping_to_param_groups(
                    metadata[opt_idx], named_parameters
                )
        frozen = state.get("frozen")
        if frozen is None:  # a checkpoint from Lightning: the groups tell what trains
            frozen = _frozen_outside_groups(pl_module, trainer.optimizers)
        before = _trainable(pl_module)
        _apply_frozen(pl_module, frozen)
        if _trainable(pl_module) != before:
            _rewrap(trainer, pl_module)

    @staticmethod
    def flatten_modules(modules: Modules) -> list[Module]:
        """The leaf modules of ``modules``, and the parent modules that hold parameters
        themselves."""
        if isinstance(modules, ModuleDict):
            modules = modules.values()
        if isinstance(modules, Iterable):
            flat: list[Module] = []
            for module in modules:
                flat.extend(BaseFinetuning.flatten_modules(module))
            found: Iterable[Module] = flat
        else:
            found = modules.modules()
        return [m for m in found if not list(m.children()) or m._parameters]

    @staticmethod
    def filter_params(
        modules: Modules, train_bn: bool = True, requires_grad: bool = True
    ) -> Generator[torch.nn.Parameter, None, None]:
        """The parameters of ``modules`` whose ``requires_grad`` is ``requires_grad`` (batch
        norm layers' only with ``train_bn``)."""
        for module in BaseFinetuning.flatten_modules(modules):
            if isinstance(module, _BatchNorm) and not train_bn:
                continue
            # not recursive: a parent with parameters of its own is in the list too
            for param in module.parameters(recurse=False):
                if param.requires_grad == requires_grad:
                    yield param

    @staticmethod
    def make_trainable(modules: Modules) -> None:
        for module in BaseFinetuning.flatten_modules(modules):
            if isinstance(module, _BatchNorm):
                module.track_running_stats = True
            for param in module.parameters(recurse=False):
                param.requires_grad = True

    @staticmethod
    def freeze_module(module: Module) -> None:
        if isinstance(module, _BatchNorm):
            module.track_running_stats = False
        for param in module.parameters(recurse=False):
            param.requires_grad = False

    @staticmethod
    def freeze(modules: Modules, train_bn: bool = True) -> None:
        """Freeze ``modules``; with ``train_bn`` their batch norm layers keep training."""
        for module in BaseFinetuning.flatten_modules(modules):
            if isinstance(module, _BatchNorm) and train_bn:
                BaseFinetuning.make_trainable(module)
            else:
                BaseFinetuning.freeze_module(module)

    @staticmethod
    def filter_on_optimizer(optimizer: Optimizer, params: Iterable) -> list:
        """``params`` without those already in one of ``optimizer``'s param groups."""
        kept, removed = [], []
        for param in params:
            if any(
                torch.equal(p, param) for group in optimizer.param_groups for p in group["params"]
            ):
                removed.append(param)
            else:
                kept.append(param)
        if removed:
            rank_zero_warn(
                "The provided params to be frozen already exist within another group of this "
                "optimizer. Those parameters will be skipped.\n"
                "HINT: Did you init your optimizer in `configure_optimizer` as such:\n"
                f" {type(optimizer)}(filter(lambda p: p.requires_grad, self.parameters()), ...) ",
            )
        return kept

    @staticmethod
    def unfreeze_and_add_param_group(
        modules: Modules,
        optimizer: Optimizer,
        lr: float | None = None,
        initial_denom_lr: float = 10.0,
        train_bn: bool = True,
    ) -> None:
        """Unfreeze ``modules`` and add their parameters to ``optimizer`` as a new group, at
        ``lr``, or else the first group's learning rate divided by ``initial_denom_lr``."""
        BaseFinetuning.make_trainable(modules)
        params_lr = optimizer.param_groups[0]["lr"] if lr is None else float(lr)
        denom_lr = initial_denom_lr if lr is None else 1.0
        params = BaseFinetuning.filter_params(modules, train_bn=train_bn, requires_grad=True)
        params = BaseFinetuning.filter_on_optimizer(optimizer, params)
        if params:
            optimizer.add_param_group({"params": params, "lr": params_lr / denom_lr})

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.freeze_before_training(pl_module)

    @staticmethod
    def _apply_mapping_to_param_groups(
        param_groups: list[dict[str, Any]], mapping: dict
    ) -> list[dict[str, Any]]:
        output = []
        for group in param_groups:
            state = {k: v for k, v in group.items() if k != "params"}
            state["params"] = [mapping[p] for p in group["params"]]
            output.append(state)
        return output

    def _store(
        self,
        pl_module: Any,
        opt_idx: int,
        num_param_groups: int,
        current_param_groups: list[dict[str, Any]],
    ) -> None:
        mapping = {p: n for n, p in pl_module.named_parameters()}
        if opt_idx not in self._internal_optimizer_metadata:
            self._internal_optimizer_metadata[opt_idx] = self._apply_mapping_to_param_groups(
                current_param_groups, mapping
            )
        elif num_param_groups != len(current_param_groups):
            # the groups this epoch added
            self._internal_optimizer_metadata[opt_idx].extend(
                self._apply_mapping_to_param_groups(
                    current_param_groups[num_param_groups:], mapping
                )
            )

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        trainable = _trainable(pl_module)
        for opt_idx, optimizer in enumerate(trainer.optimizers):
            num_param_groups = len(optimizer.param_groups)
            self.finetune_function(pl_module, trainer.current_epoch, optimizer)
            self._store(pl_module, opt_idx, num_param_groups, optimizer.param_groups)
        self._frozen = _frozen_now(pl_module)
        if _trainable(pl_module) != trainable:
            _rewrap(trainer, pl_module)

    def finetune_function(self, pl_module: Any, epoch: int, optimizer: Optimizer) -> None:
        """Override to add your unfreeze logic."""
        raise NotImplementedError

    def freeze_before_training(self, pl_module: Any) -> None:
        """Override to add your freeze logic."""
        raise NotImplementedError


def _trainable(module: Module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


def _frozen_now(module: Module) -> dict[str, list[str]]:
    return {
        "parameters": sorted(n for n, p in module.named_parameters() if not p.requires_grad),
        "batch_norms": sorted(
            n
            for n, m in module.named_modules()
            if isinstance(m, _BatchNorm) and not m.track_running_stats
        ),
    }


def _frozen_outside_groups(module: Module, optimizers: list[Optimizer]) -> dict[str, list[str]]:
    """What a checkpoint without raylight's record leaves frozen: the parameters no
    optimizer steps, and the batch norm layers among them."""
    stepped = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
    frozen = {n for n, p in module.named_parameters() if id(p) not in stepped}
    return {
        "parameters": sorted(frozen),
        "batch_norms": sorted(
            n
            for n, m in module.named_modules()
            if isinstance(m, _BatchNorm)
            and any(f"{n}.{k}" in frozen for k, _ in m.named_parameters(recurse=False))
        ),
    }


def _apply_frozen(module: Module, frozen: dict[str, list[str]]) -> None:
    parameters, batch_norms = set(frozen["parameters"]), set(frozen["batch_norms"])
    for name, param in module.named_parameters():
        param.requires_grad = name not in parameters
    for name, child in module.named_modules():
        if isinstance(child, _BatchNorm):
            child.track_running_stats = name not in batch_norms


def _rewrap(trainer: Any, pl_module: Any) -> None:
    """Wrap the module in DDP again so that it syncs the gradients of exactly the parameters
    that train now (a collective: every rank changes them at the same point)."""
    if trainer.strategy.model is not None:
        trainer.strategy.setup_module(pl_module, trainer.config.find_unused_parameters)


class BackboneFinetuning(BaseFinetuning):
    """Unfreeze ``pl_module.backbone`` at ``unfreeze_backbone_at_epoch`` with a learning rate
    of ``backbone_initial_lr`` (default: the current one times ``backbone_initial_ratio_lr``),
    then scale it by ``lambda_func(epoch + 1)`` every epoch; with ``should_align`` it never
    goes above the rest of the model's learning rate."""

    def __init__(
        self,
        unfreeze_backbone_at_epoch: int = 10,
        lambda_func: Callable = multiplicative,
        backbone_initial_ratio_lr: float = 10e-2,
        backbone_initial_lr: float | None = None,
        should_align: bool = True,
        initial_denom_lr: float = 10.0,
        train_bn: bool = True,
        verbose: bool = False,
        rounding: int = 12,
    ) -> None:
        super().__init__()
        self.unfreeze_backbone_at_epoch = unfreeze_backbone_at_epoch
        self.lambda_func = lambda_func
        self.backbone_initial_ratio_lr = backbone_initial_ratio_lr
        self.backbone_initial_lr = backbone_initial_lr
        self.should_align = should_align
        self.initial_denom_lr = initial_denom_lr
        self.train_bn = train_bn
        self.verbose = verbose
        self.rounding = rounding
        self.previous_backbone_lr: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "internal_optimizer_metadata": self._internal_optimizer_metadata,
            "previous_backbone_lr": self.previous_backbone_lr,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.previous_backbone_lr = state_dict["previous_backbone_lr"]
        super().load_state_dict(state_dict)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        _check_backbone(pl_module)
        super().setup(trainer, pl_module, stage)

    def freeze_before_training(self, pl_module: Any) -> None:
        self.freeze(pl_module.backbone)

    def finetune_function(self, pl_module: Any, epoch: int, optimizer: Optimizer) -> None:
        current_lr = optimizer.param_groups[0]["lr"]
        if epoch == self.unfreeze_backbone_at_epoch:
            backbone_lr = (
                self.backbone_initial_lr
                if self.backbone_initial_lr is not None
                else current_lr * self.backbone_initial_ratio_lr
            )
            self.previous_backbone_lr = backbone_lr
            self.unfreeze_and_add_param_group(
                pl_module.backbone,
                optimizer,
                backbone_lr,
                train_bn=self.train_bn,
                initial_denom_lr=self.initial_denom_lr,
            )
        elif epoch > self.unfreeze_backbone_at_epoch:
            backbone_lr = self.lambda_func(epoch + 1) * self.previous_backbone_lr
            if self.should_align and backbone_lr > current_lr:
                backbone_lr = current_lr
            optimizer.param_groups[-1]["lr"] = backbone_lr
            self.previous_backbone_lr = backbone_lr
        else:
            return
        if self.verbose:
            log.info(
                f"Current lr: {round(current_lr, self.rounding)}, "
                f"Backbone lr: {round(backbone_lr, self.rounding)}"
            )


def _check_backbone(pl_module: Any) -> None:
    if not isinstance(getattr(pl_module, "backbone", None), Module):
        raise MisconfigurationException(
            "The LightningModule should have a nn.Module `backbone` attribute"
        )
