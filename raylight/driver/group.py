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
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

from raylight.driver.controller import StalledRank, WorkerFailure, collective_broke
from raylight.driver.placement import (
    ResourcesUnavailable,
    autoscaler_ceiling,
    autoscaler_running,
    describe_request,
    fitting_workers,
    format_resources,
    never_fits,
    rank_order,
    release_leaked_bundles,
)
from raylight.rank import watchdog
from raylight.rank.worker import Worker
from raylight.shared import shipping, storage
from raylight.shared.config import MisconfigurationException, Scaling


class WorkerGroup:
    worker_cls = Worker

    def __init__(self, scaling: Scaling, placement_timeout_s: float) -> None:
        self.scaling = scaling
        self.placement_timeout_s = placement_timeout_s
        self.version_warnings: set[str] = set()  # the Trainer's, so a restart does not repeat
        self._pg: Any = None
        self.actors: list[Any] = []  # indexed by rank
        self.infos: list[dict[str, Any]] = []
        self.size = scaling.num_workers  # the world size; elastic groups settle it in _reserve
        self.expected_size = 0  # elastic: the size to try first (0: judge by free resources)
        self.removed_pgs: list[Any] = []
        self.trial_pg: Any = None  # a Tune trial's placement group, which Tune owns
        self._first_bundle = 0
        self._storage_proxy: Any = None
        self._storage_checked = False
        self.board: Any = None  # the Trainer's shared.board.RunBoard: stall reports arrive there
        self.exception_saves = False  # ranks may write OnExceptionCheckpoint pieces (FSDP)
        self.held_here: dict[str, float] = {}  # what this process's other Trainers hold
        self._timeout_s = 1800.0  # the process-group timeout: the watch's outer bound
        self._next_health_check = 0.0
        self._health_ref: Any = None  # the board's answer, asked for and not yet read

    # ---- start ---------------------------------------------------------------------------------
    def start(self, backend: str, pg_timeout_s: float, env_vars: dict[str, str]) -> None:
        if self.trial_pg is not None:  # inside a Tune trial: its bundles 1.. are ours
            self._pg, self._first_bundle = self._check_trial_bundles(self.trial_pg), 1
        else:
            self._pg, self._first_bundle = self._reserve(), 0
        remote_cls = ray.remote(self.worker_cls)
        bundle = self.scaling.bundle()
        options = {
            "num_cpus": bundle.get("CPU", 1.0),
            "num_gpus": bundle.get("GPU", 0.0),
            "resources": {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")},
            "runtime_env": {"env_vars": env_vars} if env_vars else None,
        }
        driver_sys_path = [os.path.abspath(p or os.curdir) for p in sys.path]
        bundle_nodes = ray.util.placement_group_table(self._pg)["bundles_to_node_id"]
        first = self._first_bundle
        order = rank_order([bundle_nodes[first + i] for i in range(self.size)])
        rank_of_worker = {worker: rank for rank, worker in enumerate(order)}
        actors = [
            remote_cls.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self._pg, placement_group_bundle_index=first + i
                ),
                **options,
            ).remote(driver_sys_path, rank_of_worker[i])
            for i in range(self.size)
        ]
        self.actors = actors
        infos = self.run_on_all(
            Worker.node_info, timeout_s=self.placement_timeout_s, what="worker start"
        )
        self._order_ranks(actors, infos)
        _warn_on_version_mismatch(infos, self.version_warnings)
        self._timeout_s = pg_timeout_s
        # A group on one node rendezvous over loopback; across nodes, on rank 0's address.
        one_node = len({info["node_id"] for info in self.infos}) == 1
        master_addr = "127.0.0.1" if one_node else self.infos[0]["node_ip"]
        port = self.run_on_ranks(
            [0], Worker.open_rendezvous, master_addr, timeout_s=60, what="rendezvous"
        )[0]
        refs = [
            actor.init_process_group.remote(
                self._rank_env(rank),
                master_addr,
                port,
                backend,
                pg_timeout_s,
                self.scaling.cpus_per_worker,
                self.board,
            )
            for rank, actor in enumerate(self.actors)
        ]
        self.wait(refs, timeout_s=min(pg_timeout_s, 300), what="init_process_group")

    def _check_trial_bundles(self, pg: Any) -> Any:
        """The trial's reservation must hold this Trainer's workers: one bundle for the
        trial's driver, then one per worker with at least a worker's resources."""
        workers = pg.bundle_specs[1:]
        need = self.scaling.bundle()
        fits = all(b.get(k, 0.0) >= v for b in workers for k, v in need.items())
        if len(workers) != self.scaling.num_workers or not fits or self.scaling.elastic:
            raise MisconfigurationException(
                f"{describe_request(self.scaling)}, but the Tune trial reserved "
                f"{pg.bundle_specs} (its driver, then its workers): give the trainable "
                f"resources(num_workers={self.scaling.num_workers}, ...) from raylight.tune "
                "with the Trainer's own scaling flags."
            )
        self.size = self.scaling.num_workers
        return pg

    def _reserve(self) -> Any:
        """A placement group for the workers. An elastic group takes as many as fit now, up
        to its max, and waits (within the placement timeout) only for its min."""
        scaling, bundle = self.scaling, self.scaling.bundle()
        smallest = scaling.min_workers if scaling.elastic else scaling.num_workers
        total = ray.cluster_resources()
        ceiling = autoscaler_ceiling()
        autoscaling = bool(ceiling) or autoscaler_running()
        if never_fits(bundle, smallest, total, ceiling, autoscaling):
            can_grow = f", and its autoscaler can grow it to {format_resources(ceiling)}"
            raise ResourcesUnavailable(
                f"{describe_request(scaling)}, but the cluster has "
                f"{format_resources(total)} in all{can_grow if ceiling else ''}. Ask for "
                "fewer workers or resources, or add nodes that have them."
            )
        release_leaked_bundles(self.removed_pgs)
        size = scaling.num_workers
        if scaling.elastic:
            # The free-resource view lags a removed group by a moment: a caller that just
            # freed its own workers says how many it expects to fit.
            fits = self.expected_size or fitting_workers(bundle, ray.available_resources())
            size = max(smallest, min(size, fits))
        deadline = time.monotonic() + self.placement_timeout_s
        while True:
            pg = placement_group([bundle] * size, strategy="PACK")
            remaining = max(0.0, deadline - time.monotonic())
            # Larger than the minimum: a short try, then one worker fewer.
            wait_s = remaining if size == smallest else min(remaining, 3.0)
            ready, _ = ray.wait([pg.ready()], timeout=wait_s)
            if ready:
                self.size = size
                return pg
            self._remove(pg)
            if size == smallest:
                raise ResourcesUnavailable(self._unplaceable(total, autoscaling))
            size -= 1

    def _unplaceable(self, total: dict[str, float], autoscaling: bool) -> str:
        """Why the bounded wait for a placement ended: needed, free, and who holds the rest."""
        free = ray.available_resources()
        bundle = self.scaling.bundle()
        held_here = {k: v for k, v in self.held_here.items() if k in bundle}
        busy = {
            k: max(0.0, total.get(k, 0.0) - free.get(k, 0.0) - held_here.get(k, 0.0))
            for k in bundle
        }
        holders = []
        if held_here:
            holders.append(
                f"{format_resources(held_here)} by this script's other Trainers, which are running"
            )
        if any(busy.values()):
            holders.append(f"{format_resources(busy)} by other jobs or tasks on the cluster")
        held = f" Held: {'; '.join(holders)}." if holders else ""
        hint = (
            " Or the cluster's autoscaler has not added nodes for them: it may not be able to "
            "(`ray status` on the head shows its node types and what it could not place), or "
            "they boot slower than the wait (a larger Trainer(placement_timeout_s=...) waits "
            "longer)."
            if autoscaling
            else ""
        )
        return (
            f"{describe_request(self.scaling)}; after {self.placement_timeout_s:.0f} s the "
            f"cluster still could not place them. It has {format_resources(total)} in all, "
            f"{format_resources(free)} free.{held} Wait for them to finish, ask for fewer "
            f"workers or resources, or add nodes (one node must fit a whole worker).{hint}"
        )

    def _remove(self, pg: Any) -> None:
        remove_placement_group(pg)
        self.removed_pgs.append(pg)

    def could_grow_to(self) -> int:
        """The world size this group could have now, counting the free resources."""
        release_leaked_bundles(self.removed_pgs)
        free = fitting_workers(self.scaling.bundle(), ray.available_resources())
        return min(self.scaling.num_workers, self.size + free)

    def _order_ranks(self, actors: list[Any], infos: list[dict[str, Any]]) -> None:
        """Put the actors in rank order (see ``rank_order``) and note each one's place."""
        order = rank_order([info["node_id"] for info in infos])
        self.actors = [actors[i] for i in order]
        self.infos = [infos[i] for i in order]
        node_order: dict[str, int] = {}
        per_node: dict[str, int] = {}
        for info in self.infos:
            info["node_rank"] = node_order.setdefault(info["node_id"], len(node_order))
            info["local_rank"] = per_node.get(info["node_id"], 0)
            per_node[info["node_id"]] = info["local_rank"] + 1
        for info in self.infos:
            info["local_world_size"] = per_node[info["node_id"]]

    def share_local_storage(self, root: str, folders: list[str], files: list[str]) -> list[int]:
        """Find the ranks whose node cannot see the driver's local ``root`` and route their
        local-path storage calls to the driver's node, which serves ``folders`` (read and
        write) and ``files`` (read) only. Returns those ranks.

        Checked once per group, by a marker file the driver writes: a node that shares the
        driver's filesystem (NFS at the same path, or the driver's own node) sees it.
        """
        if self._storage_proxy is not None:  # a later call of the Trainer: its own folders
            ray.get(self._storage_proxy.allow.remote(folders, files), timeout=60)
        if self._storage_checked or storage.is_uri(root):
            return []
        marker = storage.join(root, f".raylight-probe-{uuid.uuid4().hex}")
        storage.write_bytes(marker, b"")
        try:
            seen = self.run_on_all(Worker.sees_path, marker, timeout_s=60, what="storage check")
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
            ).remote(folders, files)
            self.run_on_ranks(blind, Worker.route_storage, self._storage_proxy, timeout_s=60)
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
            # torchrun's name for the number of nodes (its worker groups)
            "GROUP_WORLD_SIZE": len({other["node_rank"] for other in self.infos}),
        }

    # ---- the driver's calls: each runs the Worker method of the same name on every rank ------
    def setup(self, job_ref: Any, stage: str) -> list[str]:
        """Ship one Trainer call's objects; rank 0's notices come back."""
        return self.run_on_all(Worker.setup, job_ref, what=f"{stage} setup")[0]

    def fit_start(self, sanity_check: bool) -> dict[str, Any]:
        return self.run_on_all(Worker.fit_start, sanity_check)[0]

    def train_epoch(self, epoch: int, on_tick: Callable[[], None]) -> dict[str, Any]:
        """Rank 0's summary of epoch ``epoch``; ``on_tick`` runs while the ranks train."""
        return self.run_on_all(Worker.train_epoch, epoch, what=f"epoch {epoch}", on_tick=on_tick)[0]

    def fit_end(self) -> dict[str, Any]:
        """Rank 0's final state: weights and callbacks."""
        return self.run_on_all(Worker.fit_end, what="fit end")[0]

    def evaluate(self, stage: str) -> list[dict[str, float]]:
        return self.run_on_all(Worker.evaluate, stage, what=stage)[0]

    def predict(self) -> list[list[Any]]:
        """Each rank's predictions, per dataloader."""
        return self.run_on_all(Worker.predict, what="predict")

    def metrics(self) -> dict[str, Any]:
        return self.run_on_ranks([0], Worker.metrics)[0]

    def profile(self) -> list[dict[str, list[float]]]:
        """Every rank's hook timings, in rank order (Trainer(profiler="simple"))."""
        return self.run_on_all(Worker.profile, what="profile")

    def save_checkpoint(self, path: str, weights_only: bool, what: str) -> None:
        self.run_on_all(Worker.save_checkpoint, path, weights_only, what=what)

    def flush_checkpoints(self) -> None:
        """Wait until rank 0's checkpoints are committed, so the index names them."""
        self.run_on_ranks([0], Worker.flush_checkpoints, timeout_s=600, what="checkpoint")

    def run_on_all(
        self,
        method: Callable[..., Any],
        *args: Any,
        timeout_s: float | None = None,
        what: str = "",
        on_tick: Callable[[], None] | None = None,
    ) -> list[Any]:
        """``method`` (a ``Worker`` method) on every rank, in rank order."""
        name = method.__name__
        refs = [getattr(actor, name).remote(*args) for actor in self.actors]
        return self.wait(refs, timeout_s=timeout_s, what=what or name, on_tick=on_tick)

    def run_on_ranks(
        self,
        ranks: Sequence[int],
        method: Callable[..., Any],
        *args: Any,
        timeout_s: float | None = None,
        what: str = "",
    ) -> list[Any]:
        name = method.__name__
        refs = [getattr(self.actors[r], name).remote(*args) for r in ranks]
        return self.wait(refs, timeout_s=timeout_s, what=what or name, ranks=list(ranks))

    def wait(
        self,
        refs: list[Any],
        timeout_s: float | None,
        what: str,
        ranks: list[int] | None = None,
        on_tick: Callable[[], None] | None = None,
    ) -> list[Any]:
        """Results of ``refs`` in order; the first failure kills the group and raises."""
        ranks = ranks if ranks is not None else list(range(len(refs)))
        rank_of = {ref: rank for ref, rank in zip(refs, ranks, strict=True)}
        pending = list(refs)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            # In slices: Python runs signal handlers (Ctrl-C, SIGTERM) only between them.
            wait_s = _SIGNAL_SLICE_S if remaining is None else min(remaining, _SIGNAL_SLICE_S)
            try:
                ready, pending = ray.wait(pending, num_returns=1, timeout=wait_s)
            except BaseException:  # Ctrl-C: never leave ranks running on their own
                self.shutdown(force=True)
                raise
            if not ready and (deadline is None or time.monotonic() < deadline):
                self._check_health(what)
                if on_tick is not None:
                    on_tick()  # e.g. move the progress bar
                continue
            if not ready:
                self.shutdown(force=True)
                raise TimeoutError(
                    f"{what} did not finish within {timeout_s:.0f} s on ranks "
                    f"{sorted(rank_of[r] for r in pending)}; the worker group was stopped."
                )
            try:
                ray.get(ready[0])
            except ray.exceptions.RayTaskError as error:
                failure = self._lost_peer(error, rank_of[ready[0]], pending, rank_of, what)
                note = None if failure else self._await_exception_saves(pending, rank_of)
                self.shutdown(force=True)
                if failure is not None:
                    raise failure from error
                user_error = _user_error(error)
                if note is not None:
                    user_error.add_note(note)
                raise user_error from None
            except ray.exceptions.RayError as error:
                rank = rank_of[ready[0]]
                self.shutdown(force=True)
                raise WorkerFailure(self._death_message(rank, what, error), rank) from error
        return ray.get(list(refs))

    def _check_health(self, what: str) -> None:
        """About once a second while waiting: stop the group and raise when a rank reported
        a stall or its heartbeat went silent (the bounds are ``watchdog``'s). Never blocks:
        the board's answer is asked for once and read on a later tick."""
        if self.board is None:
            return
        if self._health_ref is None:
            if time.monotonic() >= self._next_health_check:
                self._health_ref = self.board.health.remote()
            return
        ready, _ = ray.wait([self._health_ref], timeout=0)
        if not ready:
            return  # the board is busy or still starting: read it on a later tick
        ref, self._health_ref = self._health_ref, None
        self._next_health_check = time.monotonic() + _HEALTH_EVERY_S
        try:
            health = ray.get(ref, timeout=_HEALTH_EVERY_S)
        except ray.exceptions.RayError:
            return  # the board is gone: Ray's own reports of the ranks decide
        failure = _unhealthy(health, what, self._timeout_s, len(self.actors))
        if failure is not None:
            self.shutdown(force=True)
            raise failure

    def _await_exception_saves(self, pending: list[Any], rank_of: dict[Any, int]) -> str | None:
        """OnExceptionCheckpoint under FSDP: each rank that raises writes its own piece before
        its call ends. The ranks that say so on the board within a few seconds of the first
        error get until their calls end (at most the process-group timeout); the others may be
        blocked in a collective that never ends, and are stopped with the group. Returns a
        note for the error when the pieces did not make a complete checkpoint."""
        if not self.exception_saves or self.board is None:
            return None
        started = time.monotonic()
        saves: dict[int, Any] = {}
        while True:
            announcing = time.monotonic() - started < _PEER_DEATH_GRACE_S
            waiting = any(rank_of[r] in saves for r in pending)
            done = not pending or (not announcing and not waiting)
            done = done or time.monotonic() - started >= self._timeout_s
            try:  # the last read takes the reports off the board
                saves = ray.get(self.board.exception_saves.remote(done), timeout=_HEALTH_EVERY_S)
            except ray.exceptions.RayError:
                return None  # the board is gone or busy: stop the group now
            if done:
                break
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=_SIGNAL_SLICE_S)
        written = {rank: save for rank, save in saves.items() if save is not None}
        if not written or any(save["lacking"] is None for save in written.values()):
            return None
        last = written[max(written)]
        return (
            f"OnExceptionCheckpoint: rank(s) {sorted(written)} wrote their pieces of "
            f"{last['path']}, but {last['lacking']}, so it is incomplete and is never read as "
            "a checkpoint (under FSDP every rank must raise for it to complete). Resume from "
            "the run's last ModelCheckpoint instead."
        )

    def _lost_peer(
        self, error: Any, rank: int, pending: list[Any], rank_of: dict[Any, int], what: str
    ) -> WorkerFailure | None:
        """A rank whose collective broke because a peer died reports first, often before
        Ray reports the death: look briefly for the dead rank and blame it."""
        cause = _user_error(error)
        if not collective_broke(cause):
            return None
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=_PEER_DEATH_GRACE_S)
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as death:
                return WorkerFailure(self._death_message(rank_of[ref], what, death), rank_of[ref])
            except ray.exceptions.RayError:
                continue
        return WorkerFailure(
            f"rank {rank}'s collective broke during {what} "
            f"({str(cause).strip().splitlines()[0][:200]}): a peer rank was lost or stopped "
            "answering; the worker group was stopped.",
            rank,
        )

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
        if self._pg is not None and self._pg is not self.trial_pg:
            self._remove(self._pg)
        self._pg = None
        self._health_ref = None


_SIGNAL_SLICE_S = 0.25  # also how often a progress bar moves
_HEALTH_EVERY_S = 1.0  # how often the driver reads the board's stall reports while it waits
_PEER_DEATH_GRACE_S = 3.0  # how long Ray may take to report the death behind a broken collective


def _warn_on_version_mismatch(infos: list[dict[str, Any]], warned: set[str]) -> None:
    """Warn about each node whose packages differ, once per line in ``warned``."""
    nodes = {info["node_ip"]: info["versions"] for info in infos}
    lines = shipping.version_mismatches(shipping.versions(), nodes)
    fresh = [line for line in lines if line not in warned]
    if fresh:
        warned.update(fresh)
        warnings.warn(
            "the cluster runs other package versions than this driver: "
            + "; ".join(fresh)
            + ". Checkpoints and pickled modules may not load across them: install the "
            "driver's versions on the cluster (cluster.yaml's setup_commands) or match the "
            "driver to the cluster.",
            stacklevel=2,
        )


def _unhealthy(
    health: dict[str, Any], what: str, timeout_s: float, size: int
) -> StalledRank | None:
    """The failure a board's ``health`` reports during the call ``what``, if any."""
    if health["stalls"]:
        report = health["stalls"][0]
        return StalledRank(watchdog.describe(report, what, timeout_s), report["rank"])
    silent_limit = timeout_s + 2 * watchdog.HEARTBEAT_S
    for rank, silent_s in sorted(health["silent_s"].items()):
        if rank < size and silent_s > silent_limit:
            return StalledRank(
                f"rank {rank} stopped answering during {what}: no heartbeat for "
                f"{silent_s:.0f} s (process_group_timeout_s={timeout_s:.0f}). Its process is "
                "frozen, or a C call holds Python's lock. The worker group was stopped.",
                rank,
            )
    return None


def _user_error(error: Any) -> BaseException:
    """The exception user code raised on a rank, carrying the rank's note and traceback."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return cause
    return RuntimeError(str(error))
