"""The driver's own code on other machines, and the package versions every node runs.

A LightningModule pickles by reference to its module (``mymodel.LitModel``), so a worker must
be able to import that module. On the driver's machine it can: workers get the driver's
``sys.path``. For other machines, a Trainer that joins a running cluster hands the modules
the driver imported from outside any installed location (a script's sibling files, a project
folder, an editable install) to ``ray.init`` as the job's ``py_modules``, unless the job
already carries code (``ray job submit --working-dir``, or a ``runtime_env`` of the user's).
Installed packages are not shipped: the cluster must have them, and ``version_mismatches``
says when its versions differ.

The user's objects themselves (module, datamodule, callbacks, loaders) travel in the job
``pack_job`` builds: their numpy arrays arrive on each rank as arrays the rank owns and may
write to, as in the processes of a Lightning run. Classes and functions of the driver's
script that hyperparameters hold are given their script names on the rank
(``name_script_objects``), so that a checkpoint pickles them as Lightning does.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import pickle
import site
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

VERSIONED = ("raylight", "torch", "ray")


def user_code() -> list[str]:
    """Folders (packages) and files (single modules) of the driver's uninstalled imports."""
    if _job_ships_code():
        return []
    installed = _installed_roots()
    found = set()
    for name, module in list(sys.modules.items()):
        if name == "__main__" or "." in name:  # __main__ is pickled by value
            continue
        path = _source(module)
        # Judged by where it is and where a link leads, shipped under its own name: a
        # symlinked package imports by the link's name, not the target's.
        if path is None or any(
            _under(place, root) for place in (path, os.path.realpath(path)) for root in installed
        ):
            continue
        found.add(path)
    return sorted(found)


_PACKAGE = __name__.partition(".")[0]  # "raylight"


def versions() -> dict[str, str]:
    """The versions of what a node must share with the driver."""
    import ray
    import torch

    # The running package's version, read from it rather than imported: this module is
    # part of that package, which Python has always imported first.
    version = sys.modules[_PACKAGE].__version__
    return {"raylight": version, "torch": torch.__version__, "ray": ray.__version__}


def version_mismatches(driver: dict[str, str], nodes: dict[str, dict[str, str]]) -> list[str]:
    """One line per node whose packages differ from the driver's, naming both versions."""
    lines = []
    for node, found in sorted(nodes.items()):
        differ = [
            f"{name} {found[name]} (driver: {driver[name]})"
            for name in VERSIONED
            if name in found and _public(found[name]) != _public(driver.get(name, ""))
        ]
        if differ:
            lines.append(f"node {node} has " + ", ".join(differ))
    return lines


def _public(version: str) -> str:
    """A version without its local build tag: torch 2.14.1+cpu and 2.14.1 are one release."""
    return version.split("+", 1)[0]


def job_ships_code(runtime_env: dict[str, Any] | None = None) -> bool:
    """Whether ``runtime_env`` (or else this process's job) carries code already."""
    if runtime_env is not None:
        return bool(runtime_env.get("working_dir") or runtime_env.get("py_modules"))
    return _job_ships_code()


def _job_ships_code() -> bool:
    """A job that carries code already: the one this process runs in once connected, or
    the one ``ray job submit`` started this driver for (its config is in the environment)."""
    import ray

    if ray.is_initialized():
        runtime_env: Any = ray.get_runtime_context().runtime_env or {}
    else:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        runtime_env = job.get("runtime_env") or {}
    return bool(runtime_env.get("working_dir") or runtime_env.get("py_modules"))


def _installed_roots() -> list[str]:
    """Where installed and standard-library modules live, raylight's own folder included
    (every node runs raylight; an editable install of it must not shadow the node's)."""
    paths = sysconfig.get_paths()
    roots = [paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths]
    roots += site.getsitepackages() + [site.getusersitepackages()]
    roots.append(os.path.dirname(sys.modules[_PACKAGE].__file__))
    return [os.path.realpath(root) for root in roots if root] + [
        os.path.abspath(root) for root in roots if root
    ]


def _source(module: Any) -> str | None:
    """A top-level module's package folder or file, when it came from one on disk."""
    folders = list(getattr(module, "__path__", None) or [])
    if len(folders) == 1 and os.path.isdir(folders[0]):
        return os.path.abspath(folders[0])
    if folders:  # a namespace package split over folders: not something to ship whole
        return None
    file = getattr(module, "__file__", None)
    if file and file.endswith(".py") and os.path.isfile(file):
        return os.path.abspath(file)
    return None


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


# ---- the driver's script on the ranks ---------------------------------------------------------

# The one process-wide fact here: the names ``name_script_objects`` gave in ``__main__``.
_named: dict[str, Any] = {}


def name_script_objects(values: Any) -> None:
    """Give the classes and functions of the driver's script that ``values`` hold (directly,
    in containers, or as an object's class) their script names in this process's
    ``__main__``.

    On the driver such a class is ``__main__.Encoder``, and pickle refers to it by that name
    (Lightning's checkpoint does). Ray ships it to a rank by value, where ``__main__`` is Ray's
    worker module, which has no ``Encoder``: ``torch.save`` would fail there, and a rank could
    not load such a checkpoint. Naming the shipped class in the rank's ``__main__`` makes
    both work and writes the same reference Lightning writes. Only names the rank's
    ``__main__`` lacks, or that an earlier job's copy holds, are set; a name it uses for
    another object is an error, never overwritten. Nested and local classes (``A.B``, ``f.<locals>.C``) are left alone: pickle
    cannot refer to them by name in Lightning's checkpoint either.
    """
    main = sys.modules["__main__"]
    for found in _script_objects(values):
        present = getattr(main, found.__qualname__, found)
        # A later job on this rank brings its own copy of a function (cloudpickle keeps one
        # identity for classes only): it takes the place of the copy named before.
        if present is not found and _named.get(found.__qualname__) is not present:
            raise pickle.PicklingError(
                f"The hyperparameters hold {found.__qualname__} from the driver's script, but "
                f"__main__ on the Ray worker already has another {found.__qualname__!r}, so a "
                "checkpoint cannot refer to it by name. Rename it, or define it in a module of "
                "its own that the script imports."
            )
        setattr(main, found.__qualname__, found)
        _named[found.__qualname__] = found


def _script_objects(values: Any) -> Iterator[Any]:
    pending, seen = [values], set()
    while pending:
        value = pending.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if inspect.isclass(value) or inspect.isfunction(value):
            if value.__module__ == "__main__" and value.__qualname__.isidentifier():
                yield value
            continue
        pending.append(type(value))  # an object pickles its class by name
        if isinstance(value, dict):
            pending += [*value.keys(), *value.values()]
        elif isinstance(value, list | tuple | set | frozenset):
            pending += list(value)
        elif isinstance(getattr(value, "__dict__", None), dict):
            pending += list(vars(value).values())


# ---- the user's objects on the ranks ----------------------------------------------------------

USER_OBJECTS = ("module", "datamodule", "callbacks", "loaders")  # the job's keys that hold them


@dataclass(frozen=True)
class Packed:
    """The user's objects, pickled once on the driver as Ray would, with the arrays apart."""

    data: bytes  # the pickle stream, without the arrays' contents
    buffers: list[pickle.PickleBuffer]  # the arrays' contents: Ray ships them zero-copy
    writable: list[bool]  # whether each array could be written to on the driver
    refs: list[Any]  # ObjectRefs and actor handles, left to Ray's own serialization


def pack_job(job: dict[str, Any]) -> dict[str, Any]:
    """``job`` with its user objects packed together (one pickle keeps shared references)."""
    rest = {key: value for key, value in job.items() if key not in USER_OBJECTS}
    return rest | {"user_objects": _pack({key: job[key] for key in USER_OBJECTS})}


def unpack_job(job: dict[str, Any]) -> dict[str, Any]:
    """On a rank: the job as the driver built it, its arrays owned by this rank."""
    rest = {key: value for key, value in job.items() if key != "user_objects"}
    return rest | _unpack(job["user_objects"])


def _pack(objects: Any) -> Packed:
    # Ray's pickler (ray.cloudpickle: a class of the driver's script keeps one identity when
    # it travels back), with Ray's out-of-band buffers for numpy arrays; references into
    # the cluster stay with Ray, which tracks who borrows them.
    import ray
    from ray import cloudpickle

    buffers: list[pickle.PickleBuffer] = []
    refs: list[Any] = []

    class Pickler(cloudpickle.CloudPickler):
        def persistent_id(self, obj: Any) -> int | None:
            if isinstance(obj, ray.ObjectRef | ray.actor.ActorHandle):
                refs.append(obj)
                return len(refs) - 1
            return None

    stream = io.BytesIO()
    Pickler(stream, protocol=5, buffer_callback=buffers.append).dump(objects)
    writable = [not memoryview(buffer).readonly for buffer in buffers]
    return Packed(stream.getvalue(), buffers, writable, refs)


def _unpack(packed: Packed) -> Any:
    # Ray hands each buffer over as a read-only view of its object store (zero-copy), so
    # torch.from_numpy on such an array warns "The given NumPy array is not writable" and
    # a write to it is undefined. Each array that was writable on the driver is copied once,
    # straight from the store, into memory this rank owns: the ranks of a node hold one copy
    # each, as the processes of a Lightning DDP run do, and the store's copy is freed with
    # the job. Arrays that were read-only on the driver stay shared views.
    buffers = [
        bytearray(buffer) if writable else buffer
        for buffer, writable in zip(packed.buffers, packed.writable, strict=True)
    ]
    refs = packed.refs

    class Unpickler(pickle.Unpickler):
        def persistent_load(self, pid: Any) -> Any:
            return refs[pid]

    return Unpickler(io.BytesIO(packed.data), buffers=buffers).load()
