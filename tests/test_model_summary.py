"""ModelSummary: Lightning's table, printed by the driver when fit starts."""

from __future__ import annotations

import pytest
import torch
from models import Classifier, loader
from pytorch_lightning import LightningModule as LightningReference
from pytorch_lightning.utilities.model_summary import ModelSummary as LightningSummary

import raylight as pl
from raylight.callbacks import ModelSummary
from raylight.callbacks.model_summary import summary_table

# tests/models.py's Classifier: Sequential(Linear(8, 16), ReLU, Linear(16, 3)), 144 + 51 params.
CLASSIFIER_TABLE = "\n".join(
    [
        "  | Name  | Type       | Params | Mode  | FLOPs",
        "-----------------------------------------------------",
        "0 | layer | Sequential | 195    | train | 0    ",  # cells are padded to the column width
        "-----------------------------------------------------",
        "195       Trainable params",
        "0         Non-trainable params",
        "195       Total params",
        "0.001     Total estimated model params size (MB)",
        "4         Modules in train mode",
        "0         Modules in eval mode",
        "0         Total Flops",
    ]
)


def _mixed(base: type) -> torch.nn.Module:
    """A module with nesting, a frozen layer, an eval-mode layer and a bare parameter."""

    class Mixed(base):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
            self.head = torch.nn.Linear(16, 3)
            self.norm = torch.nn.BatchNorm1d(3).eval()
            self.frozen = torch.nn.Linear(300, 400).requires_grad_(False)
            self.scale = torch.nn.Parameter(torch.ones(5))
            self.example_input_array = torch.zeros(4, 8)

        def forward(self, x):
            return self.norm(self.head(self.encoder(x)))

    return Mixed()


@pytest.mark.parametrize("max_depth", [1, 2, -1, 0])
def test_table_is_lightnings(max_depth):
    """Character for character what pytorch-lightning prints, sizes and FLOPs included."""
    ours = summary_table(_mixed(pl.LightningModule), max_depth)
    assert ours == str(LightningSummary(_mixed(LightningReference), max_depth=max_depth))


def test_table_rows_and_counts_of_the_classifier():
    assert summary_table(Classifier()) == CLASSIFIER_TABLE
    nested = summary_table(Classifier(), max_depth=-1).splitlines()
    assert [line.split("|")[1].strip() for line in nested[2:6]] == [
        "layer",
        "layer.0",
        "layer.1",
        "layer.2",
    ]
    assert [line.split("|")[3].strip() for line in nested[2:6]] == ["195", "144", "0", "51"]


def test_trainer_adds_one_default_summary():
    summaries = [cb for cb in pl.Trainer().callbacks if isinstance(cb, ModelSummary)]
    assert len(summaries) == 1 and summaries[0]._max_depth == 1
    assert not any(
        isinstance(cb, ModelSummary) for cb in pl.Trainer(enable_model_summary=False).callbacks
    )
    mine = ModelSummary(max_depth=-1)
    assert [
        cb for cb in pl.Trainer(callbacks=[mine]).callbacks if isinstance(cb, ModelSummary)
    ] == [mine]
    with pytest.raises(ValueError, match="`max_depth` can be -1, 0 or > 0"):
        ModelSummary(max_depth=-2)


def _fit(**kwargs):
    trainer = pl.Trainer(
        num_workers=2,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        **kwargs,
    )
    trainer.fit(Classifier(), loader())
    return trainer


@pytest.mark.slow
def test_driver_prints_the_table_at_fit_start(ray_session, capsys):
    _fit()
    printed = capsys.readouterr().err
    assert CLASSIFIER_TABLE in printed
    assert printed.count("Total params") == 1  # once, by the driver; the workers print none
    _fit(callbacks=[ModelSummary(max_depth=2)])
    assert "1 | layer.0 | Linear     | 144" in capsys.readouterr().err
    _fit(enable_model_summary=False)
    assert "Total params" not in capsys.readouterr().err
