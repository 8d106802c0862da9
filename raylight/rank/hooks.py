"""The one hook dispatcher: every hook reaches callbacks and module through ``call``.

Lightning's order is: callbacks first, then the module. For the epoch-end hooks that
monitoring callbacks (checkpointing, early stopping) react to, those callbacks run
after the module, so that they see what the module logged.

These run several times per batch: ``_set_fx`` bypasses ``nn.Module.__setattr__``, whose
parameter checks would otherwise be a visible share of a small model's step time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from raylight.callbacks.callback import Callback
from raylight.module import LightningModule

if TYPE_CHECKING:  # a type only: rank_trainer imports this module
    from raylight.rank.rank_trainer import RankTrainer


def call(trainer: RankTrainer, hook: str, *args: Any, part: str = "all") -> Any:
    """Run ``hook`` on each callback (as ``hook(trainer, module, *args)``), then on the module.

    ``part`` splits an epoch-end hook around the metrics update between them, as Lightning
    does: "before_monitors" runs the plain callbacks and the module, "monitors" the
    monitoring callbacks. Only overrides run: a hook nobody overrides is a no-op in both base
    classes, so it is skipped without entering the hook context.
    """
    targets = _targets(trainer, hook, part)
    if not targets:
        return None
    module = trainer.lightning_module
    previous_fx, previous_hook = module._current_fx_name, trainer._current_hook
    _set_fx(module, hook)
    trainer._current_hook = hook
    output = None
    try:
        for target in targets:
            if target is module:
                output = getattr(module, hook)(*args)
            else:
                getattr(target, hook)(trainer, module, *args)
        return output
    except BaseException as error:
        tag_error(error, hook)
        raise
    finally:
        _set_fx(module, previous_fx)
        trainer._current_hook = previous_hook


def _targets(trainer: RankTrainer, hook: str, part: str) -> list[Any]:
    """The callbacks and module that override ``hook``, in call order (cached per trainer)."""
    key = (hook, part)
    cache = trainer._hook_targets
    if key not in cache:
        callbacks = [cb for cb in trainer.callbacks if overrides(cb, Callback, hook)]
        monitors = [cb for cb in callbacks if part != "all" and _is_monitoring(cb)]
        early = [cb for cb in callbacks if cb not in monitors]
        module = trainer.lightning_module
        own = [module] if overrides(module, LightningModule, hook) else []
        cache[key] = {"all": early + own, "before_monitors": early + own, "monitors": monitors}[
            part
        ]
    return cache[key]


def overrides(obj: Any, base: type, hook: str) -> bool:
    """Overridden by the class, or set on the instance (as LambdaCallback does)."""
    in_instance = hook in getattr(obj, "__dict__", {})
    return in_instance or getattr(type(obj), hook, None) is not getattr(base, hook, None)


def call_module(trainer: RankTrainer, hook: str, *args: Any, **kwargs: Any) -> Any:
    """Run a hook that only the LightningModule defines (steps, optimizer and transfer hooks)."""
    module = trainer.lightning_module
    previous_fx, previous_hook = module._current_fx_name, trainer._current_hook
    _set_fx(module, hook)
    trainer._current_hook = hook
    try:
        return getattr(module, hook)(*args, **kwargs)
    except BaseException as error:
        tag_error(error, hook)
        raise
    finally:
        _set_fx(module, previous_fx)
        trainer._current_hook = previous_hook


def call_callbacks(trainer: RankTrainer, hook: str, *args: Any) -> None:
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


def call_datamodule(trainer: RankTrainer, hook: str, *args: Any) -> Any:
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


def _set_fx(module: Any, name: str | None) -> None:
    object.__setattr__(module, "_current_fx_name", name)
