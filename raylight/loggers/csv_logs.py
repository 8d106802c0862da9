"""CSVLogger: Lightning's layout, ``save_dir/name/version_N/{metrics.csv,hparams.yaml}``."""

from __future__ import annotations

import csv
import io
import os
from typing import Any

import yaml

from raylight.loggers.logger import Logger, next_version, version_folder
from raylight.shared import storage


class CSVLogger(Logger):
    def __init__(
        self,
        save_dir: str | os.PathLike,
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
    ) -> None:
        self._save_dir = os.fspath(save_dir)
        self._name = name or ""
        self._version = version
        self._prefix = prefix
        self._flush_every = flush_logs_every_n_steps
        self._rows: list[dict[str, Any]] = []
        self._unsaved = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def version(self) -> int | str:
        if self._version is None:
            self._version = next_version(self.root_dir)
        return self._version

    @property
    def root_dir(self) -> str:
        return storage.join(self._save_dir, self._name) if self._name else self._save_dir

    @property
    def log_dir(self) -> str:
        version = version_folder(self.version)
        return storage.join(self.root_dir, version)

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        text = yaml.safe_dump(_plain(dict(params)))
        storage.write_bytes(storage.join(self.log_dir, "hparams.yaml"), text.encode())

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {f"{self._prefix}-{k}" if self._prefix else k: v for k, v in metrics.items()}
        row["step"] = step
        self._rows.append(row)
        self._unsaved += 1
        if self._unsaved >= self._flush_every:
            self.save()

    def drop_rows_from(self, step: int) -> None:
        """Forget the rows of ``step`` and later: a run restarted from a checkpoint at
        ``step`` logs them again, and the file keeps one row per step."""
        kept = [row for row in self._rows if row["step"] is None or row["step"] < step]
        self._unsaved += len(self._rows) - len(kept)
        self._rows = kept

    def save(self) -> None:
        """Write metrics.csv whole (atomically, to a path or storage URI); its header holds
        every metric name seen so far."""
        if not self._unsaved:
            return
        columns = list(dict.fromkeys(k for row in self._rows for k in row))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self._rows)
        storage.write_bytes(storage.join(self.log_dir, "metrics.csv"), text.getvalue().encode())
        self._unsaved = 0


def _plain(value: Any) -> Any:
    """Hyperparameters as YAML-safe values (tuples and unknown objects become strings)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)
