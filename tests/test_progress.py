"""Progress on the driver: a live bar on a terminal, plain lines elsewhere, nothing when off."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios

import pytest
import ray

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

JOB = """
import sys, time
import raylight as pl
import raylight.driver.display
from models import Classifier, loader

raylight.driver.display.PLAIN_LINE_EVERY_S = 0.5  # so that a short test sees the periodic line

class Slow(Classifier):
    def training_step(self, batch, batch_idx):
        time.sleep(0.1)
        print(f"a print from training_step {batch_idx}")
        return super().training_step(batch, batch_idx)

trainer = pl.Trainer(num_workers=2, max_epochs=2, logger=False, enable_checkpointing=False,
                     enable_model_summary=False, enable_progress_bar=sys.argv[1] == "on")
trainer.fit(Slow(), loader(batch_size=4))  # 16 batches per rank and epoch
print("steps", trainer.global_step)
"""


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "PYTHONPATH": os.pathsep.join(
            [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]
        ),
    }


def _run_on_a_terminal() -> tuple[str, str]:
    """The job with its stderr on a 120-column pseudo-terminal; (stdout, terminal output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    job = subprocess.Popen(
        [sys.executable, "-c", JOB, "on"], env=_env(), stdout=subprocess.PIPE, stderr=slave
    )
    os.close(slave)
    terminal = b""
    while True:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the job closed the terminal
                break
            terminal += chunk
        elif job.poll() is not None:
            break
    os.close(master)
    stdout = job.stdout.read().decode()
    job.wait(timeout=60)
    assert job.returncode == 0, terminal.decode(errors="replace")[-3000:]
    return stdout, terminal.decode(errors="replace")


def test_a_live_bar_on_a_terminal(ray_session):
    stdout, terminal = _run_on_a_terminal()
    assert "steps 32" in stdout
    frames = [f for f in terminal.split("\r") if f.startswith("Epoch 0:") and "%|" in f]
    # Each epoch takes about 1.6 s; the bar moves several times a second.
    assert len(frames) >= 4, terminal[-2000:]
    assert "16/16" in frames[-1] and "train_loss=" in frames[-1]
    assert any("samples/s" in f and "it/s" in f for f in frames)  # throughput and rate (ETA)
    # Worker prints come through with the rank that printed them.
    assert "rank=0" in stdout + terminal and "a print from training_step" in stdout + terminal


def test_plain_lines_without_a_terminal_and_nothing_when_off(ray_session):
    plain = subprocess.run(
        [sys.executable, "-c", JOB, "on"], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "%|" not in plain.stderr  # no bar drawn into a log
    assert "Epoch 0: step 16 train_loss=" in plain.stderr
    assert "Epoch 1: step 32 train_loss=" in plain.stderr
    assert "Epoch 0: batch " in plain.stderr and "samples/s" in plain.stderr  # periodic lines
    off = subprocess.run(
        [sys.executable, "-c", JOB, "off"], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert off.returncode == 0, off.stderr[-3000:]
    assert "steps 32" in off.stdout and "Epoch" not in off.stderr
