# Source: https://github.com/Lightning-Universe/lightning-bolts
#   src/pl_bolts/models/mnist_module.py
#   at commit 34958a8892d42714edf02ba896fd5861ebb3cb7e
# Changes:
# - import: `pytorch_lightning`'s LightningModule and Trainer come from raylight or
#   pytorch_lightning, as --framework picks (the _harness import takes the flag off argv and
#   seeds torch); `pl_bolts.utils._TORCHVISION_AVAILABLE` (pl_bolts is not installed) -> the
#   same test, whether torchvision is importable
# - data: pl_bolts.datamodules.MNISTDataModule (downloads MNIST) -> Lightning's demo
#   MNISTDataModule (_data.mnist_datamodule: the same arguments and splits) on generated idx files
#   (_data.mnist_dir: 1200 train, 200 test images), with bolts' defaults num_workers=0 and
#   val_split 0.2 of the 1200 images -> 240
# - entry: cli_main's `Trainer.add_argparse_args` / `from_argparse_args` (removed in Lightning
#   2.0) -> the objects its parser builds with its defaults: the datamodule, LitMNIST(), a
#   Trainer with the scaling flags of scale() and max_epochs=2, limit_train_batches=8,
#   limit_val_batches=4
# - end: the fit's final metrics printed as one JSON line
import importlib.util
from argparse import ArgumentParser
from typing import Any

import torch
from _data import mnist_datamodule, mnist_dir
from _harness import RAYLIGHT, report, scale

if RAYLIGHT:
    from raylight import LightningModule, Trainer
else:
    from pytorch_lightning import LightningModule, Trainer
from torch import Tensor
from torch.nn import functional as F  # noqa: N812

_TORCHVISION_AVAILABLE = importlib.util.find_spec("torchvision") is not None


class LitMNIST(LightningModule):
    """PyTorch Lightning implementation of a two-layer MNIST classification module.

    Args:
        hidden_dim (int, optional): dimension of hidden layer (default: ``128``).
        learning_rate (float, optional): optimizer learning rate (default: ``1e-3``).

    Example::

        datamodule = MNISTDataModule()

        model = LitMNIST()

        trainer = Trainer()
        trainer.fit(model, datamodule=datamodule)

    """

    def __init__(self, hidden_dim: int = 128, learning_rate: float = 1e-3, **kwargs: Any) -> None:
        if not _TORCHVISION_AVAILABLE:  # pragma: no cover
            raise ModuleNotFoundError("You want to use `torchvision` which is not installed yet.")

        super().__init__()
        self.save_hyperparameters()

        self.l1 = torch.nn.Linear(28 * 28, self.hparams.hidden_dim)
        self.l2 = torch.nn.Linear(self.hparams.hidden_dim, 10)

    def forward(self, x: Tensor) -> Tensor:
        out = x.view(x.size(0), -1)
        out = torch.relu(self.l1(out))
        return torch.relu(self.l2(out))

    def shared_step(self, batch: Any, batch_idx: int, step: str) -> Tensor:
        x, y = batch
        y_hat = self(x)
        loss = F.cross_entropy(y_hat, y)

        if step == "train":
            self.log("train_loss", loss)
        elif step == "val":
            self.log("val_loss", loss)
        elif step == "test":
            self.log("test_loss", loss)
        else:
            raise ValueError(f"Step {step} is not recognized. Must be 'train', 'val', or 'test'.")

        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.shared_step(batch, batch_idx, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.shared_step(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.shared_step(batch, batch_idx, "test")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate)

    @staticmethod
    def add_model_specific_args(parent_parser) -> ArgumentParser:
        parser = ArgumentParser(parents=[parent_parser], add_help=False)
        parser.add_argument("--hidden_dim", type=int, default=128)
        parser.add_argument("--learning_rate", type=float, default=1e-3)
        return parser


def cli_main():
    MNISTDataModule = mnist_datamodule(RAYLIGHT)

    parser = ArgumentParser()
    parser = LitMNIST.add_model_specific_args(parser)
    args = parser.parse_args()

    # Initialize MNISTDatamodule
    datamodule = MNISTDataModule(data_dir=mnist_dir(), val_split=240, num_workers=0)

    # Initialize LitMNIST model
    model = LitMNIST(**vars(args))

    # Train LitMNIST model
    trainer = Trainer(**scale(max_epochs=2, limit_train_batches=8, limit_val_batches=4))
    trainer.fit(model, datamodule=datamodule)
    return trainer


if __name__ == "__main__":  # pragma: no cover
    trainer = cli_main()
    report(trainer.callback_metrics)
