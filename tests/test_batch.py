"""The batch launcher against a real SLURM (munged, slurmctld, slurmd of
`taskfarm.testing.slurm`) and a real controller: engines as a job array;
and ``taskfarm cluster --launcher slurm`` as a user runs it."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.trial import unittest

from taskfarm.asyncclient import TaskClient
from taskfarm.cluster.batch import BatchLauncher
from taskfarm.cluster.batchsystems import SLURM
from taskfarm.cluster.manage import read_state
from taskfarm.profile import ENGINE, TASK, Profile, read_holder
from taskfarm.task import Task
from taskfarm.testing.cluster import RealCluster
from taskfarm.testing.helpers import async_test, is_alive, proc_stat, temp_dir, wait_until
from taskfarm.testing.processes import TASKFARM, ProcessTestCase, processes_naming
from taskfarm.testing.slurm import SlurmHarness

REPO = Path(__file__).resolve().parent.parent

#: The address added to ``lo`` when this machine has no non-loopback IPv4
#: address (a /32: reachable from this machine only).
EXTRA_ADDRESS = "10.78.0.1"

_SIOCGIFADDR, _SIOCGIFFLAGS, _IFF_UP = 0x8915, 0x8913, 0x1


def local_ipv4() -> str | None:
    """A non-loopback IPv4 address of an interface of this machine that is
    up, or None.  Traffic to it stays on this machine."""
    for _, name in socket.if_nameindex():
        request = struct.pack("256s", name[:15].encode())
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                flags = struct.unpack("H", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, request)[16:18])[
                    0
                ]
                address = socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFADDR, request)[20:24])
            except OSError:
                continue  # no IPv4 address
        if flags & _IFF_UP and not ipaddress.ip_address(address).is_loopback:
            return address
    return None


class SlurmLauncherTests(unittest.TestCase):
    timeout = 90

    async def _slurm(self) -> SlurmHarness:
        # Two folders: munged wants every folder above its socket open to all.
        self.root = temp_dir(self, "taskfarm-batch-test-")
        self.slurm = SlurmHarness(reactor, temp_dir(self, "taskfarm-slurm-"), cpus=8)
        self.addCleanup(self._stop_slurm)
        await self.slurm.start()
        return self.slurm

    def _stop_slurm(self):
        async def stop():
            await self.slurm.stop()
            self.assertEqual(self.slurm.leftovers, {}, "processes left behind")

        return defer.Deferred.fromCoroutine(stop())

    def _launcher(self, **options) -> BatchLauncher:
        env = dict(self.slurm.env, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(sys.path))
        options.setdefault("poll_interval", 0.5)
        options.setdefault("backoff", (0.5, 5.0))
        launcher = BatchLauncher(
            SLURM, reactor, self.root / "profile" / "log" / "slurm", env=env, **options
        )
        self.ended: list[tuple[str, str]] = []
        launcher.watch(lambda label, reason: self.ended.append((label, reason)))
        self.addCleanup(launcher.stop)
        return launcher

    async def _cluster(self, n: int, **options):
        """SLURM, a controller, and `n` engines as SLURM jobs, registered."""
        await self._slurm()
        self.cluster = RealCluster(reactor, profile_root=str(self.root / "profile"))
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(self.cluster.stop()))
        await self.cluster.start(0)
        self.launcher = self._launcher(**options)
        started = time.monotonic()
        await self.launcher.start(n, self.cluster.profile.furl_file(ENGINE), [])
        await self.cluster.wait_for_engines(n, timeout=60)
        self.registration_s = time.monotonic() - started
        return self.cluster.task_client()

    def _engine_jobs(self) -> dict[int, str]:
        """{engine id: its batch job} of the registered engines."""
        return {
            engine_id: engine.properties.get("batch_job")
            for engine_id, engine in self.cluster.controller.registry.engines.items()
        }

    @async_test
    async def test_four_engines_run_the_quickstart(self):
        """-n 4 is one job array of 4; its 4 engines register, each naming
        its own array task, and run the quick-start; stop() leaves no job."""
        tc = await self._cluster(4)
        jobs = await self.slurm.jobs()
        self.assertEqual(len(jobs), 4)
        self.assertEqual(set(jobs.values()), {"RUNNING"})
        self.assertEqual(sorted(self._engine_jobs().values()), sorted(jobs))
        self.assertEqual(sorted(jobs), sorted(self.launcher.jobs))
        self.assertEqual(len(self.launcher.submissions), 1)
        ids = [await tc.run(Task("a = %i" % n, pull="a")) for n in range(200)]
        await tc.barrier(ids)
        results = await tc.get_task_results(ids)
        self.assertEqual([r.ns.a for r in results], list(range(200)))
        self.assertEqual({r.engineid for r in results} <= {0, 1, 2, 3}, True)
        status = await tc.queue_status()
        self.assertEqual((status["succeeded"], status["failed"]), (200, 0))
        self.assertEqual(sorted(d["job"] for d in self.launcher.describe()), sorted(jobs))
        # Each engine writes its own log on its node, rotated (0600).
        work_dir = self.launcher.work_dir
        self.assertEqual(
            sorted(p.name for p in work_dir.glob("engine-*.log")),
            sorted("engine-%s.log" % job for job in jobs),
        )
        for engine_id, job in self._engine_jobs().items():
            path = work_dir / ("engine-%s.log" % job)
            self.assertEqual(path.stat().st_mode & 0o777, 0o600)
            text = path.read_text()
            self.assertEqual(text.count("registered with the controller"), 1, (path.name, text[-2000:]))
            self.assertIn("as engine %d" % engine_id, text)
        await self.launcher.stop()
        self.assertEqual(await self.slurm.jobs(), {})
        await self.cluster.wait_for_engines(0, timeout=20)
        self.assertEqual(self.ended, [])
        print("\n4 SLURM engines registered in %.1f s" % self.registration_s)

    @async_test
    async def test_scancel_loses_no_task(self):
        """scancel of a busy engine's job: the controller loses that engine,
        the launcher reports the job ended, and its task runs elsewhere."""
        tc = await self._cluster(3)
        ids = [
            await tc.run(Task("import time; time.sleep(1.5); a = %i" % n, pull="a", retries=2))
            for n in range(6)
        ]

        async def busy():
            return (await tc.queue_status())["pending"] >= 3  # "pending": running

        await wait_until(busy, "3 tasks running", timeout=10)
        victim_id, victim_job = sorted(self._engine_jobs().items())[0]
        store = self.cluster.controller.tasks.store
        on_victim = [tid for tid in ids if store.tasks[tid].engine_id == victim_id]
        self.assertTrue(on_victim)
        result = await self.slurm.run("scancel", victim_job)
        self.assertTrue(result.ok, result.describe())
        await tc.barrier(ids)
        results = await tc.get_task_results(ids)
        self.assertEqual([r.ns.a for r in results], list(range(6)))
        self.assertNotIn(victim_id, self.cluster.controller.registry.engines)
        # Its tasks ran a second time, on another engine.
        self.assertEqual({store.tasks[tid].attempts for tid in on_victim}, {2})
        self.assertNotIn(victim_id, {results[ids.index(tid)].engineid for tid in on_victim})
        await wait_until(lambda: self.ended, "the launcher to see the job end", timeout=10)
        self.assertEqual([label for label, _ in self.ended], ["job %s" % victim_job])
        self.assertEqual(self.launcher.replacements, 0)  # no --keep-engines

    @async_test
    async def test_walltime_ends_engines_that_keep_engines_replaces(self):
        """--slurm-time 1 is the job's TimeLimit; when it runs out (brought
        forward with scontrol, so that the test takes seconds, not a
        minute), SLURM ends the job and --keep-engines submits a new one,
        whose engine registers."""
        await self._cluster(2, walltime="1", keep_engines=True)
        before = self._engine_jobs()
        victim = sorted(before.values())[0]
        shown = await self.slurm.run("scontrol", "show", "job", victim)
        self.assertIn("TimeLimit=00:01:00", shown.out)
        result = await self.slurm.run("scontrol", "update", "JobId=%s" % victim, "EndTime=now")
        self.assertTrue(result.ok, result.describe())
        await wait_until(lambda: self.ended, "the job to time out", timeout=40)
        self.assertEqual([label for label, _ in self.ended], ["job %s" % victim])
        self.assertIn("Time limit exhausted for JobId=", self.slurm.log_text())
        await wait_until(lambda: self.launcher.replacements == 1, "a replacement", timeout=10)
        await wait_until(
            lambda: (
                len(self.cluster.controller.registry.engines) == 2
                and victim not in self._engine_jobs().values()
            ),
            "the replacement engine",
            timeout=30,
        )
        after = self._engine_jobs()
        self.assertEqual(len(set(after.values()) - set(before.values())), 1)
        self.assertEqual(len(self.launcher.submissions), 2)
        jobs = await self.slurm.jobs()
        self.assertEqual(sorted(jobs), sorted(after.values()))

    @async_test
    async def test_stop_cancels_running_and_pending_jobs(self):
        """A template of one's own (here: no engine, a sleep) and more jobs
        than CPUs: stop() cancels the running and the pending ones, and
        squeue lists none after it."""
        await self._slurm()
        template = (
            "#!/bin/sh\n#SBATCH --job-name=${job_name}\n#SBATCH --array=${array}\n"
            "#SBATCH --output=/dev/null\n${directives}\nexec sleep 300\n"
        )
        launcher = self._launcher(template=template)
        await launcher.start(10, self.root / "no.furl", [])
        await wait_until(
            lambda: defer.Deferred.fromCoroutine(self._states()),
            "8 running and 2 pending jobs",
            timeout=20,
        )
        await launcher.stop()
        self.assertEqual(await self.slurm.jobs(), {})
        self.assertEqual(self.ended, [])

    async def _states(self):
        states = sorted((await self.slurm.jobs()).values())
        return states == ["PENDING"] * 2 + ["RUNNING"] * 8


def _start_time(pid: int) -> str | None:
    fields = proc_stat(pid)
    return None if fields is None else fields[19]


class SlurmCommandLineTests(ProcessTestCase):
    """``taskfarm cluster --launcher slurm`` as a user runs it, against the
    real SLURM, with the controller on a non-loopback address of this
    machine (the SLURM node is this machine too)."""

    timeout = 90
    cwd = str(REPO)

    def address(self) -> str:
        """This machine's non-loopback IPv4 address; if it has none, one
        added to ``lo`` for the test (and deleted at cleanup).  (``lo``, not
        a dummy interface: containers often lack the dummy module.)"""
        found = local_ipv4()
        if found is not None:
            return found
        subprocess.run(
            ["ip", "addr", "add", EXTRA_ADDRESS + "/32", "dev", "lo"], timeout=10, check=True
        )
        self.addCleanup(
            subprocess.run, ["ip", "addr", "del", EXTRA_ADDRESS + "/32", "dev", "lo"], timeout=10
        )
        return EXTRA_ADDRESS

    async def command(self, name: str, *args: str, within: float = 60) -> tuple[int, str]:
        """Run ``taskfarm ARGS``; (exit status, output)."""
        process = self.spawn(TASKFARM + list(args), name, self.taskfarm_env)
        code = await self.wait_for_exit(process, name, within)
        return code, self.output(name)

    async def _slurm(self):
        """The test SLURM, up; this machine's address; a profile and its
        --profile-dir."""
        slurm = SlurmHarness(reactor, temp_dir(self, "taskfarm-slurm-"), cpus=4)

        async def stop_slurm():
            await slurm.stop()
            self.assertEqual(slurm.leftovers, {}, "processes left behind")

        self.addCleanup(lambda: defer.Deferred.fromCoroutine(stop_slurm()))
        await slurm.start()
        profile = Profile(self.root / "profile")
        self.taskfarm_env = self.env(
            SLURM_CONF=slurm.env["SLURM_CONF"], PYTHONPATH=os.pathsep.join(sys.path)
        )
        return slurm, self.address(), profile, ("--profile-dir", str(profile.root))

    async def _daemon(self, address: str, where: tuple, n: int = 2) -> tuple[dict, str]:
        """``taskfarm cluster --launcher slurm -n N --daemon`` on `address`:
        (its cluster.json, its output); its launcher and controller are
        killed at cleanup if still alive."""
        code, out = await self.command(
            "daemon",
            "cluster",
            "--launcher",
            "slurm",
            "-n",
            str(n),
            "--daemon",
            "--listen",
            "tcp:0:interface=%s" % address,
            *where,
        )
        self.assertEqual(code, 0, out)
        state = read_state(Profile(Path(where[1])))
        for pid in (state["launcher"]["pid"], state["controller"]["pid"]):
            started = _start_time(pid)
            self.assertIsNotNone(started, "pid %d of cluster.json is not running" % pid)
            self.seen_children[pid] = started  # killed at cleanup if still alive
        return state, out

    @async_test
    async def test_cluster_launcher_slurm_daemon_status_task_stop(self):
        """--launcher slurm with the default --listen is refused (loopback);
        on this machine's address, --daemon returns once the 2 engines of
        one job array registered; status shows them; a task runs; `taskfarm
        engines --launcher slurm -n 1` adds a third as a job of its own and
        cancels it at SIGTERM; stop cancels the jobs (squeue lists none)
        and leaves no process."""
        began = time.monotonic()
        slurm, address, profile, where = await self._slurm()

        code, out = await self.command(
            "loopback", "cluster", "--launcher", "slurm", "-n", "2", *where
        )
        self.assertEqual(code, 1, out)
        self.assertIn(
            "the slurm launcher starts engines on other machines, but the controller's location "
            "is 127.0.0.1 (the default --listen) (loopback)",
            out,
        )
        self.assertEqual(await slurm.jobs(), {})

        asked = time.monotonic()
        state, out = await self._daemon(address, where)
        up = time.monotonic() - asked
        holder = read_holder(profile)
        self.assertEqual(state["controller"]["pid"], holder.pid)
        self.assertRegex(holder.location, r"^%s:\d+$" % re.escape(address))
        self.assertIn("listening on %s, 2 engines registered" % holder.location, out)
        jobs = await slurm.jobs()
        self.assertEqual(set(jobs.values()), {"RUNNING"})
        self.assertEqual(sorted(entry["job"] for entry in state["engines"]), sorted(jobs))
        self.assertEqual(len({job.split("_")[0] for job in jobs}), 1, jobs)  # one job array

        code, out = await self.command("status", "status", *where)
        self.assertEqual(code, 0, out)
        self.assertIn("listening on %s" % holder.location, out)
        self.assertIn("--launcher slurm (--daemon), 2 engines requested", out)
        self.assertIn("engines:    2 registered", out)
        self.assertIn("launched by slurm:", out)
        for job in jobs:
            self.assertIn("job %s" % job, out)

        tc = TaskClient(profile.furl_file(TASK), reactor, connect_timeout=10)
        self.addCleanup(tc.disconnect)
        code = "import os; a = os.environ['SLURM_ARRAY_JOB_ID'] + '_' + os.environ['SLURM_ARRAY_TASK_ID']"
        [tid] = await tc.run_many([Task(code, pull="a")])
        [result] = await tc.get_task_results([tid], block=True)
        self.assertIn(result.ns.a, jobs)  # it ran in one of the array's jobs

        # `taskfarm engines --launcher slurm` adds one, as a job of its own,
        # and cancels it when SIGTERMed.
        added = self.spawn(
            TASKFARM + ["engines", "--launcher", "slurm", "-n", "1", *where],
            "engines",
            self.taskfarm_env,
        )

        async def three():
            return len(await tc.engine_ids()) == 3

        await wait_until(three, "the added engine to register", 30, 0.1)
        more = await slurm.jobs()
        self.assertEqual(len(more), 3, more)
        [extra] = set(more) - set(jobs)
        added.send_signal(signal.SIGTERM)
        self.assertEqual(await self.wait_for_exit(added, "engines", 30), 0, self.output("engines"))
        self.assertEqual(await slurm.jobs(), jobs)  # its job is gone, the cluster's stay

        async def two():
            return len(await tc.engine_ids()) == 2

        await wait_until(two, "the added engine to go", 20, 0.1)
        await tc.disconnect()

        asked = time.monotonic()
        code, out = await self.command("stop", "stop", *where)
        took = time.monotonic() - asked
        self.assertEqual(code, 0, out)
        self.assertIn(
            "launcher pid %d stopped its controller and engines" % state["launcher"]["pid"], out
        )
        self.assertEqual(await slurm.jobs(), {})
        self.assertEqual(processes_naming(str(profile.root)), [])
        self.assertFalse(profile.state_file.exists())
        print(
            "\ntaskfarm cluster --launcher slurm -n 2 --daemon: up in %.1f s, stop %.1f s, "
            "%.1f s in all" % (up, took, time.monotonic() - began)
        )

    @async_test
    async def test_stop_after_the_launcher_was_killed_cancels_its_jobs(self):
        """The launcher killed -9 takes its controller along, but its jobs
        stay queued (SLURM runs them, not it): `taskfarm stop` cancels the
        jobs cluster.json names (SlurmLauncher.clean_up), and squeue lists
        none after it."""
        slurm, address, profile, where = await self._slurm()
        state, _ = await self._daemon(address, where)
        jobs = await slurm.jobs()
        self.assertEqual(len(jobs), 2)
        launcher, controller = state["launcher"]["pid"], state["controller"]["pid"]
        started = {pid: self.seen_children[pid] for pid in (launcher, controller)}
        os.kill(launcher, signal.SIGKILL)
        await wait_until(
            lambda: not any(is_alive(pid, s) for pid, s in started.items()),
            "the launcher and its controller to be gone",
            10,
        )
        self.assertEqual(await slurm.jobs(), jobs)  # the engines' jobs outlive it
        code, out = await self.command("stop", "stop", *where)
        self.assertEqual(code, 0, out)
        self.assertIn("launcher pid %d was gone" % launcher, out)
        self.assertIn("the slurm launcher cleaned up its engines", out)
        self.assertEqual(await slurm.jobs(), {})
        await wait_until(
            lambda: processes_naming(str(profile.root)) == [], "the engines to end", 10
        )
        self.assertFalse(profile.state_file.exists())
