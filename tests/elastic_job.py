"""The training job the multi-node fault tests run as a driver process of their own cluster.

``python elastic_job.py SCENARIO WORKDIR`` prints one ``REPORT {json}`` line. The test
process kills and adds nodes when the job leaves marker files in WORKDIR.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

import ray
import torch
import torch.distributed as dist
from models import Classifier, IndexedDataset
from torch.utils.data import DataLoader

import raylight as pl

NODE = "RAYLIGHT_TEST_NODE"  # set in each test node's environment


def _wait_for(path: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.2)


class SampleRecorder(pl.Callback):
    """Every sample id trained on, per epoch, across all ranks; saved in checkpoints, so a
    resumed run continues the record of the checkpoint it resumed from."""

    def __init__(self) -> None:
        self.seen: dict[int, list[int]] = {}
        self.world_sizes: dict[int, list[int]] = {}  # the world sizes each epoch ran at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        gathered: list = [None] * trainer.world_size
        dist.all_gather_object(gathered, batch[2].tolist())
        epoch = trainer.current_epoch
        self.seen.setdefault(epoch, []).extend(i for ids in gathered for i in ids)
        sizes = self.world_sizes.setdefault(epoch, [])
        if trainer.world_size not in sizes:
            sizes.append(trainer.world_size)

    def state_dict(self):
        return {"seen": self.seen, "world_sizes": self.world_sizes}

    def load_state_dict(self, state):
        self.seen, self.world_sizes = state["seen"], state["world_sizes"]


class NodeKiller(Classifier):
    """At ``step``, on node ``node`` (or rank 0's node when None): leave a marker naming the
    node, then wait to be killed."""

    def __init__(self, workdir: str, node: str | None, step: int) -> None:
        super().__init__()
        self.workdir, self.node, self.step = workdir, node, step

    def training_step(self, batch, batch_idx):
        marker = os.path.join(self.workdir, "kill-node")
        here = os.environ.get(NODE)
        chosen = here == self.node if self.node else self.global_rank == 0
        if self.trainer.global_step == self.step and chosen:
            if not os.path.exists(marker):
                with open(marker, "w") as f:
                    f.write(here)
                time.sleep(120)  # the test kills this whole node meanwhile
        return super().training_step(batch, batch_idx)


class WaitsForNodeBack(pl.Callback):
    """With one worker left, hold the first epoch end until the test has added a node back."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.world_size == 1:
            shrunk = os.path.join(self.workdir, "shrunk")
            if not os.path.exists(shrunk):
                open(shrunk, "w").close()
                _wait_for(os.path.join(self.workdir, "node-back"))
                # On a loaded machine the new node's CPU shows as free a moment after the
                # node is up; the driver's grow check at this epoch end must see it.
                deadline = time.monotonic() + 60
                while ray.available_resources().get("CPU", 0) < 1 and time.monotonic() < deadline:
                    time.sleep(0.2)


# Elastic (1, 2), checking for room at every epoch end, restored from a step-2 recovery point.
ELASTIC = dict(
    num_workers=(1, 2), max_failures=1, elastic_check_interval=0, recovery_every_n_train_steps=2
)


def _loader() -> DataLoader:
    return DataLoader(IndexedDataset(64), batch_size=4)


def node_loss(workdir: str) -> dict:
    """2 workers on one node; that node dies; the run finishes on the other node."""
    pl.seed_everything(0)
    reference = Classifier()
    options = dict(num_workers=2, max_epochs=3, logger=False, enable_progress_bar=False)
    trainer = pl.Trainer(default_root_dir=os.path.join(workdir, "reference"), **options)
    trainer.fit(reference, _loader())
    trainer.shutdown()
    pl.seed_everything(0)
    model = NodeKiller(workdir, node=None, step=10)  # epoch 1, batch 2
    recorder = SampleRecorder()
    trainer = pl.Trainer(
        default_root_dir=os.path.join(workdir, "run"),
        max_failures=1,
        callbacks=[recorder],
        **options,
    )
    started = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, _loader())
    exact = all(torch.equal(model.state_dict()[k], v) for k, v in reference.state_dict().items())
    return {
        "steps": trainer.global_step,
        "exact": exact,
        "seen": recorder.seen,
        "world_sizes": recorder.world_sizes,
        "restarts": [str(w.message) for w in caught if "failure" in str(w.message)],
        "seconds": time.monotonic() - started,
    }


def shrink_and_grow(workdir: str) -> dict:
    """Elastic (1, 2): one worker per node; one node dies mid-epoch (the run goes on with one
    worker, re-partitioning the epoch's rest), then comes back (the run grows to two). An
    MLflow logger (a SQLite store in WORKDIR) records every step through it all."""
    recorder = SampleRecorder()
    tracking_uri = f"sqlite:///{os.path.join(workdir, 'mlflow.db')}"
    logger = pl.loggers.MLFlowLogger(experiment_name="elastic", tracking_uri=tracking_uri)
    trainer = pl.Trainer(
        **ELASTIC,
        max_epochs=4,
        enable_checkpointing=False,
        default_root_dir=os.path.join(workdir, "run"),
        logger=logger,
        log_every_n_steps=1,
        enable_progress_bar=False,
        callbacks=[recorder, WaitsForNodeBack(workdir)],
    )
    model = NodeKiller(workdir, node="c", step=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, _loader())
    runs = logger.experiment.search_runs([logger.experiment_id])
    history = logger.experiment.get_metric_history(logger.run_id, "train_loss")
    return {
        "steps": trainer.global_step,
        "seen": recorder.seen,
        "world_sizes": recorder.world_sizes,
        "messages": [str(w.message) for w in caught],
        "mlflow_runs": len(runs),
        "mlflow_steps": [metric.step for metric in history],
    }


class ShardedNodeKiller(NodeKiller):
    """Adam, so that there is optimizer state to shard and to carry through each resize."""

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def shrink_and_grow_fsdp(workdir: str) -> dict:
    """As shrink_and_grow, with ``strategy="fsdp"``: the step-4 recovery checkpoint is written
    in shards by two ranks and read resharded by one, the resize checkpoint the other way."""
    from raylight.shared import sharded

    recorder = SampleRecorder()
    root = os.path.join(workdir, "run")
    trainer = pl.Trainer(
        **ELASTIC,
        strategy="fsdp",
        max_epochs=3,
        default_root_dir=root,
        callbacks=[
            recorder,
            WaitsForNodeBack(workdir),
            pl.callbacks.ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), save_last=True),
        ],
        logger=False,
        enable_progress_bar=False,
    )
    pl.seed_everything(0)
    model = ShardedNodeKiller(workdir, node="c", step=5)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, _loader())
    last = os.path.join(root, "ckpt", "last.ckpt")
    saved = sharded.read_full(last)
    weights = model.state_dict()
    (optimizer,) = saved["optimizer_states"]
    return {
        "steps": trainer.global_step,
        "seen": recorder.seen,
        "world_sizes": recorder.world_sizes,
        "messages": [str(w.message) for w in caught],
        "sharded": {
            name: sharded.is_sharded(os.path.join(root, "recovery", name))
            for name in os.listdir(os.path.join(root, "recovery"))
        },
        "trained": all(not torch.equal(weights[k], v) for k, v in initial.items()),
        # the driver's model holds the last checkpoint's weights, gathered from the shards
        "driver_is_last": all(torch.equal(saved["state_dict"][k], v) for k, v in weights.items()),
        "last_step": saved["global_step"],
        # Adam counted every step through the shrink and the grow: no state was dropped
        "adam_steps": sorted({int(s["step"]) for s in optimizer["state"].values()}),
    }


if __name__ == "__main__":
    scenario, workdir = sys.argv[1], sys.argv[2]
    scenarios = [node_loss, shrink_and_grow, shrink_and_grow_fsdp]
    report = {f.__name__: f for f in scenarios}[scenario](workdir)
    print("REPORT " + json.dumps(report), flush=True)
