"""CSVLogger: Lightning's layout, ``save_dir/name/version_N/{metrics.csv,hparams.yaml}``."""

from __future__ import annotations

import csv
import os
from typing import Any

import yaml

from raylight.loggers.logger import Logger


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
        self._pending: list[dict[str, Any]] = []
        self._columns: list[str] = []

    @property
    def name(self) -> str:
        return self._name

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def version(self) -> int | str:
        if self._version is None:
            self._version = self._next_version()
        return self._version

    @property
    def root_dir(self) -> str:
        return os.path.join(self._save_dir, self._name)

    @property
    def log_dir(self) -> str:
        version = self.version if isinstance(self.version, str) else f"version_{self.version}"
        return os.path.join(self.root_dir, version)

    def _next_version(self) -> int:
        if not os.path.isdir(self.root_dir):
            return 0
        versions = [
            int(entry.name.split("_", 1)[1])
            for entry in os.scandir(self.root_dir)
            if entry.is_dir() and entry.name.startswith("version_") and entry.name[8:].isdigit()
        ]
        return max(versions, default=-1) + 1

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        with open(os.path.join(self.log_dir, "hparams.yaml"), "w") as f:
            yaml.safe_dump(_plain(dict(params)), f)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {f"{self._prefix}{k}" if self._prefix else k: v for k, v in metrics.items()}
        row["step"] = step
        self._pending.append(row)
        if len(self._pending) >= self._flush_every:
            self.save()

    def save(self) -> None:
        """Append the pending rows to metrics.csv; rewrite it only when new names appear."""
        if not self._pending:
            return
        new = [k for row in self._pending for k in row if k not in self._columns]
        new = list(dict.fromkeys(new))
        os.makedirs(self.log_dir, exist_ok=True)
        path = os.path.join(self.log_dir, "metrics.csv")
        if new:
            written = []
            if self._columns and os.path.exists(path):
                with open(path, newline="") as f:
                    written = list(csv.DictReader(f))
            self._columns += new
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self._columns)
                writer.writeheader()
                writer.writerows(written)
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self._columns).writerows(self._pending)
        self._pending = []


def _plain(value: Any) -> Any:
    """Hyperparameters as YAML-safe values (tuples and unknown objects become strings)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)
