"""Lightning's ``utilities.model_helpers``: ``is_overridden`` and ``get_torchvision_model``."""

from __future__ import annotations

from typing import Any

from torch import nn


def is_overridden(
    method_name: str, instance: object | None = None, parent: type | None = None
) -> bool:
    """Whether ``instance``'s class (or the instance itself) defines ``method_name`` apart
    from ``parent``, which defaults to the raylight base class ``instance`` derives from."""
    from raylight.callbacks import Callback
    from raylight.datamodule import LightningDataModule
    from raylight.module import LightningModule

    if instance is None:
        return False
    if parent is None:
        parent = next(
            (
                base
                for base in (LightningModule, LightningDataModule, Callback)
                if isinstance(instance, base)
            ),
            None,
        )
        if parent is None:
            raise ValueError("Expected a parent")
    if not hasattr(instance, method_name):
        return False
    if method_name in getattr(instance, "__dict__", {}):
        return True
    own = getattr(type(instance), method_name, None)
    base = getattr(parent, method_name, None)
    own, base = getattr(own, "__wrapped__", own), getattr(base, "__wrapped__", base)
    return own is not base


def get_torchvision_model(model_name: str, **kwargs: Any) -> nn.Module:
    """``torchvision.models.get_model(model_name, **kwargs)``, as Lightning's helper."""
    from torchvision import models

    return models.get_model(model_name, **kwargs)
