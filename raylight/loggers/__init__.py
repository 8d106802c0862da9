"""Loggers run on the driver only: workers send metric rows, never import a backend."""

from raylight.loggers.csv_logs import CSVLogger
from raylight.loggers.logger import Logger
from raylight.loggers.tensorboard import TensorBoardLogger

__all__ = ["CSVLogger", "Logger", "TensorBoardLogger"]
