"""Which Ray the driver uses: the one Ray's conventions point to, else a new embedded one.

Ray's documented discovery, as ``ray.init()`` does it:

1. ``RAY_ADDRESS`` when set (``ray job submit`` sets it; ``local`` asks for a new instance);
2. else the cluster that ``ray start`` started on this node, which it records in
   ``<Ray's temp dir>/ray_current_cluster`` (a script run under ``ray submit`` finds the
   head this way), when its GCS answers;
3. else a new embedded instance, sized to the request.

Never ``address="auto"``: after the record, its legacy fallback scans the process table and
joins any Ray on the machine, another script's embedded instance included, whose end then
takes this run down with it.

A new embedded instance uses Ray's token authentication (on by default in Ray 2.60): the
token file is created readable by its owner only, and an existing one that others can read
is tightened, with a line saying so.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import warnings
from typing import Any

import ray

from raylight.shared import shipping, storage


def connect(
    ray_address: str | None, init_kwargs: dict[str, Any], needed_cpus: float, warned: set[str]
) -> None:
    """Join the cluster ``ray_address`` (the driver's ``RAY_ADDRESS``) or Ray's record
    names, or start an embedded local instance with at least ``needed_cpus`` CPUs.
    ``warned`` keeps the token warning to one per Trainer."""
    if ray.is_initialized():
        return
    private_token(create=False, warned=warned)
    kwargs = {"logging_level": logging.WARNING, "log_to_driver": True, **init_kwargs}
    joining = {**kwargs, **code_for_the_cluster(kwargs)}
    if ray_address not in (None, "", "local", "auto"):
        _probe(ray_address)
        _init_or_explain(ray_address, joining, f"RAY_ADDRESS={storage.redact(ray_address)!r}")
        return
    if ray_address in (None, "", "auto"):
        recorded = recorded_cluster()
        if recorded is not None:
            _init_or_explain(recorded, joining, f"the cluster `ray start` recorded ({recorded})")
            return
        if ray_address == "auto":
            raise ConnectionError(
                "RAY_ADDRESS='auto' found no cluster started with `ray start` on this node "
                "(raylight never joins another script's embedded Ray). Start one with "
                "`ray start --head`, set RAY_ADDRESS to its address, or unset RAY_ADDRESS to "
                "let the Trainer start a local Ray instance."
            )
    private_token(create=True, warned=warned)
    kwargs.setdefault("num_cpus", max(os.cpu_count() or 1, int(needed_cpus)))
    kwargs.setdefault("include_dashboard", False)
    # Ray starts workers at niceness 15 so that its own daemons win; in an instance that
    # exists only to train, the ranks should run at normal priority, as DDP processes do.
    kwargs.setdefault("_system_config", {"worker_niceness": 0})
    ray.init(address="local", **kwargs)


def _init_or_explain(address: str, kwargs: dict[str, Any], named: str) -> None:
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ray.exceptions.RayError) as error:
        # RayError: an AuthenticationError, when the cluster's token is not this user's.
        raise ConnectionError(
            f"{named} points to no reachable Ray cluster ({storage.redact(str(error))}). Start "
            "one with `ray start --head`, fix RAY_ADDRESS, or set RAY_ADDRESS=local to let the "
            "Trainer start a local Ray instance."
        ) from None


def recorded_cluster(timeout_s: float = 2.0) -> str | None:
    """The GCS address ``ray start`` recorded on this node, if something answers there."""
    try:  # Ray's own reader of its record; a private helper, kept behind this function
        from ray._private.utils import read_ray_address
    except ImportError:
        return None
    address = read_ray_address(None)
    if not address:
        return None
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError):
        return None  # a record left behind by a cluster that is gone
    return address


def code_for_the_cluster(init_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``ray.init``'s job-level ``runtime_env`` carrying the driver's own modules to every
    node (added to the user's ``runtime_env``), unless that runtime_env, or the job the
    driver runs in (``ray job submit --working-dir``), carries code already."""
    given = dict(init_kwargs.get("runtime_env") or {})
    if shipping.job_ships_code(given):
        return {}
    code = shipping.user_code()
    return {"runtime_env": {**given, "py_modules": code}} if code else {}


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds when RAY_ADDRESS names nothing: ray.init would retry for minutes."""
    host_port = address.split("://", 1)[-1].rstrip("/").rpartition("@")[2]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise ConnectionError(
            f"RAY_ADDRESS={storage.redact(address)!r} points to no reachable Ray cluster: "
            f"nothing answered at {host}:{port} within {timeout_s:.0f} s ({error}). Start one "
            "with `ray start --head`, fix RAY_ADDRESS, or unset it to let the Trainer start a "
            "local Ray instance."
        ) from None


def token_path() -> str | None:
    """Where Ray reads its authentication token (None when it comes inline)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(
        os.path.expanduser("~"), ".ray", "auth_token"
    )


def private_token(create: bool, warned: set[str]) -> None:
    """Make Ray's token file readable by its owner only; with ``create`` and token
    authentication on (Ray's default for a new local instance), write a new token first
    when there is none, as Ray would, but 0600 from the start."""
    path = token_path()
    if path is None or os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return
    if not os.path.exists(path):
        if create:
            _write_new_token(path)
        return
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO) and os.stat(path).st_uid == os.getuid():
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
        if path not in warned:
            warned.add(path)
            warnings.warn(
                f"Ray's token file {path} was readable by other users "
                f"({stat.filemode(mode)}); raylight made it readable by its owner only "
                "(chmod 600): whoever reads it can run code on your Ray clusters.",
                stacklevel=4,
            )


def _write_new_token(path: str) -> None:
    try:  # Ray's own token format
        from ray._private.authentication.authentication_token_generator import (
            generate_new_authentication_token,
        )

        token = generate_new_authentication_token()
    except ImportError:
        import secrets

        token = secrets.token_hex(32)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # another process wrote one first: Ray uses that
    with os.fdopen(descriptor, "w") as file:
        file.write(token)
