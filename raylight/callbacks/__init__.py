"""Callbacks that run on every worker rank."""

from raylight.callbacks.callback import Callback
from raylight.callbacks.model_checkpoint import ModelCheckpoint

__all__ = ["Callback", "ModelCheckpoint"]
