"""Where the Trainer runs: it joins the cluster RAY_ADDRESS names instead of starting one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import ray

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SCRIPT = """
import ray
import raylight as pl
from models import Classifier, loader

trainer = pl.Trainer(num_workers=1, max_epochs=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False)
trainer.fit(Classifier(), loader())
print("cluster", ray.get_runtime_context().gcs_address, "steps", trainer.global_step)
"""


def test_trainer_joins_the_cluster_in_ray_address(ray_session):
    address = ray.get_runtime_context().gcs_address
    env = {
        **os.environ,
        "RAY_ADDRESS": address,
        "PYTHONPATH": os.pathsep.join(
            [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]
        ),
    }
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"cluster {address} steps 8" in result.stdout
