"""Checkpoints on a rank: build one from this rank's state, save it, restore it.

The format itself (keys, the Lightning ``loops`` entry, reading and writing bytes) is
``shared/checkpoint.py``; this module adds what needs a live rank: the module, the
optimizers, the callbacks' states, every rank's generator states (a collective) and
rank 0's background uploads.
"""

from __future__ import annotations

import concurrent.futures
import errno
import io
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from raylight.rank import hooks
from raylight.rank.data import sampler_order_args
from raylight.seed import capture_rng
from raylight.shared import sharded, shipping, storage
from raylight.shared.checkpoint import (
    LIGHTNING_VERSION,
    RAYLIGHT_VERSION,
    lightning_loops,
    load,
    position_from_loops,
)

if TYPE_CHECKING:  # a type only: rank_trainer imports this module
    from raylight.rank.rank_trainer import RankTrainer


def build(trainer: RankTrainer, weights_only: bool = False, local: bool = False) -> dict[str, Any]:
    """This rank's checkpoint; ``local`` runs no collective, which a rank handling its own
    exception cannot count on: it leaves out the other ranks' generator states, and under
    FSDP it holds this rank's shards even where checkpoints are whole."""
    module = trainer.lightning_module
    next_epoch, batches_done = trainer._resume_point
    checkpoint: dict[str, Any] = {
        "epoch": trainer.current_epoch,
        "global_step": trainer.global_step,
        "pytorch-lightning_version": LIGHTNING_VERSION,
        "raylight_version": RAYLIGHT_VERSION,
        "state_dict": trainer.strategy.model_state_dict(shards=local),
        # Where to resume: raylight's own position, exact to the batch.
        "raylight": {
            "next_epoch": next_epoch,
            "batches_done": batches_done,
            # Counting the batch that stepped, which a resume does not run again; the "loops"
            # entry below keeps Lightning's count (without it, as Lightning saves it).
            "batches_that_stepped": trainer._batches_that_stepped + trainer._step_uncounted,
            "world_size": trainer.world_size,
            "rng_states": [capture_rng()] if local else _gather_rng(trainer),
        },
        "loops": lightning_loops(
            next_epoch,
            batches_done,
            trainer.num_training_batches,
            trainer._batches_that_stepped,
            trainer.global_step,
        ),
    }
    if batches_done:
        # Enough to rebuild this epoch's order at another world size (elastic resume).
        position = checkpoint["raylight"]
        position["sampler"] = sampler_order_args(trainer.train_dataloader)
        if trainer._epoch_order is not None:  # already re-partitioned: its own order
            position["epoch_order"] = torch.tensor(trainer._epoch_order)
    if not weights_only:
        # As Lightning: only callbacks that have state get an entry.
        states = {cb.state_key: cb.state_dict() for cb in trainer.callbacks}
        checkpoint["callbacks"] = {key: state for key, state in states.items() if state}
        checkpoint["optimizer_states"] = trainer.strategy.optimizer_state_dicts(shards=local)
        scaler = trainer.strategy.precision.scaler
        if scaler is not None:  # Lightning's key for the AMP plugin's state
            checkpoint["MixedPrecision"] = scaler.state_dict()
        checkpoint["lr_schedulers"] = [
            c.scheduler.state_dict() for c in trainer.lr_scheduler_configs
        ]
        hooks.call(trainer, "on_save_checkpoint", checkpoint)
    if module.hparams:
        checkpoint["hparams_name"] = module._hparams_name
        checkpoint["hyper_parameters"] = dict(module.hparams)
        # Classes and functions of the driver's script get their script names here, so
        # that torch.save refers to them as Lightning's checkpoint does.
        shipping.name_script_objects(checkpoint["hyper_parameters"])
    if trainer.datamodule is not None:
        checkpoint[type(trainer.datamodule).__qualname__] = trainer.datamodule.state_dict()
    return checkpoint


def _gather_rng(trainer: RankTrainer) -> list[dict[str, Any]]:
    """Every rank's generator states (a collective: all ranks build every checkpoint)."""
    states = capture_rng()
    if trainer.world_size == 1 or not dist.is_initialized():
        return [states]
    gathered: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(gathered, states)
    return gathered


def save_from_rank(
    trainer: RankTrainer,
    filepath: str,
    weights_only: bool = False,
    on_commit: Callable[[], None] | None = None,
) -> None:
    """Every rank builds (hooks may run collectives); rank 0 serializes and hands the bytes
    to its background writer, so the loop stalls only for the copy, not for the upload.
    ``on_commit`` runs once the file is complete in storage."""
    checkpoint = build(trainer, weights_only)
    if trainer.strategy.sharded_checkpoints:
        # No barrier: the save's own collectives (on its group, in the background) order it.
        _save_sharded(trainer, checkpoint, filepath, on_commit)
        return
    if trainer.is_global_zero:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # the copy: training may change the tensors after this
        trainer._writer.submit(filepath, buffer.getvalue(), on_commit)
    if dist.is_initialized():
        dist.barrier()


def _save_sharded(
    trainer: RankTrainer,
    checkpoint: dict[str, Any],
    filepath: str,
    on_commit: Callable[[], None] | None,
) -> None:
    """Lightning's sharded format: every rank's shards of the weights and optimizer states
    through ``torch.distributed.checkpoint``, the rest in ``meta.pt`` from rank 0. The loop
    waits only while the shards are copied to host memory; the checkpoint commits (its index
    entry, ``on_commit``) once DCP's ``.metadata`` (written after every rank's shards) and
    ``meta.pt`` are both in storage (``.metadata`` last), so a save cut short is never
    chosen."""
    tensors = _shard_entries(checkpoint)
    trainer.strategy.wait_for_save()  # a save to the same place may still be writing
    if trainer.is_global_zero:
        # An older save of this name goes first (its .metadata beside the new meta.pt would
        # look complete), then meta.pt, before the shards: DCP's .metadata must come last.
        # No barrier: no rank writes a shard before rank 0 has joined the save's planning.
        if storage.exists(filepath):
            sharded.delete_checkpoint(filepath)
        sharded.save_meta(filepath, checkpoint)
    future = trainer.strategy.save_sharded(tensors, filepath)
    zero = trainer.is_global_zero

    def commit() -> None:
        future.result()  # on rank 0: every rank's shards and DCP's .metadata are written
        if zero and on_commit is not None:
            on_commit()

    trainer._writer.after(commit)


def save_piece(trainer: RankTrainer, filepath: str) -> str | None:
    """OnExceptionCheckpoint under FSDP: this rank's piece of a sharded checkpoint, written
    with no collective; the rank that finds every rank's piece in joins them. None once the
    checkpoint is complete, else what it lacks."""
    trainer._watch.exception_save(None)  # before the error reaches the driver
    checkpoint = build(trainer, local=True)
    tensors = _shard_entries(checkpoint)
    # Pieces join only within one process group, at one step.
    group = (
        f"{trainer.config.run_id}@{os.environ.get('MASTER_ADDR')}:"
        f"{os.environ.get('MASTER_PORT')} step {trainer.global_step}"
    )
    sharded.save_piece(filepath, trainer.global_rank, tensors, checkpoint, group)
    lacking = sharded.join_pieces(filepath, trainer.world_size)
    trainer._watch.exception_save({"path": storage.redact(filepath), "lacking": lacking})
    return lacking


def _shard_entries(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Take the weights and optimizer states out of ``checkpoint``, under the sharded
    format's names."""
    tensors = {"model": checkpoint.pop("state_dict")}
    for index, state in enumerate(checkpoint.pop("optimizer_states", [])):
        tensors[f"optimizer_{index}"] = state
    return tensors


# Errors that a retry cannot mend: the disk or quota is full, the location is read-only or
# refused. Transient ones (a dropped connection, a throttled object store) are retried.
_PERMANENT_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.EFBIG,
}


class AsyncWriter:
    """Uploads checkpoints one at a time off the training loop, with retries.

    A failed upload is retried unless the error is permanent (a full disk, say). Once one
    fails for good, ``raise_if_failed`` raises it at the loop's next batch, so the fit stops
    there instead of training on with nowhere to save; ``wait`` (the end of fit) raises it
    too. Uploads stay in submission order, so the index follows commits.
    """

    def __init__(self, attempts: int = 3, backoff_s: float = 1.0) -> None:
        self._attempts, self._backoff_s = attempts, backoff_s
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "raylight-checkpoint")
        self._pending: list[concurrent.futures.Future[None]] = []
        self._failure: BaseException | None = None  # set on the writer thread, read per batch

    def submit(self, location: str, data: bytes, on_commit: Callable[[], None] | None) -> None:
        self._raise_failures(wait_s=0)
        self._pending.append(self._executor.submit(self._write, location, data, on_commit))

    def after(self, action: Callable[[], None]) -> None:
        """Run ``action`` on the writer thread once every earlier upload has committed; not at
        all once one has failed (``save_last="link"`` must not point at a failed save)."""
        self._pending.append(self._executor.submit(self._unless_failed, action))

    def _unless_failed(self, action: Callable[[], None]) -> None:
        if self._failure is None:
            self._guarded(action)

    def wait(self, timeout_s: float = 600.0) -> None:
        """Block until every upload is committed; raise the first failure."""
        self._raise_failures(wait_s=timeout_s)

    def raise_if_failed(self) -> None:
        """Raise the first upload that failed for good (cheap: called between batches)."""
        if self._failure is not None:
            self._raise_failures(wait_s=0)

    def _write(self, location: str, data: bytes, on_commit: Callable[[], None] | None) -> None:
        for attempt in range(self._attempts):
            try:
                storage.write_bytes(location, data)
                break
            except OSError as error:
                if attempt + 1 == self._attempts or error.errno in _PERMANENT_ERRNOS:
                    tries = f"after {attempt + 1} attempts" if attempt else "at once"
                    self._failure = OSError(
                        error.errno,
                        f"checkpoint upload to {storage.redact(location)} failed {tries}: "
                        f"{storage.redact(str(error))}. The checkpoints committed before it "
                        "and the run's index are intact",
                    )
                    raise self._failure from None
                time.sleep(self._backoff_s * 2**attempt)
        if on_commit is not None:
            self._guarded(on_commit)

    def _guarded(self, action: Callable[[], None]) -> None:
        try:
            action()
        except BaseException as error:
            self._failure = error
            raise

    def _raise_failures(self, wait_s: float) -> None:
        done, not_done = concurrent.futures.wait(self._pending, timeout=wait_s)
        if wait_s and not_done:
            raise TimeoutError(
                f"{len(not_done)} checkpoint upload(s) did not finish within {wait_s:.0f} s."
            )
        self._pending = list(not_done)
        for future in done:
            future.result()  # re-raises the upload's error here, on the training thread


@dataclass(frozen=True)
class Repartition:
    """A mid-epoch checkpoint whose epoch is dealt out anew over this world (beyond
    Lightning: elastic training; ``data.py`` explains how)."""

    world_size: int  # the world size the epoch was interrupted at
    batches_done: int  # batches of the epoch that world had finished
    order: list[int] | None  # the epoch's samples, if it was re-partitioned already
    sampler_args: dict[str, Any] | None  # enough to rebuild its sampler order otherwise


@dataclass(frozen=True)
class Resume:
    """Where a restored fit continues: what ``restore`` hands to the first ``train_epoch``.

    Beyond Lightning (which replays or skips batches), exact to the batch: the epoch's
    sampler order is fixed by (seed, epoch), so skipping the batches the checkpoint had
    finished continues with exactly the next one, and the generators continue from the
    states the checkpoint took.
    """

    epoch: int  # the epoch to run next
    batches_done: int = 0  # batches of that epoch the checkpoint had finished
    rng_states: dict[str, Any] | None = None  # this rank's; only at the same world size
    repartition: Repartition | None = None  # set when the world size changed mid-epoch

    @property
    def mid_epoch(self) -> bool:
        return self.batches_done > 0

    @property
    def batches_to_skip(self) -> int:
        """Batches to skip in this rank's loader (none when the epoch is re-partitioned:
        the remainder loader holds only what is left)."""
        return 0 if self.repartition is not None else self.batches_done


def restore(trainer: RankTrainer, filepath: str, stage: str) -> Resume | None:
    """Lightning's order: weights, ``on_load_checkpoint``, callbacks, optimizers, progress.
    For ``fit``, returns where the fit continues."""
    module = trainer.lightning_module
    # The hyperparameters' script classes, by name, as the checkpoint refers to them.
    shipping.name_script_objects(dict(module.hparams))
    checkpoint = _read(trainer, filepath)
    # Lightning's order: the module's hook may rewrite the checkpoint before the weights load.
    hooks.call_module(trainer, "on_load_checkpoint", checkpoint)
    trainer.strategy.load_model_state_dict(
        checkpoint["state_dict"], filepath, module.strict_loading
    )
    datamodule = trainer.datamodule
    if datamodule is not None and type(datamodule).__qualname__ in checkpoint:
        datamodule.load_state_dict(checkpoint[type(datamodule).__qualname__])
    if stage != "fit":
        return None
    hooks.call_callbacks(trainer, "on_load_checkpoint", checkpoint)
    states = checkpoint.get("callbacks", {})
    for callback in trainer.callbacks:
        if callback.state_key in states:
            callback.load_state_dict(states[callback.state_key])
    trainer.strategy.load_optimizer_state_dicts(checkpoint.get("optimizer_states", []))
    for config, state in zip(
        trainer.lr_scheduler_configs, checkpoint.get("lr_schedulers", []), strict=False
    ):
        config.scheduler.load_state_dict(state)
    scaler = trainer.strategy.precision.scaler
    if scaler is not None and "MixedPrecision" in checkpoint:
        scaler.load_state_dict(checkpoint["MixedPrecision"])
    return _restore_position(trainer, checkpoint)


def _read(trainer: RankTrainer, filepath: str) -> dict[str, Any]:
    """A ``.ckpt`` file, or a sharded checkpoint: this rank's shards of it under a sharded
    fit (redistributed over the current world), else the whole of it."""
    if not sharded.is_sharded(filepath):
        return load(filepath)
    sharded.check_complete(filepath)
    read_sharded = getattr(trainer.strategy, "read_sharded", None)
    if read_sharded is None or trainer.strategy.model is None:
        return sharded.read_full(filepath)
    checkpoint = sharded.load_meta(filepath)
    checkpoint["state_dict"], checkpoint["optimizer_states"] = read_sharded(filepath)
    return checkpoint


def _restore_position(trainer: RankTrainer, checkpoint: dict[str, Any]) -> Resume:
    # A checkpoint from pytorch-lightning has no "raylight" entry: its "loops" progress
    # gives the position (without generator states, so exact only in sample order).
    position = checkpoint.get("raylight") or position_from_loops(checkpoint)
    trainer.global_step = checkpoint["global_step"]
    trainer.current_epoch = position["next_epoch"]
    trainer._resume_point = (trainer.current_epoch, 0)  # until the first epoch starts
    trainer._batches_that_stepped = position.get("batches_that_stepped", checkpoint["global_step"])
    batches_done = position.get("batches_done", 0)
    saved_world = position.get("world_size", trainer.world_size)
    order = position.get("epoch_order")
    repartition = None
    if batches_done and (saved_world != trainer.world_size or order is not None):
        repartition = Repartition(
            world_size=saved_world,
            batches_done=batches_done,
            order=order.tolist() if order is not None else None,
            sampler_args=position.get("sampler"),
        )
    rng_states = position.get("rng_states") or []
    return Resume(
        epoch=position["next_epoch"],
        batches_done=batches_done,
        # exact only at the same world size
        rng_states=rng_states[trainer.global_rank]
        if len(rng_states) == trainer.world_size
        else None,
        repartition=repartition,
    )
