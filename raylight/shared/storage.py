"""The only place that talks ``pyarrow.fs``: locations are local paths or storage URIs.

A location is a plain string so that it pickles to the workers: ``/mnt/nfs/run``,
``s3://bucket/run``, ``gs://bucket/run``, ``hdfs://...``. A URI may carry pyarrow's
query options (``s3://bucket/run?endpoint_override=host:port&scheme=http``); ``join``
keeps them at the end. Writes are atomic: a reader sees the whole file or none of it.

Local paths are the driver's: a worker on a node that cannot see them (no shared
filesystem there) sends its local-path calls to a helper actor on the driver's node,
so checkpoints still land where the driver and a later run look for them. That actor
serves only the run's own folders.

Every message that shows a location shows ``redact(location)``: URIs may carry
credentials, as user info (``s3://KEY:SECRET@bucket``) or in the query string
(``?access_key=...&secret_key=...``).
"""

from __future__ import annotations

import contextlib
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
                f"{fn.__name__} of {redact(location)} on the driver's node did not finish "
                f"within {_PROXY_TIMEOUT_S:.0f} s. This node cannot see the driver's local "
                "paths: give default_root_dir a location every node shares (NFS, s3://...)."
            ) from error
        except ray.exceptions.RayActorError as error:
            raise OSError(
                f"{fn.__name__} of {redact(location)}: the driver's node, which holds the "
                f"run's local files, is gone ({redact(str(error))})."
            ) from None

    return wrapper  # type: ignore[return-value]


# The routed calls, and how many of their leading arguments are locations.
_ROUTED_LOCATIONS = {
    "write_bytes": 1,
    "read_bytes": 1,
    "exists": 1,
    "delete": 1,
    "list_names": 1,
    "link": 2,
    "copy_tree": 2,
    "copy_file": 2,
    "makedirs": 1,
    "rename": 2,
    "delete_tree": 1,
}
_READS = {"read_bytes", "exists", "list_names"}


class DriverNodeStorage:
    """Made an actor on the driver's node; runs the storage calls of workers that cannot
    see the driver's local paths, within the run's own folders only.

    ``folders`` may be read and written (the run's root, its checkpoint folders);
    ``files`` may only be read (a checkpoint the run resumes from). Anything else is
    refused, so a worker cannot make the driver's node write or delete elsewhere.
    """

    def __init__(self, folders: list[str], files: list[str] = ()) -> None:
        self._folders: set[str] = set()
        self._files: set[str] = set()
        self.allow(folders, files)

    def allow(self, folders: list[str], files: list[str] = ()) -> None:
        self._folders.update(_real(f) for f in folders if not is_uri(f))
        self._files.update(_real(f) for f in files if not is_uri(f))

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if name not in _ROUTED_LOCATIONS:
            raise PermissionError(f"{name} is not a storage call the driver's node runs.")
        for location in args[: _ROUTED_LOCATIONS[name]]:
            self._check(name, location)
        return globals()[name].__wrapped__(*args, **kwargs)

    def _check(self, name: str, location: str) -> None:
        path = _real(location)
        if any(within(path, folder) for folder in self._folders):
            return
        if name in _READS and (path in self._files or path in self._folders):
            return
        raise PermissionError(
            f"{name} of {redact(location)} refused on the driver's node: it serves the run's "
            f"own folders only ({', '.join(sorted(redact(f) for f in self._folders))}). Write "
            "checkpoints under default_root_dir or a ModelCheckpoint's dirpath, or give them a "
            "location every node shares (NFS, s3://...)."
        )


def _real(location: str) -> str:
    """A local path as the filesystem resolves it (symlinks followed, ``..`` removed)."""
    return os.path.realpath(_local(location))


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
        # Not chained: pyarrow's own text may quote the URI with its credentials.
        raise ValueError(
            f"{redact(location)!r} is not a storage location pyarrow.fs understands "
            f"({redact(str(error))}): use a local path or a URI such as s3://bucket/dir, "
            "gs://bucket/dir or hdfs://host/dir. Credentials come from the environment "
            "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS) or, "
            "for S3, as s3://KEY:SECRET@bucket/dir; pyarrow takes none in the query string."
        ) from None


# Query parameters whose values are secrets: pyarrow's access_key, secret_key and
# session_token, and the usual spellings of keys, tokens, passwords and signatures.
_SECRET_PARAM = re.compile(
    r"([?&;](?:[^=&;#\s]*(?:key|secret|token|passw|pwd|credential|signature|sig|auth)"
    r"[^=&;#\s]*)=)[^&;#\s'\"]*",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` (a location, or a message holding locations) without credentials: a URI's
    user info (``s3://key:secret@bucket`` -> ``s3://***@bucket``) and the values of
    credential-like query parameters (``?secret_key=...`` -> ``?secret_key=***``)."""
    text = re.sub(r"://[^/@?\s'\"]*@", "://***@", text)
    return _SECRET_PARAM.sub(r"\1***", text)


def within(location: str, folder: str) -> bool:
    """Whether ``location`` lies inside ``folder`` (both local, or both URIs of one store).

    Local paths are compared as the filesystem resolves them; URIs by their paths without
    the query string, and a URI with ``.`` or ``..`` segments is never inside anything.
    """
    if is_uri(location) != is_uri(folder):
        return False
    if not is_uri(location):
        path, root = _real(location), _real(folder)
        return path != root and os.path.commonpath([path, root]) == root
    path, root = location.partition("?")[0], folder.partition("?")[0].rstrip("/")
    scheme_and_path = path.split("://", 1)[-1]
    if any(part in (".", "..") for part in scheme_and_path.split("/")):
        return False
    return _strip_user(path).startswith(_strip_user(root) + "/")


def _strip_user(uri: str) -> str:
    return re.sub(r"://[^/@?]*@", "://", uri)


def _unreachable(location: str, error: Exception) -> OSError:
    """Raised ``from None``: the original error's text may quote the URI with credentials."""
    message = (
        f"storage at {redact(location)!r} is unreachable or refused access "
        f"({redact(str(error))}). Check the URI, the endpoint and the credentials that the "
        "driver and the workers see."
    )
    code = getattr(error, "errno", None)
    return OSError(code, message) if code else OSError(message)


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
        try:
            with open(partial, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.remove(partial)  # a full disk stays no fuller than before
            raise OSError(error.errno, f"writing {redact(path)} failed: {error.strerror}") from None
        return
    filesystem, path = _resolve(location)
    try:
        with filesystem.open_output_stream(path) as stream:
            stream.write(data)
    except OSError as error:
        raise _unreachable(location, error) from None


@_routed
def read_bytes(location: str) -> bytes:
    if not exists(location):
        raise FileNotFoundError(f"{redact(location)} not found.")
    if not is_uri(location):
        with open(_local(location), "rb") as f:
            return f.read()
    filesystem, path = _resolve(location)
    try:
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except OSError as error:
        raise _unreachable(location, error) from None


@_routed
def exists(location: str) -> bool:
    if not is_uri(location):
        return os.path.exists(_local(location))
    filesystem, path = _resolve(location)
    try:
        return filesystem.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as error:
        raise _unreachable(location, error) from None


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
        raise _unreachable(location, error) from None


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
        raise _unreachable(location, error) from None
    return sorted(info.base_name for info in infos if info.type == wanted)


@_routed
def link(target: str, location: str) -> None:
    """Make ``location`` name the same checkpoint as ``target``: a relative symlink, swapped in
    atomically, on local storage; a copy on object stores, which have no links."""
    if not is_uri(location):
        path = _local(location)
        temporary = f"{path}.link-{uuid.uuid4().hex}"
        os.symlink(os.path.relpath(_local(target), os.path.dirname(path) or "."), temporary)
        try:
            os.replace(temporary, path)
        except OSError:
            os.remove(temporary)
            raise
        return
    copy_file(target, location)


@_routed
def copy_file(source: str, destination: str) -> None:
    """Copy the file ``source`` to ``destination`` (each local or a URI), replacing it. The
    bytes stream through in chunks (no whole shard in memory; an object store's own copy
    refuses objects over 5 GiB); an object appears once its upload is complete."""
    if not is_uri(source) and not is_uri(destination):
        path = _local(destination)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        partial = f"{path}.partial-{uuid.uuid4().hex}"
        try:
            shutil.copyfile(_local(source), partial)
            os.replace(partial, path)  # atomic, as every local write here
        finally:
            with contextlib.suppress(OSError):
                os.remove(partial)
        return
    _stream_copy(source, destination, folder=False)


@_routed
def copy_tree(source: str, destination: str) -> None:
    """Copy the folder ``source`` (local or URI) into ``destination`` (local or URI)."""
    if not is_uri(source) and not is_uri(destination):
        shutil.copytree(_local(source), _local(destination), dirs_exist_ok=True)
        return
    _stream_copy(source, destination, folder=True)


def _stream_copy(source: str, destination: str, folder: bool) -> None:
    """A file or a folder between any two stores, streamed by pyarrow (one of them a URI)."""
    source_fs, source_path = _resolve(source) if is_uri(source) else (None, _local(source))
    target_fs, target_path = (
        _resolve(destination) if is_uri(destination) else (None, _local(destination))
    )
    if target_fs is None:
        os.makedirs(target_path if folder else os.path.dirname(target_path) or ".", exist_ok=True)
    try:
        pafs.copy_files(
            source_path,
            target_path,
            source_filesystem=source_fs or pafs.LocalFileSystem(),
            destination_filesystem=target_fs or pafs.LocalFileSystem(),
        )
    except OSError as error:
        raise _unreachable(destination if target_fs else source, error) from None


@_routed
def makedirs(location: str) -> None:
    """Create the folder ``location`` and its parents; nothing if it exists."""
    if not is_uri(location):
        os.makedirs(_local(location), exist_ok=True)
        return
    filesystem, path = _resolve(location)
    try:
        filesystem.create_dir(path, recursive=True)
    except OSError as error:
        raise _unreachable(location, error) from None


@_routed
def rename(source: str, destination: str) -> None:
    """Move the file ``source`` to ``destination`` (one store), replacing it: atomic locally;
    a copy and a delete on object stores, where ``destination`` still appears whole."""
    if not is_uri(source):
        os.replace(_local(source), _local(destination))
        return
    filesystem, source_path = _resolve(source)
    _, destination_path = _resolve(destination)
    try:
        filesystem.move(source_path, destination_path)
    except OSError as error:
        raise _unreachable(source, error) from None


@_routed
def delete_tree(location: str, first: tuple[str, ...] = ()) -> None:
    """Delete ``location``, a file or a folder with everything in it, the names ``first`` in
    that folder before the rest; a symlink is removed, never what it points to; nothing if it
    does not exist."""
    if not is_uri(location):
        path = _local(location)
        if os.path.islink(path) or os.path.isfile(path):
            os.remove(path)
        elif os.path.isdir(path):
            for name in first:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(path, name))
            shutil.rmtree(path)
        return
    filesystem, path = _resolve(location)
    try:
        kind = filesystem.get_file_info(path).type
        if kind == pafs.FileType.Directory:
            for name in first:
                if filesystem.get_file_info(f"{path}/{name}").type == pafs.FileType.File:
                    filesystem.delete_file(f"{path}/{name}")
            filesystem.delete_dir(path)
        elif kind != pafs.FileType.NotFound:
            filesystem.delete_file(path)
    except OSError as error:
        raise _unreachable(location, error) from None
