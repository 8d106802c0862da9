"""LightningDataModule: data preparation and loaders, as in Lightning 2.x."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from torch.utils.data import DataLoader, Dataset, IterableDataset

from raylight.module import AttributeDict, LightningModule, _missing_loader


class LightningDataModule:
    """Subclass this as you would ``pytorch_lightning.LightningDataModule``.

    ``prepare_data`` runs once per node (local rank 0), then every rank runs ``setup``.
    """

    prepare_data_per_node: bool = True

    def __init__(self) -> None:
        self.trainer: Any = None
        self._hparams = AttributeDict()
        self._hparams_initial = AttributeDict()
        self._log_hyperparams = True

    # Lightning's HyperparametersMixin, which modules and datamodules share: the very same
    # function, so that it finds the caller's __init__ one frame up.
    save_hyperparameters = LightningModule.save_hyperparameters

    @property
    def hparams(self) -> AttributeDict:
        return self.__dict__.setdefault("_hparams", AttributeDict())

    @property
    def hparams_initial(self) -> AttributeDict:
        return self.__dict__.setdefault("_hparams_initial", AttributeDict())

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["trainer"] = None
        return state

    @classmethod
    def from_datasets(
        cls,
        train_dataset: Dataset | Sequence[Dataset] | Mapping[str, Dataset] | None = None,
        val_dataset: Dataset | Sequence[Dataset] | None = None,
        test_dataset: Dataset | Sequence[Dataset] | None = None,
        predict_dataset: Dataset | Sequence[Dataset] | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        **datamodule_kwargs: Any,
    ) -> LightningDataModule:
        """A datamodule whose loaders read the given datasets, as Lightning's: training
        loaders shuffle (map-style datasets only), the others keep their order. Each rank's
        loader is then sharded as any other. ``batch_size`` and ``num_workers`` also reach
        ``__init__`` when it takes them; ``datamodule_kwargs`` always do."""

        accepted = inspect.signature(cls.__init__).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
        special = {"batch_size": batch_size, "num_workers": num_workers}
        special = {k: v for k, v in special.items() if takes_any or k in accepted}
        datamodule = cls(**datamodule_kwargs, **special)
        given = {
            "train_dataloader": (train_dataset, True),
            "val_dataloader": (val_dataset, False),
            "test_dataloader": (test_dataset, False),
            "predict_dataloader": (predict_dataset, False),
        }
        for hook, (datasets, shuffle) in given.items():
            if datasets is not None:
                setattr(datamodule, hook, _Loaders(datasets, shuffle, batch_size, num_workers))
        return datamodule

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


class _Loaders:
    """A ``*_dataloader`` hook made by ``from_datasets``: an object rather than a closure,
    so that the datamodule pickles with the standard library too."""

    def __init__(self, datasets: Any, shuffle: bool, batch_size: int, num_workers: int) -> None:
        self.datasets, self.shuffle = datasets, shuffle
        self.batch_size, self.num_workers = batch_size, num_workers

    def __call__(self) -> Any:
        if isinstance(self.datasets, Mapping):
            return {key: self._loader(ds) for key, ds in self.datasets.items()}
        if isinstance(self.datasets, Sequence):
            return [self._loader(ds) for ds in self.datasets]
        return self._loader(self.datasets)

    def _loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=self.shuffle and not isinstance(dataset, IterableDataset),
            num_workers=self.num_workers,
            pin_memory=True,
        )
