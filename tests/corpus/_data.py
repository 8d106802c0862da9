"""Small local stand-ins for the datasets the corpus scripts download, with the same item
shapes and types: MNIST as idx files torchvision's ``MNIST`` reads (1x28x28 grey images,
int labels), and a CIFAR-10 of 32x32 RGB PIL images with int labels.

Both are learnable (the class decides where a bright patch sits), so a few steps of training
move the loss and the accuracy, and both frameworks can be held to an accuracy floor.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for mnist_data
from mnist_data import write_mnist  # noqa: E402

MNIST_TRAIN = 1200
MNIST_TEST = 200
CIFAR_TRAIN = 640
CIFAR_TEST = 128


def mnist_dir() -> str:
    """An absolute folder holding ``MNIST/raw`` (so ``MNIST(folder, download=True)`` never
    downloads), written once per machine; every worker reads the same files."""
    root = Path(tempfile.gettempdir()) / f"raylight-corpus-mnist-{MNIST_TRAIN}-{MNIST_TEST}"
    if not (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").exists():
        # Written aside and renamed: two runs started side by side never read half a file.
        staging = Path(tempfile.mkdtemp(prefix="raylight-corpus-mnist-"))
        write_mnist(staging, n_train=MNIST_TRAIN, n_test=MNIST_TEST)
        try:
            os.rename(staging, root)
        except OSError:  # the other run got there first
            shutil.rmtree(staging, ignore_errors=True)
    return str(root)


class CIFAR10(Dataset):
    """Takes ``torchvision.datasets.CIFAR10``'s arguments and gives its items, from generated
    images: a bright 8x8 patch whose place (a 3x3 grid, plus one colour) encodes the class."""

    classes = [
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
    ]  # fmt: skip

    def __init__(
        self,
        root: str = ".",
        train: bool = True,
        transform: Any = None,
        target_transform: Any = None,
        download: bool = False,
    ) -> None:
        self.root = root
        self.train = train
        self.transform = transform
        self.target_transform = target_transform
        count = CIFAR_TRAIN if train else CIFAR_TEST
        rng = np.random.default_rng(1 if train else 2)
        self.targets = [int(t) for t in rng.permutation(np.arange(count) % 10)]
        self.data = rng.integers(0, 80, size=(count, 32, 32, 3), dtype=np.uint8)  # (N, H, W, C)
        for image, label in zip(self.data, self.targets, strict=True):
            cell = label % 9
            row = 2 + 10 * (cell // 3) + int(rng.integers(-1, 2))
            col = 2 + 10 * (cell % 3) + int(rng.integers(-1, 2))
            channel = 0 if label < 9 else 2
            image[row : row + 8, col : col + 8, channel] = 255
            image[row : row + 8, col : col + 8, 1] = 200

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, target = Image.fromarray(self.data[index]), self.targets[index]
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


def mnist_datamodule(raylight: bool) -> type:  # noqa: C901 (one class, built per framework)
    """Lightning's demo ``MNISTDataModule`` (``lightning.pytorch.demos``), reading the generated
    MNIST: the demo downloads, and under raylight it must subclass raylight's datamodule."""
    import torch
    from torch.utils.data import DataLoader, random_split
    from torchvision import transforms
    from torchvision.datasets import MNIST

    if raylight:
        from raylight import LightningDataModule
    else:
        from pytorch_lightning import LightningDataModule

    class MNISTDataModule(LightningDataModule):
        name = "mnist"

        def __init__(
            self,
            data_dir: str,
            val_split: int = 5000,
            num_workers: int = 16,
            normalize: bool = False,
            seed: int = 42,
            batch_size: int = 32,
        ) -> None:
            super().__init__()
            self.data_dir = data_dir
            self.val_split = val_split
            self.num_workers = num_workers
            self.normalize = normalize
            self.seed = seed
            self.batch_size = batch_size

        @property
        def num_classes(self) -> int:
            return 10

        def prepare_data(self) -> None:
            MNIST(self.data_dir, train=True, download=True)
            MNIST(self.data_dir, train=False, download=True)

        def setup(self, stage: str) -> None:
            dataset = MNIST(self.data_dir, train=True, transform=self.default_transforms)
            self.dataset_train, self.dataset_val = random_split(
                dataset,
                [len(dataset) - self.val_split, self.val_split],
                generator=torch.Generator().manual_seed(42),
            )

        def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
            return DataLoader(
                dataset,
                batch_size=self.batch_size,
                shuffle=shuffle,
                num_workers=self.num_workers,
                drop_last=True,
            )

        def train_dataloader(self) -> DataLoader:
            return self._loader(self.dataset_train, shuffle=True)

        def val_dataloader(self) -> DataLoader:
            return self._loader(self.dataset_val, shuffle=False)

        def test_dataloader(self) -> DataLoader:
            dataset = MNIST(self.data_dir, train=False, transform=self.default_transforms)
            return self._loader(dataset, shuffle=False)

        @property
        def default_transforms(self) -> Any:
            if self.normalize:
                return transforms.Compose(
                    [transforms.ToTensor(), transforms.Normalize(mean=(0.5,), std=(0.5,))]
                )
            return transforms.ToTensor()

    return MNISTDataModule
