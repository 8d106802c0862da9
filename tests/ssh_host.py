"""An OpenSSH server on 127.0.0.1:22 that stands in for a fresh cluster machine.

The cluster launcher's commands (``ray stop`` first of all) act on every Ray process of the
login user, and its setup commands install into the node's Python. So the sessions this server
starts run in their own PID and mount namespaces:

- ``ray stop`` there sees only the processes started through this server;
- ``/tmp/ray`` is an empty tmpfs, so the node's Ray session files are its own;
- the login's home is an empty folder (whose ``.bashrc`` puts this interpreter on ``PATH``,
  as a node's image would), so ``~/src/raylight`` and ``~/.ray`` are the node's own;
- this interpreter's prefix is an overlay, so ``pip install`` on the node changes nothing here.

Everything else (the network, the rest of the filesystem) is this machine's. Needs root,
``unshare`` and ``sshd`` (Debian: ``apt-get install openssh-server rsync``).
"""

from __future__ import annotations

import getpass
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PORT = 22  # the cluster launcher has no SSH port setting


def missing_prerequisites(ports: tuple[int, ...] = ()) -> list[str]:
    """What this machine lacks to run the server, and services on ``ports`` on its network
    (this machine's); empty when it has everything."""
    missing = [
        tool for tool in ("sshd", "ssh", "ssh-keygen", "rsync", "unshare") if not _which(tool)
    ]
    if os.geteuid() != 0:
        missing.append("root (namespaces and mounts)")
    for port in (PORT, *ports):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                missing.append(f"a free port {port} on 127.0.0.1")
    return missing


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


class LoopbackSSHHost:
    """Start with ``start()``, end with ``stop()``; the client key is ``client_key``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.home = folder / "node-home"  # the login's home on the "node"
        self.client_key = folder / "id_ed25519"
        self.user = getpass.getuser()
        self._process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 20.0) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write_keys()
        self._write_home()
        config = self._write_sshd_config()
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
        subprocess.run([_which("sshd"), "-t", "-f", str(config)], check=True)
        script = self.folder / "node.sh"
        script.write_text(self._namespace_script(config))
        log = open(self.folder / "sshd.log", "wb")  # noqa: SIM115 - the server's lifetime
        self._process = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--propagation",
             "private", "sh", str(script)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while not self._accepts():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sshd did not come up:\n{self.log()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """End the server and, with its namespace's first process, everything it started."""
        if self._process is None:
            return
        if self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(timeout=30)
        self._process = None

    def log(self) -> str:
        path = self.folder / "sshd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _accepts(self) -> bool:
        with socket.socket() as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(("127.0.0.1", PORT))
                return probe.recv(4).startswith(b"SSH")
            except OSError:
                return False

    def _write_keys(self) -> None:
        for key in (self.folder / "host_ed25519", self.client_key):
            if not key.exists():
                subprocess.run(
                    ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True
                )
        public = self.client_key.with_suffix(".pub").read_text()
        (self.folder / "authorized_keys").write_text(public)

    def _write_home(self) -> None:
        self.home.mkdir(mode=0o700, exist_ok=True)
        lines = [f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH"]
        # The node is this machine: the same package index settings as here.
        lines += [
            f"export {k}={shlex.quote(v)}" for k, v in os.environ.items() if k.startswith("PIP_")
        ]
        (self.home / ".bashrc").write_text("\n".join(lines) + "\n")
        pip_config = Path.home() / ".config" / "pip"
        if pip_config.is_dir():
            shutil.copytree(pip_config, self.home / ".config" / "pip", dirs_exist_ok=True)

    def _write_sshd_config(self) -> Path:
        config = self.folder / "sshd_config"
        config.write_text(
            f"ListenAddress 127.0.0.1\nPort {PORT}\n"
            f"HostKey {self.folder / 'host_ed25519'}\n"
            f"AuthorizedKeysFile {self.folder / 'authorized_keys'}\n"
            f"PidFile {self.folder / 'sshd.pid'}\n"
            f"AllowUsers {self.user}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "Subsystem sftp internal-sftp\n"
        )
        return config

    def _namespace_script(self, config: Path) -> str:
        """Runs as the new namespaces' first process; ends by becoming sshd."""
        prefix = Path(sys.prefix).resolve()
        real_home = Path.home().resolve()
        overlay = self.folder / "prefix-overlay"
        for part in ("upper", "work", "merged"):
            (overlay / part).mkdir(parents=True, exist_ok=True)
        q = shlex.quote
        steps = [
            "set -eu",
            "mkdir -p /tmp/ray",
            "mount -t tmpfs tmpfs /tmp/ray",
            f"mount -t overlay overlay -o lowerdir={q(str(prefix))},upperdir={q(str(overlay / 'upper'))},"
            f"workdir={q(str(overlay / 'work'))} {q(str(overlay / 'merged'))}",
        ]
        if prefix.is_relative_to(real_home):  # the prefix must stay visible under the new home
            (self.home / prefix.relative_to(real_home)).mkdir(parents=True, exist_ok=True)
        steps += [
            f"mount --bind {q(str(self.home))} {q(str(real_home))}",
            f"mount --bind {q(str(overlay / 'merged'))} {q(str(prefix))}",
            f"exec {q(_which('sshd'))} -D -e -f {q(str(config))}",
        ]
        return "\n".join(steps) + "\n"
