"""OnExceptionCheckpoint: save a checkpoint when user code raises, at
``dirpath/filename.ckpt``, as Lightning does; a stage that ends normally removes it.

Each rank that raises writes the checkpoint on its own, without a collective: the other
ranks may be blocked in one, or already gone, so waiting for them could hang. Under DDP
every rank holds the same weights and optimizer state, so any of them writes the same
checkpoint; the write is atomic, so when several ranks raise together the file is always
one whole checkpoint. It records the position of the latest optimizer step: resuming from
it (``fit(ckpt_path=...)``) continues right after that step, in the same sample order.
Only the writing rank's generator states are in it, so at a world size above one the
generators start afresh on resume.

Under ``strategy="fsdp"`` no rank holds the whole state, and gathering it is a collective
that a failing rank cannot count on. Each rank that raises writes its own piece of a sharded
checkpoint (a directory at the same path) with no collective, and the driver lets the ranks
that do so finish before it stops the group; the rank that finds every rank's piece in, all
from the same step, joins them into one checkpoint. So the checkpoint is complete when every
rank raises (an error every rank meets, as Lightning's collective save needs too); when
some rank did not, the directory stays incomplete, is never read as a checkpoint, and the error
the driver raises says so.
"""

from __future__ import annotations

import os
from typing import Any

from raylight.callbacks.callback import Callback
from raylight.rank import checkpointing
from raylight.shared import checkpoint, sharded, storage


class OnExceptionCheckpoint(Callback):
    FILE_EXTENSION = ".ckpt"

    def __init__(self, dirpath: str | os.PathLike, filename: str = "on_exception") -> None:
        if not filename:
            raise ValueError("The filename cannot be empty")
        # Resolved on the driver: a rank's working directory is not the script's.
        self.dirpath = storage.absolute(os.fspath(dirpath))
        self.filename = filename

    @property
    def ckpt_path(self) -> str:
        return storage.join(self.dirpath, self.filename + self.FILE_EXTENSION)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if trainer.config.fsdp is not None:
            checkpointing.save_piece(trainer, self.ckpt_path)
            return
        # Written before the exception reaches the driver, which then stops the group.
        checkpoint.save(checkpointing.build(trainer, local=True), self.ckpt_path)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if trainer.is_global_zero:
            sharded.delete_checkpoint(self.ckpt_path)  # a .ckpt, or FSDP's directory
