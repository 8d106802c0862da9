"""The Logger interface: plug in W&B, MLflow or your own by implementing these methods."""

from __future__ import annotations

from typing import Any


class Logger:
    """Lightning's logger interface, called on the driver."""

    @property
    def name(self) -> str | None:
        return None

    @property
    def version(self) -> int | str | None:
        return None

    @property
    def save_dir(self) -> str | None:
        return None

    @property
    def log_dir(self) -> str | None:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        raise NotImplementedError

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        raise NotImplementedError

    def save(self) -> None: ...

    def finalize(self, status: str) -> None:
        self.save()
