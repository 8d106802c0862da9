"""The DDP strategy (``raylight/rank/strategy.py``) and the loop's step on one process.

A world-size-1 gloo group made in this process: DDP's reducer, no_sync and the all-reduce
run for real, without Ray. Each test compares with the same arithmetic in plain torch.
"""

from __future__ import annotations

import pytest
import torch

import raylight as pl
from raylight.rank import loops
from raylight.rank.optim import LightningOptimizer
from raylight.rank.rank_trainer import RankTrainer
from raylight.shared.config import TrainerConfig

LR = 0.1


class Linear(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)


class ManualLinear(Linear):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        return loss


def _batches(count):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, generator=generator), torch.randn(4, 1)) for _ in range(count)]


def _trainer(module, **config):
    trainer = RankTrainer(TrainerConfig(**config), 0, 0, 0, 1, torch.device("cpu"))
    trainer.lightning_module = module
    module.trainer = trainer
    trainer.strategy.setup_module(module, find_unused_parameters=False)
    optimizer = torch.optim.SGD(module.parameters(), lr=LR)
    trainer.optimizers = [optimizer]
    trainer._lightning_optimizers = [
        LightningOptimizer(
            optimizer,
            trainer.strategy.after_closure,
            trainer.strategy.optimizer_step,
            trainer._on_optimizer_stepped,
        )
    ]
    return trainer


def assert_same_weights(module, model):
    for ours, plain in zip(module.layer.parameters(), model.parameters(), strict=True):
        assert torch.equal(ours, plain)


def _plain_copy():
    model = Linear().layer
    return model, torch.optim.SGD(model.parameters(), lr=LR)


def test_accumulation_steps_once_per_window_on_the_mean_of_its_losses(process_group):
    module = Linear()
    trainer = _trainer(module, accumulate_grad_batches=2)
    batches = _batches(4)
    for batch_idx, batch in enumerate(batches):
        loops._automatic_step(trainer, batch, batch_idx, len(batches))
        assert trainer.global_step == (batch_idx + 1) // 2  # steps after batches 1 and 3

    model, optimizer = _plain_copy()
    for start in (0, 2):
        optimizer.zero_grad()
        for x, y in batches[start : start + 2]:
            (torch.nn.functional.mse_loss(model(x), y) / 2).backward()
        optimizer.step()
    assert_same_weights(module, model)


def test_the_epochs_last_batch_closes_a_short_window(process_group):
    module = Linear()
    trainer = _trainer(module, accumulate_grad_batches=4)
    batches = _batches(3)
    for batch_idx, batch in enumerate(batches):
        loops._automatic_step(trainer, batch, batch_idx, len(batches))
    assert trainer.global_step == 1


def test_gradients_are_clipped_after_backward_and_before_the_step(process_group):
    module = Linear()
    trainer = _trainer(module, gradient_clip_val=0.01)
    seen = {}

    class Watch(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen["norm before clipping"] = pl_module.layer.weight.grad.norm().item()

    trainer.callbacks = [Watch()]
    (batch,) = _batches(1)
    loops._automatic_step(trainer, batch, 0, 1)

    model, optimizer = _plain_copy()
    torch.nn.functional.mse_loss(model(batch[0]), batch[1]).backward()
    assert seen["norm before clipping"] > 0.01  # the clip had something to do
    torch.nn.utils.clip_grad_norm_(list(model.parameters()), 0.01)
    optimizer.step()
    assert_same_weights(module, model)


def test_manual_optimization_syncs_its_own_backward_and_rearms_ddp(process_group):
    module = ManualLinear()
    trainer = _trainer(module)
    batches = _batches(2)
    for batch_idx, batch in enumerate(batches):
        loops._manual_step(trainer, batch, batch_idx)
        # training_step's backward ran inside DDP's forward; the next forward syncs again.
        assert trainer.model.require_backward_grad_sync
        assert trainer.model.require_forward_param_sync
    assert trainer.global_step == 2

    model, optimizer = _plain_copy()
    for x, y in batches:
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert_same_weights(module, model)


def test_the_strategy_is_lightnings_trainer_strategy(process_group):
    trainer = _trainer(Linear())
    strategy = trainer.strategy
    assert strategy.root_device == torch.device("cpu") and strategy.world_size == 1
    assert strategy.broadcast({"a": 1}) == {"a": 1}
    assert strategy.reduce_boolean_decision(True) is True
    assert trainer.precision_plugin is strategy.precision
    assert trainer.model is strategy.model


class WithUnusedLayer(Linear):
    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Linear(3, 1)


def test_the_run_configs_ddp_arguments_reach_the_wrapper(process_group):
    ddp_kwargs = {"static_graph": True, "gradient_as_bucket_view": True, "bucket_cap_mb": 2}
    trainer = _trainer(Linear(), ddp_kwargs=ddp_kwargs)
    assert trainer.model.static_graph and trainer.model.gradient_as_bucket_view
    assert trainer.model.bucket_bytes_cap == 2 * 2**20
    assert not trainer.model.find_unused_parameters


def test_unused_parameters_raise_an_error_naming_the_strategy_that_fixes_them(process_group):
    trainer = _trainer(WithUnusedLayer())
    batches = _batches(2)
    loops._automatic_step(trainer, batches[0], 0, 2)  # torch notices on the next forward
    with pytest.raises(RuntimeError) as raised:
        loops._automatic_step(trainer, batches[1], 1, 2)
    message = str(raised.value)
    assert "strategy='ddp_find_unused_parameters_true'" in message
    assert "strategy=DDPStrategy(find_unused_parameters=True)" in message
    assert "Expected to have finished reduction in the prior iteration" in str(
        raised.value.__cause__
    )
    assert raised.value._raylight_hook == "training_step"
