"""The Logger interface: plug in W&B, MLflow or your own by implementing these methods."""

from __future__ import annotations

from typing import Any

from raylight.shared import storage


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


def next_version(root_dir: str) -> int:
    """Lightning's versioning: one more than the highest ``version_N`` under ``root_dir``."""
    versions = [
        int(name[len("version_") :])
        for name in storage.list_names(root_dir, directories=True)
        if name.startswith("version_") and name[len("version_") :].isdigit()
    ]
    return max(versions, default=-1) + 1


def version_folder(version: int | str) -> str:
    """``version_N`` for a number; a string version names its folder itself."""
    return version if isinstance(version, str) else f"version_{version}"
