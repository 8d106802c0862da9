"""Loggers run on the driver only: workers send metric rows, never import a backend."""

from raylight.loggers.csv_logs import CSVLogger
from raylight.loggers.logger import Logger
from raylight.loggers.mlflow import MLFlowLogger
from raylight.loggers.tensorboard import TensorBoardLogger
from raylight.loggers.wandb import WandbLogger

__all__ = ["CSVLogger", "Logger", "MLFlowLogger", "TensorBoardLogger", "WandbLogger"]
