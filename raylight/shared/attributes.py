"""The module's own attributes, carried from rank 0 back to the driver's module after fit.

In a Lightning script the module object is rank 0's, so what training set on it (a
counter, a scheduler kept on ``self``, a dataset built in ``setup``) is there afterwards.
The weights come back through the state dict; these carry the rest: every attribute of
the module and its submodules that is not torch's bookkeeping, a method, a dataloader
(bound to the rank's sampler and workers) or unpicklable. Tensors come back on the CPU.
"""

from __future__ import annotations

import inspect
import pickle
from typing import Any

import cloudpickle
import torch
from torch import nn
from torch.utils.data import DataLoader

# torch's own per-module state, and raylight's per-rank links (trainer, device, hook name).
_SKIPPED = frozenset(vars(nn.Module())) | {"_trainer", "_device", "_current_fx_name"}


def collect(module: nn.Module) -> dict[str, dict[str, Any]]:
    """``{submodule name: {attribute: value}}`` for every attribute that can travel."""
    carried: dict[str, dict[str, Any]] = {}
    for name, submodule in module.named_modules():
        attributes = {
            key: _on_cpu(value)
            for key, value in vars(submodule).items()
            if key not in _SKIPPED and _travels(value)
        }
        if attributes:
            carried[name] = attributes
    return carried


def apply(module: nn.Module, carried: dict[str, dict[str, Any]]) -> None:
    """Set what ``collect`` gathered on the same submodules of ``module`` (those it has)."""
    submodules = dict(module.named_modules())
    for name, attributes in carried.items():
        target = submodules.get(name)
        if target is None:
            continue  # built on the ranks only (configure_model): not on the driver's module
        for key, value in attributes.items():
            object.__setattr__(target, key, value)


def _travels(value: Any) -> bool:
    if inspect.ismethod(value) or inspect.isfunction(value) or isinstance(value, DataLoader):
        return False
    try:
        cloudpickle.dumps(value)
    except (pickle.PicklingError, TypeError, AttributeError, RuntimeError, ValueError):
        return False
    return True


def _on_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    return value


def collect_optimizers(module: nn.Module, optimizers: list[Any]) -> list[dict[str, Any]] | None:
    """Rank 0's optimizers as the driver can rebuild them on its own module: each one's
    class, its param groups with parameter names in place of tensors, and its state. None
    when one holds a tensor that is not a parameter of the module."""
    names = {id(parameter): name for name, parameter in module.named_parameters()}
    snapshots = []
    for optimizer in optimizers:
        groups = []
        for group in optimizer.param_groups:
            if any(id(parameter) not in names for parameter in group["params"]):
                return None
            settings = {key: value for key, value in group.items() if key != "params"}
            groups.append({**settings, "params": [names[id(p)] for p in group["params"]]})
        state = _all_on_cpu(optimizer.state_dict())
        snapshots.append({"cls": type(optimizer), "groups": groups, "state": state})
    return snapshots


def rebuild_optimizers(
    module: nn.Module, snapshots: list[dict[str, Any]] | None
) -> list[Any] | None:
    """The optimizers ``collect_optimizers`` described, over ``module``'s parameters and
    with rank 0's state; None when one cannot be rebuilt (its class needs other arguments)."""
    if snapshots is None:
        return None
    parameters = dict(module.named_parameters())
    optimizers = []
    for snapshot in snapshots:
        groups = [
            {**group, "params": [parameters[name] for name in group["params"]]}
            for group in snapshot["groups"]
        ]
        try:
            optimizer = snapshot["cls"](groups)
            optimizer.load_state_dict(snapshot["state"])
        except (TypeError, ValueError, KeyError):
            return None
        optimizers.append(optimizer)
    return optimizers


def _all_on_cpu(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _all_on_cpu(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_all_on_cpu(item) for item in value)
    return _on_cpu(value)
