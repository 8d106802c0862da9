"""GPU paths: NCCL, one GPU per worker, 16-mixed with a gradient scaler. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import Classifier, loader

import raylight as pl

pytestmark = [pytest.mark.requires_gpu, pytest.mark.slow]


class ChecksDevice(Classifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("on_cuda", float(x.is_cuda and self.device.type == "cuda"))
        self.log("fp16_forward", float(logits.dtype == torch.float16))
        return F.cross_entropy(logits.float(), y)


def test_fit_on_gpus_with_16_mixed(ray_session):
    workers = min(2, torch.cuda.device_count())
    model = ChecksDevice()
    before = model.layer[0].weight.clone()
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=workers,
        precision="16-mixed",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, loader())
    assert trainer.callback_metrics["on_cuda"].item() == 1.0
    assert trainer.callback_metrics["fp16_forward"].item() == 1.0
    assert not torch.equal(model.layer[0].weight, before)
    assert model.layer[0].weight.device.type == "cpu"  # the driver's copy stays on its device
