"""MNIST with the design document's LitModel and MNISTDataModule, data-parallel on Ray.

    python examples/mnist.py

The first run downloads MNIST into ``--data-dir`` (default ``data/``, about 12 MB); later
runs find the files there and need no network. Prints ``test accuracy: 0.9xx`` at the end.
"""

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, random_split
from torchvision import transforms
from torchvision.datasets import MNIST

import raylight as pl


class MNISTDataModule(pl.LightningDataModule):
    def __init__(self, data_dir: str = "data", batch_size: int = 64) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.transform = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]
        )

    def prepare_data(self) -> None:
        for train in (True, False):
            try:
                MNIST(self.data_dir, train=train)  # already on disk: no network needed
            except RuntimeError:  # torchvision's "Dataset not found"
                MNIST(self.data_dir, train=train, download=True)

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", "validate", None):
            mnist_full = MNIST(self.data_dir, train=True, transform=self.transform)
            # 55000 / 5000 on the real 60000 images; a tenth for validation on smaller data.
            num_val = min(5000, len(mnist_full) // 10)
            sizes = [len(mnist_full) - num_val, num_val]
            # Every rank runs setup() on its own; a fixed generator gives them all the same split.
            generator = torch.Generator().manual_seed(42)
            self.mnist_train, self.mnist_val = random_split(mnist_full, sizes, generator)
        if stage in ("test", None):
            self.mnist_test = MNIST(self.data_dir, train=False, transform=self.transform)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.mnist_train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.mnist_val, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.mnist_test, batch_size=self.batch_size)


class LitModel(pl.LightningModule):
    # lr=0.02 is the design document's. With Adam it is on the high side but does not diverge
    # on this MLP (checked offline on digits upscaled to 28x28); --lr 1e-3 gives smoother curves.
    def __init__(self, lr: float = 0.02) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(nn.Linear(28 * 28, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.view(x.size(0), -1))  # (B, 1, 28, 28) -> (B, 10) logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _loss_and_accuracy(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y), (logits.argmax(dim=1) == y).float().mean()

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


def _int_or_float(text: str) -> int | float:
    """Lightning's limit_*_batches: an int counts batches, a float is a fraction of them."""
    return float(text) if "." in text else int(text)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data", help="where MNIST is (or is downloaded to)")
    parser.add_argument("--num-workers", type=int, default=2, help="data-parallel workers (ranks)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--max-epochs", type=int, default=3)
    parser.add_argument("--limit-train-batches", type=_int_or_float, default=None)
    parser.add_argument("--batch-size", type=int, default=64, help="per worker")
    parser.add_argument("--lr", type=float, default=0.02, help="Adam learning rate")
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
    datamodule = MNISTDataModule(data_dir=args.data_dir, batch_size=args.batch_size)
    model = LitModel(lr=args.lr)
    trainer = pl.Trainer(
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        max_epochs=args.max_epochs,
        limit_train_batches=args.limit_train_batches,
        default_root_dir=args.default_root_dir,
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=args.ckpt_path)
    (results,) = trainer.test(model, datamodule=datamodule)
    accuracy = results["test_acc"]
    print(f"test accuracy: {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    main()
