"""What the ssh launcher is told: ``--hosts``, its ssh options, its command line.

Pure logic, no I/O: `parse_hosts` reads ``node1:4,user@node2:8`` into
`SSHHost` values, `place` spreads a number of engines over them,
`check_reachable` refuses a controller that listens on loopback only, and
`SSHSettings` holds the ssh options and builds the ssh command line.  Bad
input is a `HostsError` (a `ClusterError`) naming the bad part.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import sys
from dataclasses import dataclass, field

from twisted.python import usage

from taskfarm.cluster.launcher import ClusterError

#: The module the hosts run.
REMOTE_MODULE = "taskfarm.cluster.sshremote"


class HostsError(ClusterError, usage.UsageError):
    """A ``--hosts`` value, or an ssh option, that cannot be used."""


# -- hosts ------------------------------------------------------------------------------

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(r"%s(?:\.%s)*\.?\Z" % (_LABEL, _LABEL))
_USER = re.compile(r"[A-Za-z_][A-Za-z0-9._-]{0,31}\Z")


@dataclass(frozen=True)
class SSHHost:
    """One host of ``--hosts``: its address, the login, how many engines."""

    address: str
    count: int = 1
    user: str | None = None

    @property
    def destination(self) -> str:
        """What ssh dials: ``[USER@]ADDRESS``."""
        return "%s@%s" % (self.user, self.address) if self.user else self.address


def _parse_host(part: str) -> SSHHost:
    text = part.strip()
    if not text:
        raise HostsError("--hosts has an empty entry (two commas, or one at an end)")
    user = None
    if "@" in text:
        user, _, text = text.rpartition("@")
        if not _USER.match(user):
            raise HostsError(
                "--hosts entry %r: %r is not a user name (letters, digits, '.', '_', '-'; "
                "not starting with '-')" % (part, user)
            )
    count_text = None
    if text.startswith("["):  # [IPv6]:count
        address, close, rest = text[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            raise HostsError("--hosts entry %r: write an IPv6 address as [ADDRESS]:COUNT" % part)
        count_text = rest[1:] if rest else None
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            raise HostsError(
                "--hosts entry %r: %r is not an IPv6 address" % (part, address)
            ) from None
    else:
        address, colon, count_text = text.partition(":")
        if not colon:
            count_text = None
        if ":" in (count_text or ""):
            raise HostsError("--hosts entry %r: write an IPv6 address as [ADDRESS]:COUNT" % part)
        if not _HOSTNAME.match(address):
            raise HostsError("--hosts entry %r: %r is not a host name or address" % (part, address))
    count = 1
    if count_text is not None:
        if not count_text.isdigit() or int(count_text) < 1:
            raise HostsError(
                "--hosts entry %r: the engine count %r must be a whole number >= 1"
                % (part, count_text)
            )
        count = int(count_text)
    return SSHHost(address, count, user)


def parse_hosts(text: str) -> tuple[SSHHost, ...]:
    """``node1:4,user@node2:8,[fe80::1]:2,node3`` (count 1 by default);
    `HostsError` naming the bad entry.  A host named twice is an error
    (give it one count)."""
    if not text or not text.strip():
        raise HostsError("--hosts is empty: give HOST[:COUNT],... e.g. node1:4,node2:8")
    hosts = tuple(_parse_host(part) for part in text.split(","))
    seen = set()
    for host in hosts:
        if host.destination in seen:
            raise HostsError("--hosts names %s twice; give it one count" % host.destination)
        seen.add(host.destination)
    return hosts


def place(hosts: tuple[SSHHost, ...], count: int | None) -> list[tuple[SSHHost, int]]:
    """How many of `count` engines each host gets: the hosts in order, each
    up to its own count; None: every host its full count."""
    capacity = sum(h.count for h in hosts)
    if count is None:
        count = capacity
    if count < 0:
        raise HostsError("the number of engines must be >= 0, not %d" % count)
    if count > capacity:
        raise HostsError(
            "%d engines asked for, but --hosts has room for %d (%s)"
            % (count, capacity, ",".join("%s:%d" % (h.destination, h.count) for h in hosts))
        )
    placed = []
    for host in hosts:
        take = min(host.count, count)
        if take:
            placed.append((host, take))
        count -= take
    return placed


# -- the furl's location ------------------------------------------------------------------


def furl_addresses(furl: str) -> list[str]:
    """The host parts of a furl's connection hints."""
    body = furl.strip()
    if "@" not in body:
        return []
    hints = body.split("@", 1)[1].rsplit("/", 1)[0]
    found = []
    for hint in hints.split(","):
        if hint.startswith("tcp:"):
            hint = hint[4:]
        host = hint.rsplit(":", 1)[0].strip("[]")
        if host.startswith("host="):
            host = host[5:]
        found.append(host)
    return found


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_reachable(furl: str) -> None:
    """`ClusterError` when every address in the furl is loopback: engines on
    other hosts could never reach that controller."""
    hosts = furl_addresses(furl)
    if hosts and all(_loopback(h) for h in hosts):
        raise ClusterError(
            "the controller listens on loopback only (%s): engines on other hosts cannot "
            "reach it; start it with --listen tcp:PORT:interface=ADDRESS (and --location "
            "HOST:PORT) on an address the hosts can reach" % ", ".join(hosts)
        )


# -- the ssh command line ----------------------------------------------------------------

#: ssh options taskfarm will not pass on, with the reason.
_REFUSED_OPTIONS = {
    "stricthostkeychecking": (
        {"no", "off"},
        "host keys must be checked: the connection carries the engine furl",
    ),
    "requesttty": ({"yes", "force"}, "a terminal would garble the launcher's channel"),
}


@dataclass(frozen=True)
class SSHSettings:
    """How to reach the hosts and what to run there."""

    #: The interpreter on the hosts (default: this one's path).
    python: str = field(default_factory=lambda: sys.executable)
    #: A folder on the hosts holding the taskfarm package, put first on
    #: their PYTHONPATH (default: the interpreter's own taskfarm).
    taskfarm: str | None = None
    #: ``OPTION=VALUE`` pairs, each passed as ``-o OPTION=VALUE``.
    options: tuple[str, ...] = ()
    identity_file: str | None = None
    port: int | None = None
    #: A known_hosts file used instead of the user's.
    known_hosts: str | None = None
    #: The ssh client.
    ssh: str = "ssh"

    def __post_init__(self) -> None:
        for option in self.options:
            name, sep, value = option.partition("=")
            if not sep or not name.strip().isalnum():
                raise HostsError(
                    "--ssh-options takes OPTION=VALUE items (as ssh -o), not %r" % option
                )
            refused = _REFUSED_OPTIONS.get(name.strip().lower())
            if refused and value.strip().lower() in refused[0]:
                raise HostsError("--ssh-options %s refused: %s" % (option, refused[1]))
        if self.port is not None and not 0 < self.port < 65536:
            raise HostsError("--ssh-port must be 1..65535, not %r" % self.port)

    def remote_command(self) -> str:
        """The command line the host's shell runs."""
        python = shlex.quote(self.python)
        if self.taskfarm:
            return "exec env PYTHONPATH=%s %s -m %s" % (
                shlex.quote(self.taskfarm),
                python,
                REMOTE_MODULE,
            )
        return "exec %s -m %s" % (python, REMOTE_MODULE)

    def argv(self, host: SSHHost) -> list[str]:
        """The ssh command line for `host`: the user's options first (ssh
        takes the first value it is given), then ours."""
        argv = [self.ssh, "-T"]
        if self.port is not None:
            argv += ["-p", str(self.port)]
        if self.identity_file:
            argv += ["-i", self.identity_file]
        if self.known_hosts:
            argv += ["-o", "UserKnownHostsFile=%s" % self.known_hosts]
        for option in self.options:
            argv += ["-o", option]
        argv += ["-o", "BatchMode=yes", "-o", "ForwardX11=no"]
        return argv + ["--", host.destination, self.remote_command()]


# -- the command line ----------------------------------------------------------------

#: The ssh launcher's options, `usage.Options.optParameters` style: long
#: name, short name, default, help (, coerce).
OPTIONS = [
    ["hosts", None, None, "HOST[:COUNT],... hosts and engines per host, e.g. node1:4,me@node2:8"],
    ["ssh-python", None, None, "the Python on the hosts (default: this one's path)"],
    ["ssh-taskfarm", None, None, "a folder on the hosts holding taskfarm, put on their PYTHONPATH"],
    ["ssh-options", None, None, "ssh -o options: 'OPTION=VALUE [OPTION=VALUE ...]'"],
    ["ssh-identity", None, None, "ssh -i: the private key to log in with"],
    ["ssh-port", None, None, "ssh -p: the port of the hosts' sshd", int],
    [
        "ssh-known-hosts",
        None,
        None,
        "a known_hosts file to check host keys with (default: the user's)",
    ],
]


def hosts_and_settings(options) -> tuple[tuple[SSHHost, ...], SSHSettings]:
    """The hosts and settings that parsed `OPTIONS` values ask for;
    `HostsError` naming a bad one."""
    if not options.get("hosts"):
        raise HostsError("--launcher ssh needs --hosts HOST[:COUNT],... e.g. node1:4,node2:8")
    hosts = parse_hosts(options["hosts"])
    try:
        ssh_options = tuple(shlex.split(options.get("ssh-options") or ""))
    except ValueError as e:
        raise HostsError("--ssh-options %r: %s" % (options["ssh-options"], e)) from None
    settings = SSHSettings(
        python=options.get("ssh-python") or sys.executable,
        taskfarm=options.get("ssh-taskfarm"),
        options=ssh_options,
        identity_file=options.get("ssh-identity"),
        port=options.get("ssh-port"),
        known_hosts=options.get("ssh-known-hosts"),
    )
    return hosts, settings
