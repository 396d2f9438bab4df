"""The ssh launcher's logic without processes: --hosts, placement, the ssh
command line, the loopback check, and each host's restart policy on a
`task.Clock` with a fake ssh process (tests/test_ssh.py runs the real one)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from twisted.internet import error, task
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from taskfarm import exitcodes
from taskfarm.cli import engine_count
from taskfarm.cluster.launcher import ClusterError
from taskfarm.cluster.local import LocalLauncher
from taskfarm.cluster.ssh import EngineState, HostSlot, HostState, SSHLauncher
from taskfarm.cluster.sshhosts import (
    HostsError,
    SSHHost,
    SSHSettings,
    check_reachable,
    parse_hosts,
    place,
)
from taskfarm.interfaces import IEngineLauncher
from taskfarm.profile import Profile

FURL = "pb://abcdefghijklmnopqrstuvwxyz234567@tcp:10.77.0.1:4321/SECRETSWISSNUMBER"


class HostsTests(unittest.SynchronousTestCase):
    def test_good_hosts(self):
        """Names, addresses, user@, [IPv6] and a default count of 1."""
        self.assertEqual(
            parse_hosts("node1:4,me@node2.lab.org:8,10.0.0.3,[fe80::1]:2,a_b@n-3:1"),
            (
                SSHHost("node1", 4),
                SSHHost("node2.lab.org", 8, "me"),
                SSHHost("10.0.0.3", 1),
                SSHHost("fe80::1", 2),
                SSHHost("n-3", 1, "a_b"),
            ),
        )
        self.assertEqual(SSHHost("node2", 8, "me").destination, "me@node2")

    def test_bad_hosts_name_the_bad_part(self):
        """Each bad --hosts value is a HostsError quoting the bad part."""
        cases = {
            "": "--hosts is empty",
            "node1:4,,node2": "empty entry",
            "node1:0": "'0' must be a whole number >= 1",
            "node1:-2": "'-2' must be a whole number >= 1",
            "node1:four": "'four' must be a whole number >= 1",
            "node1:": "'' must be a whole number >= 1",
            "bad host:2": "'bad host' is not a host name or address",
            "-oProxyCommand=sh:1": "'-oProxyCommand=sh' is not a host name",
            "node_1:2": "'node_1' is not a host name",
            "-me@node1": "'-me' is not a user name",
            "@node1": "'' is not a user name",
            "fe80::1:2": "write an IPv6 address as [ADDRESS]:COUNT",
            "[fe80::1:2": "write an IPv6 address as [ADDRESS]:COUNT",
            "[zz::q]:2": "'zz::q' is not an IPv6 address",
            "node1:2,node1:3": "names node1 twice",
        }
        for text, message in cases.items():
            e = self.assertRaises(HostsError, parse_hosts, text)
            self.assertIn(message, str(e), text)
            self.assertIsInstance(e, ClusterError)

    def test_place(self):
        """Engines fill the hosts in order, each up to its count; None asks
        for every host's count; more than --hosts holds is an error."""
        hosts = parse_hosts("a:2,b:3")
        self.assertEqual(place(hosts, None), [(hosts[0], 2), (hosts[1], 3)])
        self.assertEqual(place(hosts, 3), [(hosts[0], 2), (hosts[1], 1)])
        self.assertEqual(place(hosts, 1), [(hosts[0], 1)])
        self.assertEqual(place(hosts, 0), [])
        e = self.assertRaises(HostsError, place, hosts, 6)
        self.assertEqual(str(e), "6 engines asked for, but --hosts has room for 5 (a:2,b:3)")


class SettingsTests(unittest.SynchronousTestCase):
    def test_argv(self):
        """The user's options come first (ssh keeps the first value), then
        BatchMode; the furl is nowhere in it; the remote command quotes."""
        settings = SSHSettings(
            python="/opt/my python/bin/python3",
            taskfarm="/nfs/src/taskfarm",
            options=("ConnectTimeout=5",),
            identity_file="/k/id",
            port=2222,
            known_hosts="/k/known_hosts",
        )
        argv = settings.argv(SSHHost("node1", 2, "me"))
        self.assertEqual(
            argv,
            [
                "ssh",
                "-T",
                "-p",
                "2222",
                "-i",
                "/k/id",
                "-o",
                "UserKnownHostsFile=/k/known_hosts",
                "-o",
                "ConnectTimeout=5",
                "-o",
                "BatchMode=yes",
                "-o",
                "ForwardX11=no",
                "--",
                "me@node1",
                "exec env PYTHONPATH=/nfs/src/taskfarm '/opt/my python/bin/python3' "
                "-m taskfarm.cluster.sshremote",
            ],
        )
        self.assertEqual(
            SSHSettings(python="python3").remote_command(),
            "exec python3 -m taskfarm.cluster.sshremote",
        )
        self.assertEqual(SSHSettings().python, sys.executable)

    def test_refused_options(self):
        """Host key checking cannot be turned off, nor a terminal asked for;
        options must be OPTION=VALUE; ports are 1..65535."""
        for option, message in {
            "StrictHostKeyChecking=no": "host keys must be checked",
            "stricthostkeychecking = off": "host keys must be checked",
            "RequestTTY=force": "a terminal",
            "-v": "takes OPTION=VALUE",
            "Proxy Command=x": "takes OPTION=VALUE",
        }.items():
            e = self.assertRaises(HostsError, SSHSettings, options=(option,))
            self.assertIn(message, str(e))
        SSHSettings(options=("StrictHostKeyChecking=yes", "StrictHostKeyChecking=accept-new"))
        self.assertRaises(HostsError, SSHSettings, port=0)
        self.assertRaises(HostsError, SSHSettings, port=70000)

    def test_loopback_furl_refused(self):
        """A controller reachable only on loopback cannot serve other hosts."""
        e = self.assertRaises(
            ClusterError, check_reachable, "pb://x@tcp:127.0.0.1:1234,tcp:[::1]:1234/s"
        )
        self.assertIn("listens on loopback only (127.0.0.1, ::1)", str(e))
        self.assertIn("--listen tcp:PORT:interface=ADDRESS", str(e))
        self.assertRaises(ClusterError, check_reachable, "pb://x@localhost:1234/s")
        check_reachable(FURL)
        check_reachable("pb://x@tcp:127.0.0.1:1234,tcp:ctl.lab.org:1234/s")

    def test_options(self):
        """The launcher table's way: its own options make the launcher;
        --hosts is required; bad values are usage errors at parse time."""
        options = {
            "hosts": "n1:2,n2",
            "ssh-python": "/usr/bin/python3",
            "ssh-options": "ConnectTimeout=5 'Ciphers=aes128-ctr,aes256-ctr'",
            "ssh-port": 22,
        }
        SSHLauncher.check_options(options)
        launcher = SSHLauncher(task.Clock(), Profile(Path("/nowhere")), options, 4.0)
        self.assertEqual(launcher.capacity, 3)
        # Without -n, `taskfarm cluster` and `taskfarm engines` start them all.
        self.assertEqual(engine_count(None, launcher, 4), 3)
        self.assertEqual(engine_count(2, launcher, 4), 2)
        self.assertEqual(engine_count(None, LocalLauncher(task.Clock(), Profile(Path("/nowhere"))), 4), 4)
        self.assertEqual(
            launcher.settings.options, ("ConnectTimeout=5", "Ciphers=aes128-ctr,aes256-ctr")
        )
        self.assertEqual(launcher.settings.python, "/usr/bin/python3")
        self.assertEqual(launcher.settings.port, 22)
        self.assertTrue(verifyObject(IEngineLauncher, launcher))
        self.assertEqual((launcher.name, launcher.remote), ("ssh", True))
        self.assertEqual(
            [row[0] for row in SSHLauncher.optParameters],
            [
                "hosts",
                "ssh-python",
                "ssh-taskfarm",
                "ssh-options",
                "ssh-identity",
                "ssh-port",
                "ssh-known-hosts",
            ],
        )
        for bad, message in [
            ({}, "needs --hosts"),
            ({"hosts": "n1:0"}, "must be a whole number >= 1"),
            ({"hosts": "n1", "ssh-options": "StrictHostKeyChecking=no"}, "host keys must be"),
            ({"hosts": "n1", "ssh-options": "'A=b"}, "No closing quotation"),
        ]:
            e = self.assertRaises(usage.UsageError, SSHLauncher.check_options, bad)
            self.assertIn(message, str(e))
            self.assertRaises(HostsError, SSHLauncher, task.Clock(), None, bad)


# -- a host's policy, on a clock --------------------------------------------------------


class FakeTransport:
    def __init__(self, pid):
        self.pid = pid
        self.written = []
        self.stdin_closed = False
        self.signals = []

    def write(self, data):
        assert not self.stdin_closed
        self.written.append(data)

    def closeStdin(self):
        self.stdin_closed = True

    def signalProcess(self, signum):
        self.signals.append(signum)

    def messages(self):
        return [json.loads(line) for line in b"".join(self.written).splitlines()]


class FakeReactor(task.Clock):
    """A clock whose spawnProcess makes a fake ssh process."""

    def __init__(self):
        super().__init__()
        self.spawned = []

    def spawnProcess(self, protocol, executable, argv, env=None, childFDs=None):
        transport = FakeTransport(1000 + len(self.spawned))
        self.spawned.append((protocol, argv, env, transport))
        protocol.makeConnection(transport)
        return transport


def say(protocol, **message):
    protocol.outReceived(json.dumps(message).encode() + b"\n")


def end(protocol, status=None, signal=None, words=b""):
    if words:
        protocol.errReceived(words)
    protocol.transport.pid = None
    protocol.processEnded(Failure(error.ProcessTerminated(exitCode=status, signal=signal)))


class HostSlotTests(unittest.SynchronousTestCase):
    def make(self, n=2, **options):
        self.reactor = FakeReactor()
        self.reports = []
        slot = HostSlot(
            SSHHost("node1", n),
            list(range(n)),
            SSHSettings(python="python3"),
            FURL,
            ["--x"],
            self.reactor,
            None,
            lambda label, reason: self.reports.append((label, reason)),
            timeout=4.0,
            start_timeout=20.0,
            **options,
        )
        slot.start()
        return slot

    def connect(self, slot, pids=(50, 51)):
        protocol = slot.process
        say(protocol, ready="/tmp/taskfarm-ssh-x")
        for index in slot.engines:
            say(protocol, started=index, pid=pids[index])
        return protocol

    def test_furl_only_on_stdin(self):
        """The first line on ssh's stdin is the configuration with the furl;
        the furl is in no argv and the environment is this one's."""
        slot = self.make()
        protocol, argv, env, transport = self.reactor.spawned[0]
        self.assertNotIn("SECRETSWISSNUMBER", " ".join(argv))
        self.assertNotIn("SECRETSWISSNUMBER", json.dumps(env))
        first = transport.messages()[0]
        self.assertEqual(
            first,
            {
                "config": {
                    "furl": FURL,
                    "engines": [0, 1],
                    "options": ["--x"],
                    "timeout": 4.0,
                    "grace": 5.0,
                }
            },
        )
        self.assertEqual(slot.state, HostState.CONNECTING)
        self.connect(slot)
        self.assertEqual(slot.state, HostState.RUNNING)
        self.assertEqual(self.successResultOf(slot.started), None)
        self.assertEqual(slot.folder, "/tmp/taskfarm-ssh-x")
        self.assertEqual(
            [(d["label"], d["pid"], d["state"]) for d in slot.describe()],
            [("node1 engine 0", 50, "running"), ("node1 engine 1", 51, "running")],
        )

    def test_ticks(self):
        """The launcher ticks every second while connected."""
        slot = self.make()
        self.connect(slot)
        transport = slot.process.transport
        self.reactor.pump([1.0] * 3)
        self.assertEqual(transport.messages()[1:], [{"tick": 1}] * 4)

    def test_engine_restarts_with_backoff_then_gives_up(self):
        """An engine that ends is reported and started again after a delay
        that doubles with each quick death; after 3 quick deaths in a row
        the host gives up on it."""
        slot = self.make(max_quick_failures=3)
        protocol = self.connect(slot)
        transport = protocol.transport
        delays = []
        for death in range(3):
            say(protocol, ended=1, status=1, signal=None)
            before = self.reactor.seconds()
            if death == 2:
                break
            self.assertEqual(slot.engines[1].state, EngineState.RESTARTING)
            while {"start": 1} not in transport.messages():
                self.reactor.advance(0.25)
            delays.append(self.reactor.seconds() - before)
            transport.written.clear()
            say(protocol, started=1, pid=60 + death)
        self.assertEqual(delays, [1.0, 2.0])
        self.assertEqual(slot.engines[1].state, EngineState.DOWN)
        self.assertEqual(
            self.reports[-1],
            (
                "node1 engine 1",
                "node1 engine 1 (pid 61) ended (exit status 1); gave up after 3 quick failures in a row",
            ),
        )
        self.assertEqual(slot.engines[0].state, EngineState.RUNNING)

    def test_long_life_gets_fresh_backoff(self):
        """An engine that lived over a minute is started again after the
        first delay (0.5 s)."""
        slot = self.make()
        protocol = self.connect(slot)
        say(protocol, ended=0, status=1, signal=None)
        self.reactor.advance(1.0)
        say(protocol, started=0, pid=70)
        self.reactor.advance(61)
        protocol.transport.written.clear()
        say(protocol, ended=0, status=None, signal=9)
        self.reactor.advance(0.5)
        self.assertIn({"start": 0}, protocol.transport.messages())
        self.assertIn("signal 9", self.reports[-1][1])

    def test_killed_and_refused_stay_down(self):
        """Exit 76 (a MultiEngine kill) and 78 (refused) are not restarted."""
        slot = self.make()
        protocol = self.connect(slot)
        say(protocol, ended=0, status=exitcodes.EXIT_KILLED, signal=None)
        say(protocol, ended=1, status=exitcodes.EXIT_REFUSED, signal=None)
        self.reactor.advance(60)
        self.assertNotIn({"start": 0}, protocol.transport.messages())
        self.assertNotIn({"start": 1}, protocol.transport.messages())
        self.assertEqual([e.state for e in slot.engines.values()], [EngineState.DOWN] * 2)
        self.assertIn("stopped by a MultiEngine kill; it stays down", self.reports[0][1])
        self.assertIn("refused to start; it stays down", self.reports[1][1])

    def test_first_connection_failure_fails_start(self):
        """ssh failing at start (a host key, a login) fails `started` with
        its last words, and is not retried."""
        slot = self.make()
        end(slot.process, status=255, words=b"Host key verification failed.\r\n")
        failure = self.failureResultOf(slot.started, ClusterError)
        self.assertEqual(
            failure.getErrorMessage(),
            "ssh to node1 ended (exit status 255): Host key verification failed.",
        )
        self.assertEqual(slot.state, HostState.GAVE_UP)
        self.reactor.advance(120)
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_lost_connection_reconnects_then_gives_up(self):
        """ssh ending later is reported for each running engine and for the
        host, and made again after the back-off, the remaining engines
        asked for in the new configuration; after 2 quick failures in a
        row the host is given up."""
        slot = self.make(max_quick_failures=2)
        protocol = self.connect(slot)
        say(protocol, ended=1, status=exitcodes.EXIT_KILLED, signal=None)
        self.reports.clear()
        end(protocol, status=255, words=b"Connection reset by peer\n")
        self.assertEqual(
            self.reports,
            [
                (
                    "node1 engine 0",
                    "node1 engine 0 lost: ssh to node1 ended (exit status 255): Connection reset by peer",
                ),
                ("node1", "ssh to node1 ended (exit status 255): Connection reset by peer"),
            ],
        )
        self.assertEqual(slot.state, HostState.RECONNECTING)
        self.reactor.advance(0.99)
        self.assertEqual(len(self.reactor.spawned), 1)
        self.reactor.advance(0.01)
        self.assertEqual(len(self.reactor.spawned), 2)
        second = slot.process
        self.assertEqual(second.transport.messages()[0]["config"]["engines"], [0])
        end(second, status=255, words=b"No route to host\n")
        self.assertEqual(slot.state, HostState.GAVE_UP)
        self.assertEqual(
            self.reports[-1],
            (
                "node1",
                "ssh to node1 ended (exit status 255): No route to host; "
                "gave up after 2 quick failures in a row",
            ),
        )
        self.reactor.advance(120)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_silent_host_is_killed(self):
        """No line from the host for `timeout` seconds (a cut network):
        the ssh process is SIGKILLed, and its end says why."""
        slot = self.make()
        protocol = self.connect(slot)
        self.reactor.advance(3.9)
        self.assertEqual(protocol.transport.signals, [])
        say(protocol, tick=1)
        self.reactor.advance(3.9)
        self.assertEqual(protocol.transport.signals, [])
        self.reactor.advance(0.2)
        self.assertEqual(protocol.transport.signals, ["KILL"])
        end(protocol, signal=9)
        self.assertEqual(
            self.reports[-1], ("node1", "ssh to node1 ended (no word from the host for 4 s)")
        )

    def test_silent_at_start_uses_start_timeout(self):
        """While connecting the host gets `start_timeout`, then fails start."""
        slot = self.make()
        self.reactor.advance(19.9)
        self.assertEqual(slot.process.transport.signals, [])
        self.reactor.advance(0.2)
        self.assertEqual(slot.process.transport.signals, ["KILL"])
        end(slot.process, signal=9)
        self.assertIn(
            "no word from the host for 20 s", str(self.failureResultOf(slot.started).value)
        )

    def test_stop_closes_stdin_and_waits(self):
        """`stop` closes ssh's stdin (the host ends its engines) and waits for
        ssh; SIGTERM after grace + 3 s, SIGKILL after grace + 5 s; no
        reconnect or restart follows."""
        slot = self.make(grace=2.0)
        protocol = self.connect(slot)
        say(protocol, ended=1, status=1, signal=None)
        from twisted.internet import defer

        stopped = defer.Deferred.fromCoroutine(slot.stop())
        self.assertTrue(protocol.transport.stdin_closed)
        self.assertNoResult(stopped)
        self.reactor.advance(5.0)
        self.assertEqual(protocol.transport.signals, [15])
        self.reactor.advance(2.0)
        self.assertEqual(protocol.transport.signals, [15, "KILL"])
        end(protocol, signal=9)
        self.successResultOf(stopped)
        self.assertEqual(slot.state, HostState.STOPPED)
        self.reactor.advance(120)
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_describe_and_clean_up_by_pid_and_start_time(self):
        """describe() names the ssh client's pid and start time; clean_up
        signals only a live process whose start time matches (never a later
        process given the same pid), and skips entries without one."""
        slot = self.make()
        self.connect(slot)
        entry = slot.describe()[0]
        self.assertEqual(entry["host"], "node1")
        self.assertEqual(entry["ssh_pid"], 1000)
        me = os.getpid()
        described = [
            {"label": "x", "host": "n", "pid": 1, "ssh_pid": me, "ssh_started": "not-mine"},
            {"label": "y", "host": "n", "pid": 2},
        ]
        self.successResultOf(SSHLauncher.clean_up(self.reactor, None, described, {}))

    def test_lines_not_ours_are_logged_not_fatal(self):
        """Lines that are not the host side's JSON (a login script's echo,
        a bare number) go to the ssh log; the connection carries on."""
        slot = self.make()
        protocol = slot.process
        protocol.outReceived(b'Welcome to node1\n5\n[1]\n{"started": "x"}\n')
        self.connect(slot)
        self.assertEqual(slot.state, HostState.RUNNING)

    def test_no_engine_left_no_reconnect(self):
        """A connection that ends when every engine there is down for good
        is not made again."""
        slot = self.make()
        protocol = self.connect(slot)
        for index in (0, 1):
            say(protocol, ended=index, status=exitcodes.EXIT_KILLED, signal=None)
        end(protocol, status=0)
        self.assertEqual(slot.state, HostState.GAVE_UP)
        self.assertIn("no engine left to start there", self.reports[-1][1])
        self.reactor.advance(120)
        self.assertEqual(len(self.reactor.spawned), 1)
