"""``pytorch_lightning.core.datamodule``'s name for the datamodule class."""

from raylight.datamodule import LightningDataModule

__all__ = ["LightningDataModule"]
