"""raylight.utilities: Lightning's helpers, with each worker's rank set before user code runs."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import raylight as pl
from raylight.utilities import grad_norm, rank_zero_only, rank_zero_warn
from raylight.utilities import rank_zero as rank_zero_module

lightning = pytest.importorskip("pytorch_lightning")


@pytest.fixture
def rank():
    """Set this process's rank for a test, then put the previous one back."""
    from lightning_utilities.core import rank_zero as lightning_rank_zero

    before = (rank_zero_only.rank, lightning_rank_zero.rank_zero_only.rank)
    yield rank_zero_module.set_rank
    rank_zero_only.rank, lightning_rank_zero.rank_zero_only.rank = before


def test_rank_zero_only_runs_on_rank_zero_and_gives_the_default_elsewhere(rank):
    @rank_zero_only
    def hello(name):
        return f"hello {name}"

    rank(0)
    assert hello("driver") == "hello driver"
    rank(1)
    assert hello("driver") is None
    assert rank_zero_only(lambda: "x", default="skipped")() == "skipped"


def test_set_rank_also_sets_lightnings_rank_zero_only(rank):
    from pytorch_lightning.utilities import rank_zero_only as lightning_rank_zero_only

    calls = []
    noted = lightning_rank_zero_only(calls.append)
    rank(1)
    noted("rank 1")
    rank(0)
    noted("rank 0")
    assert calls == ["rank 0"]


def test_rank_zero_warn_warns_on_rank_zero_only(rank):
    rank(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rank_zero_warn("from rank 1")
    assert caught == []
    rank(0)
    with pytest.warns(UserWarning, match="from rank 0"):
        rank_zero_warn("from rank 0")


def test_the_rank_starts_from_the_environment_as_in_lightning(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    assert rank_zero_module._rank_from_env() == 3
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("SLURM_PROCID", "7")  # LOCAL_RANK wins: SLURM sets this one anyway
    assert rank_zero_module._rank_from_env() == 2
    for key in ("LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert rank_zero_module._rank_from_env() is None


def test_grad_norm_matches_lightnings():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    net(torch.randn(5, 4)).square().sum().backward()
    net[1].bias.grad = None  # a parameter without a gradient is left out
    for norm_type in (2, 1.0, "inf"):
        ours = grad_norm(net, norm_type)
        theirs = lightning.utilities.grad_norm(net, norm_type)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert "grad_2.0_norm/0.weight" in grad_norm(net, 2)
    with pytest.raises(ValueError, match="positive number or 'inf'"):
        grad_norm(net, 0)


def test_the_namespaces_users_import_exist():
    from raylight.shared.config import MisconfigurationException as ours
    from raylight.utilities.exceptions import MisconfigurationException
    from raylight.utilities.types import EVAL_DATALOADERS, STEP_OUTPUT, TRAIN_DATALOADERS

    assert MisconfigurationException is ours
    assert STEP_OUTPUT is not None and EVAL_DATALOADERS is not None and TRAIN_DATALOADERS


@pytest.mark.slow
def test_each_worker_runs_rank_zero_only_code_as_its_rank(ray_session, tmp_path):
    """raylight's and Lightning's rank_zero_only, used from a callback on two workers: only
    rank 0 runs them, and neither raises for want of a rank."""
    from models import Classifier, loader
    from pytorch_lightning.utilities import rank_zero_only as lightning_rank_zero_only

    import raylight as pl

    folder = str(tmp_path / "marks")
    os.mkdir(folder)

    class Marks(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            rank = trainer.global_rank

            @rank_zero_only
            def ours():
                open(os.path.join(folder, f"raylight-{rank}"), "w").close()

            @lightning_rank_zero_only
            def theirs():
                open(os.path.join(folder, f"lightning-{rank}"), "w").close()

            ours()
            theirs()
            open(os.path.join(folder, f"seen-{rank}"), "w").close()

    trainer = pl.Trainer(
        num_workers=2,
        max_epochs=1,
        limit_train_batches=2,
        default_root_dir=tmp_path / "run",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Marks()],
    )
    trainer.fit(Classifier(), loader())
    assert sorted(os.listdir(folder)) == ["lightning-0", "raylight-0", "seen-0", "seen-1"]


def test_import_flags_agree_with_lightnings():
    from pytorch_lightning.utilities import imports as theirs

    from raylight.utilities import imports as ours

    names = [n for n in vars(ours) if n.startswith("_") and n[1:].isupper()]
    assert "_TORCHVISION_AVAILABLE" in names and len(names) >= 10
    for name in names:
        assert bool(getattr(ours, name)) == bool(getattr(theirs, name)), name


def test_cli_lightning_logo_prints(capsys):
    pl.cli_lightning_logo()
    assert "raylight" in capsys.readouterr().out


def test_model_helpers_answer_as_lightnings():
    from pytorch_lightning.utilities import model_helpers as theirs

    from raylight.utilities import model_helpers as ours

    class Ours(pl.LightningModule):
        def training_step(self, batch, batch_idx):
            return batch

    class Theirs(_lightning_module()):
        def training_step(self, batch, batch_idx):
            return batch

    for name in ("training_step", "validation_step", "no_such_hook"):
        assert ours.is_overridden(name, Ours()) == theirs.is_overridden(name, Theirs()), name
    assert ours.is_overridden("training_step", None) is False
    with pytest.raises(ValueError, match="Expected a parent"):
        ours.is_overridden("forward", object())
    model = ours.get_torchvision_model("resnet18", weights=None, num_classes=3)
    assert model.fc.out_features == 3


def _lightning_module():
    import pytorch_lightning

    return pytorch_lightning.LightningModule
