"""The one hook dispatcher: every hook reaches callbacks and module through ``call``.

Lightning's order is: callbacks first, then the module. For the epoch-end hooks that
monitoring callbacks (checkpointing, early stopping) react to, those callbacks run
after the module, so that they see what the module logged. The four step hooks get the
optional ``batch_idx`` and ``dataloader_idx`` only as their signature asks, by Lightning's rule.

These run several times per batch: ``_set_fx`` bypasses ``nn.Module.__setattr__``, whose
parameter checks would otherwise be a visible share of a small model's step time.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from raylight.callbacks.callback import Callback
from raylight.module import LightningModule
from raylight.shared.config import MisconfigurationException

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
    profile = trainer._profile
    try:
        for target in targets:
            if target is module:
                method, call_args = getattr(module, hook), args
            else:
                method, call_args = getattr(target, hook), (trainer, module, *args)
            if profile is None:
                result = method(*call_args)
            else:
                result = timed(profile, _action(target, hook), method, *call_args)
            if target is module:
                output = result
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
        method = getattr(module, hook)
        if hook in _STEP_LOADERS:
            args = _step_args(module, method, hook, args)
        if trainer._profile is not None:
            return timed(trainer._profile, _action(module, hook), method, *args, **kwargs)
        return method(*args, **kwargs)
    except BaseException as error:
        tag_error(error, hook)
        raise
    finally:
        _set_fx(module, previous_fx)
        trainer._current_hook = previous_hook


# The step hooks, and the name Lightning gives their loaders in its messages.
_STEP_LOADERS = {
    "training_step": "train",
    "validation_step": "val",
    "test_step": "test",
    "predict_step": "predict",
}


class _StepSignature(NamedTuple):
    takes_batch_idx: bool
    takes_dataloader_idx: bool  # by name or through *args
    requires_dataloader_idx: bool  # named, without a default


def _step_args(
    module: LightningModule, method: Callable[..., Any], hook: str, args: tuple[Any, ...]
) -> tuple[Any, ...]:
    """The loops pass ``(batch, batch_idx[, dataloader_idx])``; pass what the step takes, by
    Lightning's rule: ``batch_idx`` only to a step that names it, has ``*args`` or takes two
    arguments after ``self``; ``dataloader_idx`` (given with several loaders only) always."""
    signature = _step_signature(getattr(method, "__func__", method))
    if hook != "training_step":  # Lightning checks dataloader_idx on these steps only
        _check_dataloader_idx(signature, type(module).__name__, hook, several=len(args) > 2)
    return args if signature.takes_batch_idx else args[:1] + args[2:]


def _check_dataloader_idx(signature: _StepSignature, owner: str, hook: str, several: bool) -> None:
    loader = f"{_STEP_LOADERS[hook]}_dataloader"
    if several and not signature.takes_dataloader_idx:
        raise RuntimeError(
            f"You provided multiple `{loader}`, but no `dataloader_idx` argument in "
            f"`{owner}.{hook}()`. Try adding `dataloader_idx=0` to its signature."
        )
    if not several and signature.requires_dataloader_idx:
        raise RuntimeError(
            f"You provided only a single `{loader}`, but have included `dataloader_idx` in "
            f"`{owner}.{hook}()`. Either remove the argument or give it a default value i.e. "
            "`dataloader_idx=0`."
        )


@functools.lru_cache(maxsize=256)
def _step_signature(function: Callable[..., Any]) -> _StepSignature:
    """Read once per step function, since the steps run every batch. As Lightning's
    ``is_param_in_hook_signature``: one decorator level unwrapped, the first argument
    (``self``) left out."""
    function = getattr(function, "__wrapped__", function)
    spec = inspect.getfullargspec(function)
    names = spec.args[1:]
    if "dataloader_iter" in names:
        raise MisconfigurationException(
            f"{function.__qualname__}() takes `dataloader_iter`: raylight does not run "
            "Lightning's experimental iterator-fed steps; take `(self, batch, batch_idx)` instead."
        )
    named = inspect.signature(function).parameters.get("dataloader_idx")
    return _StepSignature(
        takes_batch_idx="batch_idx" in names or spec.varargs is not None or len(names) >= 2,
        takes_dataloader_idx="dataloader_idx" in names or spec.varargs is not None,
        requires_dataloader_idx=named is not None and named.default is inspect.Parameter.empty,
    )


def call_callbacks(trainer: RankTrainer, hook: str, *args: Any) -> None:
    """Run a hook that only callbacks define (``on_sanity_check_start``, ``on_exception``)."""
    module = trainer.lightning_module
    previous_hook = trainer._current_hook
    trainer._current_hook = hook
    try:
        for callback in trainer.callbacks:
            if trainer._profile is not None:
                method = getattr(callback, hook)
                timed(trainer._profile, _action(callback, hook), method, trainer, module, *args)
            else:
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
        if trainer._profile is not None:
            method = getattr(datamodule, hook)
            return timed(trainer._profile, _action(datamodule, hook), method, *args)
        return getattr(datamodule, hook)(*args)
    except BaseException as error:
        tag_error(error, f"{type(datamodule).__name__}.{hook}")
        raise
    finally:
        trainer._current_hook = previous_hook


def timed(
    profile: dict[str, list[float]], action: str, method: Any, *args: Any, **kwargs: Any
) -> Any:
    """Trainer(profiler="simple"): run ``method`` and add its time to ``profile[action]``
    (``[calls, seconds]``), as Lightning's SimpleProfiler does for each hook."""
    start = time.perf_counter()
    try:
        return method(*args, **kwargs)
    finally:
        figures = profile.setdefault(action, [0, 0.0])
        figures[0] += 1
        figures[1] += time.perf_counter() - start


def _action(owner: Any, hook: str) -> str:
    """Lightning's SimpleProfiler names: ``[LightningModule]Model.training_step`` and so on."""
    if isinstance(owner, LightningModule):
        kind = "LightningModule"
    elif isinstance(owner, Callback):
        kind = "Callback"
    else:
        kind = "LightningDataModule"
    return f"[{kind}]{type(owner).__name__}.{hook}"


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
