"""Classify scikit-learn's 8x8 handwritten digits with a small MLP, data-parallel on Ray.

This is raylight's main job. It needs no network: the 1797 digits ship with scikit-learn.

    python examples/digits.py

By default it trains for 25 epochs with DDP over 2 CPU workers on an embedded local Ray,
tests on 180 held-out digits, and ends with a line like ``test accuracy: 0.967``.
Other runs: ``--num-workers 1``, ``--use-gpu``, ``--ckpt-path last.ckpt`` to resume.
"""

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset, random_split

import raylight as pl

NUM_VAL = 180
NUM_TEST = 180


class DigitsDataModule(pl.LightningDataModule):
    """1437 train / 180 val / 180 test digits as (8, 8) float images in [0, 1]."""

    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str | None = None) -> None:
        digits = load_digits()
        # scikit-learn's pixels are 0..16: (1797, 8, 8) floats in [0, 1], labels (1797,)
        images = torch.tensor(digits.images / 16.0, dtype=torch.float32)
        labels = torch.tensor(digits.target, dtype=torch.long)
        dataset = TensorDataset(images, labels)
        sizes = [len(dataset) - NUM_VAL - NUM_TEST, NUM_VAL, NUM_TEST]
        # Every rank runs setup() on its own; a fixed generator gives them all the same split.
        generator = torch.Generator().manual_seed(42)
        self.train_set, self.val_set, self.test_set = random_split(dataset, sizes, generator)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.batch_size)


class DigitsModel(pl.LightningModule):
    """64 -> hidden_dim -> 10 MLP with ReLU."""

    def __init__(self, hidden_dim: int = 128, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(8 * 8, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, 10),
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)  # (B, 8, 8) -> (B, 10) logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _loss_and_accuracy(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        images, labels = batch
        logits = self(images)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return F.cross_entropy(logits, labels), accuracy

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss, accuracy = self._loss_and_accuracy(batch)
        # Each rank sees only its shard of the split: sync_dist averages over all ranks.
        self.log("val_loss", loss, sync_dist=True)
        self.log("val_acc", accuracy, prog_bar=True, sync_dist=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss, accuracy = self._loss_and_accuracy(batch)
        self.log("test_loss", loss, sync_dist=True)
        self.log("test_acc", accuracy, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-workers", type=int, default=2, help="data-parallel workers (ranks)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--max-epochs", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument(
        "--default-root-dir", default=None, help="logs and checkpoints (default: cwd)"
    )
    parser.add_argument("--ckpt-path", default=None, help="checkpoint to resume fit from")
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> float:
    """Fit, test, print and return the test accuracy."""
    args = _parse_args(argv)
    pl.seed_everything(args.seed)
    datamodule = DigitsDataModule(batch_size=args.batch_size)
    model = DigitsModel()
    trainer = pl.Trainer(
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        max_epochs=args.max_epochs,
        default_root_dir=args.default_root_dir,
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=args.ckpt_path)
    (results,) = trainer.test(model, datamodule=datamodule)
    accuracy = results["test_acc"]
    print(f"test accuracy: {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    main()
