"""Lightning's ``strategies`` namespace: how the ranks share the training step."""

from raylight.strategies.ddp import DDPStrategy
from raylight.strategies.fsdp import FSDPStrategy

__all__ = ["DDPStrategy", "FSDPStrategy"]
