"""The Lightning-compatible ``.ckpt`` format: its keys, reading and writing it.

The dict has Lightning 2.x's keys (``epoch``, ``global_step``, ``state_dict``,
``optimizer_states``, ``lr_schedulers``, ``callbacks``, ``hyper_parameters``, ...),
so ``pytorch_lightning`` can read what raylight writes. raylight's own position data
lives under the ``raylight`` key; a Lightning-shaped ``loops`` entry carries the same
position for pytorch-lightning readers.

Checkpoints load ``weights_only``: nothing they name runs. The one widening is Lightning's
hyperparameters, which may hold classes and functions (``encoder_class=Encoder``): those
that the hyperparameters refer to, and only as plain references, are resolved from the
modules this process has imported (``_load_weights_only``).

Pure data and storage: this module imports only torch and ``storage``, so that
``LightningModule.load_from_checkpoint`` can use it without the engine. Building a
checkpoint from a rank's state and restoring one into it is ``rank/checkpointing.py``.
"""

from __future__ import annotations

import _compat_pickle
import inspect
import io
import os
import pickle
import sys
from collections.abc import Iterator
from typing import Any

import torch

from raylight.shared import storage

LIGHTNING_VERSION = "2.6.0"  # the format version pytorch-lightning readers check
RAYLIGHT_VERSION = "0.1.0"
# Where Lightning keeps the module's and the datamodule's hyperparameters.
HPARAMS_KEYS = ("hyper_parameters", "datamodule_hyper_parameters")


def _progress(value: int, *, completed: int | None = None, fields: int = 4) -> dict[str, int]:
    names = ("ready", "completed", "started", "processed")[:fields]
    counts = {name: value for name in names}
    if completed is not None:
        counts["completed"] = completed
    return counts


def _tracker(total: dict[str, int], current: dict[str, int], **extra: Any) -> dict[str, Any]:
    return {"total": total, "current": current, **extra}


def lightning_loops(
    next_epoch: int,
    batches_done: int,
    batches_per_epoch: int | float,
    batches_that_stepped: int,
    global_step: int,
) -> dict[str, Any]:
    """The position as pytorch-lightning 2.x's ``loops`` entry, written as Lightning would
    at the same point: after a whole epoch (every counter equal, so a Lightning reader
    starts the next epoch), or after batch ``batches_done`` of epoch ``next_epoch``
    (saved from ``on_train_batch_end``: that batch is processed, not yet completed).
    Totals assume every epoch had ``batches_per_epoch`` batches."""
    per_epoch = int(batches_per_epoch) if batches_per_epoch not in (-1, float("inf")) else 0
    mid_epoch = batches_done > 0
    epochs = next_epoch + int(mid_epoch)  # epochs started
    in_epoch = batches_done if mid_epoch else per_epoch
    total = next_epoch * per_epoch + batches_done
    lag = int(mid_epoch)  # Lightning counts a batch completed after on_train_batch_end
    empty4, empty2 = _progress(0), _progress(0, fields=2)
    idle_loop = {"state_dict": {}, "batch_progress": _tracker(empty4, empty4, is_last_batch=False)}
    steps = _tracker(_progress(global_step, fields=2), _progress(global_step, fields=2))
    zero_grad = _tracker(_progress(global_step, fields=3), _progress(global_step, fields=3))
    fit_loop = {
        "state_dict": {},
        "epoch_loop.state_dict": {"_batches_that_stepped": batches_that_stepped - lag},
        "epoch_loop.batch_progress": _tracker(
            _progress(total, completed=total - lag),
            _progress(in_epoch, completed=in_epoch - lag),
            is_last_batch=not mid_epoch or batches_done >= per_epoch,
        ),
        "epoch_loop.scheduler_progress": _tracker(empty2, empty2),
        "epoch_loop.automatic_optimization.state_dict": {},
        "epoch_loop.automatic_optimization.optim_progress": {
            "optimizer": {"step": steps, "zero_grad": zero_grad}
        },
        "epoch_loop.manual_optimization.state_dict": {},
        "epoch_loop.manual_optimization.optim_step_progress": _tracker(empty2, empty2),
        "epoch_loop.val_loop.state_dict": {},
        "epoch_loop.val_loop.batch_progress": _tracker(empty4, empty4, is_last_batch=False),
        "epoch_progress": _tracker(
            _progress(epochs, completed=next_epoch) | {"processed": next_epoch},
            _progress(epochs, completed=next_epoch) | {"processed": next_epoch},
        ),
    }
    predict = {"state_dict": {}, "batch_progress": _tracker(empty4, empty4)}
    return {
        "fit_loop": fit_loop,
        "validate_loop": idle_loop,
        "test_loop": idle_loop,
        "predict_loop": predict,
    }


def position_from_loops(checkpoint: dict[str, Any]) -> dict[str, int]:
    """Where a pytorch-lightning checkpoint resumes: the next epoch after one whose batches
    all ran, or the batch after the last processed one mid-epoch."""
    fit_loop = checkpoint.get("loops", {}).get("fit_loop")
    if not fit_loop:  # no progress recorded: an end-of-epoch checkpoint
        return {"next_epoch": checkpoint["epoch"] + 1, "batches_done": 0}
    started = fit_loop["epoch_progress"]["current"]["started"]
    batches = fit_loop["epoch_loop.batch_progress"]
    done = batches["current"]["processed"]
    if batches["is_last_batch"] or done == 0:
        return {"next_epoch": started, "batches_done": 0}
    return {"next_epoch": max(started - 1, 0), "batches_done": done}


def save(checkpoint: dict[str, Any], filepath: str) -> None:
    """Write atomically to a local path or storage URI: a reader sees the old file or the
    whole new one, never a part."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    storage.write_bytes(filepath, buffer.getvalue())


def load(filepath: str, weights_only: bool | None = None) -> dict[str, Any]:
    """Read a ``.ckpt`` with ``weights_only`` loading (see ``_load_weights_only``), unless
    the caller trusts the file: ``weights_only=False``, or torch's own switch for loads that
    do not choose, ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``, as with ``torch.load``."""
    if not storage.exists(filepath):
        raise FileNotFoundError(
            f"Checkpoint at {storage.redact(filepath)} not found: check ckpt_path."
        )
    data = storage.read_bytes(filepath)
    if weights_only is None:
        weights_only = not _torch_forces_full_load()
    if not weights_only:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    try:
        return _load_weights_only(data)
    except _Refused as refusal:
        raise pickle.UnpicklingError(
            f"Checkpoint at {storage.redact(filepath)} was not loaded: {refusal}"
        ) from None
    except Exception as error:
        raise RuntimeError(
            f"Checkpoint at {storage.redact(filepath)} could not be read "
            f"({type(error).__name__}: {storage.redact(str(error))}). It is truncated, corrupt "
            "or holds custom objects that weights_only loading refuses."
        ) from None


def _torch_forces_full_load() -> bool:
    return os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "").lower() in _TRUE


_TRUE = ("1", "y", "yes", "true")


class _Refused(Exception):
    """A checkpoint names something weights_only loading must not let in."""


class _StandIn:
    """Takes the place of a global the checkpoint names while it is first read. It is inert:
    unpickling that would call it or build an object from it raises, so nothing runs."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


def _load_weights_only(data: bytes) -> dict[str, Any]:
    """``torch.load(weights_only=True)``, also for hyperparameters that hold classes and
    functions (as ``save_hyperparameters`` keeps ``encoder_class=Encoder``): beyond
    Lightning, which leaves such a checkpoint to ``weights_only=False`` and so to arbitrary
    unpickling. Each global torch does not allow is read as an inert stand-in first; it is
    let in only where it is a plain reference inside the hyperparameters (never called, never
    built into an object, nowhere else in the checkpoint) and names a class or function this
    process has imported, which then takes the stand-in's place."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
    except ValueError:  # not torch.save's zip format (a legacy file): torch.load judges it
        unsafe = []
    if not unsafe:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    stand_ins = [(_StandIn(name), name) for name in unsafe]
    try:
        with torch.serialization.safe_globals(stand_ins):
            checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (TypeError, pickle.UnpicklingError) as error:
        raise _Refused(
            f"it names {sorted(unsafe)}, and builds objects from them ({error}). weights_only "
            "loading allows, beyond tensors and plain data, only classes and functions that "
            "its hyperparameters refer to. Save such objects' settings instead, or leave them "
            "out with save_hyperparameters(ignore=[...]); for a file you trust, "
            "load_from_checkpoint(..., weights_only=False) or TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 "
            "(as with torch.load) unpickles everything."
        ) from None
    elsewhere = {k: v for k, v in checkpoint.items() if k not in HPARAMS_KEYS}
    outside = {stand_in.name for stand_in in _stand_ins(elsewhere)}
    inside = {s.name for key in HPARAMS_KEYS for s in _stand_ins(checkpoint.get(key))}
    if outside or inside != set(unsafe):
        names = sorted(outside or set(unsafe) - inside)
        raise _Refused(
            f"it names {names} outside its hyperparameters, which weights_only loading "
            "refuses: it is not a checkpoint of raylight or Lightning, or was changed since."
        )
    resolved = {name: _resolve(name) for name in unsafe}
    for key in HPARAMS_KEYS:
        if key in checkpoint:
            checkpoint[key] = _replace(checkpoint[key], resolved, {})
    return checkpoint


def _children(value: Any) -> list[Any]:
    """The items of the containers weights_only loading builds (dict keys too)."""
    if isinstance(value, dict):
        return [*value.keys(), *value.values()]
    if isinstance(value, list | tuple | set | frozenset):
        return list(value)
    return []


def _stand_ins(value: Any) -> Iterator[_StandIn]:
    pending, seen = [value], set()
    while pending:
        item = pending.pop()
        if isinstance(item, _StandIn):
            yield item
        elif id(item) not in seen:
            seen.add(id(item))
            pending += _children(item)


def _replace(value: Any, resolved: dict[str, Any], done: dict[int, tuple[Any, Any]]) -> Any:
    """``value`` with its stand-ins resolved. Dicts and lists change in place and a tuple or
    set is rebuilt once, so that what the unpickler shared stays shared; ``done`` maps each
    container seen to (itself, kept alive so that its id stays its own; its replacement)."""
    if isinstance(value, _StandIn):
        return resolved[value.name]
    if id(value) in done:
        return done[id(value)][1]
    if isinstance(value, dict):
        done[id(value)] = (value, value)
        items = [
            (_replace(k, resolved, done), _replace(v, resolved, done)) for k, v in value.items()
        ]
        value.clear()
        value.update(items)
    elif isinstance(value, list):
        done[id(value)] = (value, value)
        value[:] = [_replace(item, resolved, done) for item in value]
    elif type(value) in (tuple, set, frozenset):
        done[id(value)] = (value, type(value)(_replace(item, resolved, done) for item in value))
        return done[id(value)][1]
    return value


def _resolve(name: str) -> Any:
    """The class or function pickle would find under ``name`` (``module.qualname``), from
    the modules this process has imported: loading imports nothing a checkpoint names."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        # protocol 2 writes Python 2's names for some modules, as pickle maps them back
        module = sys.modules.get(_compat_pickle.IMPORT_MAPPING.get(module_name, module_name))
        found = module
        for attribute in parts[cut:]:
            found = getattr(found, attribute, None)
        if module is None or found is None:
            continue
        if not (inspect.isclass(found) or inspect.isfunction(found)):
            raise _Refused(
                f"its hyperparameters name {name}, which here is a "
                f"{type(found).__name__}, not a class or function."
            )
        return found
    raise _Refused(
        f"its hyperparameters name {name}, which is not defined in this process. Import or "
        "define it before loading, as the script that saved the checkpoint did (a class "
        "defined in that script belongs in the loading script too, or in a module both import)."
    )


def load_weights(module: Any, state_dict: dict[str, Any], filepath: str, strict: bool) -> None:
    """``load_state_dict`` with an error that says which checkpoint and what to do."""
    try:
        module.load_state_dict(state_dict, strict=strict)
    except RuntimeError as error:
        ours, theirs = set(module.state_dict()), set(state_dict)
        raise RuntimeError(
            f"Checkpoint at {storage.redact(filepath)} does not fit {type(module).__name__}: "
            f"missing keys {sorted(ours - theirs)[:10]}, unexpected keys "
            f"{sorted(theirs - ours)[:10]} ({error}). It is from another model; set "
            "`self.strict_loading = False` on the module to load only what matches."
        ) from error
