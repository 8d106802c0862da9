"""Storage locations: local paths and URIs through pyarrow.fs, against a real S3 server."""

from __future__ import annotations

import socket
import time

import pytest
from models import Classifier, ScriptedScore, loader

import raylight as pl
from raylight import checkpoint, storage
from raylight.callbacks import ModelCheckpoint


def test_join_keeps_uri_query_and_redacts_credentials(tmp_path):
    uri = "s3://key:secret@bucket/run?endpoint_override=h:1&scheme=http"
    assert storage.join(uri, "checkpoints", "a.ckpt") == (
        "s3://key:secret@bucket/run/checkpoints/a.ckpt?endpoint_override=h:1&scheme=http"
    )
    assert storage.redact(uri) == "s3://***@bucket/run?endpoint_override=h:1&scheme=http"
    assert storage.join(str(tmp_path), "a") == str(tmp_path / "a")
    assert not storage.is_uri(str(tmp_path)) and storage.is_uri(uri)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_write_read_list_delete(where, tmp_path, request):
    root = (
        str(tmp_path)
        if where == "local"
        else storage.join(request.getfixturevalue("s3_server"), "unit")
    )
    target = storage.join(root, "dir", "blob.bin")
    assert not storage.exists(target)
    storage.write_bytes(target, b"payload")
    assert storage.read_bytes(target) == b"payload"
    assert storage.list_names(storage.join(root, "dir")) == ["blob.bin"]
    assert "dir" in storage.list_names(root, directories=True)
    storage.delete(target)
    assert not storage.exists(target)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(target)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_copy_tree_copies_a_folder_and_its_subfolders(where, tmp_path, request):
    source = tmp_path / "source"
    (source / "sub").mkdir(parents=True)
    (source / "a.bin").write_bytes(b"a")
    (source / "sub" / "b.bin").write_bytes(b"b")
    middle = (
        str(tmp_path / "middle")
        if where == "local"
        else storage.join(request.getfixturevalue("s3_server"), "tree")
    )
    storage.copy_tree(str(source), middle)
    assert storage.read_bytes(storage.join(middle, "sub", "b.bin")) == b"b"
    back = tmp_path / "back"
    storage.copy_tree(middle, str(back))  # and out again
    assert (back / "a.bin").read_bytes() == b"a"
    assert (back / "sub" / "b.bin").read_bytes() == b"b"


@pytest.mark.slow
def test_checkpoints_top_k_and_resume_on_s3(ray_session, s3_server):
    directory = storage.join(s3_server, "run", "checkpoints")
    callback = ModelCheckpoint(
        dirpath=directory, filename="{epoch}-{score:.1f}", monitor="score", save_top_k=2
    )
    trainer = pl.Trainer(
        num_workers=2, max_epochs=4, callbacks=[callback], logger=False, enable_progress_bar=False
    )
    trainer.fit(ScriptedScore(), loader(), loader())
    # Epochs 0 and 2 were saved, then deleted from the bucket when they fell out of the top 2.
    assert storage.list_names(directory) == ["epoch=1-score=1.0.ckpt", "epoch=3-score=0.0.ckpt"]
    assert callback.best_model_path == storage.join(directory, "epoch=3-score=0.0.ckpt")
    assert checkpoint.load(callback.best_model_path)["global_step"] == 16

    resumed = pl.Trainer(
        num_workers=2,
        max_epochs=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    resumed.fit(Classifier(), loader(), ckpt_path=callback.best_model_path)
    assert resumed.global_step == 20


def test_unreachable_storage_fails_fast_without_leaking_credentials():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"s3://key:secret@bucket/run?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    trainer = pl.Trainer(default_root_dir=uri, logger=False, enable_progress_bar=False)
    started = time.monotonic()
    with pytest.raises(OSError, match="is unreachable") as info:
        trainer.fit(Classifier(), loader())
    assert time.monotonic() - started < 60
    assert "secret" not in str(info.value)
    assert trainer._group is None  # checked on the driver before any worker started


def test_async_writer_retries_commits_in_order_and_reports_failures(tmp_path, monkeypatch):
    writer = checkpoint.AsyncWriter(attempts=3, backoff_s=0.01)
    real_write = storage.write_bytes
    failures = {"flaky.bin": 2, "broken.bin": 99}
    committed = []

    def flaky_write(location, data):
        name = location.rsplit("/", 1)[-1]
        if failures.get(name, 0) > 0:
            failures[name] -= 1
            raise OSError("connection reset")
        real_write(location, data)

    monkeypatch.setattr(storage, "write_bytes", flaky_write)
    writer.submit(str(tmp_path / "flaky.bin"), b"a", lambda: committed.append("flaky"))
    writer.submit(str(tmp_path / "ok.bin"), b"b", lambda: committed.append("ok"))
    writer.wait()
    assert committed == ["flaky", "ok"]  # retried twice, then committed, in order
    assert (tmp_path / "flaky.bin").read_bytes() == b"a"

    writer.submit(str(tmp_path / "broken.bin"), b"c", lambda: committed.append("broken"))
    with pytest.raises(OSError, match=r"broken\.bin failed after 3 attempts"):
        writer.wait()
    assert "broken" not in committed and not (tmp_path / "broken.bin").exists()


_KILLED_WRITER = """
import os, signal, sys
from raylight import storage
os.replace = lambda *args: os.kill(os.getpid(), signal.SIGKILL)  # die before publishing
storage.write_bytes(sys.argv[1], b"new checkpoint, never published")
"""


def test_a_writer_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    import subprocess
    import sys

    import torch

    path = tmp_path / "last.ckpt"
    checkpoint.save({"global_step": 7, "state_dict": {"w": torch.ones(2)}}, str(path))
    result = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(path)], timeout=60)
    assert result.returncode == -9  # the writer really died mid-write
    assert checkpoint.load(str(path))["global_step"] == 7  # the old file is whole and loads
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["last.ckpt"]  # no partial one
