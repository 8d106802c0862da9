# Source: https://github.com/Lightning-AI/pytorch-lightning
#   examples/pytorch/bug_report/bug_report_model.py at 7f0c3436cd3f6ad3753125672024fc415cbcb414
# Changes:
# - import: `from lightning.pytorch import LightningModule, Trainer` comes from raylight or
#   pytorch_lightning, as --framework picks (the _harness import takes the flag off argv)
# - Trainer: the scaling flags (raylight: num_workers=2; Lightning: accelerator="cpu",
#   devices=1); limit_*_batches 1 -> 4 and max_epochs 1 -> 2, so the loss moves
# - end: run() returns the trainer; the script prints the final metrics as one JSON line
import os

import torch
from torch.utils.data import DataLoader, Dataset

from _harness import RAYLIGHT, report, scale

if RAYLIGHT:
    from raylight import LightningModule, Trainer
else:
    from pytorch_lightning import LightningModule, Trainer


class RandomDataset(Dataset):
    def __init__(self, size, length):
        self.len = length
        self.data = torch.randn(length, size)

    def __getitem__(self, index):
        return self.data[index]

    def __len__(self):
        return self.len


class BoringModel(LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(32, 2)

    def forward(self, x):
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        loss = self(batch).sum()
        self.log("train_loss", loss)
        return {"loss": loss}

    def validation_step(self, batch, batch_idx):
        loss = self(batch).sum()
        self.log("valid_loss", loss)

    def test_step(self, batch, batch_idx):
        loss = self(batch).sum()
        self.log("test_loss", loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.layer.parameters(), lr=0.1)


def run():
    train_data = DataLoader(RandomDataset(32, 64), batch_size=2)
    val_data = DataLoader(RandomDataset(32, 64), batch_size=2)
    test_data = DataLoader(RandomDataset(32, 64), batch_size=2)

    model = BoringModel()
    trainer = Trainer(**scale(
        default_root_dir=os.getcwd(),
        limit_train_batches=4,
        limit_val_batches=4,
        limit_test_batches=4,
        num_sanity_val_steps=0,
        max_epochs=2,
        enable_model_summary=False,
    ))
    trainer.fit(model, train_dataloaders=train_data, val_dataloaders=val_data)
    trainer.test(model, dataloaders=test_data)
    return trainer


if __name__ == "__main__":
    report(run().callback_metrics)
