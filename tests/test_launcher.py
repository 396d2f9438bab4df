"""The launcher keeps its promise: engines always come back, one controller
per profile, nothing left running.

Real processes throughout: `taskfarm cluster` as a subprocess (or a
`RealCluster` controller in this process), clients in this process.  Each
test shows one case of issue 8:

- case 4: an engine whose task calls ``os._exit(0)`` or stops its reactor is
  started again; only a MultiEngine ``kill`` keeps it down, and
  ``kill(controller=True)`` stops the cluster (the exit protocol of
  `taskfarm.exitcodes`);
- case 6: a launcher killed with kill -9 leaves no controller or engine
  behind; a second controller or cluster on a profile in use refuses at once
  with a message naming the holder; the next cluster hands out fresh ids;
- case 10: an engine SIGSTOPped, or stuck in C code holding the GIL, is
  SIGKILLed by its launcher and replaced;
- case 11: a process forked by a task holds the engine's pipes: the engine
  is restarted all the same, the forked process ends with it, and SIGTERM
  stops the cluster within seconds.

Every wait is bounded; every process started is ended by PID.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from twisted.internet import defer, reactor

from taskfarm.asyncclient import MultiEngineClient, TaskClient
from taskfarm.controller.service import create_controller
from taskfarm.errors import EngineLost, ProfileInUse
from taskfarm.exitcodes import EXIT_REFUSED
from taskfarm.profile import MULTIENGINE, TASK, Profile, read_holder
from taskfarm.task import Task
from taskfarm.testing.cluster import RealCluster
from taskfarm.testing.helpers import async_test as run
from taskfarm.testing.helpers import is_alive, proc_stat, sleep, wait_until
from taskfarm.testing.processes import TASKFARM, ProcessTestCase

REPO = Path(__file__).resolve().parent.parent

#: A short heartbeat, so that hung engines are noticed in seconds.
HEARTBEAT = ("--heartbeat-period", "0.2", "--heartbeat-timeout", "2")
HEARTBEAT_TIMEOUT = 2.0

#: Forks a child that keeps the engine's stdout, stderr and liveness pipe
#: open and sleeps 60 s; `child` is its pid, `group` its process group.
FORK_SLEEPER = """\
import os, time
child = os.fork()
if child == 0:
    time.sleep(60)
    os._exit(0)
group = os.getpgid(child)
"""

PID = Task("import os; pid = os.getpid()", pull="pid")


def report(name: str, **numbers) -> None:
    """One line of numbers per test (pytest shows it with -rP)."""
    print("LAUNCHER %s %s" % (name, json.dumps(numbers, sort_keys=True)), flush=True)


class _LauncherTestCase(ProcessTestCase):
    timeout = 120
    cwd = str(REPO)

    def _tub(self):
        from taskfarm.remote.tub import new_tub

        tub = new_tub()
        tub.startService()
        self.addCleanup(tub.stopService)
        return tub

    def task_client(self, profile: Profile) -> TaskClient:
        tc = TaskClient(profile.furl_file(TASK), reactor, connect_timeout=10, tub=self._tub())
        self.addCleanup(tc.disconnect)
        return tc

    def multiengine_client(self, profile: Profile) -> MultiEngineClient:
        mec = MultiEngineClient(
            profile.furl_file(MULTIENGINE), reactor, connect_timeout=10, tub=self._tub()
        )
        self.addCleanup(mec.disconnect)
        return mec

    async def registered(self, tc: TaskClient, n: int, timeout: float = 30) -> None:
        async def enough():
            return len(await tc.engine_ids()) == n

        await wait_until(enough, "%d registered engines" % n, timeout, 0.1)

    async def stop_launcher(self, launcher: subprocess.Popen, within: float = 15) -> float:
        """SIGTERM; the launcher exits 0 within `within` seconds and leaves
        none of its children running.  Returns the seconds it took."""
        asked = reactor.seconds()
        launcher.send_signal(signal.SIGTERM)
        code = await self.wait_for_exit(launcher, "launcher", within)
        took = reactor.seconds() - asked
        self.assertEqual(code, 0, self.output("launcher"))
        alive = [pid for pid, started in self.seen_children.items() if is_alive(pid, started)]
        self.assertEqual(alive, [], "left running after SIGTERM")
        return took


def _started(pid: int) -> str:
    fields = proc_stat(pid)
    assert fields is not None, "process %d is gone" % pid
    return fields[19]


class ExitProtocolTests(_LauncherTestCase):
    @run
    async def test_engine_exit_zero_or_reactor_stop_restarted_kill_stays_down(self):
        """Case 4.  A task calling os._exit(0) fails with EngineLost, and one
        that stops its engine's reactor ends too; both engines are started
        again and 10 later tasks all run.  A MultiEngine kill of one engine
        keeps it down (exit status `EXIT_KILLED`), and kill(controller=True)
        stops the whole cluster: the launcher exits 0, nothing left."""
        launcher, profile = await self.start_launcher(2)
        first = self.children(launcher, "taskengine")
        self.assertEqual(len(first), 2)
        tc = self.task_client(profile)
        await self.registered(tc, 2)

        exits = await tc.run(Task("import os; os._exit(0)"))
        tr = await tc.get_task_result(exits, block=True)
        self.assertIsInstance(tr.failure, EngineLost)
        stops = await tc.run(
            Task("from twisted.internet import reactor\nreactor.callFromThread(reactor.stop)")
        )
        tr = await tc.get_task_result(stops, block=True)
        self.assertIn(type(tr.failure), (type(None), EngineLost))

        def restarts() -> int:
            return self.output("launcher").count("starting it again")

        await wait_until(lambda: restarts() == 2, "two engine restarts", 30)
        self.assertEqual(self.output("launcher").count("exit code 0"), 2, self.output("launcher"))
        await self.registered(tc, 2)
        ids = await tc.run_many([PID] * 10)
        results = await tc.get_task_results(ids, block=True)
        self.assertEqual([r.failure for r in results], [None] * 10)
        now = self.children(launcher, "taskengine")
        self.assertEqual(len(now), 2)
        self.assertLessEqual({r.ns.pid for r in results}, set(now))
        self.assertLess(len(set(now) & set(first)), 2)  # at least one is new

        # kill(targets=[0]) keeps that engine down.
        mec = self.multiengine_client(profile)
        victim = min(now)
        pids = await mec.get_properties("pid")
        (victim_id,) = [
            e for e, pid in zip(await mec.get_ids(), pids, strict=True) if pid == victim
        ]
        await mec.kill(targets=[victim_id])
        await wait_until(lambda: not is_alive(victim, now[victim]), "the killed engine to end", 10)
        await wait_until(
            lambda: "stays down" in self.output("launcher"), "the launcher to log it", 10
        )
        self.assertIn(
            "(pid %d) stopped as a MultiEngine kill asked" % victim, self.output("launcher")
        )
        # Longer than any back-off it could have had (2 s after one quick
        # death): still one engine.
        await sleep(2.5)
        self.assertEqual(len(self.children(launcher, "taskengine")), 1)
        self.assertEqual(restarts(), 2)
        await self.registered(tc, 1)

        # kill(controller=True): the launcher stops the cluster and exits 0.
        self.children(launcher, "taskcontroller")
        await mec.kill(controller=True)
        code = await self.wait_for_exit(launcher, "launcher", 20)
        self.assertEqual(code, 0, self.output("launcher"))
        self.assertIn("stopping the cluster", self.output("launcher"))
        alive = [pid for pid, started in self.seen_children.items() if is_alive(pid, started)]
        self.assertEqual(alive, [])

    @run
    async def test_controller_that_refuses_to_start_stops_the_launcher(self):
        """A controller exiting with EXIT_REFUSED (here: its journal turned
        to garbage, then the controller killed -9) is not restarted in a
        loop: the launcher stops its engines and exits 1 with the
        controller's message; at start, `taskfarm cluster` fails the same
        way at once."""
        launcher, profile = await self.start_launcher(1)
        (controller,) = self.children(launcher, "taskcontroller")
        engines = self.children(launcher, "taskengine")
        profile.journal_file.write_bytes(b"this is not a journal\n" * 500)
        for suffix in ("-wal", "-shm"):  # or SQLite would find its pages there
            Path(str(profile.journal_file) + suffix).unlink(missing_ok=True)
        os.kill(controller, signal.SIGKILL)
        code = await self.wait_for_exit(launcher, "launcher", 20)
        out = self.output("launcher")
        self.assertEqual(code, 1, out)
        self.assertIn("the controller refused to start: taskcontroller:", out)
        self.assertIn(str(profile.journal_file), out)
        self.assertEqual(out.count("controller (pid"), 3, out)  # first, dead, refused
        self.assertFalse(any(is_alive(pid, started) for pid, started in engines.items()))

        again = self.spawn(
            TASKFARM + ["cluster", "-n", "1", "--profile-dir", str(profile.root)], "again"
        )
        code = await self.wait_for_exit(again, "again", 30)
        out = self.output("again")
        self.assertEqual(code, 1, out)
        self.assertIn("the controller refused to start: taskcontroller:", out)
        self.assertNotIn("starting it again", out)


class OneControllerPerProfileTests(_LauncherTestCase):
    @run
    async def test_second_controller_or_cluster_on_a_held_profile_refuses(self):
        """Case 6.  While a controller holds a profile (also --no-journal),
        create_controller raises ProfileInUse naming the profile and the
        holder's pid, `twistd taskcontroller` exits with EXIT_REFUSED saying
        so, and `taskfarm cluster` fails at once with that message, starting
        no engine; the holder keeps working."""
        cluster = RealCluster(reactor, profile_root=str(self.root / "profile"), journal=False)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(cluster.stop()))
        await cluster.start(0)
        profile = cluster.profile
        self.assertEqual(read_holder(profile).pid, os.getpid())
        self.assertEqual(profile.lock_file.stat().st_mode & 0o777, 0o600)
        for journal in (True, False):
            error = self.assertRaises(
                ProfileInUse,
                create_controller,
                profile,
                reactor,
                journal=journal,
                listen="tcp:0:interface=127.0.0.1",
            )
            self.assertIn(str(profile.root), str(error))
            self.assertIn("pid %d" % os.getpid(), str(error))

        controller = self.spawn(
            [sys.executable, "-m", "twisted", "taskcontroller", "--profile-dir", str(profile.root)],
            "controller",
        )
        code = await self.wait_for_exit(controller, "controller", 30)
        self.assertEqual(code, EXIT_REFUSED, self.output("controller"))
        self.assertIn(
            "already running: pid %d since " % os.getpid(), self.output("controller")
        )

        holder = read_holder(profile)
        self.assertNotEqual(holder.location, "not listening yet")
        asked = reactor.seconds()
        second = self.spawn(
            TASKFARM + ["cluster", "-n", "1", "--profile-dir", str(profile.root)], "second"
        )
        code = await self.wait_for_exit(second, "second", 30)
        took = reactor.seconds() - asked
        out = self.output("second")
        self.assertEqual(code, 1, out)
        self.assertIn(
            "profile %s: already running: pid %d since %s, listening on %s"
            % (profile.root, os.getpid(), holder.since, holder.location),
            out,
        )
        self.assertNotIn("Press Ctrl-C", out)
        self.assertFalse((profile.log_dir / "engine-0.out").exists())
        # The holder still serves.
        self.assertEqual(await cluster.task_client().engine_ids(), [])
        self.assertEqual(read_holder(profile).pid, os.getpid())
        report("second-cluster-refused", seconds=round(took, 2))

    @run
    async def test_launcher_killed_leaves_no_orphans_next_cluster_gives_fresh_ids(self):
        """Case 6.  kill -9 of `taskfarm cluster` alone: its controller and
        engines end within 5 s (parent-death signal), which frees the
        profile; a second cluster on the same journal then starts, serves
        the first one's results, and hands out only ids never used."""
        launcher, profile = await self.start_launcher(2)
        orphans = dict(self.children(launcher, "taskengine"))
        orphans.update(self.children(launcher, "taskcontroller"))
        self.assertEqual(len(orphans), 3)
        tc = self.task_client(profile)
        old_ids = await tc.run_many([Task("a = x", push={"x": n}, pull="a") for n in range(20)])
        old = await tc.get_task_results(old_ids, block=True)
        self.assertEqual([r.ns.a for r in old], list(range(20)))
        await tc.disconnect()

        killed = reactor.seconds()
        os.kill(launcher.pid, signal.SIGKILL)
        await wait_until(
            lambda: not any(is_alive(p, s) for p, s in orphans.items()),
            "the controller and engines to end with their launcher",
            5,
        )
        gone = reactor.seconds() - killed

        second, _ = await self.start_launcher(2, name="second")
        tc = self.task_client(profile)
        again = await tc.get_task_results(old_ids)
        self.assertEqual([r.ns.a for r in again], list(range(20)))
        new_ids = await tc.run_many([Task("a = x", push={"x": n}, pull="a") for n in range(20)])
        self.assertEqual(set(new_ids) & set(old_ids), set())
        self.assertGreater(min(new_ids), max(old_ids))
        new = await tc.get_task_results(new_ids, block=True)
        self.assertEqual([r.ns.a for r in new], list(range(20)))
        again = await tc.get_task_results(old_ids)
        self.assertEqual([r.ns.a for r in again], list(range(20)))
        report("launcher-kill-9", children_gone_after_seconds=round(gone, 2))
        await tc.disconnect()
        second.send_signal(signal.SIGTERM)
        self.assertEqual(await self.wait_for_exit(second, "second", 15), 0)


class HungEngineReplacedTests(_LauncherTestCase):
    @run
    async def test_stopped_and_gil_holding_engines_killed_and_replaced(self):
        """Case 10, the launcher's part.  With --heartbeat-timeout 2, an
        engine SIGSTOPped and one stuck in re.match('(a+)+b', 'a'*40) (C
        code holding the GIL) are each SIGKILLed by the launcher within the
        timeout plus a little, and a new engine takes its place."""
        launcher, profile = await self.start_launcher(2, options=HEARTBEAT)
        tc = self.task_client(profile)
        await self.registered(tc, 2)
        figures = {}

        for how in ("sigstop", "gil"):
            before = self.children(launcher, "taskengine")
            self.assertEqual(len(before), 2)
            if how == "sigstop":
                victim = min(before)
                os.kill(victim, signal.SIGSTOP)
                hung = reactor.seconds()
            else:
                taskid = await tc.run(
                    Task("import os, re\npid = os.getpid()\nre.match('(a+)+b', 'a' * 40)")
                )
                await sleep(0.5)  # let it start on some engine
                hung = reactor.seconds()
            (victim,) = await wait_until(
                lambda before=before: set(before) - set(self.children(launcher, "taskengine")),
                "the hung engine to be killed",
                HEARTBEAT_TIMEOUT + 5,
            )
            killed = reactor.seconds() - hung
            if how == "sigstop":
                # Ticks come every timeout / 4: the last one came at most
                # that long before the stop.
                self.assertGreaterEqual(killed, HEARTBEAT_TIMEOUT * 3 / 4 - 0.1)
            await wait_until(
                lambda: len(self.children(launcher, "taskengine")) == 2, "a new engine", 20
            )
            await self.registered(tc, 2)
            replaced = reactor.seconds() - hung
            figures[how] = (round(killed, 2), round(replaced, 2))
            self.assertIn("(pid %d) sent no liveness tick" % victim, self.output("launcher"))
            if how == "gil":
                tr = await tc.get_task_result(taskid, block=True)
                self.assertIsNotNone(tr.failure)
        ids = await tc.run_many([PID] * 6)
        results = await tc.get_task_results(ids, block=True)
        self.assertEqual([r.failure for r in results], [None] * 6)
        report(
            "hung-engine-replaced",
            heartbeat_timeout=HEARTBEAT_TIMEOUT,
            sigstop_killed_replaced_seconds=figures["sigstop"],
            gil_killed_replaced_seconds=figures["gil"],
        )
        await self.stop_launcher(launcher)


class ForkedChildTests(_LauncherTestCase):
    @run
    async def test_forked_child_holding_pipes_blocks_neither_restart_nor_stop(self):
        """Case 11.  A task forks a child that keeps the engine's pipes and
        sleeps.  The engine killed -9 is started again within seconds and
        the forked child ends with it (same process group); with another
        such child alive, SIGTERM stops the cluster within seconds, the
        controller included."""
        launcher, profile = await self.start_launcher(1)
        tc = self.task_client(profile)
        await self.registered(tc, 1)
        ((engine, engine_started),) = self.children(launcher, "taskengine").items()
        self.assertEqual(os.getpgid(engine), engine)  # a group of its own

        tr = await tc.get_task_result(
            await tc.run(Task(FORK_SLEEPER, pull=("child", "group"))), block=True
        )
        self.assertIsNone(tr.failure)
        child, group = tr.ns.child, tr.ns.group
        self.assertEqual(group, engine)
        self.seen_children[child] = _started(child)

        killed = reactor.seconds()
        os.kill(engine, signal.SIGKILL)
        await wait_until(
            lambda: not is_alive(child, self.seen_children[child]),
            "the forked child to end with its engine",
            5,
        )
        (new_engine,) = await wait_until(
            lambda: set(self.children(launcher, "taskengine")) - {engine}, "a new engine", 10
        )
        await self.registered(tc, 1, 20)
        restarted = reactor.seconds() - killed

        tr = await tc.get_task_result(
            await tc.run(Task(FORK_SLEEPER, pull=("child", "group"))), block=True
        )
        self.assertEqual(tr.ns.group, new_engine)
        self.seen_children[tr.ns.child] = _started(tr.ns.child)
        (controller,) = self.children(launcher, "taskcontroller")
        took = await self.stop_launcher(launcher, within=10)
        self.assertFalse(is_alive(controller, self.seen_children[controller]))
        report(
            "forked-child",
            restart_after_kill_seconds=round(restarted, 2),
            sigterm_stop_seconds=round(took, 2),
        )
