"""Lightning's ``core`` namespace: ``from raylight.core import LightningModule`` works as
``from pytorch_lightning.core import LightningModule`` does."""

from raylight.datamodule import LightningDataModule
from raylight.module import LightningModule

__all__ = ["LightningDataModule", "LightningModule"]
