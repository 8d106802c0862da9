"""The only place that talks ``pyarrow.fs``: locations are local paths or storage URIs.

A location is a plain string so that it pickles to the workers: ``/mnt/nfs/run``,
``s3://bucket/run``, ``gs://bucket/run``, ``hdfs://...``. A URI may carry pyarrow's
query options (``s3://bucket/run?endpoint_override=host:port&scheme=http``); ``join``
keeps them at the end. Writes are atomic: a reader sees the whole file or none of it.
"""

from __future__ import annotations

import os
import re
import uuid

import pyarrow.fs as pafs


def is_uri(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def _local(location: str) -> str:
    return location[len("file://") :] if location.startswith("file://") else location


def join(location: str, *names: str) -> str:
    """``location/name/...``, with a URI's query string kept at the end."""
    if not is_uri(location):
        return os.path.join(_local(location), *names)
    base, sep, query = location.partition("?")
    return "/".join([base.rstrip("/"), *names]) + sep + query


def _resolve(location: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(location)
    except Exception as error:
        raise ValueError(
            f"{redact(location)!r} is not a storage location pyarrow.fs understands ({error}): use a "
            "local path or a URI such as s3://bucket/dir, gs://bucket/dir or hdfs://host/dir."
        ) from error


def redact(location: str) -> str:
    """The location without credentials (``s3://key:secret@bucket`` -> ``s3://***@bucket``)."""
    return re.sub(r"://[^/@?]*@", "://***@", location)


def _unreachable(location: str, error: Exception) -> OSError:
    return OSError(
        f"storage at {redact(location)!r} is unreachable or refused access "
        f"({redact(str(error))}). Check the URI, the endpoint and the credentials that the "
        "driver and the workers see."
    )


def check_reachable(location: str) -> None:
    """Fail now, on the driver, rather than at the first checkpoint on a worker."""
    if is_uri(location):
        exists(location)


def write_bytes(location: str, data: bytes) -> None:
    """Write ``data`` atomically: a temporary file renamed into place locally; one object
    upload (visible only once complete) on object stores."""
    if not is_uri(location):
        path = _local(location)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        partial = f"{path}.partial-{uuid.uuid4().hex}"
        with open(partial, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
        return
    filesystem, path = _resolve(location)
    try:
        with filesystem.open_output_stream(path) as stream:
            stream.write(data)
    except OSError as error:
        raise _unreachable(location, error) from error


def read_bytes(location: str) -> bytes:
    if not exists(location):
        raise FileNotFoundError(f"{location} not found.")
    if not is_uri(location):
        with open(_local(location), "rb") as f:
            return f.read()
    filesystem, path = _resolve(location)
    try:
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except OSError as error:
        raise _unreachable(location, error) from error


def exists(location: str) -> bool:
    if not is_uri(location):
        return os.path.exists(_local(location))
    filesystem, path = _resolve(location)
    try:
        return filesystem.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as error:
        raise _unreachable(location, error) from error


def delete(location: str) -> None:
    if not is_uri(location):
        if os.path.exists(_local(location)):
            os.remove(_local(location))
        return
    filesystem, path = _resolve(location)
    try:
        if filesystem.get_file_info(path).type != pafs.FileType.NotFound:
            filesystem.delete_file(path)
    except OSError as error:
        raise _unreachable(location, error) from error


def list_names(location: str, directories: bool = False) -> list[str]:
    """Names of the files (or, with ``directories``, the folders) directly in ``location``;
    empty when it does not exist."""
    if not is_uri(location):
        folder = _local(location)
        if not os.path.isdir(folder):
            return []
        return sorted(e.name for e in os.scandir(folder) if e.is_dir() == directories)
    filesystem, path = _resolve(location)
    wanted = pafs.FileType.Directory if directories else pafs.FileType.File
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as error:
        raise _unreachable(location, error) from error
    return sorted(info.base_name for info in infos if info.type == wanted)


def link(target: str, location: str) -> None:
    """Make ``location`` name the same checkpoint as ``target``: a relative symlink, swapped in
    atomically, on local storage; a copy on object stores, which have no links."""
    if not is_uri(location):
        path = _local(location)
        temporary = f"{path}.link-{uuid.uuid4().hex}"
        os.symlink(os.path.relpath(_local(target), os.path.dirname(path) or "."), temporary)
        os.replace(temporary, path)
        return
    write_bytes(location, read_bytes(target))
