"""raylight: the PyTorch Lightning programming model, distributed-first on Ray.

import raylight as pl
"""

from raylight import callbacks
from raylight.callbacks import Callback
from raylight.datamodule import LightningDataModule
from raylight.module import LightningModule
from raylight.seed import seed_everything
from raylight.trainer import Trainer
from raylight.utilities.logo import cli_lightning_logo

__version__ = "0.1.0"
__all__ = [
    "Callback",
    "LightningDataModule",
    "LightningModule",
    "Trainer",
    "callbacks",
    "cli_lightning_logo",
    "seed_everything",
]
