"""ModelCheckpoint, with Lightning's arguments and file naming.

It runs on every rank. Rank 0 decides whether and where to save, and broadcasts the
decision: every rank then takes part in the save (its hooks may run collectives), and
the ranks stay in step even when a monitored metric was not synced across them.
Rank 0 writes the file; the driver's copy of this callback carries rank 0's state
(``best_model_path``, ``best_k_models``, ...) after ``fit``.
"""

from __future__ import annotations

import math
import os
import re
import time
import warnings
from typing import Any

from raylight.callbacks.callback import Callback
from raylight.rank import checkpointing
from raylight.shared import checkpoint_index, sharded, storage
from raylight.shared.config import MisconfigurationException


class ModelCheckpoint(Callback):
    CHECKPOINT_JOIN_CHAR = "-"
    CHECKPOINT_EQUALS_CHAR = "="
    CHECKPOINT_NAME_LAST = "last"
    FILE_EXTENSION = ".ckpt"
    _monitors_metrics = True
    _saves_checkpoints = True

    def __init__(
        self,
        dirpath: str | os.PathLike | None = None,
        filename: str | None = None,
        monitor: str | None = None,
        verbose: bool = False,
        save_last: bool | None = None,
        save_top_k: int = 1,
        save_weights_only: bool = False,
        mode: str = "min",
        auto_insert_metric_name: bool = True,
        every_n_train_steps: int | None = None,
        train_time_interval: Any = None,
        every_n_epochs: int | None = None,
        save_on_train_epoch_end: bool | None = None,
        enable_version_counter: bool = True,
    ) -> None:
        if mode not in ("min", "max"):
            raise MisconfigurationException(f"`mode` can be 'min' or 'max', got {mode!r}.")
        if save_top_k < -1:
            raise MisconfigurationException(
                f"Invalid value for save_top_k={save_top_k}. Must be >= -1"
            )
        if monitor is None and save_top_k not in (-1, 0, 1):
            raise MisconfigurationException(
                f"ModelCheckpoint(save_top_k={save_top_k}, monitor=None) is not a valid "
                "configuration. No quantity for top_k to track: set monitor=..., or "
                "save_top_k=-1 to keep every checkpoint."
            )
        if save_last not in (None, True, False, "link"):
            raise MisconfigurationException(
                f"ModelCheckpoint(save_last={save_last!r}): use True, False, None or 'link'."
            )
        if every_n_train_steps is not None and every_n_train_steps < 0:
            raise MisconfigurationException("every_n_train_steps must be >= 0.")
        self.dirpath = os.fspath(dirpath) if dirpath is not None else None  # a path or URI
        self.filename = filename
        self.monitor = monitor
        self.verbose = verbose
        self.save_last = save_last
        self.save_top_k = save_top_k
        self.save_weights_only = save_weights_only
        self.mode = mode
        self.auto_insert_metric_name = auto_insert_metric_name
        self._every_n_train_steps = every_n_train_steps or 0
        self._train_time_interval = train_time_interval  # a datetime.timedelta
        self._last_time_saved = 0.0
        by_steps_or_time = every_n_train_steps or train_time_interval is not None
        self._every_n_epochs = (
            every_n_epochs if every_n_epochs is not None else (0 if by_steps_or_time else 1)
        )
        self._save_on_train_epoch_end = save_on_train_epoch_end
        self._enable_version_counter = enable_version_counter
        self.best_k_models: dict[str, float] = {}
        self.kth_best_model_path = ""
        self.kth_value: float | None = None
        self.best_model_score: float | None = None
        self.best_model_path = ""
        self.last_model_path = ""
        self.current_score: float | None = None
        self._last_global_step_saved = 0  # nothing to save before the first optimizer step

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            monitor=self.monitor,
            mode=self.mode,
            every_n_train_steps=self._every_n_train_steps,
            every_n_epochs=self._every_n_epochs,
            train_time_interval=self._train_time_interval,
        )

    # ---- when to save -------------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._last_time_saved = time.monotonic()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        every = self._every_n_train_steps
        if every and trainer.global_step % every == 0:
            self._save(trainer)
        if self._train_time_interval is not None:
            # Clocks differ per rank: rank 0's decides (a broadcast per batch, as in Lightning).
            interval = self._train_time_interval.total_seconds()
            due = time.monotonic() - self._last_time_saved >= interval
            if trainer.strategy.broadcast(due, src=0):
                self._save(trainer)
                self._last_time_saved = time.monotonic()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._on_train_epoch_end(trainer) and self._epoch_due(trainer):
            self._save(trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or trainer.stage != "validate" or not trainer._fitting:
            return
        if not self._on_train_epoch_end(trainer) and self._epoch_due(trainer):
            self._save(trainer)

    def _epoch_due(self, trainer: Any) -> bool:
        every = self._every_n_epochs
        return bool(every) and (trainer.current_epoch + 1) % every == 0

    def _on_train_epoch_end(self, trainer: Any) -> bool:
        """Lightning's rule: at the train epoch end, unless validation runs several times per
        epoch or not every epoch (then after each validation)."""
        if self._save_on_train_epoch_end is not None:
            return self._save_on_train_epoch_end
        if trainer.config.check_val_every_n_epoch != 1:
            return False
        if not trainer._validation_enabled:
            return True
        return trainer.config.val_check_interval == 1.0

    # ---- saving -------------------------------------------------------------------------------
    def _save(self, trainer: Any) -> None:
        if trainer.global_step == self._last_global_step_saved:
            return  # already saved at this step (e.g. both every_n_train_steps and epoch end)
        decision = self._decide(trainer) if trainer.is_global_zero else None
        decision = trainer.strategy.broadcast(decision, src=0)
        self._last_global_step_saved = trainer.global_step
        if decision is None:
            return
        filepath, score, remove = decision["filepath"], decision["score"], decision["remove"]
        if filepath is not None:
            self._record(filepath, score, remove)
            commit = self._committer(trainer, filepath, score, remove)
            checkpointing.save_from_rank(trainer, filepath, self.save_weights_only, commit)
        if self.save_last == "link" and filepath is not None:
            # last.ckpt points at the file just saved (a copy on object stores), once it exists.
            last = self._last_path(trainer)
            self.last_model_path = last
            link = sharded.link if trainer.strategy.sharded_checkpoints else storage.link
            if trainer.is_global_zero:
                trainer._writer.after(lambda: link(filepath, last))
        elif self.save_last:
            last = self._last_path(trainer)
            self.last_model_path = last
            commit = self._committer(trainer, last, None, [], monitor=None)
            checkpointing.save_from_rank(trainer, last, self.save_weights_only, commit)

    def _committer(
        self,
        trainer: Any,
        filepath: str,
        score: float | None,
        remove: list[str],
        monitor: Any = ...,
    ) -> Any:
        """What rank 0 does once ``filepath`` is complete in storage: drop the checkpoints
        that fell out of the top k, then record the new one in the run's index."""
        if not trainer.is_global_zero:
            return None
        entry = checkpoint_index.index_entry(
            filepath,
            epoch=trainer.current_epoch,
            global_step=trainer.global_step,
            run_id=trainer.config.run_id,
            monitor=self.monitor if monitor is ... else monitor,
            score=score,
            weights_only=self.save_weights_only,
        )
        root, verbose = trainer.default_root_dir, self.verbose
        doomed = [p for p in remove if self._may_delete(trainer, p, filepath)]

        def commit() -> None:
            # The index first: should it fail, no file it names has been deleted.
            checkpoint_index.update_index(root, entry, remove)
            for path in doomed:
                sharded.delete_checkpoint(path)  # a .ckpt file or a sharded directory
            if verbose:
                print(
                    f"Epoch {entry['epoch']}, global step {entry['global_step']}: saved "
                    f"{storage.redact(filepath)}"
                )

        return commit

    def _may_delete(self, trainer: Any, path: str, current: str) -> bool:
        """Lightning's rule, for every filesystem: only files in this callback's own
        ``dirpath``, never the checkpoint the fit resumed from. The paths come from the
        callback's state, which a checkpoint restores: one from elsewhere must not delete
        files outside the run."""
        if not path or path == current or path == trainer.ckpt_path:
            return False
        return storage.within(path, self.dirpath)

    def _decide(self, trainer: Any) -> dict[str, Any] | None:
        """Rank 0: where to save now (or None), the score, and what falls out of the top k."""
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if self.save_top_k == 0:
            return {"filepath": None, "score": None, "remove": []}
        if self.monitor is None:
            previous = self.best_model_path if self.save_top_k == 1 else ""
            filepath = self._new_path(trainer, metrics, replacing=previous)
            stale = previous if previous and previous != filepath else ""
            return {"filepath": filepath, "score": None, "remove": [stale] if stale else []}
        if self.monitor not in metrics and not trainer._validation_has_run:
            # Lightning: before any validation the metric may simply not exist yet.
            warnings.warn(
                f"ModelCheckpoint(monitor={self.monitor!r}) could not find the monitored key in "
                f"the returned metrics: {sorted(metrics)}; no checkpoint saved at step "
                f"{trainer.global_step}.",
                UserWarning,
                stacklevel=2,
            )
            return {"filepath": None, "score": None, "remove": []}
        if self.monitor not in metrics:
            raise MisconfigurationException(
                f"`ModelCheckpoint(monitor={self.monitor!r})` could not find the monitored key "
                f"in the returned metrics: {sorted(metrics)}. HINT: Did you call "
                f"`log({self.monitor!r}, value)` in the `LightningModule`?"
            )
        score = metrics[self.monitor]
        if math.isnan(score):  # Lightning ranks NaN last
            score = math.inf if self.mode == "min" else -math.inf
        if not self._better_than_kth(score):
            return {"filepath": None, "score": score, "remove": []}
        remove = []
        if self.save_top_k != -1 and len(self.best_k_models) >= self.save_top_k:
            remove = [self.kth_best_model_path]
        filepath = self._new_path(trainer, metrics, replacing=remove[0] if remove else "")
        return {"filepath": filepath, "score": score, "remove": remove}

    def _better_than_kth(self, score: float) -> bool:
        if self.save_top_k == -1 or len(self.best_k_models) < self.save_top_k:
            return True
        return score < self.kth_value if self.mode == "min" else score > self.kth_value

    def _record(self, filepath: str, score: float | None, remove: list[str]) -> None:
        """The top-k bookkeeping, the same on every rank."""
        self.current_score = score
        if score is None:
            self.best_model_path = filepath
            return
        for path in remove:
            self.best_k_models.pop(path, None)
        self.best_k_models[filepath] = score
        worst = max if self.mode == "min" else min
        best = min if self.mode == "min" else max
        self.kth_best_model_path = worst(self.best_k_models, key=self.best_k_models.get)
        self.kth_value = self.best_k_models[self.kth_best_model_path]
        self.best_model_path = best(self.best_k_models, key=self.best_k_models.get)
        self.best_model_score = self.best_k_models[self.best_model_path]

    # ---- names --------------------------------------------------------------------------------
    def format_checkpoint_name(self, metrics: dict[str, Any], filename: str | None = None) -> str:
        """``{epoch}-{step}`` -> ``epoch=3-step=120``; ``{val_loss:.2f}`` -> ``val_loss=0.31``.

        As in Lightning, names may hold dots or slashes (a slash makes a subdirectory), and a
        name missing from ``metrics`` formats as 0.
        """
        filename = filename or self.filename or "{epoch}" + self.CHECKPOINT_JOIN_CHAR + "{step}"
        metrics = dict(metrics)
        # Longest names first, so that "{epoch}" does not eat "{epoch_test}".
        for group in sorted(re.findall(r"(\{.*?)[:\}]", filename), key=len, reverse=True):
            name = group[1:]
            if self.auto_insert_metric_name:
                filename = filename.replace(group, name + self.CHECKPOINT_EQUALS_CHAR + "{" + name)
            filename = filename.replace("{" + name, "{0[" + name + "]")
            metrics.setdefault(name, 0)
        return filename.format(metrics)

    def _new_path(self, trainer: Any, metrics: dict[str, float], replacing: str = "") -> str:
        """A fresh name, ``-vN`` suffixed if taken, unless it is the file this save replaces."""
        metrics = {**metrics, "epoch": trainer.current_epoch, "step": trainer.global_step}
        name = self.format_checkpoint_name(metrics)
        path = storage.join(self.dirpath, name + self.FILE_EXTENSION)
        version = 1
        while self._enable_version_counter and path != replacing and storage.exists(path):
            path = storage.join(self.dirpath, f"{name}-v{version}{self.FILE_EXTENSION}")
            version += 1
        return path

    def _last_path(self, trainer: Any) -> str:
        return storage.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)

    # ---- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "best_model_score": self.best_model_score,
            "best_model_path": self.best_model_path,
            "current_score": self.current_score,
            "dirpath": self.dirpath,
            "best_k_models": dict(self.best_k_models),
            "kth_best_model_path": self.kth_best_model_path,
            "kth_value": self.kth_value,
            "last_model_path": self.last_model_path,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("dirpath") != self.dirpath:
            return  # another run's directory: start this run's bookkeeping afresh (Lightning)
        for key in (
            "best_model_score",
            "best_model_path",
            "current_score",
            "kth_best_model_path",
            "kth_value",
            "last_model_path",
        ):
            setattr(self, key, state_dict.get(key))
        self.best_k_models = dict(state_dict.get("best_k_models", {}))
