"""Checkpoints land on the driver's disk even when the workers' nodes cannot see it.

A real second Ray node runs in a private mount namespace where the run's directory is
an empty tmpfs: its workers see a filesystem other than the driver's, as on a separate
machine without shared storage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from cluster import LocalCluster, can_hide_paths

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SCRIPT = """
import json, os, sys, warnings
import ray
import torch
import raylight as pl
from models import Classifier, loader

root = sys.argv[1]
report = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    # Both workers fit on the far node (PACK): rank 0 writes through the driver's node.
    first = pl.Trainer(num_workers=2, max_epochs=1, default_root_dir=root, logger=False,
                       enable_progress_bar=False)
    first.fit(Classifier(), loader())
report["warned"] = [str(w.message) for w in caught if "cannot see" in str(w.message)]
report["best"] = first.checkpoint_callback.best_model_path
report["best_on_driver_disk"] = os.path.isfile(report["best"])
report["nodes"] = sorted({i["node_id"] for i in first._group.infos})
first.shutdown()

# A new trainer resumes from "last" (found through the index on the driver's disk); its
# far-node ranks read the checkpoint through the driver's node.
second = pl.Trainer(num_workers=2, max_epochs=2, default_root_dir=root, logger=False,
                    enable_progress_bar=False)
resumed = Classifier()
second.fit(resumed, loader(), ckpt_path="last")
report["steps"] = second.global_step
report["last"] = second.checkpoint_callback.last_model_path or second.checkpoint_callback.best_model_path
report["driver_node"] = ray.get_runtime_context().get_node_id()
second.shutdown()
print("REPORT " + json.dumps(report))
"""


@pytest.fixture
def far_cluster(tmp_path):
    if not can_hide_paths():
        pytest.skip("needs root and unshare(1) to give a node its own filesystem view")
    root = tmp_path / "run"
    root.mkdir()
    cluster = LocalCluster()
    try:
        cluster.start_head(num_cpus=0)  # the driver's node runs no workers
        cluster.add_node(num_cpus=2, hide=(str(root),))
        yield cluster, root
    finally:
        cluster.shutdown()


def test_checkpoints_travel_through_the_driver_when_nodes_share_no_storage(far_cluster):
    cluster, root = far_cluster
    env = cluster.env()
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(root)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("REPORT ")]
    report = json.loads(line[len("REPORT ") :])
    assert report["driver_node"] not in report["nodes"]  # every worker on the far node
    assert report["warned"] and "ranks [0, 1]" in report["warned"][0]
    # The files are on the driver's disk, which the far node cannot see.
    assert report["best_on_driver_disk"] and report["best"].startswith(str(root))
    assert os.path.isfile(report["last"]) and report["last"] != report["best"]
    assert os.path.isfile(root / ".raylight-checkpoints.json")
    assert report["steps"] == 8  # 4 steps restored from epoch 0, 4 more in epoch 1
    assert not [n for n in os.listdir(root) if n.startswith(".raylight-probe")]
