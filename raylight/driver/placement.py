"""Where workers can go: reading the cluster's resources, judging a request that can never
be placed, describing one that could not be, and ordering the bundles into ranks.

Pure helpers around Ray's placement groups; ``group.WorkerGroup`` reserves and holds them.
"""

from __future__ import annotations

import time
from typing import Any

import ray
from ray.util.placement_group import remove_placement_group

from raylight.shared.config import Scaling


class ResourcesUnavailable(RuntimeError):
    """The cluster cannot place the worker group."""


def format_resources(resources: dict[str, float]) -> str:
    """Resources as a user asks for them: no node labels, memory pools or the per-placement-
    group copies Ray keeps (``CPU_group_<id>``, ``bundle_group_<id>``)."""
    shown = {
        k: v
        for k, v in sorted(resources.items())
        if not k.startswith(("node:", "accelerator_type"))
        and "_group_" not in k
        and k not in ("memory", "object_store_memory")
    }
    return repr(shown)


def describe_request(scaling: Scaling) -> str:
    if scaling.elastic:
        return (
            f"Trainer(num_workers=({scaling.min_workers}, {scaling.num_workers}), "
            f"use_gpu={scaling.use_gpu}) needs {scaling.bundle()} per worker x at least "
            f"{scaling.min_workers}"
        )
    return (
        f"Trainer(num_workers={scaling.num_workers}, use_gpu={scaling.use_gpu}) needs "
        f"{scaling.bundle()} per worker x {scaling.num_workers}"
    )


def release_leaked_bundles(removed: list[Any]) -> None:
    """Remove again the placement groups whose bundles still hold resources.

    When a group is removed right after one of its nodes died, Ray's GCS may still
    reschedule the dead node's bundle and commit it on the next node that joins, where it
    holds that node's resources for a group that no longer exists. Removing the group a
    second time releases them.
    """
    if not removed:
        return

    def held() -> str:
        return " ".join(k for k in ray.available_resources() if k.startswith("bundle_group_"))

    leaked = [pg for pg in removed if pg.id.hex() in held()]
    for pg in leaked:
        remove_placement_group(pg)
    deadline = time.monotonic() + 5.0  # the free-resource view follows within moments
    while leaked and time.monotonic() < deadline:
        time.sleep(0.2)
        leaked = [pg for pg in leaked if pg.id.hex() in held()]
    del removed[: max(0, len(removed) - 64)]  # keep the recent ones only


def rank_order(node_ids: list[str]) -> list[int]:
    """Bundle indices in rank order: by node, the driver's node first when it hosts workers
    (so rank 0, which writes checkpoints and logs, shares the driver's disk), then by bundle.
    Known from the placement group before the actors exist, so each actor is created with
    its rank, which Ray prints in front of its output: ``(rank=1 pid=...)``."""
    driver_node = ray.get_runtime_context().get_node_id()
    node_order: dict[str, int] = {driver_node: 0} if driver_node in node_ids else {}
    for node in node_ids:
        node_order.setdefault(node, len(node_order))
    return sorted(range(len(node_ids)), key=lambda i: (node_order[node_ids[i]], i))


def autoscaler_ceiling() -> dict[str, float]:
    """The most of each resource the cluster's node types allow, when the autoscaler has
    published them (KubeRay's does; a `ray up` cluster's in Ray 2.60 does not). Empty
    otherwise. Read the way Ray Train and Ray Data read it."""
    try:
        from ray._private.state import state

        return dict(state.get_max_resources_from_cluster_config() or {})
    except Exception:  # a Ray without it: judge by the rest
        return {}


def autoscaler_running() -> bool:
    """Whether an autoscaler that launches nodes watches this cluster (a `ray up` or
    KubeRay cluster); False for `ray.init()` and `ray start` clusters, whose monitor only
    reports."""
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address, timeout=10)
        return str(status.stats.autoscaler_version or "0") != "0"
    except Exception:  # a Ray without it: judge by what exists now
        return False


def never_fits(
    bundle: dict[str, float],
    count: int,
    total: dict[str, float],
    ceiling: dict[str, float],
    autoscaling: bool,
) -> bool:
    """Whether ``count`` workers of ``bundle`` can never be placed: beyond what the cluster
    has and, when known, what its autoscaler's node types allow. An autoscaler whose limits
    are unknown may still add the nodes, so the request is not judged hopeless then."""
    if ceiling:
        total = {k: max(total.get(k, 0.0), ceiling.get(k, 0.0)) for k in {*total, *ceiling}}
    elif autoscaling:
        return False
    return fitting_workers(bundle, total) < count


def fitting_workers(bundle: dict[str, float], available: dict[str, float]) -> int:
    """How many workers of ``bundle`` the free resources could hold (an upper bound: a
    worker must fit on one node, and the free amounts are cluster-wide sums)."""
    return min(int(available.get(name, 0.0) // amount) for name, amount in bundle.items() if amount)
