"""Chaos: processes killed, stopped and cut off while tasks run.

Each test breaks a live cluster on purpose and checks that no task is lost:

- engines SIGKILLed every second under `taskfarm cluster` (which restarts
  them) while a blocking client runs 5,000 tasks;
- the controller SIGKILLed in the middle of such a run (the launcher starts
  it again on the same profile and port; the journal restores the tasks);
- an engine SIGSTOPped mid-task: the heartbeat notices, the task re-runs;
- a task stuck in ``time.sleep`` aborted: its engine gives up and exits 75,
  and the launcher replaces it; a pure-Python loop is interrupted in place;
- an engine in a network namespace whose link is cut mid-task (root only).

Every process started is ended by PID; every wait polls a condition under a
deadline; each test prints one ``CHAOS`` line with its numbers (shown with
``pytest -rP``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.trial import unittest

from taskfarm.asyncclient import TaskClient
from taskfarm.controller.registry import RegistryListener
from taskfarm.errors import ConnectionLost, ControllerUnreachable, TaskAborted, TaskTimeout
from taskfarm.profile import ENGINE, TASK, Profile
from taskfarm.task import Task
from taskfarm.testing.cluster import RealCluster
from taskfarm.testing.helpers import async_test as run
from taskfarm.testing.helpers import is_alive, sleep, temp_dir, wait_until
from taskfarm.testing.processes import ProcessTestCase, kill_if_alive

REPO = Path(__file__).resolve().parent.parent


#: The engine's exit status when it gives up on a command that would not
#: stop (`taskfarm.engine.worker.EXIT_STUCK`), and how long it waits first.
EXIT_STUCK = 75
STUCK_GRACE = 5.0

#: A plain blocking-client job: COUNT tasks each computing x * x after a
#: short sleep, then one barrier, then every result.  It knows nothing of
#: the chaos around it.  argv: profile folder, count, retries, seconds per
#: task.  It prints one ``REPORT`` line of JSON.
CLIENT = r"""
import json, sys, time
from taskfarm import client

profile, count, retries, cost = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
started = time.time()
tc = client.TaskClient(profile)
code = "import time\ntime.sleep(%r)\na = x * x" % cost
ids = []
longest_gap, gap_at, last = 0.0, started, time.time()
for n in range(count):
    ids.append(tc.run(client.Task(code, push={"x": n}, pull="a", retries=retries)))
    now = time.time()
    if now - last > longest_gap:
        longest_gap, gap_at = now - last, last
    last = now
submitted = time.time()
tc.barrier(ids)
waited = time.time()
results = tc.get_task_results(ids)
fetched = time.time()
failures, wrong = {}, []
for n, r in enumerate(results):
    if r is None or r.failure is not None:
        name = "unfinished" if r is None else type(r.failure).__name__
        failures[name] = failures.get(name, 0) + 1
    elif r.results != {"a": n * n}:
        wrong.append(n)
report = {
    "count": len(ids),
    "distinct_ids": len(set(ids)),
    "ids_in_order": ids == sorted(ids),
    "failures": failures,
    "wrong": wrong[:20],
    "correct": sum(1 for r in results if r is not None and r.failure is None) - len(wrong),
    "engines_used": sorted({r.engineid for r in results if r is not None}),
    "status": tc.queue_status(),
    "started": started,
    "submitted": submitted,
    "waited": waited,
    "fetched": fetched,
    "longest_run_gap": longest_gap,
    "longest_run_gap_at": gap_at,
}
tc.close()
print("REPORT " + json.dumps(report), flush=True)
"""

#: Spins in pure Python (only an interrupt stops it) for at most 30 s,
#: after writing its engine's pid to `marker`.
BUSY_LOOP = """\
import os, pathlib, time
pathlib.Path(marker).write_text(str(os.getpid()))
started = time.monotonic()
while time.monotonic() - started < 30:
    pass
done = True
"""

#: Sleeps in C for 60 s (no interrupt reaches it), after writing its
#: engine's pid to `marker`.
STUCK_SLEEP = """\
import os, pathlib, time
pathlib.Path(marker).write_text(str(os.getpid()))
time.sleep(60)
done = True
"""

#: Appends its engine's pid to `marker`, then works for `seconds` (sleeping
#: in short steps); `done` is the pid of the engine that finished.
ATTEMPT = """\
import os, time
with open(marker, 'a') as f:
    f.write('%d\\n' % os.getpid())
started = time.monotonic()
while time.monotonic() - started < seconds:
    time.sleep(0.01)
done = os.getpid()
"""


# -- processes, found through /proc ----------------------------------------------------




def report(name: str, **numbers) -> None:
    """One line of numbers per test (pytest shows it with -rP)."""
    print("CHAOS %s %s" % (name, json.dumps(numbers, sort_keys=True)), flush=True)


class _LossTimes(RegistryListener):
    """Records when the controller drops each engine."""

    def __init__(self) -> None:
        self.lost: dict[int, float] = {}

    def engine_removed(self, engine) -> None:
        self.lost.setdefault(engine.engine_id, reactor.seconds())


def engine_env() -> dict:
    """The environment of engine processes this test starts itself."""
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(sys.path))


# -- the test cases -----------------------------------------------------------------------


class _ChaosTestCase(ProcessTestCase):
    """Launcher helpers on top of `ProcessTestCase`."""

    timeout = 600
    cwd = str(REPO)

    async def start_launcher(self, n: int, options: list[str] = ()) -> tuple[subprocess.Popen, Profile]:
        launcher, profile = await super().start_launcher(n, options=options)
        self.assertEqual(len(self.children(launcher, "taskengine")), n)
        self.assertEqual(len(self.children(launcher, "taskcontroller")), 1)
        return launcher, profile

    async def stop_launcher(self, launcher: subprocess.Popen) -> None:
        """SIGTERM: the launcher stops its children and exits 0."""
        launcher.send_signal(signal.SIGTERM)
        await wait_until(lambda: launcher.poll() is not None, "the launcher to exit", 60)
        self.assertEqual(launcher.returncode, 0, self.output("launcher"))
        alive = [pid for pid, started in self.seen_children.items() if is_alive(pid, started)]
        self.assertEqual(alive, [], "left running after SIGTERM")

    def task_client(self, profile: Profile, **options) -> TaskClient:
        """An async client in this process, on a Tub of its own."""
        from taskfarm.remote.tub import new_tub

        tub = new_tub()
        tub.startService()
        self.addCleanup(tub.stopService)
        tc = TaskClient(profile.furl_file(TASK), reactor, tub=tub, **options)
        self.addCleanup(tc.disconnect)
        return tc

    def start_client(self, profile: Profile, count: int, retries: int, cost: float):
        """The blocking `CLIENT` job in a process of its own."""
        script = self.root / "client.py"
        script.write_text(CLIENT)
        return self.spawn(
            [sys.executable, str(script), str(profile.root), str(count), str(retries), str(cost)],
            "client",
        )

    def client_report(self, client: subprocess.Popen) -> dict:
        out = self.output("client")
        self.assertEqual(client.returncode, 0, out[-5000:])
        lines = [x for x in out.splitlines() if x.startswith("REPORT ")]
        self.assertEqual(len(lines), 1, out[-5000:])
        return json.loads(lines[0][len("REPORT ") :])

    def check_all_correct(self, result: dict, count: int) -> None:
        """Every task succeeded with its own x * x; ids distinct; none lost."""
        self.assertEqual(result["count"], count)
        self.assertEqual(result["distinct_ids"], count, "task ids reused")
        self.assertTrue(result["ids_in_order"])
        self.assertEqual(result["failures"], {})
        self.assertEqual(result["wrong"], [])
        self.assertEqual(result["correct"], count)
        status = result["status"]
        self.assertEqual(status["succeeded"], count, status)
        self.assertEqual(sum(status.values()), count, status)


class EngineChaosTests(_ChaosTestCase):
    COUNT = 5000
    #: Seconds each task sleeps: the run spans several seconds, yet the
    #: two cores stay free for the controller and the client.
    COST = 0.002
    ENGINES = 4
    #: The chaos stops after this many kills even if the client has not
    #: finished.  The launcher doubles an engine's restart delay after
    #: each death within 60 s of its start, so a kill every second can
    #: keep every engine down for long stretches; the cap bounds the run.
    MAX_KILLS = 20

    @run
    async def test_engines_killed_every_second_lose_no_task(self):
        """With `taskfarm cluster -n 4`, a random engine is SIGKILLed every
        second while a blocking client runs 5,000 tasks with retries=3:
        every task ends with its own correct result (none lost, none
        failed), and the launcher brings the engine count back to 4."""
        launcher, profile = await self.start_launcher(self.ENGINES)
        first_engines = self.children(launcher, "taskengine")
        (controller_pid,) = self.children(launcher, "taskcontroller")
        seed = random.randrange(2**32)
        chooser = random.Random(seed)

        client = self.start_client(profile, self.COUNT, retries=3, cost=self.COST)
        started = reactor.seconds()
        kills: list[int] = []
        engine_pids_seen = set(first_engines)
        deadline = started + 120
        next_kill = started + 1.0
        # One kill a second while the client runs (bounded in count and time).
        while (
            client.poll() is None
            and reactor.seconds() < deadline
            and len(kills) < self.MAX_KILLS
        ):
            if reactor.seconds() >= next_kill:
                next_kill = reactor.seconds() + 1.0
                engines = self.children(launcher, "taskengine")
                engine_pids_seen.update(engines)
                self.assertNotIn(controller_pid, engines)
                if engines:
                    victim = chooser.choice(sorted(engines))
                    if kill_if_alive(victim, engines[victim]):
                        kills.append(victim)
            await sleep(0.05)
        if client.poll() is not None:
            chaos_ended_by = "client finished"
        else:
            chaos_ended_by = "kill cap" if len(kills) >= self.MAX_KILLS else "time limit"
        await wait_until(lambda: client.poll() is not None, "the client to finish", 180, 0.1)
        client_seconds = reactor.seconds() - started
        result = self.client_report(client)
        self.check_all_correct(result, self.COUNT)
        self.assertGreaterEqual(len(kills), 3, "the run ended before the chaos began")
        self.assertEqual(set(self.children(launcher, "taskcontroller")), {controller_pid})

        # The launcher starts the killed engines again: four register.
        tc = self.task_client(profile, connect_timeout=10)

        async def all_engines_back():
            return len(await tc.engine_ids()) == self.ENGINES

        await wait_until(all_engines_back, "%d engines registered again" % self.ENGINES, 120, 0.2)
        engines = self.children(launcher, "taskengine")
        engine_pids_seen.update(engines)
        self.assertEqual(len(engines), self.ENGINES)
        replaced = set(first_engines) - set(engines)
        self.assertTrue(replaced)
        self.assertTrue(set(kills) >= replaced)
        report(
            "engine-kills",
            seed=seed,
            tasks=self.COUNT,
            kills=len(kills),
            chaos_ended_by=chaos_ended_by,
            lost=self.COUNT - result["correct"],
            failed=sum(result["failures"].values()),
            client_seconds=round(client_seconds, 1),
            engine_ids_used=result["engines_used"],
            engines_at_end=len(engines),
            engine_processes_restarted=len(engine_pids_seen) - self.ENGINES,
            first_engines_replaced=len(replaced),
        )
        await self.stop_launcher(launcher)


class ControllerChaosTests(_ChaosTestCase):
    COUNT = 5000
    COST = 0.003
    #: Kill the controller once the client has submitted this share of
    #: its tasks and some have succeeded: it is still submitting, tasks
    #: are running, and most are still to come.
    KILL_AT = 0.2

    @run
    async def test_controller_killed_mid_run_client_finishes(self):
        """The controller of `taskfarm cluster -n 4` is SIGKILLed while a
        blocking client submits 5,000 tasks (retries=0) and waits for them;
        the launcher starts it again on the same profile and port, the
        journal gives back every task and the id counter, and the client
        (which knows nothing of this) finishes by itself with every correct
        result and distinct task ids."""
        launcher, profile = await self.start_launcher(4)
        (controller_pid,) = self.children(launcher, "taskcontroller")
        furl_before = profile.furl_file(TASK).read_text()
        monitor = self.task_client(profile, connect_timeout=2, reconnect_timeout=0.5)
        #: (time, queue status) of every answer the monitor got.
        samples: list[tuple[float, dict]] = []

        async def status() -> dict | None:
            try:
                answer = await monitor.queue_status()
            except (ConnectionLost, ControllerUnreachable):
                return None
            samples.append((reactor.seconds(), answer))
            return answer

        client = self.start_client(profile, self.COUNT, retries=0, cost=self.COST)
        started = reactor.seconds()

        async def far_enough():
            if client.poll() is not None:
                raise AssertionError("the client finished before the controller was killed")
            now = await status()
            return (
                now is not None
                and sum(now.values()) >= self.COUNT * self.KILL_AT
                and now["succeeded"] > 0
            )

        await wait_until(far_enough, "the run to get going", 120, 0.02)
        at_kill = samples[-1][1]
        os.kill(controller_pid, signal.SIGKILL)
        killed = reactor.seconds()
        killed_wall = time.time()

        # The launcher starts a new controller (no help from this test).
        def new_controller():
            pids = set(self.children(launcher, "taskcontroller")) - {controller_pid}
            return pids and pids.pop()

        new_pid = await wait_until(new_controller, "the launcher to start a new controller", 60)
        answering = await wait_until(status, "the new controller to answer", 120, 0.05)
        back = samples[-1][0]

        async def progressing():
            now = await status()
            return now is not None and now["succeeded"] > at_kill["succeeded"]

        if client.poll() is None:
            await wait_until(progressing, "tasks to succeed again", 120, 0.05)
        resumed = samples[-1][0]
        await wait_until(lambda: client.poll() is not None, "the client to finish", 240, 0.1)
        client_seconds = reactor.seconds() - started
        result = self.client_report(client)
        self.check_all_correct(result, self.COUNT)
        # Same furl: same certificate, name and port.
        self.assertEqual(profile.furl_file(TASK).read_text(), furl_before)
        phase = "submitting" if killed_wall < result["submitted"] else "waiting (barrier)"
        report(
            "controller-kill",
            tasks=self.COUNT,
            # In memory (some not yet journaled, so not yet acknowledged),
            # then as restored from the journal.
            tasks_known_at_kill=sum(at_kill.values()),
            succeeded_at_kill=at_kill["succeeded"],
            tasks_known_when_back=sum(answering.values()),
            succeeded_when_back=answering["succeeded"],
            killed_while_client_was=phase,
            controller_restarted_by="launcher",
            new_controller_pid=new_pid,
            controller_down_seconds=round(back - killed, 2),
            no_progress_seconds=round(resumed - killed, 2),
            client_longest_run_gap=round(result["longest_run_gap"], 2),
            client_barrier_seconds=round(result["waited"] - result["submitted"], 2),
            client_seconds=round(client_seconds, 1),
            lost=self.COUNT - result["correct"],
        )
        await self.stop_launcher(launcher)


class HungEngineTests(unittest.TestCase):
    timeout = 600

    @run
    async def test_stopped_engine_noticed_and_task_rerun(self):
        """An engine SIGSTOPped while it runs a 3 s task is dropped by the
        heartbeat (period 0.2 s, timeout 1.5 s) within the heartbeat window,
        and the task (retries=1) runs again on the other engine and
        succeeds."""
        root = str(temp_dir(self, "taskfarm-chaos-"))
        cluster = RealCluster(
            reactor, profile_root=root, heartbeat_period=0.2, heartbeat_timeout=1.5
        )
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(cluster.stop()))
        await cluster.start(2)
        losses = _LossTimes()
        cluster.controller.registry.add_listener(losses)
        tc = cluster.task_client()
        pids = {engine_id: cluster.engine_pid(engine_id) for engine_id in await tc.engine_ids()}
        marker = Path(root) / "attempts"
        taskid = await tc.run(
            Task(ATTEMPT, push={"marker": str(marker), "seconds": 3.0}, pull="done", retries=1)
        )
        await wait_until(marker.exists, "the task to start", 60, 0.02)
        stopped_pid = int(marker.read_text().split()[0])
        (stopped_id,) = [e for e, pid in pids.items() if pid == stopped_pid]
        (other_id,) = set(pids) - {stopped_id}

        def resume_and_end():
            # A stopped process cannot act on SIGTERM: resume it first.
            for slot in cluster.engines:
                if slot.pid == stopped_pid and not slot.child.ended.called:
                    slot.signal(signal.SIGCONT)
                    slot.signal(signal.SIGKILL)

        self.addCleanup(resume_and_end)
        os.kill(stopped_pid, signal.SIGSTOP)
        stopped = reactor.seconds()
        await wait_until(lambda: stopped_id in losses.lost, "the engine to be dropped", 30, 0.02)
        detected = losses.lost[stopped_id] - stopped
        tr = await tc.get_task_result(taskid, block=True)
        rerun_done = reactor.seconds() - stopped
        self.assertIsNone(tr.failure)
        self.assertEqual(tr.engineid, other_id)
        self.assertEqual(tr.ns.done, pids[other_id])
        attempts = [int(x) for x in marker.read_text().split()]
        self.assertEqual(attempts, [stopped_pid, pids[other_id]])
        # Silence of 1.5 s, checked every 0.2 s: noticed in about that window
        # (the upper bound leaves room for a loaded machine).
        self.assertGreaterEqual(detected, 1.5 - 0.2 - 0.1)
        self.assertLess(detected, 1.5 + 0.2 + 2.0)
        self.assertEqual(await tc.engine_ids(), [other_id])
        resume_and_end()
        report(
            "hung-engine",
            detection_seconds=round(detected, 2),
            heartbeat_period=0.2,
            heartbeat_timeout=1.5,
            task_done_after_stop_seconds=round(rerun_done, 2),
            lost=0,
        )


class StuckTaskTests(_ChaosTestCase):
    def start_engine(self, cluster: RealCluster, name: str, role: str) -> subprocess.Popen:
        """An engine process of this test's own, with property role=ROLE."""
        return self.spawn(
            [
                sys.executable, "-m", "twisted", "taskengine",
                "--furl-file", str(cluster.profile.furl_file(ENGINE)),
                "--property", "role=%s" % role,
            ],
            name,
            engine_env(),
        )

    @run
    async def test_abort_stuck_sleep_engine_exits_75_busy_loop_interrupted_in_place(self):
        """Aborting a task stuck in time.sleep(60) answers TaskAborted at
        once; its engine gives up after the watchdog grace and exits with
        status 75.  Aborting a pure-Python loop interrupts it in place: that
        engine keeps its pid and runs the next task."""
        cluster = RealCluster(reactor, profile_root=str(self.root / "profile"))
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(cluster.stop()))
        await cluster.start(0)
        sleeper_engine = self.start_engine(cluster, "engine-sleep", "sleep")
        busy_engine = self.start_engine(cluster, "engine-busy", "busy")
        await cluster.wait_for_engines(2)
        tc = cluster.task_client()

        def on(role):
            return lambda properties: properties.get("role") == role

        sleep_marker, busy_marker = self.root / "sleeping", self.root / "spinning"
        stuck = await tc.run(
            Task(STUCK_SLEEP, push={"marker": str(sleep_marker)}, depend=on("sleep"))
        )
        busy = await tc.run(Task(BUSY_LOOP, push={"marker": str(busy_marker)}, depend=on("busy")))
        await wait_until(
            lambda: sleep_marker.exists() and busy_marker.exists(), "both tasks to start"
        )
        self.assertEqual(int(sleep_marker.read_text()), sleeper_engine.pid)
        self.assertEqual(int(busy_marker.read_text()), busy_engine.pid)

        aborted = reactor.seconds()
        await tc.abort(stuck)
        await tc.abort(busy)
        results = await tc.get_task_results([stuck, busy], block=True)
        answered = reactor.seconds() - aborted
        for tr in results:
            self.assertIsInstance(tr.failure, TaskAborted)
        self.assertLess(answered, 5)

        # The loop was interrupted in place: the same process runs the next task.
        pid_task = Task("import os; pid = os.getpid()", pull="pid", depend=on("busy"))
        tr = await tc.get_task_result(await tc.run(pid_task), block=True)
        self.assertEqual(tr.ns.pid, busy_engine.pid)
        next_task_seconds = reactor.seconds() - aborted
        self.assertLess(next_task_seconds, STUCK_GRACE)

        # The sleeping one cannot be interrupted: its engine exits 75.
        await wait_until(lambda: sleeper_engine.poll() is not None, "the stuck engine to exit", 60)
        exited = reactor.seconds() - aborted
        self.assertEqual(sleeper_engine.returncode, EXIT_STUCK)
        self.assertGreaterEqual(exited, STUCK_GRACE - 0.5)
        self.assertIn("did not stop within", self.output("engine-sleep"))
        await cluster.wait_for_engines(1)

        # Past its own grace, the busy engine is still there, and still works.
        self.assertIsNone(busy_engine.poll())
        tr = await tc.get_task_result(await tc.run(pid_task), block=True)
        self.assertEqual(tr.ns.pid, busy_engine.pid)
        self.assertNotIn("did not stop within", self.output("engine-busy"))
        report(
            "abort-stuck",
            aborted_answer_seconds=round(answered, 2),
            stuck_engine_exit_status=sleeper_engine.returncode,
            stuck_engine_exit_after_seconds=round(exited, 2),
            busy_engine_next_task_after_seconds=round(next_task_seconds, 2),
            busy_engine_pid_unchanged=True,
        )

    @run
    async def test_launcher_replaces_engine_stuck_in_sleep(self):
        """Under `taskfarm cluster -n 1`, aborting a task stuck in
        time.sleep(60) answers TaskAborted within seconds; the engine exits
        after the watchdog grace, the launcher starts a new one, and a new
        task runs there."""
        launcher, profile = await self.start_launcher(1)
        ((old_pid, old_started),) = self.children(launcher, "taskengine").items()
        tc = self.task_client(profile, connect_timeout=10)
        marker = self.root / "sleeping"
        stuck = await tc.run(Task(STUCK_SLEEP, push={"marker": str(marker)}))
        await wait_until(marker.exists, "the task to start")
        self.assertEqual(int(marker.read_text()), old_pid)
        aborted = reactor.seconds()
        await tc.abort(stuck)
        tr = await tc.get_task_result(stuck, block=True)
        answered = reactor.seconds() - aborted
        self.assertIsInstance(tr.failure, TaskAborted)
        self.assertLess(answered, 5)

        await wait_until(lambda: not is_alive(old_pid, old_started), "the stuck engine to exit", 60)
        exited = reactor.seconds() - aborted
        self.assertGreaterEqual(exited, STUCK_GRACE - 0.5)
        new_engines = await wait_until(
            lambda: set(self.children(launcher, "taskengine")) - {old_pid}, "a new engine", 60
        )
        (new_pid,) = new_engines

        async def registered():
            return len(await tc.engine_ids()) == 1

        await wait_until(registered, "the new engine to register", 60, 0.1)
        pid_task = Task("import os; pid = os.getpid()", pull="pid")
        tr = await tc.get_task_result(await tc.run(pid_task), block=True)
        self.assertEqual(tr.ns.pid, new_pid)
        usable = reactor.seconds() - aborted
        self.assertIn("did not stop within", _read(profile.log_dir / "engine-0.out"))
        report(
            "abort-stuck-launcher",
            aborted_answer_seconds=round(answered, 2),
            engine_gone_after_seconds=round(exited, 2),
            new_engine_ran_task_after_seconds=round(usable, 2),
        )
        await self.stop_launcher(launcher)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# -- network namespaces ---------------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=20, check=check
    )


def _netns_unavailable() -> str | None:
    """Why this machine cannot run the namespace test, or None if it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = "tfprobe%d" % os.getpid()
    try:
        made = _ip("netns", "add", probe, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return "`ip netns add` cannot run: %s" % e
    if made.returncode != 0:
        return "`ip netns add` failed: %s" % made.stderr.strip()
    _ip("netns", "del", probe, check=False)
    return None


class NetworkPartitionTests(_ChaosTestCase):
    HEARTBEAT_PERIOD = 0.2
    HEARTBEAT_TIMEOUT = 1.5

    def make_namespace(self) -> tuple[str, str, str]:
        """A namespace joined to this one by a veth pair on a /30 of our own;
        returns (namespace, its veth, the controller's address)."""
        reason = _netns_unavailable()
        if reason:
            raise unittest.SkipTest(reason)
        tag = os.getpid()
        namespace, outside, inside = "tfchaos%d" % tag, "tfc%da" % tag, "tfc%db" % tag
        used = _ip("-o", "-4", "addr", "show").stdout
        for step in range(250):
            octet = (tag + step) % 250 + 1
            if "10.213.%d." % octet not in used:
                break
        else:
            raise unittest.SkipTest("no free 10.213.x.0/30 subnet")
        here, there = "10.213.%d.1" % octet, "10.213.%d.2" % octet
        _ip("netns", "add", namespace)
        self.addCleanup(_ip, "netns", "del", namespace, check=False)
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        # Deleting one end deletes both, wherever the other end is.
        self.addCleanup(_ip, "link", "del", outside, check=False)
        _ip("link", "set", inside, "netns", namespace)
        _ip("addr", "add", here + "/30", "dev", outside)
        _ip("link", "set", outside, "up")
        _ip("netns", "exec", namespace, "ip", "addr", "add", there + "/30", "dev", inside)
        _ip("netns", "exec", namespace, "ip", "link", "set", inside, "up")
        _ip("netns", "exec", namespace, "ip", "link", "set", "lo", "up")
        return namespace, inside, here

    @run
    async def test_cut_link_engine_lost_task_rerun_on_other_engine(self):
        """A task that must start on the engine in a network namespace runs
        there; its veth link is then cut, so packets vanish without a
        reset: the heartbeat drops that engine, the retry (same depend)
        cannot run anywhere, and the recovery task (no depend) runs on the
        engine in the root namespace and succeeds."""
        namespace, inside, address = self.make_namespace()
        from taskfarm.controller.service import create_controller

        profile = Profile(self.root / "profile")
        controller = create_controller(
            profile,
            reactor,
            listen="tcp:0:interface=%s" % address,
            heartbeat_period=self.HEARTBEAT_PERIOD,
            heartbeat_timeout=self.HEARTBEAT_TIMEOUT,
            unmet_timeout=1.0,
        )
        controller.startService()
        self.addCleanup(controller.stopService)
        losses = _LossTimes()
        controller.registry.add_listener(losses)
        engine = [
            sys.executable, "-m", "twisted", "taskengine",
            "--furl-file", str(profile.furl_file(ENGINE)),
        ]
        cut_off = self.spawn(
            ["ip", "netns", "exec", namespace] + engine + ["--property", "where=ns"],
            "engine-ns",
            engine_env(),
        )
        await wait_until(lambda: len(controller.registry.engines) == 1, "the namespaced engine", 60)
        home = self.spawn(engine + ["--property", "where=root"], "engine-root", engine_env())
        await wait_until(lambda: len(controller.registry.engines) == 2, "the root engine", 60)
        by_place = {e.properties["where"]: e for e in controller.registry.engines.values()}
        self.assertEqual(by_place["ns"].properties["pid"], cut_off.pid)
        self.assertEqual(by_place["root"].properties["pid"], home.pid)
        ns_id, root_id = by_place["ns"].engine_id, by_place["root"].engine_id

        tc = self.task_client(profile, connect_timeout=10)
        marker = self.root / "attempts"
        options = {"push": {"marker": str(marker), "seconds": 3.0}, "pull": ["done", "where"]}
        code = ATTEMPT + "where = id\n"
        taskid = await tc.run(
            Task(
                code,
                retries=1,
                depend=lambda properties: properties.get("where") == "ns",
                recovery_task=Task(code, **options),
                **options,
            )
        )
        await wait_until(marker.exists, "the task to start in the namespace", 60, 0.02)
        self.assertEqual(int(marker.read_text().split()[0]), cut_off.pid)
        _ip("netns", "exec", namespace, "ip", "link", "set", inside, "down")
        cut = reactor.seconds()
        await wait_until(lambda: ns_id in losses.lost, "the engine to be dropped", 30, 0.02)
        detected = losses.lost[ns_id] - cut
        tr = await tc.get_task_result(taskid, block=True)
        done = reactor.seconds() - cut
        self.assertIsNone(tr.failure)
        self.assertEqual(tr.engineid, root_id)
        self.assertEqual(tr.results, {"done": home.pid, "where": root_id})
        self.assertEqual([int(x) for x in marker.read_text().split()], [cut_off.pid, home.pid])
        self.assertGreaterEqual(detected, self.HEARTBEAT_TIMEOUT - self.HEARTBEAT_PERIOD - 0.1)
        self.assertLess(detected, self.HEARTBEAT_TIMEOUT + self.HEARTBEAT_PERIOD + 2.0)
        self.assertEqual(list(controller.registry.engines), [root_id])
        report(
            "network-cut",
            detection_seconds=round(detected, 2),
            task_done_after_cut_seconds=round(done, 2),
            heartbeat_period=self.HEARTBEAT_PERIOD,
            heartbeat_timeout=self.HEARTBEAT_TIMEOUT,
            unmet_timeout=1.0,
            lost=0,
        )


#: An "engine" that holds only the engine furl: it registers, answers
#: pings, and never answers a command.  argv: the engine furl file.
ROGUE_ENGINE = r"""
import sys
from foolscap.api import Referenceable
from twisted.internet import reactor
from zope.interface import implementer
from taskfarm import serialization
from taskfarm.remote import schemas
from taskfarm.remote.tub import new_tub

@implementer(schemas.RIEngine)
class Rogue(Referenceable):
    def remote_commands(self, batch): print("swallowed a batch", flush=True)
    def remote_interrupt(self, seq): print("ignored interrupt", seq, flush=True)
    def remote_cancel(self, seqs): pass
    def remote_set_properties(self, properties): pass
    def remote_ping(self): return None

async def main():
    tub = new_tub()
    tub.startService()
    registrar = await tub.getReference(open(sys.argv[1]).read().strip())
    props = serialization.pack({"hostname": "rogue", "pid": 0})
    engine_id, session = await registrar.callRemote("register", Rogue(), props, None)
    print("registered as", engine_id, flush=True)

from twisted.internet import defer
reactor.callWhenRunning(lambda: defer.Deferred.fromCoroutine(main()))
reactor.callLater(120, reactor.stop)
reactor.run()
"""


class ControllerPromiseTests(_ChaosTestCase):
    """The controller's own part of the promise: its pauses are not engine
    loss, and task timeouts hold even when the engine cannot or will not
    answer."""

    timeout = 120

    @run
    async def test_paused_controller_keeps_its_engines(self):
        """Case 8: the controller is SIGSTOPped for 4 s with a heartbeat
        timeout of 1.5 s while two tasks run; once continued, no engine is
        declared lost and both tasks succeed."""
        launcher, profile = await self.start_launcher(
            2, ["--heartbeat-period", "0.2", "--heartbeat-timeout", "1.5"]
        )
        ((controller, started),) = self.children(launcher, "taskcontroller").items()
        self.addCleanup(kill_if_alive, controller, started, signal.SIGCONT)
        tc = self.task_client(profile)
        ids = [await tc.run(Task("import time\ntime.sleep(3)\nx = id", pull="x")) for _ in range(2)]
        await wait_until(
            lambda: tc.queue_status().addCallback(lambda s: s["pending"] == 2), "both to start", 30
        )
        os.kill(controller, signal.SIGSTOP)
        await sleep(4.0)
        os.kill(controller, signal.SIGCONT)
        resumed = reactor.seconds()
        results = await tc.get_task_results(ids, block=True)
        self.assertEqual([r.failure for r in results], [None, None])
        self.assertEqual(sorted(r.ns.x for r in results), [0, 1])
        self.assertEqual(await tc.engine_ids(), [0, 1])
        self.assertNotIn("lost", (profile.log_dir / "controller.log").read_text())
        report("controller-pause", paused_seconds=4.0, heartbeat_timeout=1.5,
               results_after_resume_seconds=round(reactor.seconds() - resumed, 2), lost=0)
        await self.stop_launcher(launcher)

    @run
    async def test_rogue_engine_cannot_hold_tasks_past_their_timeout(self):
        """Case 16: a process holding only the engine furl registers, answers
        pings and never replies.  A task with timeout=1 sent to it fails with
        TaskTimeout once the timeout and the grace (1 s) are over, and the
        controller asked it to stop the task."""
        cluster = RealCluster(reactor, profile_root=str(self.root / "profile"), timeout_grace=1.0)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(cluster.stop()))
        await cluster.start(0)
        script = self.root / "rogue.py"
        script.write_text(ROGUE_ENGINE)
        self.spawn(
            [sys.executable, str(script), str(cluster.profile.furl_file(ENGINE))],
            "rogue",
            env=self.env(PYTHONPATH=os.pathsep.join(sys.path)),
        )
        await cluster.wait_for_engines(1)
        tc = cluster.task_client()
        sent = reactor.seconds()
        taskid = await tc.run(Task("x = 1", pull="x", timeout=1))
        tr = await tc.get_task_result(taskid, block=True)
        took = reactor.seconds() - sent
        self.assertIsInstance(tr.failure, TaskTimeout)
        self.assertIn("did not answer", str(tr.failure))
        self.assertGreaterEqual(took, 2.0 - 0.1)
        self.assertLess(took, 2.0 + 5.0)
        await wait_until(lambda: "ignored interrupt" in self.output("rogue"), "the interrupt", 10)
        report("rogue-engine", timeout=1, grace=1, failed_after_seconds=round(took, 2))

    @run
    async def test_engine_stuck_in_c_gives_task_timeout(self):
        """Case 10 (the controller's part): a task stuck in a regular
        expression that holds the GIL, with timeout=1; its engine cannot
        answer anything, and the heartbeat (1.5 s) gives up on it: the task
        fails with TaskTimeout, not EngineLost."""
        cluster = RealCluster(
            reactor, profile_root=str(self.root / "profile"),
            heartbeat_period=0.2, heartbeat_timeout=1.5,
        )
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(cluster.stop()))
        await cluster.start(1)
        tc = cluster.task_client()
        sent = reactor.seconds()
        taskid = await tc.run(Task("import re\nre.match('(a+)+b', 'a' * 40)", timeout=1))
        tr = await tc.get_task_result(taskid, block=True)
        took = reactor.seconds() - sent
        self.assertIsInstance(tr.failure, TaskTimeout)
        self.assertIn("stopped answering", str(tr.failure))
        self.assertLess(took, 1.5 + 5.0)
        report("stuck-in-c", timeout=1, heartbeat_timeout=1.5, failed_after_seconds=round(took, 2))
