"""Small modules and data shared by the distributed tests (importable on the workers)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

import raylight as pl


def make_dataset(n: int = 128, features: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    y = ((x[:, 0] > 0).long() + (x[:, 1] > 0).long()) % classes
    return TensorDataset(x, y)


class IndexedDataset(Dataset):
    """Returns (x, y, index) so tests can see which samples each rank read."""

    def __init__(self, n: int = 64, features: int = 8) -> None:
        self.data = make_dataset(n, features)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        x, y = self.data[index]
        return x, y, index


class Classifier(pl.LightningModule):
    def __init__(self, features: int = 8, classes: int = 3, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Sequential(
            torch.nn.Linear(features, 16), torch.nn.ReLU(), torch.nn.Linear(16, classes)
        )

    def forward(self, x):
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        self.log("val_loss", F.cross_entropy(self(x), y), prog_bar=True)

    def test_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        self.log("test_acc", (self(x).argmax(1) == y).float().mean(), sync_dist=True)

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self(batch[0] if isinstance(batch, list | tuple) else batch).argmax(1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def loader(dataset=None, batch_size: int = 16, **kwargs) -> DataLoader:
    return DataLoader(
        dataset if dataset is not None else make_dataset(), batch_size=batch_size, **kwargs
    )


class DataModule(pl.LightningDataModule):
    def __init__(self, n: int = 128, batch_size: int = 16) -> None:
        super().__init__()
        self.n, self.batch_size = n, batch_size

    def setup(self, stage: str) -> None:
        self.train_set = make_dataset(self.n, seed=0)
        self.val_set = make_dataset(self.n // 2, seed=1)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def predict_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)


class ScriptedScore(Classifier):
    """Logs a score per epoch from a script, so the top k is known in advance."""

    SCORES = [3.0, 1.0, 2.0, 0.0]

    def validation_step(self, batch, batch_idx):
        self.log("score", self.SCORES[self.current_epoch])
