"""The ssh launcher against real OpenSSH servers in network namespaces.

Each test makes namespace hosts (`taskfarm.testing.netns.SSHHosts`), each
with a real sshd on its own address in 10.77.X.0/24, and a real controller
in this process listening on the bridge address where the hosts reach it.
`SSHLauncher` then starts engines there over the system ssh client, with
keys and a known_hosts file the test made.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from twisted.internet import reactor

from taskfarm.cluster.ssh import SSHLauncher, SSHSettings
from taskfarm.profile import ENGINE
from taskfarm.task import Task
from taskfarm.testing.cluster import ClusterTestCase
from taskfarm.testing.helpers import async_test as run
from taskfarm.testing.helpers import wait_until
from taskfarm.testing.netns import SSHHosts

REPO = Path(__file__).resolve().parent.parent


def _processes_holding(secret: bytes, pids) -> list[str]:
    """'PID cmdline|environ' for each process in `pids` whose argv or
    environment holds `secret`."""
    found = []
    for pid in pids:
        for part in ("cmdline", "environ"):
            try:
                data = Path("/proc/%d/%s" % (pid, part)).read_bytes()
            except OSError:
                continue
            if secret in data:
                found.append("%d %s" % (pid, part))
    return found


def _children(pid: int) -> set[int]:
    """Every live descendant of `pid`."""
    from taskfarm.testing.helpers import descendants_of

    return set(descendants_of(pid))


class SSHLauncherTests(ClusterTestCase):
    timeout = 90
    folder_prefix = "taskfarm-ssh-test-"
    HEARTBEAT_PERIOD = 0.5
    HEARTBEAT_TIMEOUT = 2.0
    #: Seconds without a word after which either end of a host's ssh gives up.
    LINK_TIMEOUT = 3.0

    def make_launcher(self, hosts: SSHHosts, spec: str, **options) -> SSHLauncher:
        settings = SSHSettings(
            taskfarm=str(REPO),
            identity_file=str(hosts.client_key),
            known_hosts=str(hosts.known_hosts),
            options=("IdentitiesOnly=yes", "GlobalKnownHostsFile=/dev/null", "ConnectTimeout=5"),
        )
        launcher = SSHLauncher(
            spec, reactor, settings, log_dir=self.cluster.profile.log_dir,
            timeout=self.LINK_TIMEOUT, start_timeout=30.0, grace=2.0, **options,
        )
        self.addCleanup(launcher.stop)
        return launcher

    async def start_with_hosts(self, n: int):
        # The controller must be where the hosts can reach it: make the
        # bridge first, then listen on its address.
        from taskfarm.testing.helpers import temp_dir

        scratch = temp_dir(self, "taskfarm-ssh-hosts-")
        hosts = SSHHosts(n, scratch / "hosts")
        self.addCleanup(hosts.stop)
        hosts.start()
        client = await self.start_cluster(
            0,
            listen="tcp:0:interface=%s" % hosts.controller_address,
            heartbeat_period=self.HEARTBEAT_PERIOD,
            heartbeat_timeout=self.HEARTBEAT_TIMEOUT,
        )
        return hosts, client

    @run
    async def test_engines_on_three_hosts_run_tasks_and_stop_leaves_nothing(self):
        """Three sshd hosts, engines started over ssh register across the
        namespace network, run the quick-start, and the furl is in no
        process's argv or environment; `stop()` leaves no process on any
        host but its sshd, and removes each host's furl folder."""
        hosts, tc = await self.start_with_hosts(3)
        launcher = self.make_launcher(
            hosts, ",".join("root@%s:%d" % (h.address, 2 if h.index == 0 else 1) for h in hosts.hosts)
        )
        reports = []
        launcher.watch(lambda label, reason: reports.append((label, reason)))
        began = reactor.seconds()
        await launcher.start(None, self.cluster.profile.furl_file(ENGINE), [])
        await self.cluster.wait_for_engines(4, timeout=40)
        registered = reactor.seconds() - began
        described = launcher.describe()
        self.assertEqual(
            sorted(e.properties["pid"] for e in self.cluster.controller.registry.engines.values()),
            sorted(d["pid"] for d in described),
        )
        # Each engine runs in its host's namespace.
        for slot, host in zip(launcher.slots, hosts.hosts, strict=True):
            for engine in slot.engines.values():
                self.assertIn(engine.pid, hosts.pids(host.index))
        # The quick-start, on the hosts.
        ids = [await tc.run(Task("a = %i" % n, pull="a")) for n in range(200)]
        await tc.barrier(ids)
        results = await tc.get_task_results(ids)
        self.assertEqual([r.ns.a for r in results], list(range(200)))
        self.assertEqual({r.engineid for r in results}, set(self.cluster.controller.registry.engines))
        # The furl: in a 0600 file in a 0700 folder on each host, in no argv
        # or environment of any process there, nor of the ssh clients.
        furl = self.cluster.profile.furl_file(ENGINE).read_text().strip()
        secret = furl.rsplit("/", 1)[1].encode()
        folders = [slot.folder for slot in launcher.slots]
        for folder in folders:
            self.assertEqual(stat.S_IMODE(os.stat(folder).st_mode), 0o700)
            furl_file = Path(folder) / "engine.furl"
            self.assertEqual(stat.S_IMODE(furl_file.stat().st_mode), 0o600)
            self.assertEqual(furl_file.read_text().strip(), furl)
        everyone = set()
        for i in range(3):
            everyone |= hosts.pids(i)
        everyone |= _children(os.getpid())
        self.assertGreaterEqual(len(everyone), 3 + 4 + 3 + 3)  # sshd, engines, wrappers, ssh
        self.assertEqual(_processes_holding(secret, everyone), [])
        sshds = {hosts.sshd_pid(i) for i in range(3)}
        await launcher.stop()
        await wait_until(
            lambda: all(hosts.pids(i) == {hosts.sshd_pid(i)} for i in range(3)),
            "only sshd left on every host", 15,
        )
        self.assertEqual(sshds, {hosts.sshd_pid(i) for i in range(3)})
        for folder in folders:
            self.assertFalse(os.path.exists(folder))
        self.assertEqual(reports, [])
        print("SSH registered 4 engines on 3 hosts in %.2f s" % registered)
