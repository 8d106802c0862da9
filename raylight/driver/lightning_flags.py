"""Lightning's Trainer flags that change other flags: ``barebones``, ``max_time``,
``overfit_batches`` and ``profiler``, resolved on the driver with Lightning's rules and
messages before the configuration is built."""

from __future__ import annotations

import sys
import warnings
from typing import Any

from raylight.callbacks import Timer
from raylight.shared.config import MisconfigurationException

_PROFILERS = (None, "simple")


def apply_barebones(flags: dict[str, Any]) -> dict[str, Any]:
    """Lightning's ``Trainer(barebones=True)``: every feature that costs speed is off, and
    asking for one alongside it is an error (Lightning's ``ValueError`` and words)."""
    opt_outs = {
        "enable_checkpointing": ("Checkpointing", lambda v: bool(v)),
        "logger": ("Logging", lambda v: v is not None and v is not False),
        "enable_progress_bar": ("The progress bar", lambda v: bool(v)),
        "log_every_n_steps": ("Logging", lambda v: v is not None and v != 0),
        "enable_model_summary": ("Model summary", lambda v: bool(v)),
        "num_sanity_val_steps": ("Sanity checking", lambda v: v is not None and v != 0),
        "fast_dev_run": ("Development run", lambda v: v is not False and v != 0),
        "detect_anomaly": ("Anomaly detection", lambda v: bool(v)),
        "profiler": ("Profiling", lambda v: v is not None),
    }
    for name, (feature, asked) in opt_outs.items():
        if asked(flags[name]):
            reason = (
                "is not meant for raw speed evaluation"
                if name == "fast_dev_run"
                else "can impact raw speed"
            )
            raise ValueError(
                f"`Trainer(barebones=True, {name}={flags[name]!r})` was passed. {feature} "
                f"{reason} so it is disabled in barebones mode."
            )
    print(
        "You are running in `Trainer(barebones=True)` mode: checkpointing, the progress bar, "
        "the model summary, logging (`self.log` included), sanity checking, fast_dev_run, "
        "anomaly detection and profiling are off.",
        file=sys.stderr,
        flush=True,
    )
    return flags | {
        "enable_checkpointing": False,
        "logger": False,
        "enable_progress_bar": False,
        "log_every_n_steps": 0,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }


def add_max_time(callbacks: list[Any], max_time: Any) -> None:
    """Lightning's ``max_time``: a step-interval ``Timer`` unless the user gave one."""
    if max_time is None:
        return
    if any(isinstance(callback, Timer) for callback in callbacks):
        warnings.warn(
            "callbacks list already contains a Timer, Trainer(max_time=...) will be ignored.",
            UserWarning,
            stacklevel=3,
        )
        return
    callbacks.append(Timer(duration=max_time, interval="step"))


def overfit_limits(
    overfit_batches: Any, limit_train_batches: Any, limit_val_batches: Any
) -> tuple[Any, Any]:
    """With ``overfit_batches`` Lightning trains and validates on that many batches (the
    training loader unshuffled, see ``rank.data``); otherwise the limits stand."""
    if isinstance(overfit_batches, bool) or not isinstance(overfit_batches, int | float):
        raise MisconfigurationException(
            f"Trainer(overfit_batches={overfit_batches!r}): it takes a number of batches "
            "(int >= 0) or a fraction of the data (float in [0.0, 1.0])."
        )
    if overfit_batches < 0 or (isinstance(overfit_batches, float) and overfit_batches > 1):
        raise MisconfigurationException(
            f"Trainer(overfit_batches={overfit_batches!r}) is out of range: it takes a number "
            "of batches (int >= 0) or a fraction of the data (float in [0.0, 1.0])."
        )
    if overfit_batches == 0:
        return limit_train_batches, limit_val_batches
    return overfit_batches, overfit_batches


def check_profiler(profiler: Any) -> str | None:
    """``profiler="simple"`` (the driver prints every hook's time on every rank); others are
    refused by name rather than ignored."""
    if profiler in _PROFILERS:
        return profiler
    name = profiler if isinstance(profiler, str) else type(profiler).__name__
    raise MisconfigurationException(
        f"Trainer(profiler={name!r}) is not supported: raylight has profiler='simple' (a "
        "per-hook timing table from every rank). For torch's profiler, run "
        "torch.profiler.profile() inside a hook such as on_train_epoch_start/end."
    )
