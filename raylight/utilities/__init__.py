"""Lightning's ``utilities`` namespace: the helpers public LightningModules import."""

from raylight.module import AttributeDict, move_data_to_device
from raylight.utilities.grads import grad_norm
from raylight.utilities.rank_zero import (
    rank_zero_debug,
    rank_zero_deprecation,
    rank_zero_info,
    rank_zero_only,
    rank_zero_warn,
)

__all__ = [
    "AttributeDict",
    "grad_norm",
    "move_data_to_device",
    "rank_zero_debug",
    "rank_zero_deprecation",
    "rank_zero_info",
    "rank_zero_only",
    "rank_zero_warn",
]
