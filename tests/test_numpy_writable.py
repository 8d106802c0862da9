"""numpy arrays the user's objects hold are the rank's own there, as in Lightning's processes:
writable, so ``torch.from_numpy`` gives no "The given NumPy array is not writable" warning,
and training on them matches training on the same data as tensors."""

from __future__ import annotations

import json
import warnings

import numpy as np
import ray
import torch
from models import Classifier
from torch.utils.data import DataLoader, Dataset, TensorDataset

import raylight as pl


class ArrayDataset(Dataset):
    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int):
        return torch.from_numpy(self.x[index]), torch.as_tensor(self.y[index])


def arrays() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8), dtype=np.float32)
    y = (((x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)) % 3).astype(np.int64)
    return x, y


class ArrayData(pl.LightningDataModule):
    """Keeps its data as numpy arrays, as one built from ``np.load`` would."""

    def __init__(self) -> None:
        super().__init__()
        self.x, self.y = arrays()
        self.frozen = np.arange(4.0)
        self.frozen.setflags(write=False)  # read-only by the user's choice: stays so
        self.stored = ray.put(np.arange(3))  # a reference into the cluster, kept as one

    def train_dataloader(self):
        return DataLoader(ArrayDataset(self.x, self.y), batch_size=8)


class ArraysOnRank(pl.Callback):
    """Each rank writes what it saw: its arrays' flags, and torch's warnings from set-up on
    (torch warns once per process, so recording starts before the first batch)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def setup(self, trainer, pl_module, stage):
        self._recorder = warnings.catch_warnings(record=True)
        self._caught = self._recorder.__enter__()
        warnings.simplefilter("always")

    def on_train_end(self, trainer, pl_module):
        self._recorder.__exit__(None, None, None)
        data = trainer.datamodule
        seen = {
            "writable": [data.x.flags.writeable, data.y.flags.writeable],
            "frozen_writable": data.frozen.flags.writeable,
            "module_shares_the_array": pl_module.lookup is data.x,
            "stored": ray.get(data.stored).tolist(),
            "warnings": [str(w.message) for w in self._caught if "not writable" in str(w.message)],
        }
        with open(f"{self.folder}/rank{trainer.global_rank}.json", "w") as file:
            json.dump(seen, file)


def _fit(model, **data) -> None:
    pl.seed_everything(3)
    trainer = pl.Trainer(
        num_workers=2,
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=data.pop("callbacks", []),
    )
    trainer.fit(model, **data)
    trainer.shutdown()


def test_numpy_arrays_are_writable_on_the_ranks_and_train_the_same(ray_session, tmp_path):
    torch.manual_seed(0)
    ours, baseline = Classifier(), Classifier()
    baseline.load_state_dict(ours.state_dict())
    data = ArrayData()
    ours.lookup = data.x  # the module and the datamodule share one array
    _fit(ours, datamodule=data, callbacks=[ArraysOnRank(str(tmp_path))])

    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen == {
            "writable": [True, True],
            "frozen_writable": False,
            "module_shares_the_array": True,
            "stored": [0, 1, 2],
            "warnings": [],
        }, rank
    assert data.x.flags.writeable and not data.frozen.flags.writeable  # the driver's untouched

    x, y = arrays()
    _fit(
        baseline,
        train_dataloaders=DataLoader(TensorDataset(torch.tensor(x), torch.tensor(y)), batch_size=8),
    )
    for name, value in baseline.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
