"""Lightning's ``strategies`` namespace: how the ranks share the training step."""

from raylight.strategies.ddp import DDPStrategy

__all__ = ["DDPStrategy"]
