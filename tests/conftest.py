"""Shared fixtures: one Ray instance per test session, and hygiene checks after each test."""

from __future__ import annotations

import gc
import os
import time

import pytest
import ray
import torch.distributed as dist

_RANK_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "NODE_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_WORLD_SIZE",
    "MASTER_ADDR",
)
_SEED_VARS = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")  # seed_everything sets them on purpose
NUM_CPUS = 4


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="requires_gpu: no CUDA device on this machine")
    for item in items:
        if "requires_gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance for the whole session (logical CPUs may exceed the physical ones)."""
    started = not ray.is_initialized()
    if started:
        ray.init(
            address="local", num_cpus=NUM_CPUS, include_dashboard=False, logging_level="WARNING"
        )
    yield ray
    if started:
        ray.shutdown()


def _cpus_free() -> bool:
    total = ray.cluster_resources().get("CPU", 0)
    return ray.available_resources().get("CPU", 0) >= total


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """Each test runs in its own directory: a Trainer's default_root_dir (the working
    directory) then holds its logs, checkpoints and index, never the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Keep each phase's report on the test, for ``hygiene`` to read."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture(autouse=True)
def hygiene(request):
    """Each test leaves no process group, rank variables or live workers behind."""
    env_before = {name: os.environ.get(name) for name in _RANK_VARS}
    seeds_before = {name: os.environ.get(name) for name in _SEED_VARS}
    yield
    for name, value in seeds_before.items():  # a seeded test must not seed the next one
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    assert not (dist.is_available() and dist.is_initialized()), (
        "a process group leaked in the driver"
    )
    leaked = {n for n in _RANK_VARS if os.environ.get(n) != env_before[n]}
    assert not leaked, f"the test leaked environment variables {sorted(leaked)}"
    if "ray_session" in request.fixturenames and ray.is_initialized():
        gc.collect()  # a dropped Trainer shuts its workers down
        deadline = time.monotonic() + 20
        while not _cpus_free() and time.monotonic() < deadline:
            time.sleep(0.2)
        free = _cpus_free()
        if not free:  # stop them so one failure does not starve the tests after it
            import raylight

            for obj in gc.get_objects():
                if type(obj) is raylight.Trainer:
                    obj.shutdown()
        # A failed test's Trainer lives on in its traceback: its failure is the one to read.
        call = getattr(request.node, "report_call", None)
        assert free or (call is not None and call.failed), (
            f"workers outlived the test: {ray.available_resources().get('CPU')} of "
            f"{ray.cluster_resources().get('CPU')} CPUs free"
        )


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's) on loopback; yields a URI prefix for a bucket."""
    import socket
    import subprocess
    import sys

    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.2)
        client = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{port}",
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )
        client.create_bucket(Bucket="raylight")
        yield f"s3://test:test@raylight?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def small_disk(tmp_path):
    """A real, small filesystem (a 1 MiB tmpfs) that a test can fill up; needs root."""
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a small real filesystem needs root to mount a tmpfs (CI runs as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(folder, leave: int = 0) -> None:
    """Fill the filesystem of ``folder`` until at most ``leave`` bytes are free."""
    import errno

    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(os.path.join(folder, "filler"), "wb") as file:
        try:
            file.write(b"\0" * max(0, free - leave))
            file.flush()
            os.fsync(file.fileno())
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise


@pytest.fixture
def process_group(monkeypatch):
    """A world-size-1 gloo group in this process, for rank-side tests that run without Ray."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()
