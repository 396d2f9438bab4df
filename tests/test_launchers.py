"""The launcher table, the local launcher's interface, the remote-location
check, the lock file's holder and the state file: logic without processes.

- `LocalLauncher` provides `IEngineLauncher` (verifyObject) and is the table's
  "local"; an unknown --launcher name is a usage error listing the known ones;
- a launcher's own options reach it alone, and one of another launcher is a
  usage error naming both; a table declaring one flag twice differently is a bug;
- a remote launcher refuses a loopback location (options and furl), naming
  --listen/--location;
- the lock file names pid, start time and location; a clean release empties
  it; a lock naming a dead process is taken over with a log line;
- the controller SIGTERMed from outside (EXIT_TERMINATED) stays down.
"""

from __future__ import annotations

import os

from twisted.internet import defer, task
from twisted.python import usage
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyClass, verifyObject

from taskfarm import cli
from taskfarm.cluster import launchers
from taskfarm.cluster.launcher import (
    Cluster,
    ClusterError,
    check_options_reach,
    check_reachable,
    furl_locations,
)
from taskfarm.cluster.local import LocalLauncher
from taskfarm.cluster.manage import StateRecorder, read_state, without_daemon
from taskfarm.errors import ProfileInUse
from taskfarm.interfaces import IEngineLauncher
from taskfarm.profile import LockHolder, Profile, in_use_error, lock_profile, read_holder
from taskfarm.testing.helpers import temp_dir


@implementer(IEngineLauncher)
class RemoteLauncher:
    """A launcher of engines elsewhere, for the tests: starts nothing."""

    name = "faraway"
    remote = True
    optParameters = [["far-hosts", None, None, "Hosts, far away."]]
    optFlags = [["far-verbose", None, "Say more."]]

    def __init__(self, reactor, profile, options, engine_timeout=None):
        if options["far-hosts"] == "bad":
            raise usage.UsageError("--far-hosts: 'bad' is no host list")
        self.options = options
        self.started: list = []

    @classmethod
    def check_options(cls, options):
        if options["far-hosts"] is None:
            raise usage.UsageError("--launcher faraway needs --far-hosts")

    def start(self, count, furl_file, engine_options):
        self.started.append((count, furl_file, engine_options))
        return defer.succeed(None)

    def stop(self):
        return defer.succeed(None)

    def watch(self, callback):
        pass

    def describe(self):
        return []


TABLE = {"local": LocalLauncher, "faraway": RemoteLauncher}


class TableTests(unittest.SynchronousTestCase):
    def test_local_launcher_provides_the_interface(self):
        """The table's "local" is LocalLauncher, which provides IEngineLauncher."""
        self.assertIs(launchers.LAUNCHERS["local"], LocalLauncher)
        self.assertTrue(verifyClass(IEngineLauncher, LocalLauncher))
        profile = Profile(temp_dir(self))
        launcher = launchers.make_launcher("local", task.Clock(), profile, {})
        self.assertTrue(verifyObject(IEngineLauncher, launcher))
        self.assertEqual((launcher.name, launcher.remote), ("local", False))
        self.assertEqual(launcher.describe(), [])
        self.successResultOf(launcher.start(0, profile.root / "engine.furl", []))
        self.assertIsNone(self.successResultOf(launcher.stop()))

    def test_unknown_launcher_is_a_usage_error_listing_the_known_ones(self):
        error = self.assertRaises(usage.UsageError, launchers.launcher_class, "slurmish", TABLE)
        self.assertEqual(
            str(error), "unknown launcher 'slurmish': --launcher takes one of faraway, local"
        )
        for command in (["cluster"], ["engines", "--furl-file", "F"]):
            options = cli.Options()
            error = self.assertRaises(
                usage.UsageError, options.parseOptions, command + ["--launcher", "nope"]
            )
            self.assertIn(
                "unknown launcher 'nope': --launcher takes one of %s"
                % ", ".join(sorted(launchers.LAUNCHERS)),
                str(error),
            )

    def test_options_go_to_their_launcher_alone(self):
        """Each launcher gets exactly its own options; another's given is a
        usage error; its check_options and constructor refuse bad values."""
        parameters, flags = launchers.option_table(TABLE)
        self.assertEqual([p[0] for p in parameters], ["far-hosts"])
        self.assertEqual([f[0] for f in flags], ["far-verbose"])
        values = {"far-hosts": "a,b", "far-verbose": 1, "number": 4}
        self.assertEqual(
            launchers.launcher_options("faraway", values, TABLE),
            {"far-hosts": "a,b", "far-verbose": 1},
        )
        error = self.assertRaises(
            usage.UsageError, launchers.launcher_options, "local", values, TABLE
        )
        self.assertEqual(str(error), "--far-hosts is an option of the faraway launcher, not of --launcher local")
        self.assertEqual(launchers.launcher_options("local", {"far-hosts": None, "far-verbose": 0}, TABLE), {})
        error = self.assertRaises(
            usage.UsageError, launchers.make_launcher, "faraway", None, None, {}, table=TABLE
        )
        self.assertEqual(str(error), "--launcher faraway needs --far-hosts")
        error = self.assertRaises(
            usage.UsageError,
            launchers.make_launcher, "faraway", None, None, {"far-hosts": "bad"}, table=TABLE,
        )
        self.assertIn("'bad' is no host list", str(error))
        launcher = launchers.make_launcher("faraway", None, None, values, table=TABLE)
        self.assertEqual(launcher.options, {"far-hosts": "a,b", "far-verbose": 1})

    def test_one_flag_declared_twice_differently_is_a_bug(self):
        class Other(RemoteLauncher):
            name = "other"
            optParameters = [["far-hosts", None, "x", "Another meaning."]]

        self.assertRaises(ValueError, launchers.option_table, {"faraway": RemoteLauncher, "other": Other})
        same = type("Same", (RemoteLauncher,), {"name": "same"})
        parameters, _ = launchers.option_table({"faraway": RemoteLauncher, "same": same})
        self.assertEqual(len(parameters), 1)

    def test_repeatable_options_are_lists(self):
        """A launcher's optRepeated option: each use appends to its list (in
        order; [] when not given); it is the launcher's own like any other,
        and two launchers declaring it differently is a bug of the table."""

        class Repeating(RemoteLauncher):
            name = "repeating"
            optRepeated = [["far-option", None, "One more option (repeatable)."]]

        table = {"faraway": RemoteLauncher, "repeating": Repeating}
        handlers = launchers.repeated_handlers(table)
        self.assertEqual(list(handlers), ["opt_far_option"])
        options = type("Options", (usage.Options,), dict(handlers))()
        options.parseOptions(["--far-option", "a=1", "--far-option", "b"])
        self.assertEqual(options["far-option"], ["a=1", "b"])
        self.assertIn("One more option", options.__str__())
        own = launchers.launcher_options("repeating", {"far-hosts": "h"}, table)
        self.assertEqual(own["far-option"], [])
        error = self.assertRaises(
            usage.UsageError, launchers.launcher_options, "faraway", options, table
        )
        self.assertIn("--far-option is an option of the repeating launcher", str(error))
        other = type("Other", (Repeating,), {"optRepeated": [["far-option", None, "Else."]]})
        self.assertRaises(ValueError, launchers.repeated_handlers, {"r": Repeating, "o": other})

    def test_daemon_flag_is_taken_out_of_the_argv(self):
        self.assertEqual(
            without_daemon(["-n", "2", "--daemon", "--profile-dir", "P", "--daem"]),
            ["-n", "2", "--profile-dir", "P"],
        )
        self.assertEqual(without_daemon(["--depend-timeout", "3"]), ["--depend-timeout", "3"])


class RemoteLocationTests(unittest.SynchronousTestCase):
    """A remote launcher refuses to start while the controller's location
    is loopback, naming --listen and --location; a local one never does."""

    def setUp(self):
        self.remote = RemoteLauncher(None, None, {"far-hosts": "a"})

    def test_loopback_options_refused(self):
        for argv in (
            [],
            ["--listen", "tcp:10105:interface=127.0.0.1"],
            ["--listen", "tcp:10105"],
            ["--location", "localhost:10105"],
            ["--listen", "tcp:10105:interface=0.0.0.0", "--location", "127.0.0.2:10105"],
        ):
            error = self.assertRaises(ClusterError, check_options_reach, self.remote, argv)
            self.assertIn("the faraway launcher starts engines on other machines", str(error))
            self.assertIn("(loopback)", str(error))
            self.assertIn("--listen tcp:10105:interface=ADDRESS", str(error))
            self.assertIn("--location HOST:PORT", str(error))
        for argv in (
            ["--listen", "tcp:10105:interface=10.0.0.1"],
            ["--listen", "tcp:10105:interface=0.0.0.0", "--location", "node0:10105"],
        ):
            check_options_reach(self.remote, argv)
        check_options_reach(LocalLauncher(None, None), [])

    def test_loopback_furl_refused(self):
        loopback = "pb://abc@127.0.0.1:4000,localhost:4000/engine"
        self.assertEqual(furl_locations(loopback), ["127.0.0.1:4000", "localhost:4000"])
        error = self.assertRaises(ClusterError, check_reachable, self.remote, loopback)
        self.assertIn("127.0.0.1:4000,localhost:4000 (loopback)", str(error))
        check_reachable(self.remote, "pb://abc@tcp:10.1.2.3:4000/engine")
        check_reachable(self.remote, "pb://abc@127.0.0.1:4000,node0:4000/engine")
        check_reachable(LocalLauncher(None, None), loopback)

    def test_cluster_with_a_remote_launcher_refuses_before_starting(self):
        """`Cluster.start` says so before it starts any process."""
        profile = Profile(temp_dir(self) / "p")
        cluster = Cluster(profile, 2, task.Clock(), launcher=self.remote)
        failure = self.failureResultOf(defer.Deferred.fromCoroutine(cluster.start()), ClusterError)
        self.assertIn("--listen", str(failure.value))
        self.assertIsNone(cluster.controller)
        self.assertEqual(self.remote.started, [])


class LockFileTests(unittest.SynchronousTestCase):
    def test_lock_names_pid_start_time_and_location_and_a_clean_release_empties_it(self):
        profile = Profile(temp_dir(self) / "p")
        lock = lock_profile(profile, clock=lambda: 0.0)
        self.addCleanup(lock.release)
        self.assertEqual(
            read_holder(profile), LockHolder(os.getpid(), "1970-01-01 00:00:00 UTC", "not listening yet")
        )
        lock.record_location("127.0.0.1:4321")
        holder = read_holder(profile)
        self.assertEqual(holder.location, "127.0.0.1:4321")
        error = self.assertRaises(ProfileInUse, lock_profile, profile)
        self.assertEqual(
            str(error),
            "profile %s: already running: pid %d since 1970-01-01 00:00:00 UTC, listening on "
            "127.0.0.1:4321; stop it (taskfarm stop --profile-dir %s), or give this one "
            "another --profile-dir" % (profile.root, os.getpid(), profile.root),
        )
        self.assertEqual(profile.lock_file.stat().st_mode & 0o777, 0o600)
        lock.release()
        self.assertIsNone(read_holder(profile))
        self.assertEqual(profile.lock_file.read_text(), "")
        self.assertIn("pid unknown since unknown", str(in_use_error(profile, -1)))

    def test_stale_lock_taken_over_with_a_log_line(self):
        """A lock file naming a controller that is gone (a free flock, a
        name left behind) is taken, and a warning names the dead holder."""
        from twisted.logger import globalLogPublisher

        profile = Profile(temp_dir(self) / "p")
        profile.ensure()
        dead = LockHolder(2**22 + 17, "2026-01-01 00:00:00 UTC", "127.0.0.1:999")
        profile.lock_file.write_bytes(dead.text())
        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        lock = lock_profile(profile)
        self.addCleanup(lock.release)
        self.assertEqual(lock.stale, dead)
        self.assertEqual(read_holder(profile).pid, os.getpid())
        (event,) = [e for e in events if e.get("pid") == dead.pid]
        self.assertIn("taking over the lock of controller pid", event["log_format"])
        self.assertEqual(event["location"], "127.0.0.1:999")


class CleanUpTests(unittest.TestCase):
    async def _stop(self, profile):
        from twisted.internet import reactor

        from taskfarm.cluster.manage import stop_cluster

        return await stop_cluster(reactor, profile, timeout=1)

    def test_stop_calls_the_launcher_class_clean_up_when_the_launcher_is_gone(self):
        """Engines elsewhere of a launcher that is gone: `taskfarm stop` hands
        the last describe() and the options to its class's clean_up."""
        calls = []

        class WithCleanUp(RemoteLauncher):
            @classmethod
            def clean_up(cls, reactor, profile, described, options):
                calls.append((described, options))
                return defer.succeed(None)

        self.patch(launchers, "LAUNCHERS", {"local": LocalLauncher, "faraway": WithCleanUp})
        profile = Profile(temp_dir(self) / "p")
        profile.ensure()
        jobs = [{"label": "job 7_0", "host": "node1", "job": "7_0"}]
        from taskfarm.cluster.manage import write_state

        write_state(profile, {
            "launcher": {"pid": 2**22 + 17, "started": "1", "name": "faraway"},
            "controller": {"pid": None},
            "engines": jobs,
            "options": {"far-hosts": "node1"},
        })
        d = defer.Deferred.fromCoroutine(self._stop(profile))

        def check(result):
            code, text = result
            self.assertEqual(code, 0, text)
            self.assertIn("the faraway launcher cleaned up its engines", text)
            self.assertEqual(calls, [(jobs, {"far-hosts": "node1"})])
            self.assertFalse(profile.state_file.exists())

        return d.addCallback(check)


class StateFileTests(unittest.SynchronousTestCase):
    def test_state_file_is_0600_and_names_launcher_and_engines(self):
        profile = Profile(temp_dir(self) / "p")
        profile.ensure()
        clock = task.Clock()
        cluster = Cluster(profile, 0, clock)
        recorder = StateRecorder(profile, cluster, "local", clock, daemon=True, clock=lambda: 0.0)
        recorder.start()
        state = read_state(profile)
        self.assertEqual(profile.state_file.stat().st_mode & 0o777, 0o600)
        self.assertEqual(state["phase"], "starting")
        self.assertEqual(state["launcher"]["pid"], os.getpid())
        self.assertEqual((state["launcher"]["name"], state["launcher"]["daemon"]), ("local", True))
        self.assertEqual(state["engines"], [])
        clock.advance(2.0)
        recorder.stopping()
        self.assertEqual(read_state(profile)["phase"], "stopping")
        recorder.remove()
        self.assertFalse(profile.state_file.exists())


class _StartingReactor:
    """What `_stay_down_on_sigterm` uses of a reactor that does not run yet."""

    def __init__(self) -> None:
        self.from_thread: list = []
        self.when_running: list = []

    def callFromThread(self, function, *args) -> None:
        self.from_thread.append((function, args))

    def callWhenRunning(self, function, *args) -> None:
        self.when_running.append((function, args))


class PersonsSigtermTests(unittest.SynchronousTestCase):
    """A controller run by a launcher takes a SIGTERM as a person's from the
    moment it is made, not only once its reactor runs: before this, one that
    held its profile but was still opening its journal died of the signal,
    and its launcher started it again (test_manage flaked under load)."""

    def test_sigterm_before_the_reactor_runs_exits_terminated(self):
        import signal

        from taskfarm.controller.tap import _stay_down_on_sigterm
        from taskfarm.exitcodes import EXIT_TERMINATED, stop_reactor_and_exit

        previous = signal.getsignal(signal.SIGTERM)
        self.addCleanup(signal.signal, signal.SIGTERM, previous)
        reactor = _StartingReactor()
        _stay_down_on_sigterm(reactor)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a second one changes nothing
        self.assertEqual(reactor.from_thread, [(stop_reactor_and_exit, (reactor, EXIT_TERMINATED))])
        # ... and again after the reactor's own handlers, once it runs.
        ((install, (signum, handler)),) = reactor.when_running
        self.assertEqual((install, signum), (signal.signal, signal.SIGTERM))
        self.assertIs(handler, signal.getsignal(signal.SIGTERM))
