"""Where the Trainer runs: the cluster RAY_ADDRESS names, else the one `ray start` recorded on
this node, else its own embedded Ray; never another script's."""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest
import ray

from raylight.driver import connect

SCRIPT = """
import ray
import raylight as pl
from models import Classifier, loader

trainer = pl.Trainer(num_workers=1, max_epochs=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False)
trainer.fit(Classifier(), loader())
print("cluster", ray.get_runtime_context().gcs_address, "steps", trainer.global_step)
"""


@pytest.mark.slow
@pytest.mark.e2e
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


# A driver that holds its fit at the end of epoch 0 until the test says go on, and notes in a
# file when it got there (its Ray is up and its workers are training).
HELD_DRIVER = """
import os, sys, time
import ray
import raylight as pl
from models import Classifier, loader

class HoldAtEpochEnd(pl.Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch != 0:
            return
        open(os.path.join(self.folder, "held"), "w").close()
        deadline = time.monotonic() + 240
        while not os.path.exists(os.path.join(self.folder, "go")):
            assert time.monotonic() < deadline, "the test never said go"
            time.sleep(0.1)

trainer = pl.Trainer(num_workers=1, max_epochs=2, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, callbacks=[HoldAtEpochEnd(sys.argv[1])])
trainer.fit(Classifier(), loader())
print("cluster", ray.get_runtime_context().gcs_address, "steps", trainer.global_step, flush=True)
"""


def test_the_token_file_is_readable_by_its_owner_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    token = tmp_path / ".ray" / "auth_token"
    warned: set[str] = set()
    connect.private_token(create=False, warned=warned)  # joining: no token is made up
    assert not token.exists()
    connect.private_token(create=True, warned=warned)  # a new embedded Ray: Ray's format, 0600
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64
    written = token.read_text()
    connect.private_token(create=True, warned=warned)  # there is one: kept as it is
    assert token.read_text() == written
    token.chmod(0o644)
    with pytest.warns(UserWarning, match=r"readable by other users \(-rw-r--r--\)"):
        connect.private_token(create=False, warned=warned)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and token.read_text() == written
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the user turned token authentication off
    token.unlink()
    connect.private_token(create=True, warned=warned)
    assert not token.exists()


def test_a_record_of_a_cluster_that_is_gone_is_passed_over(tmp_path, monkeypatch):
    record = tmp_path / "ray" / "ray_current_cluster"
    record.parent.mkdir()
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert connect.recorded_cluster() is None  # no record: a new embedded Ray
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        alive = f"127.0.0.1:{listening.getsockname()[1]}"
        record.write_text(alive)
        assert connect.recorded_cluster() == alive  # `ray start`'s cluster answers: joined
    record.write_text(alive)  # the same address, nothing listening any more
    assert connect.recorded_cluster(timeout_s=1) is None


def _driver_env(ray_tmpdir: str, home) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    }
    return {
        **env,
        "RAY_TMPDIR": ray_tmpdir,  # where Ray's `ray start` record would be
        "HOME": str(home),
        "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")]),
    }


def _held(folder, process: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not (folder / "held").exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the driver never reached its epoch end"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.e2e
def test_two_scripts_on_one_machine_each_start_their_own_ray_and_both_finish(ray_session, tmp_path):
    """Without RAY_ADDRESS, neither joins the other's embedded Ray nor this test's (a third,
    unrelated one), although all three share the user's Ray token, so the second finishes
    although the first ends first."""
    ray_tmpdir = tempfile.mkdtemp(prefix="rl-", dir="/tmp")  # short: Ray's socket paths
    token = os.path.join(os.path.expanduser("~"), ".ray", "auth_token")  # this test's Ray's
    folders, homes, drivers = [], [], []
    for name in ("first", "second"):
        folder = tmp_path / name
        folder.mkdir()
        folders.append(folder)
    # The second runs with a copy of the user's token that others may read, as
    # `ray get-auth-token --generate` leaves it.
    homes = [os.path.expanduser("~"), tmp_path / "home"]
    (homes[1] / ".ray").mkdir(parents=True)
    shutil.copy(token, homes[1] / ".ray" / "auth_token")
    os.chmod(homes[1] / ".ray" / "auth_token", 0o644)
    try:
        for folder, home in zip(folders, homes, strict=True):
            drivers.append(
                subprocess.Popen(
                    [sys.executable, "-c", HELD_DRIVER, str(folder)],
                    env=_driver_env(ray_tmpdir, home),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
            _held(folder, drivers[-1])  # both are mid-fit before either ends
        (folders[0] / "go").touch()
        first_out, first_err = drivers[0].communicate(timeout=180)
        assert drivers[0].returncode == 0, first_err[-3000:]
        (folders[1] / "go").touch()  # the second trains on after the first's Ray is gone
        second_out, second_err = drivers[1].communicate(timeout=180)
        assert drivers[1].returncode == 0, second_err[-3000:]
    finally:
        for driver in drivers:
            if driver.poll() is None:
                driver.kill()
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
    first = re.search(r"cluster (\S+) steps 16", first_out)
    second = re.search(r"cluster (\S+) steps 16", second_out)
    assert first and second, (first_out, second_out)
    clusters = {first.group(1), second.group(1), ray.get_runtime_context().gcs_address}
    assert len(clusters) == 3  # each its own Ray: not the other's, not this test's
    # The token that others could read was made readable by its owner only, and said so.
    copied = homes[1] / ".ray" / "auth_token"
    assert stat.S_IMODE(copied.stat().st_mode) == 0o600
    assert copied.read_text() == open(token).read()  # tightened, not replaced
    assert "readable by other users (-rw-r--r--); raylight made it readable" in second_err


@pytest.mark.slow
@pytest.mark.e2e
def test_a_script_on_a_node_joins_the_cluster_ray_start_recorded(tmp_path):
    """What `ray submit` relies on: no RAY_ADDRESS, but `ray start` ran on this node."""
    from cluster import LocalCluster

    base = tempfile.mkdtemp(prefix="rl-", dir="/tmp")
    cluster = LocalCluster()
    cluster.temp_dir = os.path.join(base, "ray")  # Ray's default layout under RAY_TMPDIR
    os.makedirs(cluster.temp_dir)
    try:
        cluster.start_head(num_cpus=2)
        (tmp_path / "go").touch()  # no hold: run straight through
        env = {**_driver_env(base, os.path.expanduser("~")), "RAY_AUTH_MODE": "token"}
        result = subprocess.run(
            [sys.executable, "-c", HELD_DRIVER, str(tmp_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        cluster.shutdown()
        shutil.rmtree(base, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"cluster {cluster.address} steps 16" in result.stdout
