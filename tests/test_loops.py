"""The training epoch (``raylight/rank/loops.py``) on one process, without Ray.

A world-size-1 gloo group made in this process, so DDP's wrapper runs for real.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

import raylight as pl
from raylight.rank import loops
from raylight.rank.checkpointing import Resume
from raylight.rank.optim import LightningOptimizer
from raylight.rank.rank_trainer import RankTrainer
from raylight.seed import capture_rng
from raylight.shared.config import TrainerConfig


class Recorder(pl.Callback):
    def __init__(self):
        self.events = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.events.append("epoch start")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.events.append(batch_idx)


class Linear(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)


def _trainer(recorder):
    trainer = RankTrainer(TrainerConfig(), 0, 0, 0, 1, torch.device("cpu"))
    module = Linear()
    trainer.lightning_module, trainer.callbacks = module, [recorder]
    module.trainer = trainer
    trainer.strategy.setup_module(module, find_unused_parameters=False)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    trainer.optimizers = [optimizer]
    trainer._lightning_optimizers = [
        LightningOptimizer(
            optimizer,
            trainer.strategy.after_closure,
            trainer.strategy.optimizer_step,
            trainer._on_optimizer_stepped,
        )
    ]
    data = TensorDataset(torch.randn(8, 2), torch.randn(8, 1))
    trainer.train_dataloader = DataLoader(data, batch_size=2)
    trainer.num_training_batches = 4
    return trainer


def test_a_whole_epoch_runs_every_batch_and_then_resumes_at_the_next_epoch(process_group):
    recorder = Recorder()
    trainer = _trainer(recorder)
    summary = loops.train_epoch(trainer, 0)
    assert recorder.events == ["epoch start", 0, 1, 2, 3]
    assert summary["global_step"] == 4 and trainer._batches_that_stepped == 4
    assert trainer._resume_point == (1, 0)  # a checkpoint now starts the next epoch


def test_a_resumed_epoch_skips_the_finished_batches_and_continues_the_generators(
    process_group,
):
    recorder = Recorder()
    trainer = _trainer(recorder)
    torch.manual_seed(123)
    states = capture_rng()
    torch.manual_seed(0)  # what the resume must undo
    resume = Resume(epoch=2, batches_done=2, rng_states=states)
    loops.train_epoch(trainer, 2, resume)
    # on_train_epoch_start ran before the checkpoint was taken; batches 0 and 1 had run.
    assert recorder.events == [2, 3]
    assert trainer.current_epoch == 2 and trainer._resume_point == (3, 0)
    assert trainer.global_step == 2
    # The states were restored after the loader's iterator drew its seed, and nothing in
    # this epoch draws again: the generator is where the checkpoint left it.
    assert torch.equal(torch.get_rng_state(), states["torch"])


def test_stopping_mid_epoch_leaves_the_position_after_the_last_step(process_group):
    class StopAfterTwo(Recorder):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 1:
                trainer.should_stop = True

    recorder = StopAfterTwo()
    trainer = _trainer(recorder)
    loops.train_epoch(trainer, 0)
    assert recorder.events == ["epoch start", 0, 1]
    assert trainer._resume_point == (0, 2)  # a checkpoint now resumes after batch 1
