"""TQDMProgressBar and RichProgressBar configure the driver's bar: Lightning's arguments and
errors, refresh_rate in batches (0 turns the bar off), leave, and a live bar in a real fit."""

from __future__ import annotations

import fcntl
import inspect
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios

import pytest
import ray
from models import Classifier, loader
from pytorch_lightning.callbacks import RichProgressBar as LightningRichProgressBar
from pytorch_lightning.callbacks import TQDMProgressBar as LightningTQDMProgressBar

import raylight as pl
from raylight.callbacks import RichProgressBar, RichProgressBarTheme, TQDMProgressBar
from raylight.driver import display
from raylight.driver.display import ProgressDisplay
from raylight.shared.config import MisconfigurationException


def _defaults(cls: type) -> dict[str, object]:
    return {
        name: parameter.default
        for name, parameter in inspect.signature(cls.__init__).parameters.items()
        if name not in ("self", "theme")
    }


def test_arguments_as_lightning():
    assert _defaults(TQDMProgressBar) == _defaults(LightningTQDMProgressBar)
    assert _defaults(RichProgressBar) == _defaults(LightningRichProgressBar)
    theme = RichProgressBarTheme()
    assert (theme.metrics_format, theme.metrics_text_delimiter) == (".3f", " ")
    bar = TQDMProgressBar(refresh_rate=0, process_position=1, leave=True)
    assert bar.is_disabled and bar.process_position == 1 and bar.leave
    assert TQDMProgressBar().is_enabled


def test_trainer_refuses_what_lightning_refuses():
    with pytest.raises(MisconfigurationException, match="only one progress bar is supported"):
        pl.Trainer(callbacks=[TQDMProgressBar(), RichProgressBar()])
    with pytest.raises(
        MisconfigurationException,
        match="`enable_progress_bar=False` but found `RichProgressBar` in callbacks list",
    ):
        pl.Trainer(callbacks=[RichProgressBar()], enable_progress_bar=False)
    assert pl.Trainer(callbacks=[TQDMProgressBar(refresh_rate=0)])._display.enabled is False


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _post(epoch: int, batch: int, total: int = 16) -> dict[str, object]:
    return {
        "epoch": epoch,
        "batch": batch,
        "total": total,
        "step": batch,
        "samples_per_s": 100.0,
        "metrics": {"train_loss": 0.5},
    }


def _summary(epoch: int) -> dict[str, object]:
    return {
        "epoch": epoch,
        "global_step": 16 * (epoch + 1),
        "num_training_batches": 16,
        "progress_bar_metrics": {"train_loss": 0.25},
    }


@pytest.fixture
def terminal(monkeypatch) -> _Terminal:
    monkeypatch.setattr(display, "_terminal_width", lambda stream: 120)
    return _Terminal()


def test_refresh_rate_moves_the_bar_every_n_batches(terminal):
    bars = ProgressDisplay(True, terminal, bar=TQDMProgressBar(refresh_rate=5))
    drawn = []
    for batch in range(1, 17):
        bars.show(_post(0, batch))
        drawn.append(bars._bar.n)
    assert drawn == [0] * 4 + [5] * 5 + [10] * 5 + [15, 16]  # and the epoch's last batch
    first_bar = bars._bar
    bars.end_epoch(_summary(0))
    bars.show(_post(1, 3))
    assert bars._bar is first_bar and bars._bar.n == 0  # leave=False: one bar, reset
    assert "Epoch 1" in bars._bar.desc
    bars.close()
    assert "train_loss=0.5" in terminal.getvalue()


def test_leave_keeps_each_epochs_bar_and_rich_formats_metrics(terminal):
    bars = ProgressDisplay(True, terminal, bar=RichProgressBar(refresh_rate=1, leave=True))
    bars.show(_post(0, 16))
    first_bar = bars._bar
    bars.end_epoch(_summary(0))
    assert bars._bar is None and first_bar.disable  # closed, left on the terminal
    bars.show(_post(1, 2))
    assert bars._bar is not first_bar
    bars.close()
    assert "train_loss: 0.250" in terminal.getvalue()  # the theme's metrics_format


def test_refresh_rate_zero_draws_nothing(terminal):
    bars = ProgressDisplay(True, terminal, bar=TQDMProgressBar(refresh_rate=0))
    bars.show(_post(0, 16))
    bars.end_epoch(_summary(0))
    assert terminal.getvalue() == "" and bars._bar is None


@pytest.mark.slow
def test_plain_lines_follow_the_callback_in_a_fit(ray_session, capsys):
    def fit(bar) -> str:
        trainer = pl.Trainer(
            num_workers=1,
            max_epochs=2,
            callbacks=[bar],
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
        )
        trainer.fit(Classifier(), loader())
        trainer.shutdown()
        return capsys.readouterr().err

    assert "Epoch 1: step 16 train_loss=" in fit(TQDMProgressBar(refresh_rate=3))
    assert "Epoch" not in fit(TQDMProgressBar(refresh_rate=0))


JOB = """
import time
import raylight as pl
from raylight.callbacks import TQDMProgressBar
from models import Classifier, loader

class Slow(Classifier):
    def training_step(self, batch, batch_idx):
        time.sleep(0.1)
        return super().training_step(batch, batch_idx)

trainer = pl.Trainer(num_workers=2, max_epochs=1, logger=False, enable_checkpointing=False,
                     enable_model_summary=False, callbacks=[TQDMProgressBar(refresh_rate=4)])
trainer.fit(Slow(), loader(batch_size=4))  # 16 batches per rank
"""


@pytest.mark.slow
@pytest.mark.e2e
def test_a_live_bar_moves_every_refresh_rate_batches(ray_session):
    env = {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "PYTHONPATH": os.pathsep.join(
            [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]
        ),
    }
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    job = subprocess.Popen(
        [sys.executable, "-c", JOB], env=env, stderr=slave, stdout=subprocess.PIPE
    )
    os.close(slave)
    terminal = b""
    while True:
        if select.select([master], [], [], 0.2)[0]:
            try:
                terminal += os.read(master, 65536)
            except OSError:  # the job closed the terminal
                break
        elif job.poll() is not None:
            break
    os.close(master)
    job.wait(timeout=60)
    text = terminal.decode(errors="replace")
    assert job.returncode == 0, text[-3000:]
    shown = [int(n) for n in re.findall(r"Epoch 0:.*?\| *(\d+)/16", text)]
    assert shown and shown[-1] == 16, text[-2000:]
    assert len(set(shown)) >= 3 and all(n % 4 == 0 for n in shown), shown
