"""BaseFinetuning / BackboneFinetuning: Lightning's results on one worker, ranks that stay in
step once the backbone is unfrozen mid-fit, and param groups that survive a resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import loader
from pytorch_lightning.callbacks import BackboneFinetuning as LightningBackboneFinetuning

import raylight as pl
from raylight.callbacks import BackboneFinetuning, BaseFinetuning, Callback
from raylight.shared.config import MisconfigurationException

lightning = pytest.importorskip("pytorch_lightning")


def _layers() -> tuple[torch.nn.Module, torch.nn.Module]:
    backbone = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 16)
    )
    return backbone, torch.nn.Linear(16, 3)


def _step(module, batch):
    return F.cross_entropy(module.head(module.backbone(batch[0])), batch[1])


def _optimizer(module):
    # Lightning's advice: only the parameters that train now; the callback adds the rest.
    params = filter(lambda p: p.requires_grad, module.parameters())
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


class Transfer(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.backbone, self.head = _layers()

    def training_step(self, batch, batch_idx):
        return _step(self, batch)

    def configure_optimizers(self):
        return _optimizer(self)


class LightningTransfer(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.backbone, self.head = _layers()

    def training_step(self, batch, batch_idx):
        return _step(self, batch)

    def configure_optimizers(self):
        return _optimizer(self)


class RanksAgree(Callback):
    """Rank 0 ends holding the largest difference between the ranks' parameters."""

    def __init__(self) -> None:
        self.max_difference = -1.0

    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = pl_module.all_gather(flat)
        self.max_difference = float((gathered - gathered[0]).abs().max())


def _trainer(callbacks, **kwargs) -> pl.Trainer:
    defaults = dict(
        num_workers=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def test_helpers_freeze_and_unfreeze_as_lightning():
    module = Transfer()
    BaseFinetuning.freeze(module.backbone, train_bn=True)
    trainable = sorted(n for n, p in module.backbone.named_parameters() if p.requires_grad)
    assert trainable == ["1.bias", "1.weight"]  # the batch norm keeps training
    BaseFinetuning.freeze(module.backbone, train_bn=False)
    assert not any(p.requires_grad for p in module.backbone.parameters())
    assert module.backbone[1].track_running_stats is False
    assert len(BaseFinetuning.flatten_modules(module)) == 4 + 1  # 3 leaves with a ReLU, head
    optimizer = torch.optim.SGD(module.head.parameters(), lr=0.1)
    BaseFinetuning.unfreeze_and_add_param_group(module.backbone, optimizer, train_bn=False)
    assert len(optimizer.param_groups) == 2 and optimizer.param_groups[1]["lr"] == pytest.approx(
        0.01
    )
    assert len(optimizer.param_groups[1]["params"]) == 4  # both Linear layers, no batch norm
    assert module.backbone[1].track_running_stats is True
    with pytest.warns(UserWarning, match="already exist within another group"):
        BaseFinetuning.unfreeze_and_add_param_group(module.head, optimizer, lr=0.5)


@pytest.mark.slow
def test_one_worker_matches_lightning(ray_session, tmp_path):
    torch.manual_seed(0)
    ours, theirs = Transfer(), LightningTransfer()
    theirs.load_state_dict(ours.state_dict())
    callback = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_lr=0.01)
    _trainer([callback], num_workers=1, max_epochs=3).fit(ours, loader())

    reference = LightningBackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_lr=0.01)
    lightning.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=3,
        callbacks=[reference],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    ).fit(theirs, loader())

    # lr 0.01 at epoch 1, then doubled (Lightning's default lambda) at epoch 2
    assert callback.previous_backbone_lr == reference.previous_backbone_lr == 0.02
    assert (
        callback.state_dict()["internal_optimizer_metadata"]
        == reference.state_dict()["internal_optimizer_metadata"]
    )
    for name, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_two_ranks_stay_in_step_and_resume_exactly(ray_session, tmp_path):
    torch.manual_seed(0)
    initial = Transfer().state_dict()

    def fresh() -> Transfer:
        module = Transfer()
        module.load_state_dict(initial)
        return module

    def finetuning() -> BackboneFinetuning:
        return BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_lr=0.01)

    straight, agree = fresh(), RanksAgree()
    _trainer([finetuning(), agree], max_epochs=4).fit(straight, loader(shuffle=True))
    # The backbone trained from epoch 1 on, and DDP synced its gradients on both ranks.
    assert not torch.equal(straight.backbone[0].weight, initial["backbone.0.weight"])
    assert agree.max_difference == 0.0

    first = _trainer([finetuning()], max_epochs=2)
    first.fit(fresh(), loader(shuffle=True))
    first.save_checkpoint(tmp_path / "half.ckpt")
    first.shutdown()
    saved = torch.load(tmp_path / "half.ckpt", weights_only=True)
    assert len(saved["optimizer_states"][0]["param_groups"]) == 2  # the backbone's group
    (state,) = saved["callbacks"].values()
    # head and batch norm (train_bn), then the backbone's two Linear layers
    assert [len(g["params"]) for g in state["internal_optimizer_metadata"][0]] == [4, 4]

    resumed, callback, agree = fresh(), finetuning(), RanksAgree()
    trainer = _trainer([callback, agree], max_epochs=4)
    trainer.fit(resumed, loader(shuffle=True), ckpt_path=tmp_path / "half.ckpt")
    assert trainer.global_step == 16 and agree.max_difference == 0.0
    assert callback.previous_backbone_lr == 0.04  # 0.01, then doubled at epochs 2 and 3
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


class NoBackbone(Transfer):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = self.backbone
        del self.backbone

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.head(self.trunk(batch[0])), batch[1])


@pytest.mark.slow
def test_backbone_is_required(ray_session):
    with pytest.raises(MisconfigurationException, match="nn.Module `backbone` attribute"):
        _trainer([BackboneFinetuning()], max_epochs=1).fit(NoBackbone(), loader())
