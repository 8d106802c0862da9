"""The README's cluster section, end to end: ray up, ray submit, ray job submit, ray down.

The cluster is the shipped ``cluster.yaml`` (head_ip 127.0.0.1), reached over a real OpenSSH
server on loopback (``ssh_host.py``). The one override is the SSH key: a copy of the file whose
``auth.ssh_private_key`` names a throwaway key (ssh expands ``~`` from the password database,
not from ``HOME``). The commands run from the repository root with ``HOME`` set to a fresh
folder, where the README's first step writes ``~/.ray/auth_token``.

Slow (a minute or more) and alone on the machine, so not in the default suite: ``.ci/run``
runs it as its own step, ``python -m pytest -m cluster_launch``.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mnist_data import write_mnist
from ssh_host import LoopbackSSHHost, missing_prerequisites

pytestmark = [
    pytest.mark.cluster_launch,
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.timeout(1800),
]

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
HEAD = "127.0.0.1"
# The head's fixed ports: GCS, dashboard, and the dashboard agent that runs submitted jobs.
# The node shares this machine's network, so another Ray here must not hold them.
RAY_PORTS = (6379, 8265, 52365)
ACCURACY = re.compile(r"test accuracy: (\d\.\d+)")


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    missing = missing_prerequisites(RAY_PORTS)
    if missing:
        pytest.fail(
            "the cluster-launch test needs " + ", ".join(missing) + "; `.ci/run` installs "
            "openssh-server and rsync (apt), runs it as root, and runs it alone: any other Ray "
            "on this machine takes the ports a head node listens on",
            pytrace=False,
        )
    host = LoopbackSSHHost(tmp_path_factory.mktemp("node"))
    host.start()
    yield host
    host.stop()


@pytest.fixture
def config(node, tmp_path) -> str:
    """cluster.yaml with the throwaway key; nothing else differs."""
    settings = yaml.safe_load((REPO / "cluster.yaml").read_text())
    settings["auth"]["ssh_private_key"] = str(node.client_key)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(settings))
    return str(path)


@pytest.fixture
def user_env(tmp_path):
    """A user's environment, with a home of its own holding the cluster's Ray token."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_AUTH_MODE="token")
    _run([RAY, "get-auth-token", "--generate"], env, timeout_s=60)  # the README's first step
    assert (home / ".ray" / "auth_token").read_text().strip()
    return env


def _attempt(command: list[str], env: dict[str, str], timeout_s: float) -> tuple[int, str]:
    """Run a user's command from the repository root: its exit status and output."""
    try:
        done = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(
            f"`{' '.join(command)}` ran over {timeout_s} s:\n{error.stdout}\n{error.stderr}"
        )
    return done.returncode, done.stdout + done.stderr


def _run(command: list[str], env: dict[str, str], timeout_s: float) -> str:
    """A user's command that must succeed: its output, or a failure showing it."""
    status, output = _attempt(command, env, timeout_s)
    assert status == 0, f"`{' '.join(command)}` exited {status}:\n{output}"
    return output


def _submit_job(config: str, entrypoint: list[str], env: dict[str, str], attempts=6) -> str:
    """``ray job submit``; the head's job agent registers some seconds after ``ray up``
    returns, and until then Ray answers "No available agent ... try again later"."""
    command = [RAY, "job", "submit", "--address", f"http://{HEAD}:8265", "--working-dir", "."]
    for attempt in range(attempts):
        status, output = _attempt([*command, "--", *entrypoint], env, timeout_s=600)
        if "No available agent" not in output or attempt == attempts - 1:
            break
        time.sleep(10)
    if status and "No available agent" in output:
        output += _head_log(config, "dashboard_agent.log", env)
    assert status == 0, f"`ray job submit` exited {status}:\n{output}"
    return output


def _head_log(config: str, name: str, env: dict[str, str]) -> str:
    """The end of one of the head node's Ray logs, for a failure message."""
    command = [RAY, "exec", config, f"tail -n 40 /tmp/ray/session_latest/logs/{name}"]
    _, shown = _attempt(command, env, timeout_s=120)
    return f"\n--- the head's {name} ---\n{shown[-6000:]}"


def _ray_sessions_on_head(config: str, env: dict[str, str]) -> int:
    """How many Ray instances have run on the head (one session folder each)."""
    listed = _run([RAY, "exec", config, "ls /tmp/ray | grep -c '^session_2'"], env, 120)
    counts = [line.strip() for line in listed.splitlines() if line.strip().isdigit()]
    assert len(counts) == 1, listed
    return int(counts[0])


def _accuracy(output: str) -> float:
    found = ACCURACY.findall(output)
    assert found, f"the example printed no test accuracy:\n{output}"
    return float(found[-1])


def test_ray_up_submit_job_submit_and_down_on_cluster_yaml(config, user_env, node, tmp_path):
    write_mnist(tmp_path / "mnist", n_train=1200, n_test=200)
    data = str(tmp_path / "mnist")
    example = ["--num-workers", "2", "--max-epochs", "1", "--data-dir", data]
    try:
        _run([RAY, "up", "-y", config], user_env, timeout_s=900)
        # The token reached the node readable by its owner only (cluster.yaml's chmod).
        token = node.home / ".ray" / "auth_token"
        assert stat.S_IMODE(token.stat().st_mode) == 0o600, oct(token.stat().st_mode)

        submitted = _run(
            [RAY, "submit", config, "examples/mnist.py", "--", *example],
            user_env,
            timeout_s=600,
        )
        assert _accuracy(submitted) > 0.3  # learnable data: chance is 0.1
        # The script joined the cluster `ray up` started instead of starting a second Ray.
        assert _ray_sessions_on_head(config, user_env) == 1

        job = _submit_job(config, ["python", "examples/mnist.py", *example], user_env)
        assert _accuracy(job) > 0.3
        assert "succeeded" in job.lower(), job
        assert _ray_sessions_on_head(config, user_env) == 1  # the job joined it too

        # More workers than the cluster holds. Its autoscaler (`ray up` runs one) might add
        # nodes, and Ray does not publish what it could add: a bounded wait (the Trainer's
        # placement_timeout_s, 60 s), then an error naming the autoscaler, not a hang.
        status, refused = _attempt(
            [RAY, "submit", config, "examples/mnist.py", "--", *example, "--num-workers", "64"],
            user_env,
            timeout_s=300,
        )
        assert status != 0, refused
        assert "ResourcesUnavailable" in refused and "per worker x 64" in refused, refused
        assert "after 60 s" in refused and "autoscaler has not added nodes" in refused, refused
    finally:
        down_status, down = _attempt([RAY, "down", "-y", config], user_env, timeout_s=300)
    assert down_status == 0, down
