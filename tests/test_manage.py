"""Managing a cluster, as a user would: ``taskfarm cluster --daemon``,
``taskfarm status``, ``taskfarm stop``, the profile lock, a person's SIGTERM.

Real processes throughout (``taskfarm`` commands as subprocesses, clients in
this process).  Each test shows, for issue 10:

- ``--daemon`` returns once all engines registered, printing the controller's
  pid and address; ``status`` shows the engines (id, host, pid, state,
  tasks) and the queue counts; ``taskfarm engines`` adds engines to it; a
  second cluster on the busy profile fails at once with ``already running:
  pid N since T, listening on ADDR``; ``stop`` leaves no process (checked
  by pid and start time) and no state file; then ``status`` and ``stop``
  say that no cluster runs, with exit status 1;
- a lock whose controller was killed -9 is taken over, with a log line;
- SIGKILL of the controller (a crash) restarts it, SIGTERM of the controller
  (a person) stops the whole cluster, and it is not restarted;
- an unknown ``--launcher`` is a usage error (exit status 2).

Every wait is bounded; every process started is ended by PID.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

from twisted.internet import reactor

from taskfarm.asyncclient import TaskClient
from taskfarm.cluster.launchers import LAUNCHERS
from taskfarm.cluster.manage import read_state, write_state
from taskfarm.profile import TASK, Profile, read_holder
from taskfarm.task import Task
from taskfarm.testing.helpers import async_test as run
from taskfarm.testing.helpers import is_alive, proc_stat, wait_until
from taskfarm.testing.processes import TASKFARM, ProcessTestCase, kill_if_alive, processes_naming

REPO = Path(__file__).resolve().parent.parent


def report(name: str, **numbers) -> None:
    """One line of numbers per test (pytest shows it with -rP)."""
    print("MANAGE %s %s" % (name, json.dumps(numbers, sort_keys=True)), flush=True)


def _started(pid: int) -> str | None:
    fields = proc_stat(pid)
    return None if fields is None else fields[19]


class _ManageTestCase(ProcessTestCase):
    timeout = 120
    cwd = str(REPO)

    def setUp(self):
        super().setUp()
        self.profile = Profile(self.root / "profile")

    async def command(self, name: str, *args: str, within: float = 60) -> tuple[int, str]:
        """Run ``taskfarm ARGS``; (exit status, output)."""
        process = self.spawn(TASKFARM + list(args), name)
        code = await self.wait_for_exit(process, name, within)
        return code, self.output(name)

    def remember_cluster(self) -> dict[int, str]:
        """{pid: start time} of the launcher, controller and engines the
        state file names; each is killed at cleanup if still alive."""
        state = read_state(self.profile)
        assert state is not None, "no cluster.json"
        pids = [state["launcher"]["pid"], state["controller"]["pid"]]
        pids += [entry["pid"] for entry in state["engines"]]
        found = {pid: _started(pid) for pid in pids}
        for pid, started in found.items():
            assert started is not None, "pid %d of cluster.json is not running" % pid
            self.seen_children[pid] = started
        self.addCleanup(self._kill_all, found)
        return found

    def _kill_all(self, found: dict[int, str]) -> None:
        for pid, started in found.items():
            kill_if_alive(pid, started)

    def alive(self, found: dict[int, str]) -> list[int]:
        return [pid for pid, started in found.items() if is_alive(pid, started)]


class DaemonStatusStopTests(_ManageTestCase):
    @run
    async def test_daemon_status_busy_profile_engines_and_stop_leave_nothing(self):
        profile = self.profile
        asked = reactor.seconds()
        code, out = await self.command(
            "daemon", "cluster", "-n", "2", "--daemon", "--profile-dir", str(profile.root)
        )
        up = reactor.seconds() - asked
        self.assertEqual(code, 0, out)
        state = read_state(profile)
        holder = read_holder(profile)
        self.assertEqual(state["phase"], "running")
        self.assertTrue(state["launcher"]["daemon"])
        self.assertEqual(state["controller"]["pid"], holder.pid)
        self.assertIn(
            "launcher pid %d, controller pid %d listening on %s, 2 engines registered"
            % (state["launcher"]["pid"], holder.pid, holder.location),
            out,
        )
        self.assertRegex(holder.location, r"^127\.0\.0\.1:\d+$")
        self.assertEqual(profile.state_file.stat().st_mode & 0o777, 0o600)
        cluster = self.remember_cluster()
        self.assertEqual(len(cluster), 4)
        # Detached: its own session, stdin closed, output in the profile's logs.
        launcher = state["launcher"]["pid"]
        self.assertEqual(os.getsid(launcher), launcher)
        self.assertEqual(os.readlink("/proc/%d/fd/0" % launcher), "/dev/null")
        self.assertEqual(
            os.readlink("/proc/%d/fd/1" % launcher), str(profile.log_dir / "cluster.out")
        )
        # ... which it rotates itself: stderr too, owner-only.
        self.assertEqual(
            os.readlink("/proc/%d/fd/2" % launcher), str(profile.log_dir / "cluster.out")
        )
        self.assertEqual((profile.log_dir / "cluster.out").stat().st_mode & 0o777, 0o600)

        tc = TaskClient(profile.furl_file(TASK), reactor, connect_timeout=10)
        self.addCleanup(tc.disconnect)
        ids = await tc.run_many([Task("a = 1", pull="a")] * 3)
        await tc.get_task_results(ids, block=True)
        await tc.disconnect()

        code, out = await self.command("status", "status", "--profile-dir", str(profile.root))
        self.assertEqual(code, 0, out)
        self.assertIn(
            "controller: pid %d since %s, listening on %s" % (holder.pid, holder.since, holder.location),
            out,
        )
        self.assertIn("launcher:   pid %d, --launcher local (--daemon), 2 engines requested" % launcher, out)
        self.assertIn("engines:    2 registered", out)
        rows = re.findall(r"^\s+(\d+)\s+(\S+)\s+(\d+)\s+(idle|running \S+)\s+(\d+)$", out, re.M)
        engine_pids = {entry["pid"] for entry in state["engines"]}
        self.assertEqual(sorted(int(r[0]) for r in rows), [0, 1], out)
        self.assertEqual({int(r[2]) for r in rows}, engine_pids, out)
        self.assertEqual({r[1] for r in rows}, {os.uname().nodename}, out)
        self.assertIn("succeeded 3", out)
        self.assertIn("pending 0", out)
        self.assertIn("totals:     3 succeeded, 0 failed", out)
        self.assertIn("dashboard:  off", out)

        # A second cluster on the busy profile: at once, with the message.
        message = "already running: pid %d since %s, listening on %s" % (
            holder.pid, holder.since, holder.location,
        )
        for name, extra in (("second", ()), ("second-daemon", ("--daemon",))):
            asked = reactor.seconds()
            code, out = await self.command(
                name, "cluster", "-n", "1", "--profile-dir", str(profile.root), *extra
            )
            self.assertEqual(code, 1, out)
            self.assertIn(message, out)
            self.assertLess(reactor.seconds() - asked, 10)
        self.assertEqual(read_state(profile)["launcher"]["pid"], launcher)

        # `taskfarm engines` adds one to the running controller.
        engines = self.spawn(
            TASKFARM + ["engines", "-n", "1", "--launcher", "local", "--profile-dir", str(profile.root)],
            "engines",
        )
        tc = TaskClient(profile.furl_file(TASK), reactor, connect_timeout=10)
        self.addCleanup(tc.disconnect)

        async def three():
            return len(await tc.engine_ids()) == 3

        await wait_until(three, "the added engine to register", 30, 0.1)
        await tc.disconnect()
        engines.send_signal(signal.SIGTERM)
        self.assertEqual(await self.wait_for_exit(engines, "engines", 15), 0, self.output("engines"))

        asked = reactor.seconds()
        code, out = await self.command("stop", "stop", "--profile-dir", str(profile.root))
        took = reactor.seconds() - asked
        self.assertEqual(code, 0, out)
        self.assertIn("stopped the cluster on profile %s" % profile.root, out)
        self.assertIn("launcher pid %d stopped its controller and engines" % launcher, out)
        self.assertEqual(self.alive(cluster), [])
        self.assertEqual(processes_naming(str(profile.root)), [])
        self.assertFalse(profile.state_file.exists())
        self.assertIsNone(read_holder(profile))

        code, out = await self.command("status-after", "status", "--profile-dir", str(profile.root))
        self.assertEqual(code, 1, out)
        self.assertIn("no cluster runs on profile %s" % profile.root, out)
        code, out = await self.command("stop-after", "stop", "--profile-dir", str(profile.root))
        self.assertEqual(code, 1, out)
        self.assertIn("no cluster runs on profile %s" % profile.root, out)
        report("daemon", up_seconds=round(up, 2), stop_seconds=round(took, 2))

    @run
    async def test_stop_of_a_stuck_launcher_or_a_dead_one(self):
        """A launcher that does not stop within --timeout (SIGSTOPped here)
        is killed, and so is everything it started; a launcher killed -9
        took its children with it: `stop` says no cluster runs (exit 1)
        and drops the stale state file."""
        code, out = await self.command(
            "daemon", "cluster", "-n", "1", "--daemon", "--profile-dir", str(self.profile.root)
        )
        self.assertEqual(code, 0, out)
        cluster = self.remember_cluster()
        launcher = read_state(self.profile)["launcher"]["pid"]
        os.kill(launcher, signal.SIGSTOP)
        code, out = await self.command(
            "stop", "stop", "--timeout", "2", "--profile-dir", str(self.profile.root)
        )
        self.assertEqual(code, 0, out)
        self.assertIn("launcher pid %d did not stop within 2 s: killed it" % launcher, out)
        self.assertEqual(self.alive(cluster), [])
        self.assertFalse(self.profile.state_file.exists())

        code, out = await self.command(
            "daemon2", "cluster", "-n", "1", "--daemon", "--profile-dir", str(self.profile.root)
        )
        self.assertEqual(code, 0, out)
        cluster = self.remember_cluster()
        launcher = read_state(self.profile)["launcher"]["pid"]
        os.kill(launcher, signal.SIGKILL)
        await wait_until(lambda: self.alive(cluster) == [], "the cluster to die with its launcher", 10)
        code, out = await self.command("stop2", "stop", "--profile-dir", str(self.profile.root))
        self.assertEqual(code, 1, out)
        self.assertIn(
            "no cluster runs on profile %s (its cluster.json names launcher pid %d, gone with all "
            "it started)" % (self.profile.root, launcher),
            out,
        )
        self.assertFalse(self.profile.state_file.exists())


class FallbackTests(_ManageTestCase):
    @run
    async def test_stop_kills_named_processes_a_gone_launcher_left(self):
        """A launcher gone while a process it started still runs (here a
        stand-in whose pid and start time the state file names): `stop`
        kills that process by pid, and says so."""
        leftover = self.spawn(["sleep", "60"], "leftover")
        started = _started(leftover.pid)
        self.profile.ensure()
        write_state(
            self.profile,
            {
                "phase": "running",
                "launcher": {"pid": 2**22 + 17, "started": "1", "name": "local"},
                "controller": {"pid": None},
                "engines": [
                    {"label": "engine 0", "host": os.uname().nodename, "pid": leftover.pid,
                     "started": started}
                ],
            },
        )
        code, out = await self.command("stop", "stop", "--profile-dir", str(self.profile.root))
        self.assertEqual(code, 0, out)
        self.assertIn("launcher pid %d was gone; killed what was left: engine 0" % (2**22 + 17), out)
        self.assertEqual(leftover.wait(5), -signal.SIGKILL)
        self.assertFalse(self.profile.state_file.exists())

    @run
    async def test_daemon_that_cannot_start_says_why_and_leaves_nothing(self):
        code, out = await self.command(
            "daemon", "cluster", "-n", "1", "--daemon", "--start-timeout", "0.3",
            "--profile-dir", str(self.profile.root),
        )
        self.assertEqual(code, 1, out)
        self.assertIn("taskfarm cluster: the background cluster exited with status 1:", out)
        self.assertIn("the controller did not answer within 0.3 s", out)
        await wait_until(
            lambda: processes_naming(str(self.profile.root)) == [],
            "no process left on the profile",
            10,
        )
        self.assertFalse(self.profile.state_file.exists())


class LockTests(_ManageTestCase):
    @run
    async def test_stale_lock_of_a_killed_controller_is_taken_over_with_a_log_line(self):
        """A controller run by hand and killed -9 leaves its name in the
        lock file; the next cluster takes the lock over and logs whose it
        was."""
        profile = self.profile
        controller = self.spawn(
            [sys.executable, "-m", "twisted", "taskcontroller", "--profile-dir", str(profile.root),
             "--no-journal"],
            "controller",
        )
        await wait_until(
            lambda: (read_holder(profile) or None) is not None
            and read_holder(profile).location != "not listening yet",
            "the hand-run controller to listen",
            30,
        )
        dead = read_holder(profile)
        self.assertEqual(dead.pid, controller.pid)
        controller.kill()
        self.assertEqual(await self.wait_for_exit(controller, "controller", 10), -signal.SIGKILL)
        self.assertIsNone(read_holder(profile))  # free, but it still names the dead one
        self.assertTrue(profile.lock_file.read_text().startswith("%d\n" % dead.pid))

        code, out = await self.command(
            "daemon", "cluster", "-n", "1", "--daemon", "--profile-dir", str(profile.root)
        )
        self.assertEqual(code, 0, out)
        self.remember_cluster()
        log = (profile.log_dir / "controller.log").read_text()
        self.assertIn(
            "taking over the lock of controller pid %d (since %s, %s): that process is gone"
            % (dead.pid, dead.since, dead.location),
            log,
        )
        code, out = await self.command("stop", "stop", "--profile-dir", str(profile.root))
        self.assertEqual(code, 0, out)


class PersonsSigtermTests(_ManageTestCase):
    @run
    async def test_controller_crash_restarts_sigterm_stops_the_cluster(self):
        """SIGKILL of the controller is a fault: it is started again.
        SIGTERM of the (new) controller is a person's: the launcher stops
        the engines and exits 0, saying why, and starts nothing again."""
        launcher, profile = await self.start_launcher(2)
        (first,) = self.children(launcher, "taskcontroller")
        self.children(launcher, "taskengine")
        os.kill(first, signal.SIGKILL)

        def new_controller():
            found = self.children(launcher, "taskcontroller")
            return next(iter(found), None) if found and first not in found else None

        await wait_until(lambda: new_controller() is not None, "the controller restarted", 30)
        await wait_until(
            lambda: (read_holder(profile) or None) is not None
            and read_holder(profile).pid == new_controller(),
            "the new controller to hold the profile",
            30,
        )
        second = new_controller()
        self.assertIn("controller (pid %d) ended" % first, self.output("launcher"))
        asked = reactor.seconds()
        os.kill(second, signal.SIGTERM)
        code = await self.wait_for_exit(launcher, "launcher", 20)
        took = reactor.seconds() - asked
        out = self.output("launcher")
        self.assertEqual(code, 0, out)
        self.assertIn(
            "the controller (pid %d) was stopped by a SIGTERM from outside (kill); it is not "
            "restarted; stopping the cluster" % second,
            out,
        )
        self.assertEqual(out.count("controller (pid %d) ended" % second), 0, out)
        alive = [pid for pid, started in self.seen_children.items() if is_alive(pid, started)]
        self.assertEqual(alive, [])
        self.assertFalse(profile.state_file.exists())
        report("sigterm", stopped_seconds=round(took, 2))


class UsageTests(_ManageTestCase):
    @run
    async def test_unknown_launcher_is_a_usage_error(self):
        code, out = await self.command(
            "cluster", "cluster", "--launcher", "nope", "--profile-dir", str(self.profile.root)
        )
        self.assertEqual(code, 2, out)
        self.assertIn(
            "taskfarm cluster: unknown launcher 'nope': --launcher takes one of %s\n"
            "Run 'taskfarm cluster --help' for its options."
            % ", ".join(sorted(LAUNCHERS)),
            out,
        )
        self.assertNotIn("Options:", out)
        self.assertFalse(self.profile.root.exists())
