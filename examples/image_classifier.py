"""Fine-tune (or train from scratch) a ResNet-18 on a folder of images, data-parallel on Ray.

The design document's ImageClassifier and ImageDataModule (section 5). ``--data-dir`` is a
torchvision ImageFolder tree, one subfolder per class (``data_dir/cat/1.png``, ...):

    python examples/image_classifier.py --data-dir path/to/images --no-pretrained

It splits the images 70/15/15 into train / val / test, trains for 5 epochs with DDP over
2 CPU workers on an embedded local Ray, and ends with ``test accuracy: X`` on the test split.
``--pretrained`` starts from torchvision's ImageNet weights: they are downloaded once
(about 45 MB) into torch.hub's cache under ``$TORCH_HOME``; offline, put the file there first.
Other runs: ``--num-workers 1``, ``--use-gpu``, ``--image-size 64`` for speed,
``--ckpt-path last.ckpt`` to resume.
"""

import argparse
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, random_split
from torchvision import models, transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

import raylight as pl

# ImageNet's per-channel statistics: the pretrained weights expect inputs normalized by them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)  # train, val, test


def _resnet18(pretrained: bool) -> nn.Module:
    """torchvision's ResNet-18, with ImageNet weights when ``pretrained``."""
    if not pretrained:
        return models.resnet18(weights=None)
    weights = models.ResNet18_Weights.DEFAULT
    try:
        return models.resnet18(weights=weights)
    except OSError as error:  # urllib's URLError, DNS and socket errors are all OSErrors
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        raise RuntimeError(
            f"ImageClassifier(pretrained=True) could not download the ResNet-18 ImageNet "
            f"weights from {weights.url} ({error}). Either train from scratch with "
            f"--no-pretrained (pretrained=False), or download that file on a machine with "
            f"network access and copy it to {cached} (torch.hub's cache; set TORCH_HOME to "
            f"move it)."
        ) from None  # the reason is in the message; urllib's traceback would bury it


class ImageClassifier(pl.LightningModule):
    """ResNet-18 with its 1000-way ImageNet head replaced by a ``num_classes``-way one."""

    def __init__(self, num_classes: int = 10, pretrained: bool = False, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = _resnet18(pretrained)
        self.model.fc = nn.Linear(self.model.fc.in_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)  # (B, 3, H, W) -> (B, num_classes) logits

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


class ImageDataModule(pl.LightningDataModule):
    """An ImageFolder tree split 70/15/15, as (3, image_size, image_size) normalized images."""

    def __init__(
        self, data_dir: str, batch_size: int = 32, num_workers: int = 4, image_size: int = 224
    ) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        # The design document's Resize(256) + CenterCrop(224), kept in proportion for other sizes.
        self.transform = transforms.Compose(
            [
                transforms.Resize(round(image_size * 256 / 224)),
                transforms.CenterCrop(image_size),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def setup(self, stage: str | None = None) -> None:
        self.dataset = ImageFolder(self.data_dir, transform=self.transform)
        # Every rank runs setup() on its own; a fixed generator gives them all the same split.
        generator = torch.Generator().manual_seed(42)
        self.train_dataset, self.val_dataset, self.test_dataset = random_split(
            self.dataset, SPLIT_FRACTIONS, generator
        )

    def _loader(self, dataset: torch.utils.data.Dataset, shuffle: bool = False) -> DataLoader:
        # The worker processes are forked inside the Ray actor of each rank. Without
        # persistent_workers they exit when an epoch's iteration ends.
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="ImageFolder root: one subdir a class")
    parser.add_argument(
        "--num-classes", type=int, default=None, help="default: the subfolders of --data-dir"
    )
    parser.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="start from the ImageNet weights (downloaded once into $TORCH_HOME)",
    )
    parser.add_argument("--num-workers", type=int, default=2, help="data-parallel workers (ranks)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--max-epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument(
        "--loader-workers", type=int, default=4, help="DataLoader processes per worker"
    )
    parser.add_argument("--image-size", type=int, default=224, help="side of the square crop")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
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
    num_classes = args.num_classes or len(find_classes(args.data_dir)[0])
    datamodule = ImageDataModule(
        args.data_dir,
        batch_size=args.batch_size,
        num_workers=args.loader_workers,
        image_size=args.image_size,
    )
    model = ImageClassifier(num_classes, pretrained=args.pretrained, lr=args.lr)
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
