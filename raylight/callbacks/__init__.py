"""Callbacks: their hooks run on every worker rank (ModelSummary prints on the driver)."""

from raylight.callbacks.callback import Callback
from raylight.callbacks.early_stopping import EarlyStopping
from raylight.callbacks.finetuning import BackboneFinetuning, BaseFinetuning
from raylight.callbacks.lambda_function import LambdaCallback
from raylight.callbacks.lr_monitor import LearningRateMonitor
from raylight.callbacks.model_checkpoint import ModelCheckpoint
from raylight.callbacks.model_summary import ModelSummary
from raylight.callbacks.timer import Timer

__all__ = [
    "BackboneFinetuning",
    "BaseFinetuning",
    "Callback",
    "EarlyStopping",
    "LambdaCallback",
    "LearningRateMonitor",
    "ModelCheckpoint",
    "ModelSummary",
    "Timer",
]
