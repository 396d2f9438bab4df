"""The `taskfarm` command and the blocking client, in real processes.

The launcher runs as a subprocess with a temporary profile folder; the
blocking client runs in a subprocess of its own (in this process trial owns
the reactor, and the blocking client must never share it).  Every wait polls
a condition under a deadline, and every process started is ended by PID.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from twisted.internet import reactor

from taskfarm.asyncclient import TaskClient
from taskfarm.profile import INTERFACES, TASK
from taskfarm.task import Task
from taskfarm.testing.helpers import async_test as run
from taskfarm.testing.helpers import descendants_of, is_alive, wait_until
from taskfarm.testing.processes import TASKFARM, ProcessTestCase

REPO = Path(__file__).resolve().parent.parent


#: The original quick-start, with the blocking client, as a script.  argv[1]
#: is the profile folder; TASKFARM_PROFILE names the same folder, so the
#: default client finds the same controller.
QUICKSTART = r"""
import json, sys
from taskfarm import client

tc = client.TaskClient(sys.argv[1])
tasklist = [client.Task("a = %i" % n, pull="a") for n in range(1000)]
taskids = [tc.run(t) for t in tasklist]
tc.barrier(taskids)
task_results = [tc.get_task_result(taskid) for taskid in taskids]
tr = task_results[73]
status = tc.queue_status()
# One batch, so that both engines surely get some.
pid_ids = tc.run_many([client.Task("import os; pid = os.getpid()", pull="pid") for _ in range(20)])
default = client.TaskClient()
report = {
    "repr": repr(tr),
    "a": tr.results["a"],
    "ns_a": tr.ns.a,
    "id": tr.taskid,
    "first_id": taskids[0],
    "submitted": tr.submitted,
    "in_order": [r.ns.a for r in task_results] == list(range(1000)),
    "engines": sorted({r.engineid for r in task_results}),
    "status": status,
    "engine_ids": tc.engine_ids(),
    "default_engine_ids": default.engine_ids(),
    "pow": tc.get_task_result(tc.run(client.MapTask(pow, (2, 10))), block=True),
    "pids": sorted({tc.get_task_result(i, block=True).ns.pid for i in pid_ids}),
}
default.close()
tc.close()
print("REPORT " + json.dumps(report))
"""


class _ProcessTestCase(ProcessTestCase):
    cwd = str(REPO)


class ClusterCommandTests(_ProcessTestCase):
    @run
    async def test_cluster_serves_blocking_quickstart_and_stops_cleanly(self):
        """`taskfarm cluster -n 2` prints its furl files (0600, in a 0700
        folder), serves the blocking quick-start run from another process,
        and on SIGTERM stops the controller and every engine."""
        launcher, profile = await self.start_launcher(2)
        out = self.output("launcher")
        for interface in INTERFACES:
            path = profile.furl_file(interface)
            self.assertIn(str(path), out)
            self.assertEqual(path.stat().st_mode & 0o777, 0o600, interface)
        self.assertEqual(profile.security_dir.stat().st_mode & 0o777, 0o700)
        self.assertEqual(profile.cert_file.stat().st_mode & 0o777, 0o600)

        children = self.remember_children(launcher.pid)
        controllers = [pid for pid, (_, cmd) in children.items() if "taskcontroller" in cmd]
        engines = sorted(pid for pid, (_, cmd) in children.items() if "taskengine" in cmd)
        self.assertEqual(len(controllers), 1, children)
        self.assertEqual(len(engines), 2, children)
        self.assertIn("controller (pid %d)" % controllers[0], out)

        script = self.root / "quickstart.py"
        script.write_text(QUICKSTART)
        job = self.spawn(
            [sys.executable, str(script), str(profile.root)],
            "quickstart",
            self.env(TASKFARM_PROFILE=str(profile.root)),
        )
        code = await self.wait_for_exit(job, "quickstart", 90)
        job_out = self.output("quickstart")
        self.assertEqual(code, 0, job_out)
        (line,) = [x for x in job_out.splitlines() if x.startswith("REPORT ")]
        report = json.loads(line[len("REPORT ") :])
        self.assertEqual(report["repr"], "TaskResult[ID:%d]:{'a': 73}" % report["id"])
        self.assertEqual((report["a"], report["ns_a"]), (73, 73))
        self.assertEqual(report["id"], report["first_id"] + 73)
        self.assertRegex(report["submitted"], r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d$")
        self.assertTrue(report["in_order"])
        self.assertEqual(report["engines"], [0, 1])
        self.assertEqual(report["status"]["succeeded"], 1000)
        self.assertEqual(report["status"]["failed"], 0)
        self.assertEqual(report["engine_ids"], [0, 1])
        self.assertEqual(report["default_engine_ids"], [0, 1])
        self.assertEqual(report["pow"], 1024)
        self.assertEqual(report["pids"], engines)

        launcher.send_signal(signal.SIGTERM)
        code = await self.wait_for_exit(launcher, "launcher", 60)
        self.assertEqual(code, 0, self.output("launcher"))
        still = [pid for pid, (started, _) in children.items() if is_alive(pid, started)]
        self.assertEqual(still, [], "left running after SIGTERM")

    @run
    async def test_killed_engine_is_restarted(self):
        """The launcher starts an engine again after it was SIGKILLed, until
        two engines are registered again."""
        launcher, profile = await self.start_launcher(2)
        before = self.remember_children(launcher.pid)
        engines = {pid for pid, (_, cmd) in before.items() if "taskengine" in cmd}
        self.assertEqual(len(engines), 2, before)

        from taskfarm.remote.tub import new_tub

        tub = new_tub()
        tub.startService()
        self.addCleanup(tub.stopService)
        tc = TaskClient(profile.furl_file(TASK), reactor, connect_timeout=5, tub=tub)
        self.addCleanup(tc.disconnect)
        self.assertEqual(len(await tc.engine_ids()), 2)

        victim = min(engines)
        os.kill(victim, signal.SIGKILL)
        await wait_until(lambda: not is_alive(victim, before[victim][0]), "the engine to die")

        def new_engine():
            now = self.remember_children(launcher.pid)
            return {p for p, (_, cmd) in now.items() if "taskengine" in cmd} - engines

        (newcomer,) = await wait_until(new_engine, "a new engine process")

        async def two_engines():
            return len(await tc.engine_ids()) == 2

        await wait_until(two_engines, "two registered engines again")
        ids = await tc.run_many([Task("import os; pid = os.getpid()", pull="pid")] * 10)
        results = await tc.get_task_results(ids, block=True)
        self.assertEqual({r.ns.pid for r in results}, (engines - {victim}) | {newcomer})

        launcher.send_signal(signal.SIGTERM)
        await self.wait_for_exit(launcher, "launcher", 60)
        alive = [pid for pid, started in self.seen_children.items() if is_alive(pid, started)]
        self.assertEqual(alive, [])


class DemoCommandTests(_ProcessTestCase):
    @run
    async def test_demo_runs_and_says_ok(self):
        """`taskfarm demo -n 2` starts a cluster, runs the quick-start job,
        stops everything and exits 0 saying 'demo: OK'."""
        demo = self.spawn(TASKFARM + ["demo", "-n", "2"], "demo")
        code = await self.wait_for_exit(demo, "demo", 100)
        out = self.output("demo")
        self.assertEqual(code, 0, out)
        self.assertIn("demo: OK", out)
        self.assertIn("1000 tasks in", out)
        self.assertIn("MapTask(sum, squares of 0..9) = 285", out)

    @run
    async def test_demo_interrupted_stops_its_cluster(self):
        """SIGTERM to `taskfarm demo` while its job runs stops the controller
        and engines it started (they used to be left running)."""
        demo = self.spawn(TASKFARM + ["demo", "-n", "2"], "demo")
        await wait_until(
            lambda: "cluster up" in self.output("demo"), "the demo's cluster to start", 60
        )
        cluster = {}
        for pid, started in descendants_of(demo.pid).items():
            self.seen_children[pid] = started
            cmdline = Path("/proc/%d/cmdline" % pid).read_bytes()
            if b"taskcontroller" in cmdline or b"taskengine" in cmdline:
                cluster[pid] = started
        self.assertEqual(len(cluster), 3, self.output("demo"))
        demo.send_signal(signal.SIGTERM)
        await self.wait_for_exit(demo, "demo", 60)
        await wait_until(
            lambda: not any(is_alive(pid, started) for pid, started in cluster.items()),
            "the demo's controller and engines to end",
            10,
        )
