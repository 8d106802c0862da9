"""The one hook dispatcher: every hook reaches callbacks and module through ``call``.

Lightning's order is: callbacks first, then the module. For the epoch-end hooks that
monitoring callbacks (checkpointing, early stopping) react to, those callbacks run
after the module, so that they see what the module logged.
"""

from __future__ import annotations

from typing import Any


def call(trainer: Any, hook: str, *args: Any, monitoring_last: bool = False) -> Any:
    """Run ``hook`` on each callback (as ``hook(trainer, module, *args)``), then on the module."""
    module = trainer.lightning_module
    previous_fx, previous_hook = module._current_fx_name, trainer._current_hook
    module._current_fx_name = trainer._current_hook = hook
    try:
        callbacks = trainer.callbacks
        early = [cb for cb in callbacks if not (monitoring_last and _is_monitoring(cb))]
        for callback in early:
            getattr(callback, hook)(trainer, module, *args)
        output = None
        module_hook = getattr(module, hook, None)
        if module_hook is not None:
            output = module_hook(*args)
        if monitoring_last:
            for callback in callbacks:
                if _is_monitoring(callback):
                    getattr(callback, hook)(trainer, module, *args)
        return output
    except BaseException as error:
        tag_error(error, hook)
        raise
    finally:
        module._current_fx_name, trainer._current_hook = previous_fx, previous_hook


def call_module(trainer: Any, hook: str, *args: Any, **kwargs: Any) -> Any:
    """Run a hook that only the LightningModule defines (steps, optimizer and transfer hooks)."""
    module = trainer.lightning_module
    previous_fx, previous_hook = module._current_fx_name, trainer._current_hook
    module._current_fx_name = trainer._current_hook = hook
    try:
        return getattr(module, hook)(*args, **kwargs)
    except BaseException as error:
        tag_error(error, hook)
        raise
    finally:
        module._current_fx_name, trainer._current_hook = previous_fx, previous_hook


def call_callbacks(trainer: Any, hook: str, *args: Any) -> None:
    """Run a hook that only callbacks define (``on_sanity_check_start``, ``on_exception``)."""
    module = trainer.lightning_module
    previous_hook = trainer._current_hook
    trainer._current_hook = hook
    try:
        for callback in trainer.callbacks:
            getattr(callback, hook)(trainer, module, *args)
    except BaseException as error:
        tag_error(error, hook)
        raise
    finally:
        trainer._current_hook = previous_hook


def call_datamodule(trainer: Any, hook: str, *args: Any) -> Any:
    datamodule = trainer.datamodule
    if datamodule is None:
        return None
    previous_hook = trainer._current_hook
    trainer._current_hook = f"{type(datamodule).__name__}.{hook}"
    try:
        return getattr(datamodule, hook)(*args)
    except BaseException as error:
        tag_error(error, f"{type(datamodule).__name__}.{hook}")
        raise
    finally:
        trainer._current_hook = previous_hook


def _is_monitoring(callback: Any) -> bool:
    return getattr(callback, "_monitors_metrics", False)


def tag_error(error: BaseException, hook: str) -> None:
    """Remember the innermost hook an exception came from (or is about), for the driver."""
    if getattr(error, "_raylight_hook", None) is None:
        try:
            error._raylight_hook = hook
        except AttributeError:  # an exception type with __slots__
            pass
