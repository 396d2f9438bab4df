"""Paced retries (issue 11 item 2): a failed attempt that will be retried
waits its delay in ``waiting_retry``, the delay doubles per retry up to
`MAX_RETRY_DELAY`, the engine it failed on sits out the failure penalty for
that task, a final failure and engine loss are never slowed.

The unit tests run a real `TaskController` on a `task.Clock` with scripted
engines; `RealEnginesTests` runs the issue's scenario with engine processes.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from twisted.internet import reactor, task
from twisted.python import usage
from twisted.trial import unittest

from taskfarm import serialization, wire
from taskfarm.controller import tap
from taskfarm.controller.dispatcher import DEFAULT_FAILURE_PENALTY, DEFAULT_RETRY_DELAY
from taskfarm.controller.journal import Journal
from taskfarm.controller.registry import EngineRegistry
from taskfarm.controller.scheduler import FIFOScheduler
from taskfarm.controller.taskcontroller import TaskController
from taskfarm.controller.tasks import TaskState
from taskfarm.errors import BadRequest, EngineLost, RemoteTaskError, TaskAborted
from taskfarm.task import MAX_RETRY_DELAY, MapTask, Task, result_from_envelope
from taskfarm.testing.cluster import ClusterTestCase
from taskfarm.testing.fakes import ScriptedChannel
from taskfarm.testing.helpers import async_test


def _error():
    return RemoteTaskError("RuntimeError", "not yet", "Traceback (most recent call last):\n", 0)


class PacingTestCase(unittest.SynchronousTestCase):
    """A controller on a `task.Clock`, one task slot per engine."""

    retry_delay = DEFAULT_RETRY_DELAY
    failure_penalty = DEFAULT_FAILURE_PENALTY

    def setUp(self):
        self.clock = task.Clock()
        self.registry = EngineRegistry(self.clock, task_slots=1, heartbeat_period=None)
        self.controller = TaskController(
            self.registry,
            FIFOScheduler(),
            self.clock,
            unmet_timeout=None,
            retention=None,
            prefetch=None,
            retry_delay=self.retry_delay,
            failure_penalty=self.failure_penalty,
        )
        self.controller.start()
        self.addCleanup(self.controller.stop)
        self.addCleanup(self.registry.stop)

    def add_engine(self):
        channel = ScriptedChannel.registered(self.registry)
        return channel

    def submit(self, *tasks):
        return self.controller.submit([t.to_envelope() for t in tasks])

    def running(self, channel):
        """The codes of the tasks running on `channel`'s engine."""
        return [serialization.unpack(args[1])[0] for _, _, args in channel.pending()]

    def fail_one(self, channel):
        ((seq, _, _),) = channel.pending()
        channel.fail(seq, _error())

    def succeed_one(self, channel):
        ((seq, _, _),) = channel.pending()
        channel.reply(seq, True, serialization.dumps({}), 0.0, 1.0)

    def result(self, taskid):
        (envelope,) = self.successResultOf(self.controller.results([taskid]))
        return None if envelope is None else result_from_envelope(envelope)

    def state(self, taskid):
        return self.controller.store.tasks[taskid].state

    def waits(self, channel, delay: float) -> None:
        """The failed task comes back to `channel` after `delay`, not before."""
        self.clock.advance(delay * 0.999)
        self.assertEqual(channel.pending(), [])
        self.assertEqual(self.controller.queue_status()["waiting_retry"], 1)
        self.clock.advance(delay * 0.001 + 1e-9)
        self.assertEqual(len(channel.pending()), 1)


class DelayTests(PacingTestCase):
    def test_delay_doubles_per_retry(self):
        """The default delay (0.1 s) before the first retry, then 0.2, 0.4,
        0.8: on the only engine, which takes it again once the delay passed
        (no other engine is free, so the penalty does not hold it back)."""
        a = self.add_engine()
        (tid,) = self.submit(Task("x", retries=4))
        self.clock.advance(0)
        for delay in (0.1, 0.2, 0.4, 0.8):
            self.fail_one(a)
            self.assertIs(self.state(tid), TaskState.WAITING_RETRY)
            self.waits(a, delay)
        self.succeed_one(a)
        result = self.result(tid)
        self.assertIsNone(result.failure)
        self.assertEqual(result.attempts, 5)

    def test_task_retry_delay_and_the_cap(self):
        """A task's own retry_delay replaces the default; doubling stops at
        MAX_RETRY_DELAY (30 s)."""
        a = self.add_engine()
        (tid,) = self.submit(MapTask(len, ("ab",), retry_delay=12, retries=3))
        self.clock.advance(0)
        for delay in (12.0, 24.0, MAX_RETRY_DELAY):
            self.fail_one(a)
            self.waits(a, delay)

    def test_zero_delay_retries_at_once(self):
        """retry_delay=0: the retry is queued at once, never waiting."""
        a = self.add_engine()
        (tid,) = self.submit(Task("x", retries=2, retry_delay=0))
        self.clock.advance(0)
        self.fail_one(a)
        self.assertIs(self.state(tid), TaskState.QUEUED)
        self.clock.advance(0)
        self.assertEqual(len(a.pending()), 1)

    def test_final_attempt_is_not_slowed(self):
        """The failure of the last attempt is final at once, with no timer left."""
        a = self.add_engine()
        (tid,) = self.submit(Task("x", retries=1))
        self.clock.advance(0)
        self.fail_one(a)
        self.waits(a, DEFAULT_RETRY_DELAY)
        self.fail_one(a)
        result = self.result(tid)
        self.assertIsInstance(result.failure, RemoteTaskError)
        self.assertIs(self.state(tid), TaskState.FAILED)
        self.assertEqual(self.controller.dispatcher.pending_timers(), 0)

    def test_recovery_task_is_not_slowed(self):
        """Once retries are spent the recovery task goes out at once, with no
        penalty: the failed engine takes it though another one is free."""
        a, b = self.add_engine(), self.add_engine()
        (tid,) = self.submit(Task("x", recovery_task=Task("y")))
        self.clock.advance(0)
        self.fail_one(a)
        self.clock.advance(0)
        self.assertEqual((self.running(a), self.running(b)), (["y"], []))

    def test_engine_loss_retries_at_once_elsewhere(self):
        """A task whose engine is lost runs again at once on another engine,
        with no delay and no penalty."""
        a = self.add_engine()
        (tid,) = self.submit(Task("x", retries=2))
        self.clock.advance(0)
        self.assertEqual(self.running(a), ["x"])
        b = self.add_engine()
        self.registry.engine_lost(a.engine, "connection lost")
        self.assertIs(self.state(tid), TaskState.QUEUED)
        self.clock.advance(0)
        self.assertEqual(self.running(b), ["x"])
        self.assertIsNone(self.controller.store.tasks[tid].avoid_engine)

    def test_engine_loss_of_the_last_attempt_fails_at_once(self):
        a = self.add_engine()
        (tid,) = self.submit(Task("x"))
        self.clock.advance(0)
        self.registry.engine_lost(a.engine, "gone")
        self.assertIsInstance(self.result(tid).failure, EngineLost)


class PenaltyTests(PacingTestCase):
    def test_failed_engine_sits_out_while_another_is_free(self):
        """After its delay the retry goes to the other free engine, though
        the failed one is free too and would come first (fewest tasks in
        flight, lowest id)."""
        a, b = self.add_engine(), self.add_engine()
        (tid,) = self.submit(Task("x", retries=1))
        self.clock.advance(0)
        self.assertEqual(self.running(a), ["x"])
        self.fail_one(a)
        self.clock.advance(DEFAULT_RETRY_DELAY)
        self.assertEqual((self.running(a), self.running(b)), ([], ["x"]))

    def test_other_tasks_still_use_the_failed_engine(self):
        """The penalty holds back that task only: the next task in the queue
        runs on the failed engine in the same pass."""
        a, b = self.add_engine(), self.add_engine()
        self.submit(Task("x", retries=1, retry_delay=0))
        self.clock.advance(0)
        self.fail_one(a)  # x is queued again at once, avoiding a
        self.submit(Task("y"))
        self.clock.advance(0)
        self.assertEqual((self.running(a), self.running(b)), (["y"], ["x"]))

    def test_failed_engine_takes_it_when_no_other_is_free(self):
        """With the other engine busy, the failed engine takes the retry
        after the delay, within the penalty."""
        a, b = self.add_engine(), self.add_engine()
        tid, _ = self.submit(Task("x", retries=1), Task("busy"))
        self.clock.advance(0)
        self.assertEqual((self.running(a), self.running(b)), (["x"], ["busy"]))
        self.fail_one(a)
        self.clock.advance(DEFAULT_RETRY_DELAY)
        self.assertLess(DEFAULT_RETRY_DELAY, DEFAULT_FAILURE_PENALTY)
        self.assertEqual(self.running(a), ["x"])

    def test_penalty_ends(self):
        """A retry whose delay outlasts the penalty may run on the failed
        engine again, though another engine is free."""
        a, b = self.add_engine(), self.add_engine()
        (tid,) = self.submit(Task("x", retries=1, retry_delay=2 * DEFAULT_FAILURE_PENALTY))
        self.clock.advance(0)
        self.fail_one(a)
        record = self.controller.store.tasks[tid]
        self.assertEqual(record.avoid_engine, a.engine.engine_id)
        self.clock.advance(DEFAULT_FAILURE_PENALTY)
        self.assertIsNone(record.avoid_engine)
        self.clock.advance(DEFAULT_FAILURE_PENALTY)
        self.assertEqual((self.running(a), self.running(b)), (["x"], []))
        self.assertEqual(self.controller.dispatcher.pending_timers(), 0)


class NoPenaltyTests(PacingTestCase):
    failure_penalty = 0.0

    def test_without_a_penalty_the_failed_engine_comes_first(self):
        """--failure-penalty 0: the retry goes where the scheduler puts it
        (the engine with the fewest tasks in flight, lowest id)."""
        a, b = self.add_engine(), self.add_engine()
        self.submit(Task("x", retries=1))
        self.clock.advance(0)
        self.fail_one(a)
        self.clock.advance(DEFAULT_RETRY_DELAY)
        self.assertEqual((self.running(a), self.running(b)), (["x"], []))


class WaitingStateTests(PacingTestCase):
    def test_queue_status_shows_waiting_tasks(self):
        a = self.add_engine()
        tid, other = self.submit(Task("x", retries=1), Task("y"))
        self.clock.advance(0)
        self.fail_one(a)
        self.assertEqual(
            self.controller.queue_status(),
            {"scheduled": 1, "pending": 0, "waiting_retry": 1, "succeeded": 0,
             "failed": 0, "aborted": 0},
        )
        verbose = self.controller.queue_status(verbose=True)
        self.assertEqual(verbose["waiting_retry"], [tid])
        self.assertEqual(verbose["scheduled"], [other])
        # Not final: a waiter and a non-blocking result still wait.
        self.assertIsNone(self.result(tid))
        self.assertNoResult(self.controller.wait([tid]))

    def test_abort_while_waiting(self):
        """A waiting task aborts at once; its retry never goes out."""
        a = self.add_engine()
        (tid,) = self.submit(Task("x", retries=3))
        self.clock.advance(0)
        self.fail_one(a)
        waiting = self.controller.wait([tid])
        self.controller.abort(tid)
        self.successResultOf(waiting)
        self.assertIsInstance(self.result(tid).failure, TaskAborted)
        self.assertEqual(self.controller.dispatcher.pending_timers(), 0)
        self.clock.advance(60)
        self.assertEqual(a.pending(), [])
        self.assertEqual(self.controller.queue_status()["waiting_retry"], 0)

    def test_stop_leaves_no_timer(self):
        a = self.add_engine()
        self.submit(Task("x", retries=3))
        self.clock.advance(0)
        self.fail_one(a)
        self.assertTrue(self.clock.getDelayedCalls())
        self.controller.stop()
        self.assertEqual(self.controller.dispatcher.pending_timers(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class OptionTests(unittest.SynchronousTestCase):
    def test_retry_delay_checked(self):
        for bad, error in ((-1, ValueError), (MAX_RETRY_DELAY + 1, ValueError),
                           (float("nan"), ValueError), ("1", TypeError), (True, TypeError)):
            with self.subTest(bad=bad):
                self.assertRaises(error, Task, "x", retry_delay=bad)
                self.assertRaises(error, MapTask, len, retry_delay=bad)
        t = Task("x", retry_delay=2)
        self.assertEqual(t.retry_delay, 2.0)
        with self.assertRaises(ValueError):
            t.retry_delay = -1
        self.assertEqual(t.retry_delay, 2.0)
        t.retry_delay = None
        self.assertIsNone(t.retry_delay)

    def test_options_on_the_wire(self):
        """Without retry_delay a task sends version-1 options (the old
        five-tuple); with it, version 3: the five, then 3, then the delay."""
        options = Task("x").to_envelope()[2]
        self.assertEqual(options, (False, False, 0, 0, None))
        options = Task("x", retry_delay=0.5).to_envelope()[2]
        self.assertEqual(options, (False, False, 0, 0, None, 3, 0.5))
        self.assertEqual(wire.TaskOptions.parse(options).retry_delay, 0.5)
        self.assertIsNone(wire.TaskOptions.parse(options[:5]).retry_delay)
        for bad in (-0.5, MAX_RETRY_DELAY * 2, "1", True):
            with self.subTest(bad=bad):
                self.assertRaises(BadRequest, wire.TaskOptions.parse, options[:6] + (bad,))

    def test_result_attempts_on_the_wire(self):
        """A result envelope of version 3 carries the attempts; version 1
        (an older controller's) parses with attempts None."""
        fields = (4, "call", True, b"r", 1, 10.0, 11.0, 12.0)
        self.assertEqual(wire.ResultEnvelope.parse(fields + (3, 7)).attempts, 7)
        self.assertEqual(wire.ResultEnvelope.parse(fields + (3, 7)).plain(), fields + (3, 7))
        self.assertIsNone(wire.ResultEnvelope.parse(fields).attempts)
        for bad in (-1, "7", None, True):
            with self.subTest(bad=bad):
                self.assertRaises(BadRequest, wire.ResultEnvelope.parse, fields + (3, bad))

    def test_controller_options(self):
        options = tap.Options()
        options.parseOptions(["--no-journal"])
        self.assertEqual((options["retry-delay"], options["failure-penalty"]), (0.1, 1.0))
        options = tap.Options()
        options.parseOptions(["--retry-delay", "0", "--failure-penalty", "2.5"])
        self.assertEqual((options["retry-delay"], options["failure-penalty"]), (0.0, 2.5))
        for argv in (["--retry-delay", "-1"], ["--retry-delay", "31"], ["--failure-penalty", "-1"]):
            with self.subTest(argv=argv):
                self.assertRaises(usage.UsageError, tap.Options().parseOptions, argv)
        clock = task.Clock()
        registry = EngineRegistry(clock, heartbeat_period=None)
        self.assertRaises(ValueError, TaskController, registry, FIFOScheduler(), clock,
                          retry_delay=-1)
        self.assertRaises(ValueError, TaskController, registry, FIFOScheduler(), clock,
                          failure_penalty=float("inf"))


class RealEnginesTests(ClusterTestCase):
    """The issue's scenario with engine processes."""

    timeout = 60

    @async_test
    async def test_tasks_wait_for_a_condition_set_later(self):
        """10 tasks with retries=20 that raise until the engines' ``ready``
        is set one second later all succeed: the retries are paced
        (0.1, 0.2, 0.4, 0.8 s ...) rather than spent within a second."""
        tc = await self.start_cluster(2)
        mec = self.cluster.multiengine_client()
        await mec.execute("ready = False")
        code = "if not ready:\n    raise RuntimeError('not ready')\nr = 1"
        ids = await tc.run_many([Task(code, pull="r", retries=20) for _ in range(10)])
        await task.deferLater(reactor, 1.0, lambda: None)
        await mec.push({"ready": True})
        results = await tc.get_task_results(ids, block=True)
        self.assertEqual([r.ns.r for r in results], [1] * 10)
        attempts = [r.attempts for r in results]
        # Each failed at least once while not ready, and none spent all
        # 21 attempts: about 5 within the first second.
        self.assertTrue(all(2 <= n <= 10 for n in attempts), attempts)


class JournalTests(unittest.TestCase):
    """A task waiting to retry restores from the journal as queued."""

    timeout = 30

    def controller(self, path, clock):
        journal = Journal(path, reactor)
        journal.open()
        self.addCleanup(journal.close)
        registry = EngineRegistry(clock, heartbeat_period=None)
        controller = TaskController(
            registry, FIFOScheduler(), clock, unmet_timeout=None, journal=journal, retention=None
        )
        controller.start()
        self.addCleanup(controller.stop)
        channel = ScriptedChannel()
        channel.engine = registry.register(channel, {})
        return journal, controller, channel

    @async_test
    async def test_waiting_task_restores_as_queued(self):
        folder = Path(tempfile.mkdtemp(prefix="taskfarm-retry-"))
        self.addCleanup(shutil.rmtree, folder, True)
        clock = task.Clock()
        journal, first, channel = self.controller(folder / "journal.sqlite", clock)
        (tid,) = await first.submit_durably([Task("x", retries=3).to_envelope()])
        clock.advance(0)
        ((seq, _, _),) = channel.pending()
        channel.fail(seq, _error())
        self.assertEqual(first.queue_status(verbose=True)["waiting_retry"], [tid])
        await journal.sync()
        first.stop()
        journal.close()

        clock = task.Clock()
        _, second, channel = self.controller(folder / "journal.sqlite", clock)
        self.assertEqual(second.queue_status(verbose=True)["scheduled"], [tid])
        record = second.store.tasks[tid]
        self.assertEqual((record.retries_left, record.attempts), (2, 1))
        clock.advance(0)  # a restart simply retries it, at once
        self.assertEqual(len(channel.pending()), 1)
