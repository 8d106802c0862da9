"""Callbacks that run on every worker rank."""

from raylight.callbacks.callback import Callback

__all__ = ["Callback"]
