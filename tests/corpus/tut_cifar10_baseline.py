# Source: https://github.com/Lightning-AI/tutorials
#   lightning_examples/cifar10-baseline/baseline.py
#   at commit 15817658a2d63afa338b9e1cd8454fb98d746fac
#   (the notebook up to the LitResnet test; its SWA bonus and the metric plots are not included)
# Changes:
# - import: `pytorch_lightning as pl`, its LearningRateMonitor and CSVLogger come from raylight
#   or pytorch_lightning, as --framework picks (the _harness import takes the flag off argv and
#   seeds torch); the plotting and notebook imports (pandas, seaborn, IPython) removed
# - data: torchvision's CIFAR10 (downloading) -> _data.CIFAR10 (generated images, 640 train,
#   128 test; split 0.2 as written: 512 train, 128 val); BATCH_SIZE 64 on CPU -> 16 and
#   NUM_WORKERS -> 0 (two CPU cores)
# - Trainer: accelerator/devices -> the scaling flags of scale(); max_epochs 5 -> 1,
#   limit_train_batches=6, limit_val_batches=2, limit_test_batches=2, log_every_n_steps=1 (so
#   LearningRateMonitor logs every step's learning rate in so short a run)
# - end: the test results, the fit's final metrics and the last learning rate the monitor wrote
#   to the logger's metrics.csv (the notebook reads that file with pandas) printed as one JSON line
import csv
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from _data import CIFAR10
from _harness import RAYLIGHT, report, scale

if RAYLIGHT:
    import raylight as pl
    from raylight.callbacks import LearningRateMonitor
    from raylight.loggers import CSVLogger
else:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import LearningRateMonitor
    from pytorch_lightning.loggers import CSVLogger
from torch.optim.lr_scheduler import OneCycleLR
from torch.utils.data import DataLoader, random_split
from torchmetrics.functional import accuracy

pl.seed_everything(7)

PATH_DATASETS = os.environ.get("PATH_DATASETS", ".")
BATCH_SIZE = 256 if torch.cuda.is_available() else 16
NUM_WORKERS = 0

cifar10_normalization = torchvision.transforms.Normalize(
    mean=[x / 255.0 for x in [125.3, 123.0, 113.9]],
    std=[x / 255.0 for x in [63.0, 62.1, 66.7]],
)


def split_dataset(dataset, val_split=0.2, train=True):
    """Splits the dataset into train and validation set."""
    len_dataset = len(dataset)
    splits = get_splits(len_dataset, val_split)
    dataset_train, dataset_val = random_split(
        dataset, splits, generator=torch.Generator().manual_seed(42)
    )

    if train:
        return dataset_train
    return dataset_val


def get_splits(len_dataset, val_split):
    """Computes split lengths for train and validation set."""
    if isinstance(val_split, int):
        train_len = len_dataset - val_split
        splits = [train_len, val_split]
    elif isinstance(val_split, float):
        val_len = int(val_split * len_dataset)
        train_len = len_dataset - val_len
        splits = [train_len, val_len]
    else:
        raise ValueError(f"Unsupported type {type(val_split)}")

    return splits


train_transforms = torchvision.transforms.Compose(
    [
        torchvision.transforms.RandomCrop(32, padding=4),
        torchvision.transforms.RandomHorizontalFlip(),
        torchvision.transforms.ToTensor(),
        cifar10_normalization,
    ]
)
test_transforms = torchvision.transforms.Compose(
    [
        torchvision.transforms.ToTensor(),
        cifar10_normalization,
    ]
)

dataset_train = CIFAR10(PATH_DATASETS, train=True, download=True, transform=train_transforms)
dataset_val = CIFAR10(PATH_DATASETS, train=True, download=True, transform=test_transforms)
dataset_train = split_dataset(dataset_train)
dataset_val = split_dataset(dataset_val, train=False)
dataset_test = CIFAR10(PATH_DATASETS, train=False, download=True, transform=test_transforms)

train_dataloader = DataLoader(
    dataset_train, batch_size=BATCH_SIZE, shuffle=True, num_workers=NUM_WORKERS
)
val_dataloader = DataLoader(
    dataset_val, batch_size=BATCH_SIZE, shuffle=False, num_workers=NUM_WORKERS
)
test_dataloader = DataLoader(
    dataset_test, batch_size=BATCH_SIZE, shuffle=False, num_workers=NUM_WORKERS
)


def create_model():
    model = torchvision.models.resnet18(pretrained=False, num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
    model.maxpool = nn.Identity()
    return model


class LitResnet(pl.LightningModule):
    def __init__(self, lr=0.05):
        super().__init__()

        self.save_hyperparameters()
        self.model = create_model()

    def forward(self, x):
        out = self.model(x)
        return F.log_softmax(out, dim=1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.nll_loss(logits, y)
        self.log("train_loss", loss)
        return loss

    def evaluate(self, batch, stage=None):
        x, y = batch
        logits = self(x)
        loss = F.nll_loss(logits, y)
        preds = torch.argmax(logits, dim=1)
        acc = accuracy(preds, y, task="multiclass", num_classes=10)

        if stage:
            self.log(f"{stage}_loss", loss, prog_bar=True)
            self.log(f"{stage}_acc", acc, prog_bar=True)

    def validation_step(self, batch, batch_idx):
        self.evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self.evaluate(batch, "test")

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(
            self.parameters(),
            lr=self.hparams.lr,
            momentum=0.9,
            weight_decay=5e-4,
        )
        steps_per_epoch = 45000 // BATCH_SIZE
        scheduler_dict = {
            "scheduler": OneCycleLR(
                optimizer,
                0.1,
                epochs=self.trainer.max_epochs,
                steps_per_epoch=steps_per_epoch,
            ),
            "interval": "step",
        }
        return {"optimizer": optimizer, "lr_scheduler": scheduler_dict}


model = LitResnet(lr=0.05)

trainer = pl.Trainer(
    **scale(
        max_epochs=1,
        limit_train_batches=6,
        limit_val_batches=2,
        limit_test_batches=2,
        log_every_n_steps=1,
    ),
    logger=CSVLogger(save_dir="logs/"),
    callbacks=[LearningRateMonitor(logging_interval="step")],
)

trainer.fit(model, train_dataloaders=train_dataloader, val_dataloaders=val_dataloader)
test_result = trainer.test(model, dataloaders=test_dataloader)

with open(f"{trainer.logger.log_dir}/metrics.csv") as file:
    lrs = [float(row["lr-SGD"]) for row in csv.DictReader(file) if row.get("lr-SGD")]
report(trainer.callback_metrics, test_result[0], lr=lrs[-1], lr_rows=len(lrs))
