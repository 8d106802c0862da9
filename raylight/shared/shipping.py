"""The driver's own code on other machines, and the package versions every node runs.

A LightningModule pickles by reference to its module (``mymodel.LitModel``), so a worker must
be able to import that module. On the driver's machine it can: workers get the driver's
``sys.path``. For other machines, a Trainer that joins a running cluster hands the modules
the driver imported from outside any installed location (a script's sibling files, a project
folder, an editable install) to ``ray.init`` as the job's ``py_modules``, unless the job
already carries code (``ray job submit --working-dir``, or a ``runtime_env`` of the user's).
Installed packages are not shipped: the cluster must have them, and ``version_mismatches``
says when its versions differ.
"""

from __future__ import annotations

import json
import os
import site
import sys
import sysconfig
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
