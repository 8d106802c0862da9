"""Callbacks: their hooks run on every worker rank (ModelSummary prints on the driver; the
progress bar callbacks configure the driver's bar)."""

from raylight.callbacks.callback import Callback
from raylight.callbacks.device_stats_monitor import DeviceStatsMonitor
from raylight.callbacks.early_stopping import EarlyStopping
from raylight.callbacks.finetuning import BackboneFinetuning, BaseFinetuning
from raylight.callbacks.gradient_accumulation_scheduler import GradientAccumulationScheduler
from raylight.callbacks.lambda_function import LambdaCallback
from raylight.callbacks.lr_monitor import LearningRateMonitor
from raylight.callbacks.model_checkpoint import ModelCheckpoint
from raylight.callbacks.model_summary import ModelSummary
from raylight.callbacks.on_exception_checkpoint import OnExceptionCheckpoint
from raylight.callbacks.prediction_writer import BasePredictionWriter
from raylight.callbacks.progress import (
    ProgressBar,
    RichProgressBar,
    RichProgressBarTheme,
    TQDMProgressBar,
)
from raylight.callbacks.stochastic_weight_avg import StochasticWeightAveraging
from raylight.callbacks.timer import Timer

__all__ = [
    "BackboneFinetuning",
    "BaseFinetuning",
    "BasePredictionWriter",
    "Callback",
    "DeviceStatsMonitor",
    "EarlyStopping",
    "GradientAccumulationScheduler",
    "LambdaCallback",
    "LearningRateMonitor",
    "ModelCheckpoint",
    "ModelSummary",
    "OnExceptionCheckpoint",
    "ProgressBar",
    "RichProgressBar",
    "RichProgressBarTheme",
    "StochasticWeightAveraging",
    "TQDMProgressBar",
    "Timer",
]
