"""The Lightning-compatible ``.ckpt`` format: its keys, reading and writing it.

The dict has Lightning 2.x's keys (``epoch``, ``global_step``, ``state_dict``,
``optimizer_states``, ``lr_schedulers``, ``callbacks``, ``hyper_parameters``, ...),
so ``pytorch_lightning`` can read what raylight writes. raylight's own position data
lives under the ``raylight`` key; a Lightning-shaped ``loops`` entry carries the same
position for pytorch-lightning readers.

Pure data and storage: this module imports only torch and ``storage``, so that
``LightningModule.load_from_checkpoint`` can use it without the engine. Building a
checkpoint from a rank's state and restoring one into it is ``rank/checkpointing.py``.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from raylight.shared import storage

LIGHTNING_VERSION = "2.6.0"  # the format version pytorch-lightning readers check
RAYLIGHT_VERSION = "0.1.0"


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


def load(filepath: str) -> dict[str, Any]:
    if not storage.exists(filepath):
        raise FileNotFoundError(
            f"Checkpoint at {storage.redact(filepath)} not found: check ckpt_path."
        )
    data = storage.read_bytes(filepath)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:
        raise RuntimeError(
            f"Checkpoint at {storage.redact(filepath)} could not be read "
            f"({type(error).__name__}: {storage.redact(str(error))}). It is truncated, corrupt "
            "or holds custom objects that weights_only loading refuses."
        ) from None


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
