"""``self.log(name, metric)`` with a torchmetrics.Metric: the batch value on steps, the
synced ``compute()`` at epoch end, then a reset, as in Lightning."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F
from models import Classifier, loader, make_dataset
from torch.utils.data import DistributedSampler
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import MulticlassAccuracy

import raylight as pl
from raylight.loggers import CSVLogger
from raylight.rank.logging import MetricLog

TRAIN = make_dataset(128, seed=0)  # 2 ranks x 4 batches of 16: no DistributedSampler padding
VAL = make_dataset(64, seed=1)  # 2 ranks x 2 batches of 16


class MetricClassifier(Classifier):
    """lr=0: the weights never change, so every logged accuracy can be computed by hand."""

    def __init__(self) -> None:
        super().__init__(lr=0.0)
        self.train_acc = MulticlassAccuracy(num_classes=3, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=3, average="micro")
        self.val_seen = SumMetric()

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.train_acc(logits.argmax(1), y)  # forward: the batch's accuracy, and accumulate
        self.log("train_acc", self.train_acc, on_step=True, on_epoch=True)
        return F.cross_entropy(logits, y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc.update(self(x).argmax(1), y)
        self.val_seen.update(torch.ones(len(y)))
        self.log("val_acc", self.val_acc)
        self.log("val_seen", self.val_seen)


def _accuracy(model, dataset, indices=None) -> float:
    x, y = dataset.tensors
    if indices is not None:
        x, y = x[indices], y[indices]
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.slow
def test_metric_objects_sync_across_ranks_and_reset_each_epoch(ray_session, tmp_path):
    model = MetricClassifier()
    trainer = pl.Trainer(
        num_workers=2,
        max_epochs=2,
        log_every_n_steps=1,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader(TRAIN), loader(VAL))
    rows = list(csv.DictReader(open(tmp_path / "lightning_logs/version_0/metrics.csv")))
    val_rows = [r for r in rows if r["val_acc"]]

    # Epoch values cover the whole dataset, both ranks' halves: torchmetrics synced them.
    val_accuracy = _accuracy(model, VAL)
    rank0_val_accuracy = _accuracy(model, VAL, list(range(0, 64, 2)))  # its unpadded shard
    assert rank0_val_accuracy != pytest.approx(val_accuracy)  # so a rank-0-only value shows
    assert [float(r["val_acc"]) for r in val_rows] == pytest.approx([val_accuracy] * 2)
    assert trainer.callback_metrics["val_acc"].item() == pytest.approx(val_accuracy)
    # Every epoch counts the 64 validation samples once: reset after the sanity check and
    # after each epoch (else 128, 192), synced (else 32).
    assert [float(r["val_seen"]) for r in val_rows] == [64.0, 64.0]
    train_epoch = [float(r["train_acc_epoch"]) for r in rows if r["train_acc_epoch"]]
    assert train_epoch == pytest.approx([_accuracy(model, TRAIN)] * 2)

    # Step values are rank 0's batch accuracies (torchmetrics' forward), unsynced.
    expected_steps = []
    for epoch in range(2):
        sampler = DistributedSampler(TRAIN, num_replicas=2, rank=0, shuffle=True, seed=0)
        sampler.set_epoch(epoch)
        order = list(sampler)
        expected_steps += [_accuracy(model, TRAIN, order[i : i + 16]) for i in range(0, 64, 16)]
    step_rows = [r for r in rows if r["train_acc_step"]]
    assert [int(r["step"]) for r in step_rows] == list(range(8))
    assert [float(r["train_acc_step"]) for r in step_rows] == pytest.approx(expected_steps)


def test_metric_log_reads_forward_cache_and_compute_once():
    results = MetricLog(all_reduce=lambda tensor, op: tensor)
    metric = SumMetric()
    kwargs = dict(
        prog_bar=True,
        logger=True,
        reduce_fx="mean",
        sync_dist=True,  # ignored for a Metric: it syncs itself
        add_dataloader_idx=True,
        batch_size=None,
    )
    metric(torch.tensor(2.0))
    results.log("training_step", "total", metric, on_step=True, on_epoch=True, **kwargs)
    metric(torch.tensor(3.0))
    results.log("training_step", "total", metric, on_step=True, on_epoch=True, **kwargs)
    callback, logged, bar = results.step_metrics()
    assert logged == {"total_step": torch.tensor(3.0)} and bar == logged
    callback, logged, _ = results.epoch_metrics()
    assert logged == {"total_epoch": torch.tensor(5.0)} and callback["total"] == 5.0
    metric.update(torch.tensor(10.0))  # not logged again: the epoch value stays the one read
    assert results.epoch_metrics()[1] == {"total_epoch": torch.tensor(5.0)}
    results.reset_metrics()
    assert metric.sum_value == 0.0 and metric.update_count == 0
    results = MetricLog(all_reduce=lambda tensor, op: tensor)  # a loop's log ends at its reset
    with pytest.raises(ValueError, match="must be a one-element tensor"):
        per_class = MulticlassAccuracy(num_classes=3, average=None)
        per_class(torch.tensor([0, 1]), torch.tensor([0, 2]))
        results.log(
            "validation_step", "per_class", per_class, on_step=None, on_epoch=None, **kwargs
        )
        results.epoch_metrics()
