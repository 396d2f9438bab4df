"""Garbage of received messages: collected once it adds up, and once a
burst is over, so big messages do not stay in memory (issue 8, memory)."""

from __future__ import annotations

import gc

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from taskfarm.remote import sweeper
from taskfarm.remote.sweeper import SETTLE_BYTES, SETTLE_DELAY, CycleSweeper
from taskfarm.task import Task
from taskfarm.testing.cluster import RealCluster
from taskfarm.testing.helpers import async_test, sleep, temp_dir

MB = 1024 * 1024


class CycleSweeperTests(unittest.TestCase):
    """The rule, on a Clock."""

    def setUp(self):
        self.clock = task.Clock()
        self.runs = []
        self.sweeper = CycleSweeper(self.clock, 64 * MB, lambda: self.runs.append(self.clock.seconds()))

    def test_collects_in_the_turn_after_the_threshold(self):
        self.sweeper.received(63 * MB)
        self.clock.advance(100)
        self.assertEqual(self.runs, [])
        self.sweeper.received(1 * MB)
        self.assertEqual(self.runs, [])  # the message being handled is alive now
        self.clock.advance(0)
        self.assertEqual(self.runs, [100])
        self.sweeper.received(63 * MB)
        self.clock.advance(1000)
        self.assertEqual(self.runs, [100])

    def test_settles_only_while_started(self):
        self.sweeper.received(SETTLE_BYTES)
        self.clock.advance(SETTLE_DELAY * 10)
        self.assertEqual(self.runs, [])
        self.sweeper.start()
        self.sweeper.received(1)
        self.clock.advance(SETTLE_DELAY - 0.01)
        self.assertEqual(self.runs, [])
        self.clock.advance(0.02)
        self.assertEqual(len(self.runs), 1)

    def test_settles_after_a_slow_burst_is_over(self):
        """A burst slower than SETTLE_DELAY is swept once, after its last
        message: not half-way, which left its tail behind."""
        self.sweeper.start()
        self.sweeper.received(SETTLE_BYTES)
        for _ in range(8):
            self.clock.advance(SETTLE_DELAY * 0.75)
            self.sweeper.received(1 * MB)
        self.assertEqual(self.runs, [])
        self.clock.advance(SETTLE_DELAY)
        self.assertEqual(self.runs, [SETTLE_DELAY * 0.75 * 8 + SETTLE_DELAY])
        self.clock.advance(SETTLE_DELAY * 10)
        self.assertEqual(len(self.runs), 1)

    def test_threshold_hurries_a_settle(self):
        self.sweeper.start()
        self.sweeper.received(SETTLE_BYTES)
        self.sweeper.received(64 * MB)
        self.clock.advance(0)
        self.assertEqual(self.runs, [0])
        self.clock.advance(SETTLE_DELAY * 2)
        self.assertEqual(self.runs, [0])

    def test_stop_leaves_no_timer(self):
        self.sweeper.start()
        self.sweeper.received(SETTLE_BYTES)
        self.sweeper.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ControllerMemoryTests(unittest.TestCase):
    """Finished tasks with big pushes leave nothing big behind in the
    controller: not in its records, and not as Foolscap's garbage."""

    timeout = 120

    def _unslicers(self) -> int:
        return sum(1 for o in gc.get_objects() if type(o).__name__ == "ArgumentUnslicer")

    @async_test
    async def test_big_pushes_do_not_stay_after_their_tasks(self):
        """With automatic collection off, 40 tasks of 1 MB pushes leave no
        received message behind once they finished and a burst settled,
        and their records keep no payload."""
        cluster = RealCluster(reactor, profile_root=str(temp_dir(self, "taskfarm-sweeper-")))
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(cluster.stop()))
        await cluster.start(1)
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        before = self._unslicers()
        tc = cluster.task_client()
        blob = b"p" * MB
        ids = [await tc.run(Task("n = len(b)", push={"b": blob}, pull="n")) for _ in range(40)]
        results = await tc.get_task_results(ids, block=True)
        self.assertEqual([r.ns.n for r in results], [MB] * 40)
        await sleep(SETTLE_DELAY + 0.5)
        self.assertLessEqual(self._unslicers() - before, 5)
        records = [cluster.controller.tasks._tasks[t] for t in ids]
        self.assertEqual({r.spec.payload for r in records}, {b""})
        self.assertGreater(sweeper.process_sweeper().collections, 0)
