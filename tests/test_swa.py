"""StochasticWeightAveraging: Lightning's averaged weights and batch norm statistics on one
worker, and two ranks that end with the same averaged weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import loader
from pytorch_lightning.callbacks import StochasticWeightAveraging as LightningSWA

import raylight as pl
from raylight.callbacks import Callback, ModelCheckpoint, StochasticWeightAveraging
from raylight.shared.config import MisconfigurationException

lightning = pytest.importorskip("pytorch_lightning")


def _layers() -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
    )


def _step(module, batch):
    loss = F.cross_entropy(module.net(batch[0]), batch[1])
    module.log("train_loss", loss)  # dropped in raylight's batch norm pass
    return loss


def _optimizers(module):
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _layers()

    def training_step(self, batch, batch_idx):
        return _step(self, batch)

    def configure_optimizers(self):
        return _optimizers(self)


class LightningNet(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _layers()

    def training_step(self, batch, batch_idx):
        return _step(self, batch)

    def configure_optimizers(self):
        return _optimizers(self)


class FinalWeights(Callback):
    """After SWA's on_train_end: the largest difference between the ranks' weights (running
    statistics included), the learning rates SWALR set, and rank 0's average."""

    def __init__(self) -> None:
        self.max_difference = -1.0
        self.lrs: list[float] = []
        self.averaged: dict[str, torch.Tensor] = {}

    def on_train_epoch_end(self, trainer, pl_module):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([v.detach().float().flatten() for v in pl_module.state_dict().values()])
        gathered = pl_module.all_gather(flat)
        self.max_difference = float((gathered - gathered[0]).abs().max())
        swa = next(c for c in trainer.callbacks if isinstance(c, StochasticWeightAveraging))
        self.averaged = {n: p.detach().clone() for n, p in swa._average_model.named_parameters()}


def _swa() -> StochasticWeightAveraging:
    return StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2, annealing_epochs=2)


def _trainer(callbacks, **kwargs) -> pl.Trainer:
    defaults = dict(
        max_epochs=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def test_arguments_are_checked_as_lightning():
    with pytest.raises(MisconfigurationException, match="swa_epoch_start should be"):
        StochasticWeightAveraging(swa_lrs=0.1, swa_epoch_start=0)
    with pytest.raises(MisconfigurationException, match="positive float"):
        StochasticWeightAveraging(swa_lrs=[0.1, -1.0])
    with pytest.raises(MisconfigurationException, match="should be callable"):
        StochasticWeightAveraging(swa_lrs=0.1, avg_fn=3)


@pytest.mark.slow
def test_one_worker_matches_lightning(ray_session, tmp_path):
    torch.manual_seed(0)
    ours, theirs = Net(), LightningNet()
    theirs.load_state_dict(ours.state_dict())
    swa, final = _swa(), FinalWeights()
    _trainer([swa, final], num_workers=1).fit(ours, loader())

    reference = LightningSWA(swa_lrs=0.05, swa_epoch_start=2, annealing_epochs=2)
    lightning.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=4,
        callbacks=[reference],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    ).fit(theirs, loader())

    # SWALR took over from StepLR at epoch 1 and annealed the rate to swa_lrs.
    assert final.lrs[-1] == pytest.approx(0.05)
    assert int(swa.n_averaged) == int(reference.n_averaged) == 3  # epochs 1, 2 and 3
    # The batch norm statistics were recomputed under the averaged weights.
    assert int(ours.net[1].num_batches_tracked) == 128 // 16
    assert ours.net[1].momentum == 0.1
    # Lightning's own average, and its batch norm statistics. Its module's parameters are not
    # compared: in its extra batch norm epoch SGD's momentum still moves them a little after
    # the averaged weights went in. Not bit-exact (about 1e-7 apart): float rounding in a
    # different order of the same operations.
    for name, value in reference._average_model.named_parameters():
        torch.testing.assert_close(ours.get_parameter(name), value, rtol=0, atol=1e-5, msg=name)
    for name, value in theirs.named_buffers():
        torch.testing.assert_close(ours.get_buffer(name), value, rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_two_ranks_end_with_the_same_average_and_resume_exactly(ray_session, tmp_path):
    torch.manual_seed(0)
    initial = Net().state_dict()

    def fresh() -> Net:
        module = Net()
        module.load_state_dict(initial)
        return module

    straight, final = fresh(), FinalWeights()
    _trainer([_swa(), final], num_workers=2).fit(straight, loader(shuffle=True))
    assert final.max_difference == 0.0
    assert final.averaged  # rank 0's callback came back with its average
    for name, value in final.averaged.items():
        assert torch.equal(straight.get_parameter(name), value), name
    assert not torch.equal(straight.net[0].weight, initial["net.0.weight"])
    # each rank ran its 4 batches, then the ranks' statistics were averaged
    assert int(straight.net[1].num_batches_tracked) == 4
    assert not torch.equal(straight.net[1].running_var, initial["net.1.running_var"])

    every_epoch = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)
    _trainer([_swa(), every_epoch], num_workers=2, max_epochs=3, enable_checkpointing=True).fit(
        fresh(), loader(shuffle=True)
    )
    middle = tmp_path / "epoch=1-step=8.ckpt"  # SWALR, and the average of one epoch
    (state,) = (v for k, v in torch.load(middle)["callbacks"].items() if "Stochastic" in k)
    assert state["n_averaged"] == 1 and state["scheduler_state"] is not None

    resumed, swa = fresh(), _swa()
    _trainer([swa], num_workers=2).fit(resumed, loader(shuffle=True), ckpt_path=middle)
    assert int(swa.n_averaged) == 3
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
