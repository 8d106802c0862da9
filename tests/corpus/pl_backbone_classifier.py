# Source: https://github.com/Lightning-AI/pytorch-lightning
#   examples/pytorch/basics/backbone_image_classifier.py
#   at commit 7f0c3436cd3f6ad3753125672024fc415cbcb414
# Changes:
# - import: every `lightning.pytorch...` import names raylight's module of the same path instead
#   when --framework raylight (pytorch_lightning's when --framework lightning); the _harness import
#   takes the flag off argv and seeds torch
# - data: `lightning.pytorch.demos.mnist_datamodule.MNIST` (torchvision's MNIST, downloading) ->
#   torchvision's MNIST on generated idx files (_data.mnist_dir: 1200 train, 200 test images), so
#   random_split [55000, 5000] -> [1000, 200]
# - entry: LightningCLI (needs jsonargparse, installed in neither environment) -> the objects it
#   builds with these defaults: seed_everything(1234), the model and datamodule with their
#   default arguments, a Trainer
#   (max_epochs=2 plus the scaling flags of scale() and limit_train_batches=8, limit_val_batches=2,
#   limit_test_batches=2, limit_predict_batches=2)
# - end: cli_main returns the trainer, the test results and the predictions; the final losses
#   and the predictions' count printed as one JSON line
# Copyright The Lightning AI team.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""MNIST backbone image classifier example.

To run: python backbone_image_classifier.py --trainer.max_epochs=50

"""

from os import path
from typing import Optional

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, random_split

from torchvision.datasets import MNIST

from _data import mnist_dir
from _harness import RAYLIGHT, report, scale

if RAYLIGHT:
    from raylight import LightningDataModule, LightningModule, Trainer, cli_lightning_logo, seed_everything
    from raylight.utilities.imports import _TORCHVISION_AVAILABLE
else:
    from pytorch_lightning import LightningDataModule, LightningModule, Trainer, cli_lightning_logo, seed_everything
    from pytorch_lightning.utilities.imports import _TORCHVISION_AVAILABLE

if _TORCHVISION_AVAILABLE:
    from torchvision import transforms

DATASETS_PATH = mnist_dir()


class Backbone(torch.nn.Module):
    """
    >>> Backbone()  # doctest: +ELLIPSIS +NORMALIZE_WHITESPACE
    Backbone(
      (l1): Linear(...)
      (l2): Linear(...)
    )
    """

    def __init__(self, hidden_dim=128):
        super().__init__()
        self.l1 = torch.nn.Linear(28 * 28, hidden_dim)
        self.l2 = torch.nn.Linear(hidden_dim, 10)

    def forward(self, x):
        x = x.view(x.size(0), -1)
        x = torch.relu(self.l1(x))
        return torch.relu(self.l2(x))


class LitClassifier(LightningModule):
    """
    >>> LitClassifier(Backbone())  # doctest: +ELLIPSIS +NORMALIZE_WHITESPACE
    LitClassifier(
      (backbone): ...
    )
    """

    def __init__(self, backbone: Optional[Backbone] = None, learning_rate: float = 0.0001):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        if backbone is None:
            backbone = Backbone()
        self.backbone = backbone

    def forward(self, x):
        # use forward for inference/predictions
        return self.backbone(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        y_hat = self(x)
        loss = F.cross_entropy(y_hat, y)
        self.log("train_loss", loss, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        y_hat = self(x)
        loss = F.cross_entropy(y_hat, y)
        self.log("valid_loss", loss, on_step=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        y_hat = self(x)
        loss = F.cross_entropy(y_hat, y)
        self.log("test_loss", loss)

    def predict_step(self, batch, batch_idx, dataloader_idx=None):
        x, _ = batch
        return self(x)

    def configure_optimizers(self):
        # self.hparams available because we called self.save_hyperparameters()
        return torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate)


class MyDataModule(LightningDataModule):
    def __init__(self, batch_size: int = 32):
        super().__init__()
        dataset = MNIST(DATASETS_PATH, train=True, download=True, transform=transforms.ToTensor())
        self.mnist_test = MNIST(DATASETS_PATH, train=False, download=True, transform=transforms.ToTensor())
        self.mnist_train, self.mnist_val = random_split(
            dataset, [1000, 200], generator=torch.Generator().manual_seed(42)
        )
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.mnist_train, batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(self.mnist_val, batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.mnist_test, batch_size=self.batch_size)

    def predict_dataloader(self):
        return DataLoader(self.mnist_test, batch_size=self.batch_size)


def cli_main():
    seed_everything(1234)
    model, datamodule = LitClassifier(), MyDataModule()
    trainer = Trainer(**scale(max_epochs=2, limit_train_batches=8, limit_val_batches=2,
                              limit_test_batches=2, limit_predict_batches=2))
    trainer.fit(model, datamodule=datamodule)
    test_results = trainer.test(ckpt_path="best", datamodule=datamodule)
    predictions = trainer.predict(ckpt_path="best", datamodule=datamodule)
    print(predictions[0])
    return trainer, test_results, predictions


if __name__ == "__main__":
    cli_lightning_logo()
    trainer, test_results, predictions = cli_main()
    report(trainer.callback_metrics, test_results[0], predicted=sum(len(p) for p in predictions))
