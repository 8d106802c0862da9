"""``pytorch_lightning.core.module``'s name for the module class."""

from raylight.module import LightningModule

__all__ = ["LightningModule"]
