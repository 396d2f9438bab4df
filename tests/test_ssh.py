"""The ssh launcher against real OpenSSH servers in network namespaces.

Each test makes namespace hosts (`taskfarm.testing.netns.SSHHosts`), each
with a real sshd on its own address in 10.77.X.0/24, and a real controller
in this process listening on the bridge address where the hosts reach it.
`SSHLauncher` then starts engines there over the system ssh client, with
keys and a known_hosts file the test made.
"""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

from twisted.internet import reactor

from taskfarm.cluster.launcher import ClusterError
from taskfarm.cluster.ssh import SSHLauncher
from taskfarm.cluster.sshhosts import SSHSettings
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
            options=("IdentitiesOnly=yes", "GlobalKnownHostsFile=/dev/null", "ConnectTimeout=2"),
        )
        launcher = SSHLauncher(
            reactor,
            self.cluster.profile,
            engine_timeout=self.LINK_TIMEOUT,
            hosts=spec,
            settings=settings,
            start_timeout=30.0,
            grace=2.0,
            **options,
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
            hosts,
            ",".join("root@%s:%d" % (h.address, 2 if h.index == 0 else 1) for h in hosts.hosts),
        )
        reports = []
        launcher.watch(lambda label, reason: reports.append((label, reason)))
        began = reactor.seconds()
        await launcher.start(
            None, self.cluster.profile.furl_file(ENGINE), ["--property", "site=ssh"]
        )
        await self.cluster.wait_for_engines(4, timeout=40)
        registered = reactor.seconds() - began
        described = launcher.describe()
        registered_engines = self.cluster.controller.registry.engines.values()
        self.assertEqual({e.properties["site"] for e in registered_engines}, {"ssh"})
        self.assertEqual(
            sorted(e.properties["pid"] for e in self.cluster.controller.registry.engines.values()),
            sorted(d["pid"] for d in described),
        )
        # Each engine runs in its host's namespace, and its output comes
        # back to a rotated file of its own.
        log_paths = set()
        for slot, host in zip(launcher.slots, hosts.hosts, strict=True):
            for index, engine in slot.engines.items():
                self.assertIn(engine.pid, hosts.pids(host.index))
                await wait_until(
                    lambda e=engine: e.log is not None
                    and "registered with the controller" in Path(e.log.path).read_text(),
                    "%s logged its registration" % engine.label,
                    10,
                )
                path = Path(engine.log.path)
                self.assertEqual(path.name, "ssh-%s-engine-%d.out" % (host.address, index))
                self.assertEqual(path.stat().st_mode & 0o777, 0o600)
                self.assertEqual(path.read_text().count("registered with the controller"), 1)
                log_paths.add(path)
        self.assertEqual(len(log_paths), 4)
        # The quick-start, on the hosts.
        # Submitted at once, so that every engine's slots fill at the start.
        ids = await tc.run_many([Task("a = %i" % n, pull="a") for n in range(200)])
        await tc.barrier(ids)
        results = await tc.get_task_results(ids)
        self.assertEqual([r.ns.a for r in results], list(range(200)))
        self.assertEqual(
            {r.engineid for r in results}, set(self.cluster.controller.registry.engines)
        )
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
            "only sshd left on every host",
            15,
        )
        self.assertEqual(sshds, {hosts.sshd_pid(i) for i in range(3)})
        for folder in folders:
            self.assertFalse(os.path.exists(folder))
        self.assertEqual(reports, [])
        print("SSH registered 4 engines on 3 hosts in %.2f s" % registered)

    @run
    async def test_cut_link_loses_host_engines_tasks_finish_elsewhere(self):
        """Three hosts of one engine; tasks run; one host's link is cut
        while it runs a task: the controller's heartbeat drops its engine,
        its tasks finish on the other hosts, the launcher reports the host
        (its ssh went silent), and the host side, cut off from the launcher,
        ends its engine by itself.  Once the link is back the launcher
        connects again and a fresh engine registers there; `stop()` then
        leaves only sshd on every host."""
        hosts, tc = await self.start_with_hosts(3)
        launcher = self.make_launcher(hosts, ",".join("%s:1" % h.address for h in hosts.hosts))
        reports = []
        launcher.watch(lambda label, reason: reports.append((label, reason)))
        await launcher.start(3, self.cluster.profile.furl_file(ENGINE), [])
        await self.cluster.wait_for_engines(3, timeout=40)
        registry = self.cluster.controller.registry
        cut_slot = launcher.slots[0]
        cut_pid = cut_slot.engines[0].pid
        cut_remote, cut_folder = cut_slot.remote_pid, cut_slot.folder
        self.assertTrue({cut_pid, cut_remote} <= hosts.pids(0))
        (cut_id,) = [e for e, r in registry.engines.items() if r.properties["pid"] == cut_pid]
        marks = self.tmp / "attempts"
        code = (
            "import os, time\n"
            "with open(%r, 'a') as f: f.write('%%d %%d\\n' %% (i, os.getpid()))\n"
            "time.sleep(1.0)\n"
            "p = os.getpid()\n" % str(marks)
        )
        ids = [await tc.run(Task(code, push={"i": i}, pull="p", retries=2)) for i in range(12)]

        def attempts():
            if not marks.exists():
                return []
            return [tuple(map(int, x.split())) for x in marks.read_text().split("\n") if x]

        await wait_until(
            lambda: any(pid == cut_pid for _, pid in attempts()), "a task on the host to cut", 20
        )
        hosts.cut(0)
        cut = reactor.seconds()
        await wait_until(lambda: cut_id not in registry.engines, "the cut host's engine lost", 15)
        lost_after = reactor.seconds() - cut
        results = await tc.get_task_results(ids, block=True)
        self.assertEqual([r.failure for r in results], [None] * 12)
        moved = {
            i for i, pid in attempts() if pid == cut_pid and results[i].results["p"] != cut_pid
        }
        self.assertTrue(moved, "no task of the cut host finished elsewhere: %s" % attempts())
        for i in moved:
            self.assertNotEqual(results[i].engineid, cut_id)
        # The launcher noticed the host (its ssh said nothing for LINK_TIMEOUT).
        await wait_until(
            lambda: any(label == "%s engine 0" % hosts.hosts[0].address for label, _ in reports),
            "the launcher to report the cut host",
            15,
        )
        self.assertNotIn(hosts.hosts[1].address, " ".join(label for label, _ in reports))
        # The host side, cut off, ended its engine and itself (sshd's own
        # session process goes when sshd notices the client gone).
        await wait_until(
            lambda: not {cut_pid, cut_remote} & hosts.pids(0), "the cut host to end its engine", 15
        )
        cleaned_after = reactor.seconds() - cut
        self.assertFalse(os.path.exists(cut_folder))
        hosts.restore(0)
        await self.cluster.wait_for_engines(3, timeout=30)
        back_after = reactor.seconds() - cut
        fresh = cut_slot.engines[0].pid
        self.assertNotEqual(fresh, cut_pid)
        self.assertIn(fresh, hosts.pids(0))
        self.assertGreaterEqual(cut_slot.connects, 2)
        await launcher.stop()
        await wait_until(
            lambda: all(hosts.pids(i) == {hosts.sshd_pid(i)} for i in range(3)),
            "only sshd left on every host",
            15,
        )
        print(
            "SSH cut: engine lost after %.2f s, host clean after %.2f s, engine back %.2f s "
            "after the cut; %d tasks moved; reports %s"
            % (lost_after, cleaned_after, back_after, len(moved), reports)
        )

    @run
    async def test_dead_engine_and_dead_ssh_are_replaced(self):
        """An engine SIGKILLed on its host is reported and started again
        there after the back-off; the ssh client SIGKILLed here drops the
        connection, so the host ends both its engines at once (stdin
        closed), and the launcher connects again and starts two fresh ones."""
        hosts, tc = await self.start_with_hosts(1)
        address = hosts.hosts[0].address
        launcher = self.make_launcher(hosts, "%s:2" % address)
        reports = []
        launcher.watch(lambda label, reason: reports.append((label, reason)))
        await launcher.start(2, self.cluster.profile.furl_file(ENGINE), [])
        await self.cluster.wait_for_engines(2, timeout=40)
        slot = launcher.slots[0]
        first = {i: e.pid for i, e in slot.engines.items()}
        os.kill(first[1], signal.SIGKILL)
        await wait_until(
            lambda: slot.engines[1].pid not in (None, first[1]), "engine 1 started again", 15
        )
        self.assertEqual(reports[0][0], "%s engine 1" % address)
        self.assertIn("signal 9", reports[0][1])
        await self.cluster.wait_for_engines(2, timeout=30)
        second = {i: e.pid for i, e in slot.engines.items()}
        self.assertEqual(second[0], first[0])
        os.kill(slot.process.pid, signal.SIGKILL)
        await wait_until(
            lambda: all(pid not in hosts.pids(0) for pid in second.values()),
            "the host to end the engines of the dropped connection",
            15,
        )
        await wait_until(
            lambda: (
                slot.connects == 2
                and all(e.pid not in (None, second[e.index]) for e in slot.engines.values())
            ),
            "fresh engines over a fresh connection",
            20,
        )
        await self.cluster.wait_for_engines(2, timeout=30)
        labels = [label for label, _ in reports]
        self.assertEqual(
            labels,
            ["%s engine 1" % address, "%s engine 0" % address, "%s engine 1" % address, address],
        )
        await launcher.stop()
        await wait_until(
            lambda: hosts.pids(0) == {hosts.sshd_pid(0)}, "only sshd left on the host", 15
        )

    @run
    async def test_unknown_host_key_and_missing_python_fail_start(self):
        """A host whose key is not in known_hosts is refused by ssh itself
        (no prompt, BatchMode), and a --ssh-python that does not exist
        there fails too: `start` fails with `ClusterError` quoting ssh's or
        the shell's words for each host, and nothing is left running."""
        hosts, _ = await self.start_with_hosts(2)
        unknown = self.tmp / "empty_known_hosts"
        unknown.write_text("")
        spec = ",".join("%s:1" % h.address for h in hosts.hosts)
        settings = SSHSettings(
            taskfarm=str(REPO),
            identity_file=str(hosts.client_key),
            known_hosts=str(unknown),
            options=("IdentitiesOnly=yes", "GlobalKnownHostsFile=/dev/null"),
        )
        launcher = SSHLauncher(reactor, self.cluster.profile, hosts=spec, settings=settings)
        self.addCleanup(launcher.stop)
        error = await self.assertFailure(
            launcher.start(None, self.cluster.profile.furl_file(ENGINE), []), ClusterError
        )
        self.assertIn("could not start engines on 2 of 2 hosts", str(error))
        self.assertIn("Host key verification failed", str(error))
        print("SSH start failure: %s" % error)
        settings = SSHSettings(
            python="/nonexistent/python3",
            identity_file=str(hosts.client_key),
            known_hosts=str(hosts.known_hosts),
            options=("IdentitiesOnly=yes", "GlobalKnownHostsFile=/dev/null"),
        )
        launcher = SSHLauncher(reactor, self.cluster.profile, hosts=spec, settings=settings)
        self.addCleanup(launcher.stop)
        error = await self.assertFailure(
            launcher.start(None, self.cluster.profile.furl_file(ENGINE), []), ClusterError
        )
        self.assertIn("/nonexistent/python3", str(error))
        print("SSH start failure: %s" % error)
        self.assertEqual(self.cluster.controller.registry.engines, {})
        for i in range(2):
            await wait_until(lambda i=i: hosts.pids(i) == {hosts.sshd_pid(i)}, "only sshd left", 10)
