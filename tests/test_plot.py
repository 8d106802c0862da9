"""``python -m raylight.plot``: a run's train and val curves from its metrics.csv to a PNG."""

from __future__ import annotations

import subprocess
import sys

import pytest
from models import Classifier, loader

import raylight as pl
from raylight import plot
from raylight.loggers import CSVLogger

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(ray_session, tmp_path_factory):
    """A real two-rank fit's CSVLogger output: root/lightning_logs/version_0/metrics.csv."""
    root = tmp_path_factory.mktemp("plot-run")
    trainer = pl.Trainer(
        num_workers=2,
        max_epochs=2,
        log_every_n_steps=1,
        default_root_dir=root,
        logger=CSVLogger(root),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Classifier(), loader(), loader())
    return root


@pytest.mark.slow
@pytest.mark.e2e
def test_command_draws_the_curves_to_a_png(run_dir, tmp_path):
    output = tmp_path / "curves.png"
    done = subprocess.run(
        [sys.executable, "-m", "raylight.plot", str(run_dir), "-o", str(output)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(output)
    data = output.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


@pytest.mark.slow
def test_curves_and_default_output_next_to_the_csv(run_dir, capsys):
    version_0 = run_dir / "lightning_logs" / "version_0"
    assert plot.find_run(str(run_dir)) == str(version_0)  # through lightning_logs
    assert plot.find_run(str(run_dir / "lightning_logs")) == str(version_0)
    panels = plot.read_curves(str(version_0 / "metrics.csv"))
    assert {panel: sorted(series) for panel, series in panels.items()} == {
        "loss": ["train_loss", "val_loss"]
    }
    assert [step for step, _ in panels["loss"]["train_loss"]] == list(range(8))
    assert [step for step, _ in panels["loss"]["val_loss"]] == [3, 7]
    assert plot.main([str(version_0)]) == 0
    assert capsys.readouterr().out.strip() == str(version_0 / "metrics.png")
    assert (version_0 / "metrics.png").read_bytes().startswith(PNG_SIGNATURE)


def test_newest_version_is_chosen(tmp_path):
    for version in (1, 10, 2):  # numerically newest, not by name
        folder = tmp_path / f"version_{version}"
        folder.mkdir()
        (folder / "metrics.csv").write_text(f"train_loss,step\n{version},0\n")
    assert plot.find_run(str(tmp_path)) == str(tmp_path / "version_10")


def test_clear_error_without_metrics_csv(tmp_path, capsys):
    (tmp_path / "lightning_logs" / "version_0").mkdir(parents=True)  # a TensorBoard-only run
    assert plot.main([str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert "No metrics.csv in" in error and "CSVLogger" in error
    no_curves = tmp_path / "other"
    no_curves.mkdir()
    (no_curves / "metrics.csv").write_text("test_acc,step\n0.5,0\n")
    assert plot.main([str(no_curves)]) == 1
    assert "no train or val columns" in capsys.readouterr().err
