"""Hosts for ssh tests: network namespaces, each with a real OpenSSH server.

`SSHHosts(n, folder)` makes, when started (root only, Linux):

- a bridge in this namespace with the address ``10.77.X.1/24`` (X a free
  subnet), where a controller listens for the hosts;
- per host a network namespace joined to the bridge by a veth pair, the
  host's end ``10.77.X.(10+i)/24``;
- per host a real ``/usr/sbin/sshd -D -f CONFIG`` started inside that
  namespace on that address, port 22, with an ed25519 host key made by
  ``ssh-keygen``, root logins by a client key also made here, and nothing
  else (no passwords, no PAM);
- a ``known_hosts`` file holding the hosts' keys, and the client key, for
  the ssh client.

`cut(i)` sets the host's end of its link down (its packets vanish, no
reset), `restore(i)` sets it up again.  `pids(i)` lists every process in
the host's namespace.  `stop()` ends every process in the namespaces by
PID, sshd included, and deletes the links, the bridge and the namespaces;
the folder is the caller's (`temp_dir`).  A missing program fails with the
command that installs it.  The namespaces share this machine's file
system and process table: only the network is theirs.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"
INSTALL = "apt-get install -y openssh-server iproute2"


_instances = itertools.count()


class HarnessError(AssertionError):
    """The namespace hosts cannot be made here (a missing program, not root)."""


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=20, check=check)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run("ip", *args, check=check)


def missing_programs() -> list[str]:
    """The programs the harness needs that are not installed."""
    missing = [p for p in ("ip", "ssh", "ssh-keygen") if shutil.which(p) is None]
    if not os.path.exists(SSHD):
        missing.append(SSHD)
    return missing


@dataclass
class NamespaceHost:
    """One namespace host."""

    index: int
    namespace: str
    address: str
    #: The veth end inside the namespace, and its peer on the bridge.
    inside: str
    outside: str
    folder: Path
    sshd: subprocess.Popen | None = None


class SSHHosts:
    """`n` namespace hosts with sshd; see the module's docstring."""

    def __init__(self, n: int, folder: Path) -> None:
        self.n = n
        self.folder = Path(folder)
        # Names unique to this process and instance (interface names have
        # at most 15 characters).
        tag = "%d%d" % (os.getpid() % 100000, next(_instances) % 10)
        self._tag = tag
        self.bridge = "tfs%sbr" % tag
        self.hosts: list[NamespaceHost] = []
        self.controller_address: str | None = None
        self.client_key = self.folder / "client_ed25519"
        self.known_hosts = self.folder / "known_hosts"
        self._made_run_sshd = False
        self._made: list[tuple[str, ...]] = []  # undo commands, last first

    def start(self) -> None:
        missing = missing_programs()
        if missing:
            raise HarnessError("%s not found: %s" % (", ".join(missing), INSTALL))
        if os.geteuid() != 0:
            raise HarnessError("the ssh hosts need root (network namespaces, sshd)")
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _free_subnet(self) -> int:
        used = _ip("-o", "-4", "addr", "show").stdout
        for step in range(250):
            octet = (int(self._tag) + step) % 250 + 1
            if "10.77.%d." % octet not in used:
                return octet
        raise HarnessError("no free 10.77.x.0/24 subnet")

    def _start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        octet = self._free_subnet()
        self.controller_address = "10.77.%d.1" % octet
        _ip("link", "add", "name", self.bridge, "type", "bridge")
        self._made.append(("link", "del", self.bridge))
        _ip("addr", "add", self.controller_address + "/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        _run(
            "ssh-keygen",
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "taskfarm-test-client",
            "-f",
            str(self.client_key),
        )
        if not os.path.isdir("/run/sshd"):  # sshd's privilege separation folder
            os.makedirs("/run/sshd", mode=0o755)
            self._made_run_sshd = True
        known = []
        for i in range(self.n):
            host = NamespaceHost(
                index=i,
                namespace="tfssh%s-%d" % (self._tag, i),
                address="10.77.%d.%d" % (octet, 10 + i),
                inside="tfs%sn%d" % (self._tag, i),
                outside="tfs%sh%d" % (self._tag, i),
                folder=self.folder / ("host%d" % i),
            )
            self.hosts.append(host)
            self._make_namespace(host)
            known.append("%s %s" % (host.address, self._make_sshd(host)))
        self.known_hosts.write_text("\n".join(known) + "\n")
        for host in self.hosts:
            self._wait_for_sshd(host)

    def _make_namespace(self, host: NamespaceHost) -> None:
        _ip("netns", "add", host.namespace)
        self._made.append(("netns", "del", host.namespace))
        _ip("link", "add", host.outside, "type", "veth", "peer", "name", host.inside)
        # Deleting one end deletes both, wherever the other end is.
        self._made.append(("link", "del", host.outside))
        _ip("link", "set", host.inside, "netns", host.namespace)
        _ip("link", "set", host.outside, "master", self.bridge)
        _ip("link", "set", host.outside, "up")
        inside = ("netns", "exec", host.namespace, "ip")
        _ip(*inside, "addr", "add", host.address + "/24", "dev", host.inside)
        _ip(*inside, "link", "set", host.inside, "up")
        _ip(*inside, "link", "set", "lo", "up")

    def _make_sshd(self, host: NamespaceHost) -> str:
        """Start the host's sshd; returns its public host key line."""
        host.folder.mkdir(mode=0o700)
        key = host.folder / "host_ed25519"
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", host.namespace, "-f", str(key))
        authorized = host.folder / "authorized_keys"
        shutil.copyfile(str(self.client_key) + ".pub", authorized)
        authorized.chmod(0o600)
        config = host.folder / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    "ListenAddress %s:22" % host.address,
                    "HostKey %s" % key,
                    "PidFile none",
                    "AuthorizedKeysFile %s" % authorized,
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "AllowTcpForwarding no",
                    "X11Forwarding no",
                    "PermitUserEnvironment no",
                    # A client gone silent is dropped within ~3 s.
                    "ClientAliveInterval 1",
                    "ClientAliveCountMax 3",
                    "MaxStartups 50",
                    "LogLevel VERBOSE",
                    "",
                ]
            )
        )
        log = open(host.folder / "sshd.log", "wb")
        try:
            host.sshd = subprocess.Popen(
                ["ip", "netns", "exec", host.namespace, SSHD, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        return " ".join((host.folder / "host_ed25519.pub").read_text().split()[:2])

    def _wait_for_sshd(self, host: NamespaceHost, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if host.sshd.poll() is not None:
                raise HarnessError(
                    "sshd of %s exited (%s): %s"
                    % (
                        host.namespace,
                        host.sshd.returncode,
                        (host.folder / "sshd.log").read_text(errors="replace")[-2000:],
                    )
                )
            try:
                with socket.create_connection((host.address, 22), timeout=1.0) as s:
                    if s.recv(4).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.05)
        raise HarnessError("sshd of %s did not answer within %g s" % (host.namespace, timeout))

    # -- while it runs

    def sshd_pid(self, i: int) -> int:
        """The pid of host `i`'s sshd (``ip netns exec`` executes it in place)."""
        return self.hosts[i].sshd.pid

    def pids(self, i: int) -> set[int]:
        """Every process in host `i`'s namespace."""
        out = _ip("netns", "pids", self.hosts[i].namespace, check=False).stdout
        return {int(x) for x in out.split()}

    def cut(self, i: int) -> None:
        """Cut host `i`'s link: its packets vanish, nobody gets a reset."""
        host = self.hosts[i]
        _ip("netns", "exec", host.namespace, "ip", "link", "set", host.inside, "down")

    def restore(self, i: int) -> None:
        """Set host `i`'s link up again."""
        host = self.hosts[i]
        _ip("netns", "exec", host.namespace, "ip", "link", "set", host.inside, "up")

    # -- the end

    def stop(self) -> None:
        """End every process in the namespaces (by PID), then delete the
        namespaces, links and bridge.  Safe to call more than once."""
        for i, host in enumerate(self.hosts):
            if host.sshd is not None and host.sshd.poll() is None:
                host.sshd.terminate()
            for pid in self.pids(i):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for host in self.hosts:
            if host.sshd is not None:
                try:
                    host.sshd.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    host.sshd.kill()
                    host.sshd.wait(timeout=5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(self.pids(i) for i in range(len(self.hosts))):
            time.sleep(0.05)
        while self._made:
            _ip(*self._made.pop(), check=False)
        if self._made_run_sshd:
            try:
                os.rmdir("/run/sshd")
            except OSError:
                pass
            self._made_run_sshd = False
