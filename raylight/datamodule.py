"""LightningDataModule: data preparation and loaders, as in Lightning 2.x."""

from __future__ import annotations

from typing import Any

from raylight.module import _missing_loader


class LightningDataModule:
    """Subclass this as you would ``pytorch_lightning.LightningDataModule``.

    ``prepare_data`` runs once per node (local rank 0), then every rank runs ``setup``.
    """

    prepare_data_per_node: bool = True

    def __init__(self) -> None:
        self.trainer: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["trainer"] = None
        return state

    def prepare_data(self) -> None: ...
    def setup(self, stage: str) -> None: ...
    def teardown(self, stage: str) -> None: ...

    def train_dataloader(self) -> Any:
        raise NotImplementedError(_missing_loader("train_dataloader"))

    def val_dataloader(self) -> Any:
        raise NotImplementedError(_missing_loader("val_dataloader"))

    def test_dataloader(self) -> Any:
        raise NotImplementedError(_missing_loader("test_dataloader"))

    def predict_dataloader(self) -> Any:
        raise NotImplementedError(_missing_loader("predict_dataloader"))

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...

    def on_exception(self, exception: BaseException) -> None: ...
