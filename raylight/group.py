"""WorkerGroup: the placement group, one actor per rank, rendezvous, calls and teardown.

Every wait here has a bound. A rank that dies or raises is seen as soon as Ray
reports it, and then the whole group is killed: ranks blocked in a collective with
the failed one would otherwise wait for the process-group timeout.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

from raylight import storage
from raylight.config import Scaling
from raylight.worker import Worker


class WorkerFailure(RuntimeError):
    """A worker process or its node died (as opposed to user code raising)."""

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.rank = rank


class ResourcesUnavailable(RuntimeError):
    """The cluster cannot place the worker group."""


def _format_resources(resources: dict[str, float]) -> str:
    shown = {
        k: v
        for k, v in sorted(resources.items())
        if not k.startswith(("node:", "accelerator_type"))
        and k not in ("memory", "object_store_memory")
    }
    return repr(shown)


def _describe_request(scaling: Scaling) -> str:
    return (
        f"Trainer(num_workers={scaling.num_workers}, use_gpu={scaling.use_gpu}) needs "
        f"{scaling.bundle()} per worker x {scaling.num_workers}"
    )


class WorkerGroup:
    worker_cls = Worker

    def __init__(self, scaling: Scaling, placement_timeout_s: float) -> None:
        self.scaling = scaling
        self.placement_timeout_s = placement_timeout_s
        self._pg: Any = None
        self.actors: list[Any] = []  # indexed by rank
        self.infos: list[dict[str, Any]] = []
        self._storage_proxy: Any = None
        self._storage_checked = False

    # ---- start ---------------------------------------------------------------------------------
    def start(self, backend: str, pg_timeout_s: float, env_vars: dict[str, str]) -> None:
        self._pg = self._reserve()
        remote_cls = ray.remote(self.worker_cls)
        bundle = self.scaling.bundle()
        options = {
            "num_cpus": bundle.get("CPU", 1.0),
            "num_gpus": bundle.get("GPU", 0.0),
            "resources": {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")},
            "runtime_env": {"env_vars": env_vars} if env_vars else None,
        }
        driver_sys_path = [os.path.abspath(p or os.curdir) for p in sys.path]
        actors = [
            remote_cls.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self._pg, placement_group_bundle_index=i
                ),
                **options,
            ).remote(driver_sys_path)
            for i in range(self.scaling.num_workers)
        ]
        self.actors = actors
        infos = self.run_on_all(
            "node_info", timeout_s=self.placement_timeout_s, what="worker start"
        )
        self._order_ranks(actors, infos)
        port = self.run_on_ranks([0], "free_port", timeout_s=60, what="rendezvous")[0]
        master_addr = self.infos[0]["node_ip"]
        refs = [
            actor.init_process_group.remote(
                self._rank_env(rank),
                master_addr,
                port,
                backend,
                pg_timeout_s,
                self.scaling.cpus_per_worker,
            )
            for rank, actor in enumerate(self.actors)
        ]
        self.wait(refs, timeout_s=min(pg_timeout_s, 300), what="init_process_group")

    def _reserve(self) -> Any:
        bundles = [self.scaling.bundle() for _ in range(self.scaling.num_workers)]
        total = ray.cluster_resources()
        for name, amount in bundles[0].items():
            if total.get(name, 0.0) < amount * self.scaling.num_workers:
                raise ResourcesUnavailable(
                    f"{_describe_request(self.scaling)}, but the cluster has "
                    f"{_format_resources(total)} in all. Ask for fewer workers or resources, "
                    "or add nodes that have them."
                )
        pg = placement_group(bundles, strategy="PACK")
        ready, _ = ray.wait([pg.ready()], timeout=self.placement_timeout_s)
        if not ready:
            remove_placement_group(pg)
            raise ResourcesUnavailable(
                f"{_describe_request(self.scaling)}; after {self.placement_timeout_s:.0f} s the "
                f"cluster still could not place them (free now: "
                f"{_format_resources(ray.available_resources())}; total: {_format_resources(total)}). "
                "Other jobs may hold the resources, or no single node fits one worker."
            )
        return pg

    def _order_ranks(self, actors: list[Any], infos: list[dict[str, Any]]) -> None:
        """Ranks go by node, then by GPU id. The driver's node comes first when it hosts
        workers, so rank 0, which writes checkpoints and logs, shares the driver's disk."""
        node_order: dict[str, int] = {}
        driver_node = ray.get_runtime_context().get_node_id()
        if any(info["node_id"] == driver_node for info in infos):
            node_order[driver_node] = 0
        for info in infos:
            node_order.setdefault(info["node_id"], len(node_order))
        order = sorted(
            range(len(actors)),
            key=lambda i: (
                node_order[infos[i]["node_id"]],
                [int(g) for g in infos[i]["gpu_ids"] if g.isdigit()],
                i,
            ),
        )
        self.actors = [actors[i] for i in order]
        self.infos = [infos[i] for i in order]
        per_node: dict[str, int] = {}
        for info in self.infos:
            info["local_rank"] = per_node.get(info["node_id"], 0)
            per_node[info["node_id"]] = info["local_rank"] + 1
            info["node_rank"] = node_order[info["node_id"]]
        for info in self.infos:
            info["local_world_size"] = per_node[info["node_id"]]

    def share_local_storage(self, root: str) -> list[int]:
        """Find the ranks whose node cannot see the driver's local ``root`` and route their
        local-path storage calls to the driver's node. Returns those ranks.

        Checked once per group, by a marker file the driver writes: a node that shares the
        driver's filesystem (NFS at the same path, or the driver's own node) sees it.
        """
        if self._storage_checked or storage.is_uri(root):
            return []
        marker = storage.join(root, f".raylight-probe-{uuid.uuid4().hex}")
        storage.write_bytes(marker, b"")
        try:
            seen = self.run_on_all("sees_path", marker, timeout_s=60, what="storage check")
        finally:
            storage.delete(marker)
        blind = [rank for rank, sees in enumerate(seen) if not sees]
        if blind:
            proxy_cls = ray.remote(storage.DriverNodeStorage)
            self._storage_proxy = proxy_cls.options(
                num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(
                    ray.get_runtime_context().get_node_id(), soft=False
                ),
            ).remote()
            self.run_on_ranks(blind, "route_storage", self._storage_proxy, timeout_s=60)
        self._storage_checked = True
        return blind

    def _rank_env(self, rank: int) -> dict[str, int]:
        info = self.infos[rank]
        return {
            "RANK": rank,
            "LOCAL_RANK": info["local_rank"],
            "WORLD_SIZE": len(self.actors),
            "NODE_RANK": info["node_rank"],
            "LOCAL_WORLD_SIZE": info["local_world_size"],
        }

    # ---- calls -----------------------------------------------------------------------------------
    def run_on_all(
        self, method: str, *args: Any, timeout_s: float | None = None, what: str = ""
    ) -> list[Any]:
        return self.run_on_ranks(
            range(len(self.actors)), method, *args, timeout_s=timeout_s, what=what
        )

    def run_on_ranks(
        self,
        ranks: Sequence[int],
        method: str,
        *args: Any,
        timeout_s: float | None = None,
        what: str = "",
    ) -> list[Any]:
        refs = [getattr(self.actors[r], method).remote(*args) for r in ranks]
        return self.wait(refs, timeout_s=timeout_s, what=what or method, ranks=list(ranks))

    def wait(
        self, refs: list[Any], timeout_s: float | None, what: str, ranks: list[int] | None = None
    ) -> list[Any]:
        """Results of ``refs`` in order; the first failure kills the group and raises."""
        ranks = ranks if ranks is not None else list(range(len(refs)))
        rank_of = {ref: rank for ref, rank in zip(refs, ranks, strict=True)}
        pending = list(refs)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                ready, pending = ray.wait(pending, num_returns=1, timeout=remaining)
            except BaseException:  # Ctrl-C: never leave ranks running on their own
                self.shutdown(force=True)
                raise
            if not ready:
                self.shutdown(force=True)
                raise TimeoutError(
                    f"{what} did not finish within {timeout_s:.0f} s on ranks "
                    f"{sorted(rank_of[r] for r in pending)}; the worker group was stopped."
                )
            try:
                ray.get(ready[0])
            except ray.exceptions.RayTaskError as error:
                self.shutdown(force=True)
                raise _user_error(error) from None
            except ray.exceptions.RayError as error:
                rank = rank_of[ready[0]]
                self.shutdown(force=True)
                raise WorkerFailure(self._death_message(rank, what, error), rank) from error
        return ray.get(list(refs))

    def _death_message(self, rank: int, what: str, error: Exception) -> str:
        info = self.infos[rank] if rank < len(self.infos) else {}
        where = f" (node {info.get('node_ip')}, pid {info.get('pid')})" if info else ""
        return (
            f"rank {rank}{where} died during {what}: {type(error).__name__}. The process "
            "exited or was killed (out of memory, a signal, os._exit) or its node was lost; "
            "the worker group was stopped."
        )

    # ---- teardown --------------------------------------------------------------------------------
    def shutdown(self, force: bool = False) -> None:
        if not force and self.actors:
            refs = [actor.shutdown.remote() for actor in self.actors]
            ray.wait(refs, num_returns=len(refs), timeout=10)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self._storage_proxy is not None:
            ray.kill(self._storage_proxy, no_restart=True)
            self._storage_proxy = None
        self._storage_checked = False
        if self._pg is not None:
            remove_placement_group(self._pg)
        self._pg = None


def _user_error(error: Any) -> BaseException:
    """The exception user code raised on a rank, carrying the rank's note and traceback."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return cause
    return RuntimeError(str(error))
