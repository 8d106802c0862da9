"""Storage locations: local paths and URIs through pyarrow.fs, against a real S3 server."""

from __future__ import annotations

import errno
import os
import socket
import time

import pytest
from models import Classifier, ScriptedScore, loader

import raylight as pl
from raylight.callbacks import ModelCheckpoint
from raylight.rank import checkpointing
from raylight.shared import checkpoint, storage

SECRETS = ("SeKrEtKeY123", "AKIDSECRET77", "TOKENabc999", "pa55word")


@pytest.mark.parametrize(
    "text",
    [
        "s3://AKIDSECRET77:SeKrEtKeY123@bucket/run/x.ckpt",
        "s3://bucket/run?access_key=AKIDSECRET77&secret_key=SeKrEtKeY123&scheme=http",
        "s3://bucket/run?session_token=TOKENabc999&endpoint_override=h:1",
        "gs://bucket/run?access_token=TOKENabc999",
        "hdfs://user:pa55word@namenode:8020/run",
        "checkpoint upload to 's3://bucket/a.ckpt?region=x&aws_secret_access_key=SeKrEtKeY123' "
        "failed",
        "two: s3://u:pa55word@b/x and s3://b/y?X-Amz-Signature=SeKrEtKeY123&X-Amz-Credential="
        "AKIDSECRET77",
    ],
)
def test_redact_removes_user_info_and_every_credential_parameter(text):
    redacted = storage.redact(text)
    assert not [secret for secret in SECRETS if secret in redacted], redacted
    assert "***" in redacted


def test_redact_keeps_what_is_not_a_secret():
    uri = "s3://bucket/run/epoch=3-step=40.ckpt?endpoint_override=minio:9000&scheme=http&region=eu"
    assert storage.redact(uri) == uri
    assert storage.redact("/mnt/nfs/run/last.ckpt") == "/mnt/nfs/run/last.ckpt"


def test_within_is_true_only_inside_the_folder(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (run / "checkpoints" / "escape").symlink_to(tmp_path / "elsewhere")
    folder = str(run / "checkpoints")
    assert storage.within(str(run / "checkpoints" / "a.ckpt"), folder)
    assert not storage.within(folder, folder)
    assert not storage.within(str(run / "checkpoints" / ".." / "a.ckpt"), folder)
    assert not storage.within(str(run / "checkpoints" / "escape" / "a.ckpt"), folder)
    assert not storage.within(str(tmp_path / "run" / "checkpoints2" / "a.ckpt"), folder)
    uri = "s3://b/run/checkpoints?endpoint_override=h:1"
    assert storage.within("s3://b/run/checkpoints/a.ckpt?endpoint_override=h:1", uri)
    assert storage.within("s3://k:s@b/run/checkpoints/a.ckpt", uri)  # credentials aside
    assert not storage.within("s3://b/run/checkpoints/../x.ckpt", uri)
    assert not storage.within("s3://b/run/checkpoints2/a.ckpt", uri)
    assert not storage.within("s3://other/run/checkpoints/a.ckpt", uri)
    assert not storage.within(str(tmp_path / "a.ckpt"), uri)


def test_the_driver_node_storage_serves_only_the_run_folders(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "victim.txt"
    run.mkdir()
    outside.write_text("keep me")
    resume = tmp_path / "given.ckpt"
    resume.write_bytes(b"ckpt")
    (run / "link").symlink_to(tmp_path)
    served = storage.DriverNodeStorage([str(run)], [str(resume)])
    served.call("write_bytes", str(run / "ckpts" / "a.ckpt"), b"a")
    assert served.call("read_bytes", str(run / "ckpts" / "a.ckpt")) == b"a"
    assert served.call("read_bytes", str(resume)) == b"ckpt"  # the checkpoint it resumes from
    assert served.call("list_names", str(run), directories=True) == ["ckpts", "link"]
    for name, args in [
        ("delete", (str(outside),)),
        ("delete", (str(run / "link" / "victim.txt"),)),  # a link out of the run
        ("delete", (str(resume),)),  # readable, not deletable
        ("write_bytes", (str(run / ".." / "victim.txt"), b"x")),
        ("link", (str(run / "ckpts" / "a.ckpt"), str(tmp_path / "x.ckpt"))),
        ("copy_tree", (str(tmp_path), str(run / "copy"))),
        ("delete", (str(run),)),  # the folder itself: readable only
        ("route_local_paths", (None,)),  # not a storage call at all
    ]:
        with pytest.raises(PermissionError, match="refused|not a storage call"):
            served.call(name, *args)
    assert outside.read_text() == "keep me" and resume.exists()
    served.allow([str(tmp_path / "later")])  # a later call's checkpoint folder
    served.call("write_bytes", str(tmp_path / "later" / "b.ckpt"), b"b")


def test_a_failed_write_leaves_no_partial_file(small_disk):
    from conftest import fill

    fill(small_disk, leave=4096)
    target = small_disk / "ckpts" / "big.ckpt"
    with pytest.raises(OSError, match="No space left") as info:
        storage.write_bytes(str(target), b"x" * 200_000)
    assert info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in (small_disk / "ckpts").iterdir()) == []  # no .partial-*


def test_a_permanent_write_error_is_not_retried_and_stops_at_the_next_check(tmp_path, monkeypatch):
    writer = checkpointing.AsyncWriter(attempts=3, backoff_s=5.0)
    calls = []

    def full_disk(location, data):
        calls.append(location)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage, "write_bytes", full_disk)
    writer.raise_if_failed()  # nothing failed yet
    started = time.monotonic()
    writer.submit(str(tmp_path / "a.ckpt"), b"a", None)
    deadline = time.monotonic() + 10
    while writer._failure is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(OSError, match=r"a\.ckpt failed at once: .*No space left") as info:
        writer.raise_if_failed()
    assert info.value.errno == errno.ENOSPC
    assert len(calls) == 1 and time.monotonic() - started < 5  # no retry, no back-off


def test_actions_after_a_failed_upload_do_not_run(tmp_path, monkeypatch):
    writer = checkpointing.AsyncWriter(attempts=1)

    def full_disk(location, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    ran = []
    writer.after(lambda: ran.append("before"))
    monkeypatch.setattr(storage, "write_bytes", full_disk)
    writer.submit(str(tmp_path / "a.ckpt"), b"a", None)
    writer.after(lambda: ran.append("link to a.ckpt"))  # as save_last="link" queues it
    with pytest.raises(OSError, match="No space left"):
        writer.wait(timeout_s=30)
    assert ran == ["before"]


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


@pytest.mark.parametrize("where", ["local", "s3"])
def test_copy_file_within_a_store_and_out_of_it(where, tmp_path, request):
    root = (
        str(tmp_path / "store")
        if where == "local"
        else storage.join(request.getfixturevalue("s3_server"), "copies")
    )
    source, copy = storage.join(root, "a.bin"), storage.join(root, "b", "a.bin")
    storage.write_bytes(source, b"first")
    storage.write_bytes(copy, b"older, longer content")
    storage.copy_file(source, copy)  # replaces it
    assert storage.read_bytes(copy) == b"first"
    storage.copy_file(copy, str(tmp_path / "out.bin"))  # to local storage
    assert (tmp_path / "out.bin").read_bytes() == b"first"
    last = storage.join(root, "last.ckpt")
    storage.link(source, last)  # a symlink locally, a copy on the object store
    assert storage.read_bytes(last) == b"first"
    assert os.path.islink(last) == (where == "local")


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
    writer = checkpointing.AsyncWriter(attempts=3, backoff_s=0.01)
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
from raylight.shared import storage
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


ACCESS, SECRET = "AKIAMOTOACCESS00001", "MotoSecretKey0987654321"


def _formatted(error: BaseException) -> str:
    """All a traceback shows of ``error``: its message, notes and the chain of causes."""
    import traceback

    return "".join(traceback.format_exception(error))


def _credentialed(s3_server: str) -> tuple[str, str]:
    """The moto bucket with this test's credentials: as user info (which pyarrow uses) and in
    the query string (which pyarrow refuses, in an error that must not show them)."""
    base, _, query = s3_server.partition("?")
    bucket = base.split("@", 1)[1]
    return (
        f"s3://{ACCESS}:{SECRET}@{bucket}?{query}",
        f"s3://{bucket}?access_key={ACCESS}&secret_key={SECRET}&{query}",
    )


@pytest.mark.slow
def test_no_error_shows_credentials(s3_server):
    in_user_info, in_query = _credentialed(s3_server)
    storage.write_bytes(storage.join(in_user_info, "corrupt.ckpt"), b"not a checkpoint")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    unreachable = f"s3://{ACCESS}:{SECRET}@b/run?endpoint_override=127.0.0.1:{closed}&scheme=http"
    cases = [
        (ValueError, lambda: storage.exists(storage.join(in_query, "x.ckpt"))),
        (ValueError, lambda: storage.exists(f"nosuchfs://{ACCESS}:{SECRET}@b/x?secret_key={SECRET}")),
        (FileNotFoundError, lambda: checkpoint.load(storage.join(in_user_info, "missing.ckpt"))),
        (RuntimeError, lambda: checkpoint.load(storage.join(in_user_info, "corrupt.ckpt"))),
        (OSError, lambda: storage.read_bytes(storage.join(unreachable, "a.ckpt"))),
    ]  # fmt: skip
    for error_type, call in cases:
        with pytest.raises(error_type) as info:
            call()
        shown = _formatted(info.value)
        assert ACCESS not in shown and SECRET not in shown, shown
        assert "***" in shown, shown  # the location is there, without its credentials


_S3_DRIVER = """
import sys, traceback
import raylight as pl
from raylight.shared import storage
from raylight.callbacks import ModelCheckpoint
from models import Classifier, loader

root = sys.argv[1]
callback = ModelCheckpoint(dirpath=storage.join(root, "checkpoints"), verbose=True, save_last=True)
trainer = pl.Trainer(num_workers=2, max_epochs=2, default_root_dir=root, callbacks=[callback])
trainer.fit(Classifier(), loader(), loader())
print("best", storage.redact(callback.best_model_path), flush=True)
for bad in (storage.join(root, "missing.ckpt"), sys.argv[2]):
    try:
        pl.Trainer(num_workers=2, max_epochs=3, default_root_dir=root).fit(
            Classifier(), loader(), ckpt_path=bad)
    except Exception:
        traceback.print_exc()
"""


@pytest.mark.slow
@pytest.mark.e2e
def test_a_run_on_s3_never_prints_its_credentials(ray_session, s3_server):
    """Everything a user sees of a fit on S3 (progress, the "saved ..." lines the workers
    print, logger and checkpoint messages, the errors of a bad ckpt_path), through the
    driver's terminal."""
    import os
    import subprocess
    import sys

    in_user_info, in_query = _credentialed(s3_server)
    root = storage.join(in_user_info, "secret-run")
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
        "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]),
    }  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", _S3_DRIVER, root, storage.join(in_query, "a.ckpt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    shown = result.stdout + result.stderr
    assert result.returncode == 0, shown[-3000:]
    assert ACCESS not in shown and SECRET not in shown
    assert "saved s3://***@raylight/secret-run/checkpoints/epoch=1-step=8.ckpt?" in shown
    assert "best s3://***@raylight/secret-run/checkpoints/epoch=1-step=8.ckpt?" in shown
    assert "FileNotFoundError: Checkpoint at s3://***@raylight/secret-run/missing.ckpt" in shown
    assert "secret_key=***" in shown  # the refused query-string URI, named without its secret
