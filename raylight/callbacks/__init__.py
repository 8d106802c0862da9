"""Callbacks that run on every worker rank."""

from raylight.callbacks.callback import Callback
from raylight.callbacks.early_stopping import EarlyStopping
from raylight.callbacks.lambda_function import LambdaCallback
from raylight.callbacks.model_checkpoint import ModelCheckpoint
from raylight.callbacks.timer import Timer

__all__ = ["Callback", "EarlyStopping", "LambdaCallback", "ModelCheckpoint", "Timer"]
