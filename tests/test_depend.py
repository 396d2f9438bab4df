"""`depend` predicates never run in the controller (issue 8, cases 1, 3, 9).

A real controller (in this process, as `RealCluster` runs it), its real
depend evaluator processes and real engine processes.  Each test shows the
tasks end in exactly one of a result, a typed failure or aborted, within a
bound, and that the controller keeps serving meanwhile.
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.trial import unittest

from taskfarm.errors import DependError, TaskAborted, TaskTimeout
from taskfarm.task import Task
from taskfarm.testing.cluster import RealCluster
from taskfarm.testing.helpers import async_test, temp_dir, wait_until


def _exits(properties):
    raise SystemExit(3)


def _interrupts(properties):
    raise KeyboardInterrupt


def _kills(properties):
    os._exit(0)


def _blocks_saying_pid(marker: str):
    def blocks(properties):
        Path(marker + ".tmp").write_text(str(os.getpid()))
        os.rename(marker + ".tmp", marker)
        time.sleep(60)
        return True

    return blocks


class DependTestCase(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.root = str(temp_dir(self, "taskfarm-depend-"))

    async def start(self, n_engines=1, **options) -> RealCluster:
        """A cluster on this test's profile (the same journal each time)."""
        cluster = RealCluster(reactor, profile_root=self.root, **options)
        self.addCleanup(self.stop, cluster)
        await cluster.start(n_engines)
        return cluster

    def stop(self, cluster: RealCluster) -> defer.Deferred:
        """Stop `cluster` unless a test did already."""
        if cluster.controller is None or not cluster.controller.running:
            return defer.succeed(None)
        return defer.Deferred.fromCoroutine(cluster.stop())

    async def results(self, tc, ids, within: float):
        """The results of `ids`, which must all end within `within` seconds."""
        d = tc.get_task_results(ids, block=True)
        timer = reactor.callLater(within, d.cancel)
        try:
            return await d
        finally:
            if timer.active():
                timer.cancel()


class RestoreTests(DependTestCase):
    """Case 1: a depend whose module is gone does not poison the journal."""

    @async_test
    async def test_missing_module_fails_only_its_task(self):
        """A depend from a module in the cluster's folder; the module is
        removed and the controller restarted on the same journal: it starts,
        finished results are reachable, the task with the missing module
        fails with DependError naming it, the other queued tasks run."""
        folder = Path(self.root) / "start-folder"
        folder.mkdir()
        name = "depend_gone_%d" % os.getpid()
        (folder / (name + ".py")).write_text("def anywhere(properties):\n    return True\n")
        sys.path.insert(0, str(folder))
        self.addCleanup(lambda: str(folder) in sys.path and sys.path.remove(str(folder)))
        self.addCleanup(sys.modules.pop, name, None)
        module = importlib.import_module(name)

        cluster = await self.start(1)
        tc = cluster.task_client()
        (done,) = await tc.run_many([Task("a = 1", pull="a", depend=module.anywhere)])
        self.assertEqual((await self.results(tc, [done], 30))[0].results, {"a": 1})
        # No engine now: the next tasks stay queued in the journal.
        await cluster.engines[0].stop(grace=3)
        await cluster.wait_for_engines(0)
        queued = await tc.run_many(
            [
                Task("b = 2", pull="b", depend=module.anywhere),
                Task("c = 3", pull="c"),
                Task("d = 4", pull="d", depend=lambda p: "pid" in p),
            ]
        )
        await tc.confirm()
        await self.stop(cluster)

        sys.path.remove(str(folder))
        del sys.modules[name]
        shutil.rmtree(folder)

        cluster = await self.start(1)
        tc = cluster.task_client()
        first, *rest = await self.results(tc, [done] + queued, 60)
        self.assertEqual(first.results, {"a": 1})
        gone, plain, other = rest
        self.assertIsInstance(gone.failure, DependError)
        self.assertIn("No module named '%s'" % name, str(gone.failure))
        self.assertEqual((plain.failure, plain.results), (None, {"c": 3}))
        self.assertEqual((other.failure, other.results), (None, {"d": 4}))


class FailingDependTests(DependTestCase):
    """Case 3: a depend that raises SystemExit (or worse) wedges nothing."""

    @async_test
    async def test_exit_interrupt_and_os_exit_count_as_false(self):
        """Depends raising SystemExit or KeyboardInterrupt, or calling
        os._exit, count as False: other tasks dispatch, abort works; after a
        restart on the same journal the unmet timeout fails them with
        TaskTimeout, and new tasks still run."""
        cluster = await self.start(1, unmet_timeout=600)
        tc = cluster.task_client()
        exiting, interrupted, killing, aborted, plain = await tc.run_many(
            [
                Task("x = 1", depend=_exits),
                Task("x = 1", depend=_interrupts),
                Task("x = 1", depend=_kills),
                Task("x = 1", depend=_exits),
                Task("p = 1", pull="p"),
            ]
        )
        self.assertEqual((await self.results(tc, [plain], 30))[0].results, {"p": 1})
        await tc.abort(aborted)
        self.assertIsInstance((await self.results(tc, [aborted], 5))[0].failure, TaskAborted)
        scheduler = cluster.controller.scheduler
        key = cluster.controller.tasks._tasks[exiting].spec.depend
        await wait_until(lambda: scheduler.depend_verdicts(key)[0][0] is False, "the verdict", 30)
        self.assertEqual(scheduler.depend_verdicts(key), {0: (False, "raised SystemExit: 3")})
        status = await tc.queue_status()
        self.assertEqual((status["scheduled"], status["succeeded"], status["aborted"]), (3, 1, 1))
        await self.stop(cluster)

        cluster = await self.start(1, unmet_timeout=2)
        tc = cluster.task_client()
        started = reactor.seconds()
        results = await self.results(tc, [exiting, interrupted, killing], 30)
        for r in results:
            self.assertIsInstance(r.failure, TaskTimeout)
        self.assertLess(reactor.seconds() - started, 30)
        (again,) = await tc.run_many([Task("q = 2", pull="q", depend=lambda p: True)])
        self.assertEqual((await self.results(tc, [again], 30))[0].results, {"q": 2})


class BlockingDependTests(DependTestCase):
    """Case 9: a depend that blocks does not freeze the controller."""

    @async_test
    async def test_blocking_depend_times_out_and_the_controller_answers(self):
        """A depend that sleeps 60 s: another client's queue_status answers
        within a second meanwhile, the predicate times out (--depend-timeout
        1), and the task fails with TaskTimeout within a bound.  Killing the
        evaluator processes then does not stop later depends."""
        cluster = await self.start(1, unmet_timeout=2, depend_timeout=1)
        tc = cluster.task_client()
        marker = str(Path(self.root) / "evaluating")
        started = reactor.seconds()
        (blocked,) = await tc.run_many([Task("x = 1", depend=_blocks_saying_pid(marker))])
        # A finished task drops its spec: take the depend's key while queued.
        key = cluster.controller.tasks._tasks[blocked].spec.depend
        await wait_until(lambda: os.path.exists(marker), "the predicate to start", 30)
        other = cluster.task_client()
        asked = reactor.seconds()
        status = await other.queue_status()
        self.assertLess(reactor.seconds() - asked, 1.0)
        self.assertEqual(status["scheduled"], 1)
        result = (await self.results(tc, [blocked], 30))[0]
        self.assertIsInstance(result.failure, TaskTimeout)
        self.assertLess(reactor.seconds() - started, 30)
        verdict = cluster.controller.scheduler.depend_verdicts(key)
        self.assertEqual(verdict, {0: (False, "timed out after 1 s")})

        for pid in cluster.controller.evaluator.pids():
            os.kill(pid, signal.SIGKILL)
        (later,) = await tc.run_many([Task("y = 2", pull="y", depend=lambda p: "pid" in p)])
        result = (await self.results(tc, [later], 30))[0]
        self.assertEqual((result.failure, result.results), (None, {"y": 2}))
