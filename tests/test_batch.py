"""The batch launcher against a real SLURM (munged, slurmctld, slurmd of
`taskfarm.testing.slurm`) and a real controller: engines as a job array."""

from __future__ import annotations

import os
import sys
import time

from twisted.internet import defer, reactor
from twisted.trial import unittest

from taskfarm.cluster.batch import BatchLauncher
from taskfarm.cluster.batchsystems import SLURM
from taskfarm.profile import ENGINE
from taskfarm.task import Task
from taskfarm.testing.cluster import RealCluster
from taskfarm.testing.helpers import async_test, temp_dir, wait_until
from taskfarm.testing.slurm import SlurmHarness


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
