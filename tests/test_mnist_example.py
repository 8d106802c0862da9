"""The example datamodules: split sizes, shapes and dtypes, on data written to tmp_path (no network)."""

import pytest
import torch
from mnist_data import write_mnist
from torchvision.datasets import MNIST

from examples.digits import DigitsDataModule
from examples.mnist import MNISTDataModule


def _refuse_download(self: MNIST) -> None:
    raise AssertionError("MNIST.download() was called although the files are on disk")


def test_mnist_datamodule_reads_files_on_disk_without_download(tmp_path, monkeypatch):
    write_mnist(tmp_path, n_train=300, n_test=50)
    monkeypatch.setattr(MNIST, "download", _refuse_download)
    datamodule = MNISTDataModule(data_dir=str(tmp_path), batch_size=16)

    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("test")

    # n_val = min(5000, 300 // 10): 55000/5000 on real MNIST, 270/30 here.
    assert (len(datamodule.mnist_train), len(datamodule.mnist_val)) == (270, 30)
    assert len(datamodule.mnist_test) == 50
    assert not set(datamodule.mnist_train.indices) & set(datamodule.mnist_val.indices)
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.shape == (16, 1, 28, 28)
    assert images.dtype == torch.float32
    assert labels.dtype == torch.int64
    test_labels = torch.cat([y for _, y in datamodule.test_dataloader()])
    assert test_labels.min() >= 0 and test_labels.max() <= 9
    assert len(test_labels.unique()) == 10


def test_mnist_datamodule_normalizes_like_mnist(tmp_path):
    write_mnist(tmp_path, n_train=100, n_test=20)
    datamodule = MNISTDataModule(data_dir=str(tmp_path))
    datamodule.setup("test")

    image, label = datamodule.mnist_test[0]
    raw = MNIST(str(tmp_path), train=False).data[0]
    expected = (raw.float() / 255 - 0.1307) / 0.3081
    assert image.shape == (1, 28, 28)
    torch.testing.assert_close(image[0], expected)
    assert 0 <= label <= 9


def test_mnist_prepare_data_downloads_only_what_is_missing(tmp_path, monkeypatch):
    downloads = []

    def fake_download(self: MNIST) -> None:
        downloads.append(self.train)
        write_mnist(self.root, n_train=100, n_test=20)

    monkeypatch.setattr(MNIST, "download", fake_download)
    MNISTDataModule(data_dir=str(tmp_path)).prepare_data()
    assert downloads, "prepare_data() did not download a missing dataset"
    assert (tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()

    downloads.clear()
    MNISTDataModule(data_dir=str(tmp_path)).prepare_data()
    assert downloads == []


def test_digits_split_is_disjoint_complete_and_the_same_on_every_rank():
    # setup() runs separately on each rank, after different RNG use: the split must not
    # depend on the global seed.
    splits = []
    for global_seed in (0, 1234):
        torch.manual_seed(global_seed)
        datamodule = DigitsDataModule(batch_size=32)
        datamodule.setup("fit")
        subsets = (datamodule.train_set, datamodule.val_set, datamodule.test_set)
        splits.append([set(subset.indices) for subset in subsets])

    train, val, test = splits[0]
    assert [len(train), len(val), len(test)] == [1437, 180, 180]
    assert not train & val and not train & test and not val & test
    assert train | val | test == set(range(1797))
    assert splits[1] == splits[0]


@pytest.mark.parametrize("stage", ["fit", "test"])
def test_digits_images_are_floats_in_unit_range(stage):
    datamodule = DigitsDataModule(batch_size=64)
    datamodule.setup(stage)

    loader = datamodule.train_dataloader() if stage == "fit" else datamodule.test_dataloader()
    images, labels = next(iter(loader))
    assert images.shape == (64, 8, 8)
    assert images.dtype == torch.float32
    assert labels.min() >= 0 and labels.max() <= 9
    all_images = torch.cat([batch_images for batch_images, _ in loader])
    # Pixels are 0..16 in scikit-learn: scaled by 16, the brightest is exactly 1.
    assert all_images.min() == 0.0 and all_images.max() == 1.0
