"""Gradient norms for logging, as ``pytorch_lightning.utilities.grad_norm``."""

from __future__ import annotations

import torch
from torch.nn import Module


def grad_norm(module: Module, norm_type: float | int | str, group_separator: str = "/") -> dict:
    """Each parameter's gradient p-norm, and their overall norm (of all gradients viewed as
    one vector), keyed ``grad_{p}_norm/{name}`` and ``grad_{p}_norm_total``. Typical use:
    ``self.log_dict(grad_norm(self, norm_type=2))`` in ``on_before_optimizer_step``."""
    norm_type = float(norm_type)
    if norm_type <= 0:
        raise ValueError(
            f"`norm_type` must be a positive number or 'inf' (infinity norm). Got {norm_type}"
        )
    norms = {
        f"grad_{norm_type}_norm{group_separator}{name}": p.grad.data.norm(norm_type)
        for name, p in module.named_parameters()
        if p.grad is not None
    }
    if norms:
        norms[f"grad_{norm_type}_norm_total"] = torch.tensor(list(norms.values())).norm(norm_type)
    return norms
