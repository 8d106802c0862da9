"""A real multi-node Ray cluster on one machine: a head plus worker nodes, each its own
``ray start --block`` process tree, each with its own resources and a label.

    python launch/local_cluster.py --nodes 2 --cpus-per-node 2

prints the ``RAY_ADDRESS`` to export, then keeps the cluster up until Ctrl-C, which stops
every process it started. Fault-tolerance experiments kill one node with
``kill -9 -- -PGID`` (each node runs in its own process group, printed at start). The
tests use the same class: it can kill single nodes, add them back, and start a node in a
private mount namespace with folders hidden behind an empty tmpfs, which then sees a
filesystem other than the driver's, as a separate machine without shared storage does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import ray

TOKEN_ENV = {"RAY_AUTH_MODE": "token"}  # joiners must opt in; the head made ~/.ray/auth_token


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def can_hide_paths() -> bool:
    """Private mount namespaces need root and unshare(1)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=10)
    return probe.returncode == 0


class LocalCluster:
    """Nodes are started with ``start_new_session``, so each one is a process group that
    ``kill_node`` and ``shutdown`` end without touching any other Ray on the machine."""

    def __init__(self) -> None:
        # Short: Ray's socket paths under it must fit in 107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="rl-", dir="/tmp")
        self.port = _free_port()
        self.address = ""
        self.nodes: list[subprocess.Popen] = []
        self.killed: list[subprocess.Popen] = []

    def env(self) -> dict[str, str]:
        """The environment of a driver process that joins this cluster."""
        return {**os.environ, **TOKEN_ENV, "RAY_ADDRESS": self.address}

    def start_head(self, num_cpus: int) -> None:
        self._start(
            [
                "--head",
                f"--port={self.port}",
                f"--num-cpus={num_cpus}",
                "--include-dashboard=false",
                f"--temp-dir={self.temp_dir}",
            ],
            hide=(),
            env={},
        )
        self.address = f"{ray.util.get_node_ip_address()}:{self.port}"
        self._wait_for_nodes(1)

    def add_node(
        self,
        num_cpus: int,
        resources: dict[str, float] | None = None,
        hide: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        node_ip: str | None = None,
    ) -> subprocess.Popen:
        """A worker node; ``env`` reaches the processes of its workers. A ``node_ip`` other
        than the head's (127.0.0.2, say) makes it look like another machine to Ray."""
        args = [f"--address={self.address}", f"--num-cpus={num_cpus}"]
        if node_ip:
            args.append(f"--node-ip-address={node_ip}")
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        node = self._start(args, hide, env or {})
        self._wait_for_nodes(len(self._alive()))
        return node

    def _start(
        self, args: list[str], hide: tuple[str, ...], env: dict[str, str]
    ) -> subprocess.Popen:
        command = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--block",
            "--disable-usage-stats",
            *args,
        ]
        if hide:
            mounts = " && ".join(f"mount -t tmpfs none {path}" for path in hide)
            command = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                       f'{mounts} && exec "$@"', "sh", *command]  # fmt: skip
        log = open(os.path.join(self.temp_dir, f"node-{len(self.nodes)}.log"), "wb")
        node = subprocess.Popen(
            command,
            env={**os.environ, **TOKEN_ENV, **env},
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        self.nodes.append(node)
        return node

    def _wait_for_nodes(self, count: int, timeout_s: float = 60) -> None:
        script = "import ray; ray.init(); print('ALIVE', sum(n['Alive'] for n in ray.nodes()))"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [n.args for n in self._alive() if n.poll() is not None]
            assert not dead, f"a Ray node exited while starting; logs in {self.temp_dir}"
            result = subprocess.run(
                [sys.executable, "-c", script], env=self.env(), capture_output=True, text=True
            )
            # Ray may print its own notes to stdout too: read the one line this script wrote.
            alive = re.findall(r"^ALIVE (\d+)$", result.stdout, flags=re.MULTILINE)
            if result.returncode == 0 and alive and int(alive[-1]) >= count:
                return
            time.sleep(1)
        raise TimeoutError(f"{count} Ray nodes did not come up in {timeout_s} s: {self.temp_dir}")

    def _alive(self) -> list[subprocess.Popen]:
        return [n for n in self.nodes if n not in self.killed]

    def kill_node(self, node: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """Kill one node's whole process tree (its raylet and its workers)."""
        self.killed.append(node)
        try:
            os.killpg(node.pid, sig)
        except ProcessLookupError:
            pass
        node.wait(timeout=30)

    def shutdown(self) -> None:
        for node in reversed(self.nodes):
            try:
                os.killpg(node.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + 5
        for node in self.nodes:
            try:
                node.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(node.pid, signal.SIGKILL)  # whatever ignored SIGTERM
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2, help="worker nodes besides the head")
    parser.add_argument("--cpus-per-node", type=int, default=2)
    parser.add_argument("--head-cpus", type=int, default=0, help="the head runs no workers")
    args = parser.parse_args()
    cluster = LocalCluster()

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # `kill` and `timeout` stop it cleanly too
    try:
        cluster.start_head(num_cpus=args.head_cpus)
        for index in range(args.nodes):
            label = f"node_{index + 1}"
            node = cluster.add_node(num_cpus=args.cpus_per_node, resources={label: 1})
            print(f"{label}: {args.cpus_per_node} CPUs, process group {node.pid}", flush=True)
        print(f"export RAY_ADDRESS={cluster.address} RAY_AUTH_MODE=token", flush=True)
        print("Ctrl-C stops the cluster.", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
