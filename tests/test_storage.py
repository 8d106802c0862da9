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
