"""Fault recovery and elasticity across real Ray nodes on this machine.

Each test starts its own cluster (a head that runs no workers plus worker nodes, see
``cluster.py``) and runs ``elastic_job.py`` as the driver. The test kills and adds whole
nodes (their raylets and workers) when the job asks for it through marker files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from cluster import LocalCluster

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

JOB = os.path.join(os.path.dirname(__file__), "elastic_job.py")


def _start_job(cluster: LocalCluster, scenario: str, workdir) -> subprocess.Popen:
    env = cluster.env()
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, JOB, scenario, str(workdir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path, job: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if job.poll() is not None:
            raise AssertionError(f"the job ended early:\n{job.stderr.read()[-4000:]}")
        assert time.monotonic() < deadline, f"no {os.path.basename(path)} after {timeout_s} s"
        time.sleep(0.2)


def _report(job: subprocess.Popen) -> dict:
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-4000:]
    (line,) = [x for x in stdout.splitlines() if x.startswith("REPORT ")]
    return json.loads(line[len("REPORT ") :])


def _each_sample_once_per_epoch(report: dict, epochs: int, samples: int = 64) -> None:
    assert sorted(int(e) for e in report["seen"]) == list(range(epochs))
    for epoch, ids in report["seen"].items():
        assert sorted(ids) == list(range(samples)), f"epoch {epoch}"


@pytest.fixture
def cluster():
    cluster = LocalCluster()
    try:
        cluster.start_head(num_cpus=0)  # the driver's node: no workers, never killed
        yield cluster
    finally:
        cluster.shutdown()


def test_a_lost_node_is_replaced_and_the_result_is_exact(cluster, tmp_path):
    nodes = {name: cluster.add_node(num_cpus=2, env={"RAYLIGHT_TEST_NODE": name}) for name in "bc"}
    job = _start_job(cluster, "node_loss", tmp_path)
    _wait_for(tmp_path / "kill-node", job)
    cluster.kill_node(nodes[(tmp_path / "kill-node").read_text()])
    report = _report(job)
    assert report["steps"] == 24  # 3 epochs x 8 steps, as if nothing happened
    assert report["exact"]  # the same weights as the uninterrupted reference run
    assert len(report["restarts"]) == 1 and "died" in report["restarts"][0]
    _each_sample_once_per_epoch(report, epochs=3)
    assert report["world_sizes"] == {"0": [2], "1": [2], "2": [2]}


def _shrink_and_grow(cluster: LocalCluster, scenario: str, workdir) -> dict:
    """One worker node each for b and c; c dies when the job asks, and comes back once the
    job has shrunk."""
    cluster.add_node(num_cpus=1, env={"RAYLIGHT_TEST_NODE": "b"})
    node_c = cluster.add_node(num_cpus=1, env={"RAYLIGHT_TEST_NODE": "c"})
    job = _start_job(cluster, scenario, workdir)
    _wait_for(workdir / "kill-node", job)
    cluster.kill_node(node_c)
    _wait_for(workdir / "shrunk", job)
    cluster.add_node(num_cpus=1, env={"RAYLIGHT_TEST_NODE": "c"})
    (workdir / "node-back").touch()
    return _report(job)


def test_elastic_run_shrinks_on_node_loss_and_grows_back(cluster, tmp_path):
    report = _shrink_and_grow(cluster, "shrink_and_grow", tmp_path)
    # Epoch 0: 4 steps on 2 workers, then (restored from the step-4 recovery checkpoint)
    # its other 32 samples on 1 worker: 8 steps. Epochs 1-3 on 2 workers again: 8 steps each.
    assert report["world_sizes"] == {"0": [2, 1], "1": [2], "2": [2], "3": [2]}, report["messages"]
    assert report["steps"] == 12 + 3 * 8
    _each_sample_once_per_epoch(report, epochs=4)
    # One MLflow run through the restart and the resize; no step went backwards and none was
    # sent twice, though the restored run logged the steps after its checkpoint again: one row
    # per step from the step-4 checkpoint on (32 steps). The rows of the lost group's
    # unfinished epoch before that checkpoint never reached the driver: they travel with the
    # epoch's results.
    steps = report["mlflow_steps"]
    assert report["mlflow_runs"] == 1
    assert steps == sorted(set(steps)) and len(steps) == report["steps"] - 4, steps
    assert any("restarting the group bigger" in m for m in report["messages"])


def test_fsdp_run_reshards_through_a_shrink_and_a_grow(cluster, tmp_path):
    report = _shrink_and_grow(cluster, "shrink_and_grow_fsdp", tmp_path)
    # The same course as the DDP run above: 12 steps in epoch 0, then 8 a epoch on 2 again.
    assert report["world_sizes"] == {"0": [2, 1], "1": [2], "2": [2]}, report["messages"]
    assert report["steps"] == 12 + 2 * 8
    _each_sample_once_per_epoch(report, epochs=3)
    assert any("restarting the group bigger" in m for m in report["messages"])
    # Both the recovery checkpoints (2 ranks -> 1) and the resize one (1 -> 2) are sharded.
    assert report["sharded"] and all(report["sharded"].values()), report["sharded"]
    assert any(name.startswith("resize-") for name in report["sharded"]), report["sharded"]
    assert report["last_step"] == report["steps"]
    assert report["adam_steps"] == [report["steps"]]
    assert report["trained"] and report["driver_is_last"]
