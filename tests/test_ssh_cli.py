"""`taskfarm cluster --launcher ssh` as a user runs it, against real sshd
hosts in network namespaces (`taskfarm.testing.netns`): --daemon, status,
a task, stop; and the refusals before anything starts.
"""

from __future__ import annotations

import re
from pathlib import Path

from twisted.internet import reactor

from taskfarm.asyncclient import TaskClient
from taskfarm.profile import ENGINE, TASK, Profile
from taskfarm.task import Task
from taskfarm.testing.helpers import async_test as run
from taskfarm.testing.helpers import descendants_of, temp_dir, wait_until
from taskfarm.testing.netns import SSHHosts
from taskfarm.testing.processes import TASKFARM, ProcessTestCase, kill_if_alive

REPO = Path(__file__).resolve().parent.parent


def read_state(profile: Profile) -> dict | None:
    """The cluster's state file (`taskfarm.cluster.manage`, helper A's)."""
    from taskfarm.cluster.manage import read_state as read

    return read(profile)


class SSHCommandTests(ProcessTestCase):
    timeout = 120
    cwd = str(REPO)

    async def command(self, name: str, *args: str, within: float = 60) -> tuple[int, str]:
        process = self.spawn(TASKFARM + list(args), name)
        code = await self.wait_for_exit(process, name, within)
        return code, self.output(name)

    def make_hosts(self, n: int) -> SSHHosts:
        hosts = SSHHosts(n, temp_dir(self, "taskfarm-ssh-hosts-") / "hosts")
        self.addCleanup(hosts.stop)
        hosts.start()
        return hosts

    @run
    async def test_daemon_status_task_stop_leaves_only_sshd(self):
        """`taskfarm cluster --launcher ssh --hosts A:2,B:1 --listen ...
        --daemon` returns once the 3 engines registered; `taskfarm status`
        lists them by host; a task runs; the furl is in no argv or
        environment; `taskfarm stop` leaves only sshd on each host."""
        hosts = self.make_hosts(2)
        a, b = hosts.hosts[0].address, hosts.hosts[1].address
        profile = Profile(self.root / "profile")
        self.addCleanup(self._stop_if_running, profile)
        code, out = await self.command(
            "cluster",
            "cluster",
            "-n",
            "3",
            "--launcher",
            "ssh",
            "--hosts",
            "%s:2,%s:1" % (a, b),
            "--listen",
            "tcp:0:interface=%s" % hosts.controller_address,
            "--ssh-taskfarm",
            str(REPO),
            "--ssh-identity",
            str(hosts.client_key),
            "--ssh-known-hosts",
            str(hosts.known_hosts),
            "--ssh-options",
            "IdentitiesOnly=yes GlobalKnownHostsFile=/dev/null",
            "--daemon",
            "--profile-dir",
            str(profile.root),
        )
        self.assertEqual(code, 0, out)
        self.assertRegex(
            out, r"listening on %s:\d+, 3 engines registered" % re.escape(hosts.controller_address)
        )
        code, out = await self.command("status", "status", "--profile-dir", str(profile.root))
        self.assertEqual(code, 0, out)
        self.assertIn("--launcher ssh (--daemon), 3 engines requested", out)
        engines = [
            (label, int(pid))
            for label, pid in re.findall(r"(\S+ engine \d) .*pid (\d+) running", out)
        ]
        self.assertEqual(
            sorted(label for label, _ in engines),
            ["%s engine 0" % a, "%s engine 1" % a, "%s engine 0" % b],
        )
        for label, pid in engines:
            self.assertIn(pid, hosts.pids(0 if label.startswith(a + " ") else 1))
        tc = TaskClient(profile.furl_file(TASK), reactor, connect_timeout=10)
        self.addCleanup(tc.disconnect)
        ids = await tc.run_many([Task("import os; p = os.getpid()", pull="p")] * 6)
        results = await tc.get_task_results(ids, block=True)
        self.assertTrue({r.results["p"] for r in results} <= {pid for _, pid in engines})
        await tc.disconnect()
        secret = profile.furl_file(ENGINE).read_text().strip().rsplit("/", 1)[1].encode()
        launcher = read_state(profile)["launcher"]["pid"]
        everyone = hosts.pids(0) | hosts.pids(1) | set(descendants_of(launcher)) | {launcher}
        for pid in everyone:
            for part in ("cmdline", "environ"):
                try:
                    data = Path("/proc/%d/%s" % (pid, part)).read_bytes()
                except OSError:
                    continue
                self.assertNotIn(secret, data, "the furl in /proc/%d/%s" % (pid, part))
        code, out = await self.command("stop", "stop", "--profile-dir", str(profile.root))
        self.assertEqual(code, 0, out)
        await wait_until(
            lambda: all(hosts.pids(i) == {hosts.sshd_pid(i)} for i in range(2)),
            "only sshd left on the hosts",
            15,
        )

    async def _stop_if_running(self, profile: Profile) -> None:
        state = read_state(profile)
        if state is None:
            return
        await self.command("stop-cleanup", "stop", "--profile-dir", str(profile.root))
        pid, started = state["launcher"]["pid"], state["launcher"].get("started")
        if started:
            kill_if_alive(pid, started)

    @run
    async def test_loopback_controller_and_bad_hosts_refused(self):
        """Before anything starts: a loopback controller for remote hosts,
        and a bad --hosts value, each with its message."""
        profile = str(self.root / "profile")
        code, out = await self.command(
            "loopback",
            "cluster",
            "-n",
            "1",
            "--launcher",
            "ssh",
            "--hosts",
            "node1:1",
            "--profile-dir",
            profile,
        )
        self.assertEqual(code, 1, out)
        self.assertIn("loopback", out)
        code, out = await self.command(
            "bad",
            "cluster",
            "-n",
            "1",
            "--launcher",
            "ssh",
            "--hosts",
            "node1:0",
            "--profile-dir",
            profile,
        )
        self.assertEqual(code, 2, out)
        self.assertIn(
            "--hosts entry 'node1:0': the engine count '0' must be a whole number >= 1", out
        )
