"""Clean early stops: a signal to the driver or to a worker ends the fit at a batch all
ranks agree on, with a checkpoint there, and the run resumes from it exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import ray
import torch
from models import Classifier, loader

import raylight as pl

pytestmark = pytest.mark.slow

JOB = """
import os, sys, time, torch
import raylight as pl
from models import Classifier, loader

class Slow(Classifier):
    workdir = sys.argv[1]  # read on the driver: a worker's argv is its own

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == 5 and self.global_rank == 0:
            open(os.path.join(self.workdir, "step5"), "a").close()
        time.sleep(0.2)  # the stop lands within about half a second: before the end
        return super().training_step(batch, batch_idx)

pl.seed_everything(0)
model = Slow()
trainer = pl.Trainer(num_workers=2, max_epochs=6, default_root_dir=sys.argv[1], logger=False,
                     enable_progress_bar=False, enable_model_summary=False)
trainer.fit(model, loader(), ckpt_path=sys.argv[2] if len(sys.argv) > 2 else None)
torch.save(model.state_dict(), os.path.join(sys.argv[1], "final.pt"))
print("steps", trainer.global_step)
"""


def _env(ray_session) -> dict[str, str]:
    return {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "PYTHONPATH": os.pathsep.join(
            [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]
        ),
    }


def _reference() -> dict[str, torch.Tensor]:
    pl.seed_everything(0)
    model = Classifier()
    trainer = pl.Trainer(
        num_workers=2, max_epochs=6, logger=False, enable_progress_bar=False, default_root_dir="ref"
    )
    trainer.fit(model, loader())
    return model.state_dict()


def test_sigterm_on_the_driver_saves_and_the_run_resumes_from_last(ray_session, tmp_path):
    env = _env(ray_session)
    job = subprocess.Popen(
        [sys.executable, "-c", JOB, str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "step5").exists():
        assert job.poll() is None and time.monotonic() < deadline, job.stderr.read()[-3000:]
        time.sleep(0.2)  # the stop lands within about half a second: before the end
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 1, stderr[-3000:]
    assert "SIGTERM: saved" in stderr and 'ckpt_path="last"' in stderr
    (saved,) = os.listdir(tmp_path / "recovery")
    step = int(saved.split("step=")[1].removesuffix(".ckpt"))
    assert saved.startswith("stopped-epoch=") and 5 < step < 24  # within a second or so
    assert not (tmp_path / "final.pt").exists()

    resumed = subprocess.run(
        [sys.executable, "-c", JOB, str(tmp_path), "last"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "steps 24" in resumed.stdout
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    for name, value in _reference().items():
        assert torch.equal(final[name], value), name


class StopsOnItsNode(Classifier):
    """Rank 1 gets SIGTERM (as when its node is preempted) at step 5, once."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and self.trainer.global_step == 5:
            if not os.path.exists(self.marker):
                open(self.marker, "w").close()
                os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # ranks agree about twice a second: long enough to get there
        return super().training_step(batch, batch_idx)


def test_sigterm_on_a_worker_saves_and_the_run_goes_on_exactly(ray_session, tmp_path):
    reference = _reference()
    pl.seed_everything(0)
    model = StopsOnItsNode(str(tmp_path / "marker"))
    trainer = pl.Trainer(num_workers=2, max_epochs=6, logger=False, enable_progress_bar=False)
    with pytest.warns(UserWarning, match="SIGTERM on its node"):
        trainer.fit(model, loader())
    assert trainer.global_step == 24
    assert len(os.listdir(tmp_path / "recovery")) == 1
    for name, value in reference.items():
        assert torch.equal(model.state_dict()[name], value), name
