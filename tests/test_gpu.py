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


class ChecksShards(Classifier):
    """Logs whether the step runs on CUDA under bf16 autocast with this rank's shards."""

    def training_step(self, batch, batch_idx):
        from torch.distributed.tensor import DTensor

        x, y = batch
        logits = self(x)
        weight = self.layer[0].weight
        self.log("on_cuda", float(x.is_cuda and logits.is_cuda))
        self.log("bf16_forward", float(logits.dtype == torch.bfloat16))
        self.log("sharded_on_cuda", float(isinstance(weight, DTensor) and weight.is_cuda))
        return F.cross_entropy(logits.float(), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def test_fsdp_on_gpus_with_nccl_bf16_mixed_and_a_sharded_resume(ray_session, tmp_path):
    from raylight.shared import sharded
    from raylight.strategies import FSDPStrategy

    workers = min(2, torch.cuda.device_count())
    flags = dict(
        accelerator="gpu",
        devices=workers,
        strategy=FSDPStrategy(auto_wrap_policy={torch.nn.Linear}),
        precision="bf16-mixed",
        logger=False,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path),
    )
    model = ChecksShards()
    before = model.layer[0].weight.clone()
    trainer = pl.Trainer(max_epochs=1, **flags)
    trainer.fit(model, loader())
    for key in ("on_cuda", "bf16_forward", "sharded_on_cuda"):
        assert trainer.callback_metrics[key].item() == 1.0, key
    assert not torch.equal(model.layer[0].weight, before)
    assert model.layer[0].weight.device.type == "cpu"  # the whole weights, back in the driver
    path = trainer.checkpoint_callback.best_model_path
    saved = sharded.read_full(path)  # the shards were copied off the GPU and written
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved["state_dict"][name]), name

    resumed = pl.Trainer(max_epochs=2, **flags)
    resumed.fit(ChecksShards(), loader(), ckpt_path=path)
    assert resumed.global_step == 2 * trainer.global_step
