"""LambdaCallback: a callback made on the fly from functions, as in Lightning.

The functions run on every worker rank, so they must be picklable (lambdas and closures
are) and whatever they record must outlive the worker: write it to a file, say, rather
than to a variable of the driver.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from raylight.callbacks.callback import Callback

_HOOKS = (
    "setup",
    "teardown",
    "on_fit_start",
    "on_fit_end",
    "on_sanity_check_start",
    "on_sanity_check_end",
    "on_train_batch_start",
    "on_train_batch_end",
    "on_train_epoch_start",
    "on_train_epoch_end",
    "on_validation_epoch_start",
    "on_validation_epoch_end",
    "on_test_epoch_start",
    "on_test_epoch_end",
    "on_validation_batch_start",
    "on_validation_batch_end",
    "on_test_batch_start",
    "on_test_batch_end",
    "on_train_start",
    "on_train_end",
    "on_validation_start",
    "on_validation_end",
    "on_test_start",
    "on_test_end",
    "on_exception",
    "on_save_checkpoint",
    "on_load_checkpoint",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_predict_start",
    "on_predict_end",
    "on_predict_batch_start",
    "on_predict_batch_end",
    "on_predict_epoch_start",
    "on_predict_epoch_end",
)


class LambdaCallback(Callback):
    """``LambdaCallback(on_train_epoch_end=lambda trainer, pl_module: ...)``.

    Each keyword is a hook of ``Callback``, called with that hook's arguments.
    """

    def __init__(self, **hooks: Callable[..., Any] | None) -> None:
        unknown = sorted(set(hooks) - set(_HOOKS))
        if unknown:
            raise TypeError(
                f"LambdaCallback got unknown hooks {unknown}: use hooks of `Callback`, such as "
                "`on_train_epoch_end`."
            )
        for name, function in hooks.items():
            if function is not None:
                setattr(self, name, function)
