"""The only place that talks ``pyarrow.fs``: locations are local paths or storage URIs.

A location is a plain string so that it pickles to the workers: ``/mnt/nfs/run``,
``s3://bucket/run``, ``gs://bucket/run``, ``hdfs://...``. A URI may carry pyarrow's
query options (``s3://bucket/run?endpoint_override=host:port&scheme=http``); ``join``
keeps them at the end. Writes are atomic: a reader sees the whole file or none of it.

Local paths are the driver's: a worker on a node that cannot see them (no shared
filesystem there) sends its local-path calls to a helper actor on the driver's node,
so checkpoints still land where the driver and a later run look for them.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import pyarrow.fs as pafs

_Fn = TypeVar("_Fn", bound=Callable[..., Any])
# The one process-wide fact here: whether this process sees the driver's local paths.
# It belongs to the process's node, not to a run's configuration; set by ``route_local_paths``.
_driver_node_proxy: Any = None
_PROXY_TIMEOUT_S = 900.0  # one call may carry a whole checkpoint through the object store


def _routed(fn: _Fn) -> _Fn:
    """Run ``fn`` on the driver's node when this process cannot see its local paths."""

    @functools.wraps(fn)
    def wrapper(location: str, *args: Any, **kwargs: Any) -> Any:
        proxy = _driver_node_proxy
        if proxy is None or is_uri(location):
            return fn(location, *args, **kwargs)
        import ray

        try:
            return ray.get(
                proxy.call.remote(fn.__name__, location, *args, **kwargs), timeout=_PROXY_TIMEOUT_S
            )
        except ray.exceptions.GetTimeoutError as error:
            raise OSError(
                f"{fn.__name__} of {location} on the driver's node did not finish within "
                f"{_PROXY_TIMEOUT_S:.0f} s. This node cannot see the driver's local paths: "
                "give default_root_dir a location every node shares (NFS, s3://...)."
            ) from error
        except ray.exceptions.RayActorError as error:
            raise OSError(
                f"{fn.__name__} of {location}: the driver's node, which holds the "
                f"run's local files, is gone ({error})."
            ) from error

    return wrapper  # type: ignore[return-value]


class DriverNodeStorage:
    """Made an actor on the driver's node; runs the storage calls of workers that cannot
    see the driver's local paths."""

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return globals()[name].__wrapped__(*args, **kwargs)


def route_local_paths(proxy: Any) -> None:
    """From now on, this process's local-path calls run through ``proxy`` (a
    ``DriverNodeStorage`` actor)."""
    global _driver_node_proxy
    _driver_node_proxy = proxy


def is_uri(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def absolute(location: str) -> str:
    """A local path made absolute (the driver's, so a worker does not read it from its own
    working directory); URIs unchanged."""
    return location if "://" in location else os.path.abspath(location)


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


@_routed
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


@_routed
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


@_routed
def exists(location: str) -> bool:
    if not is_uri(location):
        return os.path.exists(_local(location))
    filesystem, path = _resolve(location)
    try:
        return filesystem.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as error:
        raise _unreachable(location, error) from error


@_routed
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


@_routed
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


@_routed
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


@_routed
def copy_tree(source: str, destination: str) -> None:
    """Copy the folder ``source`` (local or URI) into ``destination`` (local or URI)."""
    if not is_uri(source) and not is_uri(destination):
        shutil.copytree(_local(source), _local(destination), dirs_exist_ok=True)
        return
    source_fs, source_path = _resolve(source) if is_uri(source) else (None, _local(source))
    target_fs, target_path = (
        _resolve(destination) if is_uri(destination) else (None, _local(destination))
    )
    if target_fs is None:
        os.makedirs(target_path, exist_ok=True)
    try:
        pafs.copy_files(
            source_path,
            target_path,
            source_filesystem=source_fs or pafs.LocalFileSystem(),
            destination_filesystem=target_fs or pafs.LocalFileSystem(),
        )
    except OSError as error:
        raise _unreachable(destination if target_fs else source, error) from error
