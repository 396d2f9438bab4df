"""Unit tests of the controller's Task interface: `TaskController` with an
`EngineRegistry`, a `FIFOScheduler`, scripted engines and a `task.Clock`.

Dispatch and the registry's flush run from ``clock.callLater(0)``, so a test
calls `turn()` (``clock.advance(0)``) where a reactor turn would pass.
"""

from twisted.internet import task
from twisted.trial import unittest

from taskfarm import serialization
from taskfarm.controller.registry import EngineRegistry
from taskfarm.controller.scheduler import FIFOScheduler, PriorityScheduler
from taskfarm.controller.taskcontroller import TaskController
from taskfarm.errors import (
    BadRequest,
    DependError,
    EngineLost,
    RemoteTaskError,
    TaskAborted,
    TaskAlreadyAborted,
    TaskAlreadyCompleted,
    TaskTimeout,
    UnknownTask,
)
from taskfarm.task import EXEC, MapTask, Task, result_from_envelope
from taskfarm.testing import InProcessEvaluator, ScriptedChannel


def _needs_gpu(properties):
    return properties.get("gpu", False)


def _triple(x):
    return 3 * x


def _user_error(name="ZeroDivisionError", message="division by zero"):
    return RemoteTaskError(name, message, "Traceback (most recent call last):\n", 0)


class ControllerTestCase(unittest.SynchronousTestCase):
    """Builds a controller on a `task.Clock` with scripted engines."""

    task_slots = 2
    unmet_timeout = 10.0
    scheduler_class = FIFOScheduler
    #: Fixed task slots unless a test class turns adaptive prefetch on.
    prefetch = None
    #: Retries go out at once here (``--retry-delay 0 --failure-penalty 0``):
    #: these tests show where retries run; tests/test_retry_pacing.py shows
    #: the pacing the defaults add.
    retry_delay = 0.0
    failure_penalty = 0.0

    def setUp(self):
        self.clock = task.Clock()
        self.registry = EngineRegistry(self.clock, task_slots=self.task_slots)
        self.evaluator = InProcessEvaluator(self.clock)
        self.evaluator.start()
        self.scheduler = self.scheduler_class(evaluator=self.evaluator)
        self.controller = TaskController(
            self.registry,
            self.scheduler,
            self.clock,
            unmet_timeout=self.unmet_timeout,
            prefetch=self.prefetch,
            retry_delay=self.retry_delay,
            failure_penalty=self.failure_penalty,
        )
        self.controller.start()
        self.addCleanup(self.controller.stop)
        self.addCleanup(self.registry.stop)

    def add_engine(self, properties=None):
        channel = ScriptedChannel.registered(self.registry, properties)
        return channel

    def submit(self, *tasks):
        return self.controller.submit([t.to_envelope() for t in tasks])

    def turn(self):
        """Let one reactor turn pass: dispatch, then flush to the engines."""
        self.clock.advance(0)

    def running(self, channel):
        """``[(seq, code)]`` of the task commands an engine has not answered."""
        out = []
        for seq, op, args in channel.pending():
            self.assertEqual(op, "task")
            kind, payload = args[0], args[1]
            if kind == EXEC:
                out.append((seq, serialization.unpack(payload)[0]))
            else:
                out.append((seq, kind))
        return out

    def codes(self, channel):
        return [code for _, code in self.running(channel)]

    def answer(self, channel, code, value=None, started=5.0, finished=7.5):
        """Answer the pending command that runs `code` with a success."""
        for seq, pending_code in self.running(channel):
            if pending_code == code:
                data = serialization.dumps({} if value is None else value)
                channel.reply(seq, True, data, started, finished)
                return seq
        self.fail("%r is not running on engine %d" % (code, channel.engine.engine_id))

    def fail_with(self, channel, code, error=None):
        for seq, pending_code in self.running(channel):
            if pending_code == code:
                channel.fail(seq, error or _user_error())
                return seq
        self.fail("%r is not running on engine %d" % (code, channel.engine.engine_id))

    def result(self, taskid):
        (envelope,) = self.successResultOf(self.controller.results([taskid]))
        return None if envelope is None else result_from_envelope(envelope)


class SubmitAndDispatchTests(ControllerTestCase):
    """Submitting tasks and handing them to engines."""

    def test_ids_increase(self):
        """Each submitted task gets the next id, across batches."""
        self.assertEqual(self.submit(Task("a"), Task("b"), Task("c")), [0, 1, 2])
        self.assertEqual(self.submit(Task("d")), [3])

    def test_a_batch_leaves_in_one_message_at_submit(self):
        """A submitted batch's tasks leave at once, together in one message
        (the submit's own dispatch pass; they used to wait for the turn)."""
        channel = self.add_engine()
        self.turn()  # the pass the engine's arrival asked for
        self.submit(Task("a"), Task("b"))
        self.assertEqual([op for _, op, _ in channel.sent], ["task", "task"])
        self.assertEqual(len(channel.messages), 1)

    def test_respects_task_slots(self):
        """An engine holds at most task_slots tasks; an answer frees a slot for the next."""
        channel = self.add_engine()
        self.submit(*[Task("t%d" % i) for i in range(5)])
        self.turn()
        self.assertEqual(self.codes(channel), ["t0", "t1"])
        self.answer(channel, "t0")
        self.turn()
        self.assertEqual(self.codes(channel), ["t1", "t2"])
        self.assertEqual(self.controller.queue_status()["scheduled"], 2)

    def test_spread_over_engines(self):
        """A burst spreads over all engines."""
        engines = [self.add_engine() for _ in range(3)]
        self.submit(*[Task("t%d" % i) for i in range(6)])
        self.turn()
        self.assertEqual([len(self.codes(c)) for c in engines], [2, 2, 2])

    def test_engine_arriving_later_gets_work(self):
        """Tasks queued before any engine exists run once one registers."""
        self.submit(Task("a"))
        self.turn()
        channel = self.add_engine()
        self.turn()
        self.assertEqual(self.codes(channel), ["a"])

    def test_task_options_reach_the_engine(self):
        """clear_before, clear_after and timeout travel with the task command."""
        channel = self.add_engine()
        self.submit(Task("a", clear_before=True, clear_after=False, timeout=4))
        self.turn()
        (_, op, args) = channel.sent[0]
        self.assertEqual(op, "task")
        self.assertEqual(args[2:], (True, False, 4.0))

    def test_success(self):
        """An answered task succeeds with its values, engine and times."""
        channel = self.add_engine()
        (taskid,) = self.submit(Task("a = 73", pull="a"))
        self.assertIsNone(self.result(taskid))
        self.turn()
        self.answer(channel, "a = 73", {"a": 73}, started=5.0, finished=7.5)
        r = self.result(taskid)
        self.assertEqual(repr(r), "TaskResult[ID:%d]:{'a': 73}" % taskid)
        self.assertEqual(r.ns.a, 73)
        self.assertEqual(r.engineid, channel.engine.engine_id)
        self.assertEqual(r.duration, 2.5)
        self.assertRegex(r.submitted, r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d$")
        self.assertIsNone(r.failure)
        self.assertEqual(self.controller.queue_status()["succeeded"], 1)

    def test_map_task_success(self):
        """A MapTask's answer comes back as its value."""
        channel = self.add_engine()
        (taskid,) = self.submit(MapTask(_triple, (2,)))
        self.turn()
        (seq, kind), = self.running(channel)
        channel.reply(seq, True, serialization.dumps(6))
        self.assertEqual(self.result(taskid).value, 6)

    def test_failure_without_retries(self):
        """A user error with no retries left fails the task with that typed error."""
        channel = self.add_engine()
        (taskid,) = self.submit(Task("1/0"))
        self.turn()
        self.fail_with(channel, "1/0")
        r = self.result(taskid)
        self.assertIsInstance(r.failure, RemoteTaskError)
        self.assertEqual(r.failure.ename, "ZeroDivisionError")
        self.assertEqual(self.controller.queue_status()["failed"], 1)

    def test_failure_retried_on_any_engine(self):
        """A failed attempt with retries left goes to the back of the queue and may run elsewhere."""
        self.task_slots = 1
        self.setUp()
        a, b = self.add_engine(), self.add_engine()
        (t0, t1, t2) = self.submit(Task("flaky", retries=1), Task("one"), Task("two"))
        self.turn()
        self.assertEqual((self.codes(a), self.codes(b)), (["flaky"], ["one"]))
        self.fail_with(a, "flaky")
        self.turn()
        # "two" was waiting first; the retry queues behind it.
        self.assertEqual(self.codes(a), ["two"])
        self.assertEqual(self.controller.queue_status()["scheduled"], 1)
        self.answer(b, "one")
        self.turn()
        self.assertEqual(self.codes(b), ["flaky"])
        self.answer(b, "flaky", {"x": 1})
        r = self.result(t0)
        self.assertEqual(r.engineid, b.engine.engine_id)
        self.assertEqual(r.results, {"x": 1})

    def test_retries_spent(self):
        """After retries+1 failed attempts the task fails with the last error."""
        channel = self.add_engine()
        (taskid,) = self.submit(Task("boom", retries=2))
        for attempt in range(3):
            self.turn()
            self.assertEqual(self.codes(channel), ["boom"])
            self.assertIsNone(self.result(taskid))
            self.fail_with(channel, "boom", _user_error("ValueError", "attempt %d" % attempt))
        self.turn()
        self.assertEqual(self.codes(channel), [])
        r = self.result(taskid)
        self.assertEqual(str(r.failure), "ValueError: attempt 2")
        self.assertEqual(len(channel.sent), 3)

    def test_recovery_task_takes_over(self):
        """Once retries are spent the recovery task runs under the same id, with its own retries."""
        channel = self.add_engine()
        recovery = Task("recover", pull="r", retries=1)
        (taskid,) = self.submit(Task("main", retries=1, recovery_task=recovery))
        self.turn()
        self.fail_with(channel, "main")
        self.turn()
        self.fail_with(channel, "main")
        self.turn()
        self.assertEqual(self.codes(channel), ["recover"])
        self.fail_with(channel, "recover")
        self.turn()
        # The recovery task's own retry.
        self.assertEqual(self.codes(channel), ["recover"])
        self.answer(channel, "recover", {"r": "saved"})
        r = self.result(taskid)
        self.assertEqual(r.taskid, taskid)
        self.assertEqual(r.ns.r, "saved")
        self.assertEqual(self.controller.queue_status(True)["succeeded"], [taskid])

    def test_recovery_chain_of_other_kind(self):
        """A MapTask recovering a Task gives its return value; a failing chain ends in the last error."""
        channel = self.add_engine()
        last = Task("last")
        ids = self.submit(
            Task("main", recovery_task=MapTask(_triple, (1,))),
            Task("other", recovery_task=Task("middle", recovery_task=last)),
        )
        self.turn()
        self.fail_with(channel, "main")
        self.fail_with(channel, "other")
        self.turn()
        (seq, kind), middle = self.running(channel)
        self.assertEqual((kind, middle[1]), ("call", "middle"))
        channel.reply(seq, True, serialization.dumps(3))
        self.assertEqual(self.result(ids[0]).value, 3)
        self.fail_with(channel, "middle")
        self.turn()
        self.fail_with(channel, "last", _user_error("KeyError", "'last'"))
        self.assertEqual(str(self.result(ids[1]).failure), "KeyError: 'last'")


class EngineLostTests(ControllerTestCase):
    """An engine that disconnects in the middle of a task."""

    def test_lost_engine_attempt_retried(self):
        """A task on a lost engine counts as a failed attempt and is retried elsewhere."""
        a = self.add_engine()
        (taskid,) = self.submit(Task("work", retries=1))
        self.turn()
        self.assertEqual(self.codes(a), ["work"])
        b = self.add_engine()
        self.registry.engine_lost(a.engine, "connection lost")
        self.turn()
        self.assertEqual(self.codes(b), ["work"])
        self.answer(b, "work", {"done": True})
        r = self.result(taskid)
        self.assertEqual((r.engineid, r.results), (b.engine.engine_id, {"done": True}))

    def test_lost_engine_without_retries(self):
        """Without retries a task on a lost engine fails with a typed EngineLost naming it."""
        a = self.add_engine()
        (taskid,) = self.submit(Task("work"))
        self.turn()
        self.registry.engine_lost(a.engine, "connection lost")
        r = self.result(taskid)
        self.assertIsInstance(r.failure, EngineLost)
        self.assertIn("engine %d" % a.engine.engine_id, str(r.failure))
        self.assertIn("connection lost", str(r.failure))
        self.assertEqual(self.controller.queue_status()["failed"], 1)

    def test_lost_engine_gets_no_more_tasks(self):
        """Queued tasks wait for another engine after theirs is lost."""
        a = self.add_engine()
        self.submit(*[Task("t%d" % i) for i in range(4)])
        self.turn()
        self.registry.engine_lost(a.engine, "gone")
        self.turn()
        self.assertEqual(len(a.sent), 2)
        self.assertEqual(self.controller.queue_status()["scheduled"], 2)
        b = self.add_engine()
        self.turn()
        self.assertEqual(self.codes(b), ["t2", "t3"])

    def test_late_reply_of_lost_engine_ignored(self):
        """A reply from a lost engine's handle does not touch the task now running elsewhere."""
        a = self.add_engine()
        (taskid,) = self.submit(Task("work", retries=1))
        self.turn()
        (seq, _), = self.running(a)
        self.registry.engine_lost(a.engine, "gone")
        b = self.add_engine()
        self.turn()
        self.registry.replies(a.engine, [(seq, True, serialization.dumps({"stale": 1}), 0.0, 1.0)])
        self.assertIsNone(self.result(taskid))
        self.answer(b, "work", {"fresh": 1})
        self.assertEqual(self.result(taskid).results, {"fresh": 1})


class AbortTests(ControllerTestCase):
    """abort() of queued, running, finished and aborted tasks."""

    def test_abort_queued(self):
        """A queued task that is aborted ends with TaskAborted and never runs."""
        (taskid,) = self.submit(Task("never"))
        self.controller.abort(taskid)
        r = self.result(taskid)
        self.assertIsInstance(r.failure, TaskAborted)
        channel = self.add_engine()
        self.turn()
        self.assertEqual(channel.sent, [])
        self.assertEqual(self.controller.queue_status()["aborted"], 1)
        self.assertEqual(self.controller.queue_status()["scheduled"], 0)

    def test_abort_running(self):
        """A running task is interrupted on its engine and ends with TaskAborted."""
        channel = self.add_engine()
        (taskid,) = self.submit(Task("long"))
        self.turn()
        (seq, _), = self.running(channel)
        self.controller.abort(taskid)
        self.assertEqual(channel.interrupted, [seq])
        self.assertIsInstance(self.result(taskid).failure, TaskAborted)
        self.assertEqual(self.controller.queue_status()["pending"], 0)

    def test_abort_running_late_reply(self):
        """The aborted task's late reply is ignored, and frees the engine's slot."""
        self.task_slots = 1
        self.setUp()
        channel = self.add_engine()
        (taskid, nextid) = self.submit(Task("long"), Task("next"))
        self.turn()
        self.assertEqual(self.codes(channel), ["long"])
        self.controller.abort(taskid)
        self.answer(channel, "long", {"late": True})
        self.assertIsInstance(self.result(taskid).failure, TaskAborted)
        self.turn()
        self.assertEqual(self.codes(channel), ["next"])
        self.answer(channel, "next")
        self.assertIsNone(self.result(nextid).failure)

    def test_abort_finished(self):
        """abort of a finished task raises IndexError 'Task Already Completed'."""
        channel = self.add_engine()
        ok, bad = self.submit(Task("ok"), Task("bad"))
        self.turn()
        self.answer(channel, "ok")
        self.fail_with(channel, "bad")
        for taskid in (ok, bad):
            with self.assertRaises(TaskAlreadyCompleted) as caught:
                self.controller.abort(taskid)
            self.assertIsInstance(caught.exception, IndexError)
            self.assertEqual(str(caught.exception), "Task Already Completed")
        self.assertEqual(self.controller.queue_status()["aborted"], 0)

    def test_abort_twice(self):
        """A second abort raises TaskAlreadyAborted."""
        (taskid,) = self.submit(Task("x"))
        self.controller.abort(taskid)
        self.assertRaises(TaskAlreadyAborted, self.controller.abort, taskid)
        self.assertEqual(self.controller.queue_status()["aborted"], 1)

    def test_abort_unknown(self):
        """abort of an id never submitted raises UnknownTask (an IndexError)."""
        self.assertRaises(UnknownTask, self.controller.abort, 42)
        self.assertRaises(IndexError, self.controller.abort, 42)

    def test_abort_wrong_type(self):
        """abort takes one int id; anything else is a TypeError."""
        for bad in ("0", [0], True):
            self.assertRaises(TypeError, self.controller.abort, bad)

    def test_abort_wakes_waiters(self):
        """Waiting on an aborted task ends at the abort."""
        (taskid,) = self.submit(Task("x"))
        d = self.controller.results([taskid], block=True)
        self.assertNoResult(d)
        self.controller.abort(taskid)
        (envelope,) = self.successResultOf(d)
        self.assertIsInstance(result_from_envelope(envelope).failure, TaskAborted)


class WaitTests(ControllerTestCase):
    """wait() and results(block=True)."""

    def test_results_block(self):
        """results(block=True) fires once every listed task has finished."""
        channel = self.add_engine()
        ids = self.submit(Task("a"), Task("b"))
        d = self.controller.results(ids, block=True)
        self.turn()
        self.answer(channel, "a", {"v": 1})
        self.assertNoResult(d)
        self.fail_with(channel, "b")
        envelopes = self.successResultOf(d)
        results = [result_from_envelope(e) for e in envelopes]
        self.assertEqual([r.taskid for r in results], ids)
        self.assertEqual(results[0].results, {"v": 1})
        self.assertIsInstance(results[1].failure, RemoteTaskError)

    def test_results_nonblocking(self):
        """results() without block gives None for unfinished tasks."""
        channel = self.add_engine()
        ids = self.submit(Task("a"), Task("b"))
        self.turn()
        self.answer(channel, "a")
        envelopes = self.successResultOf(self.controller.results(ids))
        self.assertIsNotNone(envelopes[0])
        self.assertIsNone(envelopes[1])

    def test_wait_already_done(self):
        """wait() on finished tasks fires at once."""
        channel = self.add_engine()
        ids = self.submit(Task("a"))
        self.turn()
        self.answer(channel, "a")
        self.assertIsNone(self.successResultOf(self.controller.wait(ids)))

    def test_each_waiter_own_deferred(self):
        """Two waiters on one task each get their own Deferred, both fired."""
        channel = self.add_engine()
        (taskid,) = self.submit(Task("a"))
        d1 = self.controller.wait([taskid])
        d2 = self.controller.wait([taskid, taskid])
        self.assertIsNot(d1, d2)
        self.turn()
        self.answer(channel, "a")
        self.successResultOf(d1)
        self.successResultOf(d2)

    def test_wait_survives_retries(self):
        """A failed attempt that is retried does not wake the waiters."""
        channel = self.add_engine()
        (taskid,) = self.submit(Task("a", retries=1))
        d = self.controller.wait([taskid])
        self.turn()
        self.fail_with(channel, "a")
        self.assertNoResult(d)
        self.turn()
        self.answer(channel, "a")
        self.successResultOf(d)

    def test_wait_unknown(self):
        """wait() on an unknown id raises UnknownTask."""
        self.assertRaises(UnknownTask, self.controller.wait, [5])
        self.assertRaises(UnknownTask, self.controller.results, [5])


class QueueStatusTests(ControllerTestCase):
    """queue_status() counts, and lists when verbose."""

    def test_counts_and_lists(self):
        """Each task is counted in exactly one state; verbose lists the ids."""
        channel = self.add_engine()
        ids = self.submit(*[Task("t%d" % i) for i in range(6)])
        self.turn()
        self.answer(channel, "t0")
        self.fail_with(channel, "t1")
        self.turn()
        self.controller.abort(ids[5])
        self.assertEqual(
            self.controller.queue_status(),
            {"scheduled": 1, "pending": 2, "waiting_retry": 0, "succeeded": 1, "failed": 1, "aborted": 1},
        )
        verbose = self.controller.queue_status(verbose=True)
        self.assertIn("engines", verbose)  # per-engine counts: tests/test_why.py
        del verbose["engines"]
        self.assertEqual(
            verbose,
            {
                "scheduled": [ids[4]],
                "pending": [ids[2], ids[3]],
                "waiting_retry": [],
                "succeeded": [ids[0]],
                "failed": [ids[1]],
                "aborted": [ids[5]],
            },
        )

    def test_retry_counted_once(self):
        """A retried task moves between scheduled and pending, never counted twice."""
        channel = self.add_engine()
        self.submit(Task("a", retries=3))
        self.turn()
        self.fail_with(channel, "a")
        self.assertEqual(self.controller.queue_status()["scheduled"], 1)
        self.assertEqual(self.controller.queue_status()["pending"], 0)
        self.turn()
        self.assertEqual(self.controller.queue_status()["pending"], 1)
        self.assertEqual(sum(self.controller.queue_status().values()), 1)


class ClearTests(ControllerTestCase):
    """clear() forgets finished tasks only."""

    def test_clear_all_finished(self):
        """clear() forgets every finished task and keeps the unfinished ones."""
        channel = self.add_engine()
        ids = self.submit(Task("a"), Task("b"), Task("c"))
        self.turn()
        self.answer(channel, "a")
        self.fail_with(channel, "b")
        self.assertEqual(self.controller.clear(), 2)
        self.assertRaises(UnknownTask, self.controller.results, [ids[0]])
        self.assertEqual(
            self.controller.queue_status(),
            {"scheduled": 1, "pending": 0, "waiting_retry": 0, "succeeded": 0, "failed": 0, "aborted": 0},
        )
        self.assertEqual(self.controller.queue_status(True)["scheduled"], [ids[2]])

    def test_clear_some(self):
        """clear(ids) forgets the finished ones listed and keeps unfinished ones."""
        channel = self.add_engine()
        ids = self.submit(Task("a"), Task("b"), Task("c"))
        self.turn()
        self.answer(channel, "a")
        self.answer(channel, "b")
        self.assertEqual(self.controller.clear([ids[0], ids[2]]), 1)
        self.assertIsNotNone(self.result(ids[1]))
        self.assertIsNone(self.result(ids[2]))

    def test_clear_unknown(self):
        """Unknown ids raise UnknownTask after the known ones are cleared."""
        channel = self.add_engine()
        (taskid,) = self.submit(Task("a"))
        self.turn()
        self.answer(channel, "a")
        self.assertRaises(UnknownTask, self.controller.clear, [taskid, 99])
        self.assertRaises(UnknownTask, self.controller.results, [taskid])

    def test_ids_not_reused(self):
        """Ids keep increasing after a clear."""
        self.submit(Task("a"))
        self.controller.abort(0)
        self.controller.clear()
        self.assertEqual(self.submit(Task("b")), [1])


class DependTests(ControllerTestCase):
    """Tasks with `depend`: properties changes and the unmet timeout."""

    def test_depend_routes_task(self):
        """A depend task goes only to an engine whose properties satisfy it."""
        plain = self.add_engine({"gpu": False})
        gpu = self.add_engine({"gpu": True})
        self.submit(Task("g", depend=_needs_gpu))
        self.turn()
        self.assertEqual((self.codes(plain), self.codes(gpu)), ([], ["g"]))

    def test_properties_change_unblocks(self):
        """update_properties on an engine runs a waiting depend task, without spin()."""
        channel = self.add_engine({"gpu": False})
        self.submit(Task("g", depend=_needs_gpu))
        self.turn()
        self.assertEqual(channel.sent, [])
        channel.engine.update_properties({"gpu": True})
        self.turn()
        self.assertEqual(self.codes(channel), ["g"])

    def test_unmet_depend_times_out(self):
        """A task no engine accepts fails with TaskTimeout after unmet_timeout."""
        self.add_engine({"gpu": False})
        (taskid,) = self.submit(Task("g", depend=_needs_gpu))
        self.turn()
        self.clock.advance(self.unmet_timeout / 2)
        self.assertIsNone(self.result(taskid))
        for _ in range(8):
            self.clock.advance(self.unmet_timeout / 4)
        r = self.result(taskid)
        self.assertIsInstance(r.failure, TaskTimeout)
        self.assertIn("depend", str(r.failure))
        self.assertEqual(self.controller.queue_status()["failed"], 1)
        self.assertEqual(self.scheduler.ntasks, 0)

    def test_unmet_depend_without_engines_waits(self):
        """With no engine registered at all, a depend task waits (engines may come)."""
        (taskid,) = self.submit(Task("g", depend=_needs_gpu))
        self.clock.pump([self.unmet_timeout / 4] * 20)
        self.assertIsNone(self.result(taskid))

    def test_unmet_timeout_recovery_takes_over(self):
        """When the depend is never met the recovery task runs under the same id."""
        channel = self.add_engine({"gpu": False})
        (taskid,) = self.submit(
            Task("g", depend=_needs_gpu, retries=5, recovery_task=Task("cpu", pull="x"))
        )
        self.turn()
        self.clock.pump([self.unmet_timeout / 4] * 8)
        self.assertEqual(self.codes(channel), ["cpu"])
        self.answer(channel, "cpu", {"x": 1})
        r = self.result(taskid)
        self.assertEqual((r.taskid, r.results), (taskid, {"x": 1}))

    def test_unmet_timeout_recovery_with_same_depend(self):
        """A recovery task with the same unmet depend also times out, and each task
        is handed out once when an engine finally accepts them."""
        channel = self.add_engine({"gpu": False})
        ids = self.submit(
            *[Task("t%d" % i, depend=_needs_gpu, recovery_task=Task("r%d" % i, depend=_needs_gpu)) for i in range(3)]
        )
        self.turn()
        self.clock.pump([self.unmet_timeout / 4] * 6)
        self.assertEqual(self.controller.queue_status()["scheduled"], 3)
        self.assertEqual(self.scheduler.ntasks, 3)
        channel.engine.update_properties({"gpu": True})
        other = self.add_engine({"gpu": True})
        self.turn()
        sent = sorted(self.codes(channel) + self.codes(other))
        self.assertEqual(sent, ["r0", "r1", "r2"])
        self.assertEqual(self.controller.queue_status()["pending"], 3)
        for c in (channel, other):
            for code in self.codes(c):
                self.answer(c, code)
        self.assertEqual(self.controller.queue_status(True)["succeeded"], ids)

    def test_depend_that_raises_never_matches(self):
        """A depend that raises on every engine counts as False and times out."""
        self.add_engine({})
        (taskid,) = self.submit(Task("x", depend=lambda p: p["missing"]))
        self.clock.pump([self.unmet_timeout / 4] * 8)
        self.assertIsInstance(self.result(taskid).failure, TaskTimeout)


    def test_depend_raising_base_exceptions_counts_as_false(self):
        """A depend raising SystemExit or KeyboardInterrupt counts as False: the
        tasks beside it dispatch, the unmet timeout still fails it, and an
        abort of another such task works (issue 8, case 3, on a Clock)."""

        def exits(properties):
            raise SystemExit(3)

        def interrupts(properties):
            raise KeyboardInterrupt

        channel = self.add_engine({})
        exiting, interrupted, aborted, plain = self.submit(
            Task("x", depend=exits), Task("k", depend=interrupts), Task("y", depend=exits), Task("p")
        )
        # Finished tasks drop their spec: take the depend's key now.
        key = self.controller._tasks[exiting].spec.depend
        self.turn()
        self.assertEqual(self.codes(channel), ["p"])
        self.controller.abort(aborted)
        self.assertIsInstance(self.result(aborted).failure, TaskAborted)
        self.answer(channel, "p")
        self.clock.pump([self.unmet_timeout / 4] * 8)
        for taskid in (exiting, interrupted):
            self.assertIsInstance(self.result(taskid).failure, TaskTimeout)
        self.assertEqual(self.scheduler.ntasks, 0)
        self.assertEqual(self.scheduler.depend_verdicts(key), {0: (False, "raised SystemExit: 3")})


class PriorityDependTests(ControllerTestCase):
    """The unmet timeout under the priority scheduler."""

    scheduler_class = PriorityScheduler

    def test_recovery_with_same_depend_runs_once(self):
        """A recovery task that keeps its task's depend but raises its priority is
        handed out once, not once for the old queue entry and once for the new."""
        channel = self.add_engine({"gpu": False})
        first, second = self.submit(
            Task("a", depend=_needs_gpu, priority=9, recovery_task=Task("ra", depend=_needs_gpu, priority=10)),
            Task("b", depend=_needs_gpu, recovery_task=Task("rb", depend=_needs_gpu)),
        )
        self.clock.pump([self.unmet_timeout / 4] * 6)
        self.assertEqual(self.scheduler.ntasks, 2)
        channel.engine.update_properties({"gpu": True})
        self.turn()
        self.assertEqual(self.codes(channel), ["ra", "rb"])
        self.answer(channel, "ra")
        self.answer(channel, "rb")
        self.assertEqual(self.controller.queue_status(True)["succeeded"], [first, second])


class BadRequestTests(ControllerTestCase):
    """Malformed envelopes are refused, batch and all."""

    def test_bad_envelope_rejects_batch(self):
        """One malformed envelope rejects the whole batch: nothing is queued, no id used."""
        good = Task("a").to_envelope()
        bad_envelopes = [
            ("exec", b"p"),
            ("shell", b"p", (False, False, 0, 0, None), None, None),
            ("exec", "not bytes", (False, False, 0, 0, None), None, None),
            ("exec", b"p", (1, False, 0, 0, None), None, None),
            ("exec", b"p", (False, False, -1, 0, None), None, None),
            ("exec", b"p", (False, False, 0, 0.5, None), None, None),
            ("exec", b"p", (False, False, 0, 0, -3), None, None),
            ("exec", b"p", (False, False, 0, 0, None), "not bytes", None),
            ("exec", b"p", (False, False, 0, 0, None), None, ("exec", b"p")),
            None,
        ]
        for bad in bad_envelopes:
            self.assertRaises(BadRequest, self.controller.submit, [good, bad])
        self.assertEqual(sum(self.controller.queue_status().values()), 0)
        self.assertEqual(self.scheduler.ntasks, 0)
        self.assertEqual(self.controller.submit([good]), [0])

    def test_unloadable_depend_fails_its_task(self):
        """A depend that cannot be loaded is accepted as bytes (the controller
        never unpickles it), then fails its own task with DependError naming
        the cause; the tasks beside it run."""
        channel = self.add_engine({"gpu": True})
        garbage = ("exec", b"p", (False, False, 0, 0, None), b"garbage", None)
        number = ("exec", b"p", (False, False, 0, 0, None), serialization.dumps(42), None)
        bad, good, odd = self.controller.submit([garbage, Task("a").to_envelope(), number])
        self.turn()
        self.assertEqual(self.codes(channel), ["a"])
        failure = self.result(bad).failure
        self.assertIsInstance(failure, DependError)
        self.assertIn("cannot load: UnpicklingError", str(failure))
        self.assertIn("task %d" % bad, str(failure))
        self.assertIn("not a function", str(self.result(odd).failure))
        self.answer(channel, "a")
        self.assertIsNone(self.result(good).failure)
        self.assertEqual(self.controller.queue_status()["failed"], 2)
        self.assertEqual(self.scheduler.ntasks, 0)


class AdaptivePrefetchTests(ControllerTestCase):
    """Task slots follow each engine's task run time."""

    prefetch = 0.005

    def answer_all(self, channel, duration):
        for seq, _, _ in channel.pending():
            channel.reply(seq, True, serialization.dumps({}), 0.0, duration)

    def test_short_tasks_get_more_slots(self):
        """An engine whose tasks take 50 us holds about 5 ms of them: 100 tasks."""
        channel = self.add_engine()
        self.submit(*[Task("t") for _ in range(5000)])
        self.turn()
        self.assertEqual(len(channel.pending()), self.task_slots)
        for _ in range(5):
            self.answer_all(channel, 0.00005)
            self.turn()
        self.assertEqual(channel.engine.task_slots, 100)
        self.assertEqual(len(channel.pending()), 100)

    def test_long_tasks_get_one_slot(self):
        """An engine whose tasks take 100 ms holds one at a time, so none waits
        behind a long task while another engine is idle."""
        channel = self.add_engine()
        self.submit(*[Task("t") for _ in range(10)])
        self.turn()
        self.answer_all(channel, 0.1)
        self.turn()
        self.assertEqual(channel.engine.task_slots, 1)
        self.assertEqual(len(channel.pending()), 1)


class FinishedOrderTests(ControllerTestCase):
    """The retention queue does not keep cleared tasks alive."""

    def test_clear_compacts_the_retention_queue(self):
        """After most finished tasks are cleared, the retention queue holds
        entries only for the ones still kept."""
        channel = self.add_engine()
        ids = self.submit(*[Task("t") for _ in range(3000)])
        for _ in range(3000):
            self.turn()
            for seq, _, _ in channel.pending():
                channel.reply(seq, True, serialization.dumps({}), 0.0, 1.0)
            if not channel.pending() and self.controller.queue_status()["scheduled"] == 0:
                break
        self.assertEqual(self.controller.queue_status()["succeeded"], 3000)
        self.controller.clear(ids[:2900])
        self.assertEqual(len(self.controller._finished_order), 100)


class HeartbeatTestCase(ControllerTestCase):
    """A registry with the heartbeat on: period 1 s, timeout 10 s."""

    def setUp(self):
        super().setUp()
        self.registry._heartbeat_period = 1.0
        self.registry._heartbeat_timeout = 10.0
        self.registry.start()

    def beat(self, seconds: int) -> None:
        """Let `seconds` pass one second at a time (one beat each)."""
        for _ in range(seconds):
            self.clock.advance(1.0)


class HeartbeatTests(HeartbeatTestCase):
    """Silence is measured against the controller's own running time."""

    def test_silent_engine_lost_after_timeout(self):
        """An engine that answers nothing is lost once it was silent for more
        than the timeout, and its task fails with EngineLost."""
        silent = self.add_engine()
        silent.answers_pings = False
        (taskid,) = self.submit(Task("work"))
        self.turn()
        self.beat(10)
        self.assertIn(silent.engine.engine_id, self.registry.engines)
        self.beat(1)
        self.assertNotIn(silent.engine.engine_id, self.registry.engines)
        self.assertTrue(silent.disconnected)
        self.assertIsInstance(self.result(taskid).failure, EngineLost)

    def test_answering_engine_kept(self):
        """An engine that answers its pings stays, however long its task runs."""
        alive = self.add_engine()
        self.submit(Task("long"))
        self.turn()
        self.beat(60)
        self.assertIn(alive.engine.engine_id, self.registry.engines)
        self.assertEqual(self.codes(alive), ["long"])

    def test_controller_stall_is_not_engine_loss(self):
        """Case 8: the controller stalls for 12 s (SIGSTOP, a long pass) with
        a heartbeat timeout of 10 s: on resuming, its healthy engines get a
        fresh window and their running tasks go on."""
        engines = [self.add_engine() for _ in range(2)]
        ids = self.submit(Task("a"), Task("b"))
        self.turn()
        self.beat(3)
        # No beat runs for 12 s; the engines' pings are answered when the
        # reactor runs again, which is after the late beat itself.
        for channel in engines:
            channel.answers_pings = False
        self.clock.advance(12.0)
        for channel in engines:
            channel.answers_pings = True
            self.registry._heard(channel.engine)
        self.beat(5)
        self.assertEqual(sorted(self.registry.engines), [0, 1])
        self.assertEqual([self.result(t) for t in ids], [None, None])
        self.answer(engines[0], "a")
        self.answer(engines[1], "b")
        self.assertEqual([self.result(t).failure for t in ids], [None, None])

    def test_silence_across_a_stall_counts_once(self):
        """An engine that is really silent is still lost after a stall: the
        stall adds one period to its silence, not twelve."""
        silent = self.add_engine()
        silent.answers_pings = False
        self.beat(2)
        self.clock.advance(12.0)
        self.assertAlmostEqual(silent.engine.silence, 3.0)
        self.beat(7)
        self.assertIn(silent.engine.engine_id, self.registry.engines)
        self.beat(1)
        self.assertNotIn(silent.engine.engine_id, self.registry.engines)


class ControllerTimeoutTests(HeartbeatTestCase):
    """Case 16 and case 10: the controller enforces task timeouts itself."""

    def grace(self) -> float:
        return self.registry.timeout_grace

    def test_rogue_engine_cannot_hold_a_task_past_its_timeout(self):
        """An engine that answers pings but never replies: a task with
        timeout=5 fails with TaskTimeout at 5 s plus the grace, the engine's
        slot stays written off, and the retry runs on a good engine."""
        rogue = self.add_engine()
        (taskid,) = self.submit(Task("work", timeout=5, retries=1))
        self.turn()
        self.assertEqual(self.codes(rogue), ["work"])
        good = self.add_engine()
        self.clock.advance(5 + self.grace() - 0.01)
        self.assertIsNone(self.result(taskid))
        self.clock.advance(0.02)
        self.turn()
        self.assertIn(rogue.engine.engine_id, self.registry.engines)
        self.assertEqual(rogue.interrupted, [0])
        self.assertEqual(self.codes(good), ["work"])
        self.answer(good, "work", {"ok": 1})
        r = self.result(taskid)
        self.assertEqual((r.engineid, r.results), (good.engine.engine_id, {"ok": 1}))

    def test_written_off_slots_get_no_more_work(self):
        """A rogue engine's tasks fail one after another, each once it had
        been current for its timeout plus the grace; once every slot is
        written off the engine gets nothing more, and a late reply frees a
        slot without touching the finished task."""
        rogue = self.add_engine()
        first, second, third = self.submit(*[Task("t%d" % i, timeout=1) for i in range(3)])
        self.turn()
        self.assertEqual(self.codes(rogue), ["t0", "t1"])
        self.clock.advance(1 + self.grace() + 0.01)
        self.turn()
        failure = self.result(first).failure
        self.assertIsInstance(failure, TaskTimeout)
        self.assertIn("did not answer", str(failure))
        self.assertIsNone(self.result(second))
        self.clock.advance(1 + self.grace() + 0.01)
        self.turn()
        self.assertIsInstance(self.result(second).failure, TaskTimeout)
        # Both slots are written off: the third task waits.
        self.assertEqual(self.codes(rogue), ["t0", "t1"])
        self.assertEqual(self.controller.queue_status()["scheduled"], 1)
        rogue.reply(0, True, serialization.dumps({"late": 1}), 0.0, 1.0)
        self.turn()
        self.assertIsInstance(self.result(first).failure, TaskTimeout)
        self.assertEqual(self.codes(rogue), ["t1", "t2"])

    def test_timeout_counts_from_when_the_task_is_current(self):
        """A task sent ahead behind a long one is not failed for the time it
        waited in the engine's queue."""
        engine = self.add_engine()
        long, short = self.submit(Task("long"), Task("short", timeout=2))
        self.turn()
        self.clock.advance(30)
        self.assertIsNone(self.result(short))
        self.answer(engine, "long")
        self.clock.advance(2 + self.grace() - 0.01)
        self.assertIsNone(self.result(short))
        self.clock.advance(0.02)
        self.assertIsInstance(self.result(short).failure, TaskTimeout)

    def test_answer_in_time_cancels_the_deadline(self):
        """A task answered within its timeout leaves no timer behind."""
        engine = self.add_engine()
        (taskid,) = self.submit(Task("quick", timeout=3))
        self.turn()
        self.answer(engine, "quick", {"v": 1})
        self.assertEqual(engine.engine.head, None)
        self.assertEqual(self.result(taskid).results, {"v": 1})
        self.clock.advance(100)
        self.assertEqual(self.result(taskid).results, {"v": 1})

    def test_hung_engine_past_timeout_gives_task_timeout(self):
        """Case 10: an engine hung in C code (no answer, no pings) while a
        task with timeout=2 runs: when the heartbeat gives up on it, the task
        fails with TaskTimeout, not EngineLost; a task without a timeout on
        a hung engine gets EngineLost."""
        hung = self.add_engine()
        hung.answers_pings = False
        (timed,) = self.submit(Task("regex", timeout=2))
        self.turn()
        other = self.add_engine()
        other.answers_pings = False
        (plain,) = self.submit(Task("plain"))
        self.turn()
        self.assertEqual(self.codes(other), ["plain"])
        self.beat(11)
        failure = self.result(timed).failure
        self.assertIsInstance(failure, TaskTimeout)
        self.assertIn("timeout of 2 s", str(failure))
        self.assertIsInstance(self.result(plain).failure, EngineLost)


class SubmissionTokenTests(ControllerTestCase):
    """A replayed token is recognised by its batch's bytes."""

    def test_resend_gets_the_same_ids(self):
        envelopes = [Task("a").to_envelope()]
        first = self.controller.submit(envelopes, token="t", digest="10:aa")
        again = self.controller.submit(envelopes, token="t", digest="10:aa")
        self.assertEqual(first, again)
        self.assertEqual(self.controller.queue_status()["scheduled"], 1)

    def test_token_replayed_with_another_batch_is_refused(self):
        """A token sent again with different tasks is a BadRequest, not a
        silent answer with the first batch's ids."""
        self.controller.submit([Task("a").to_envelope()], token="t", digest="10:aa")
        with self.assertRaises(BadRequest) as caught:
            self.controller.submit([Task("b").to_envelope()], token="t", digest="10:bb")
        self.assertIn("already used for another batch", str(caught.exception))
        self.assertEqual(self.controller.queue_status()["scheduled"], 1)


class FinishedTaskMemoryTests(ControllerTestCase):
    """A finished task keeps its result, not its envelope."""

    def test_finished_tasks_drop_their_payload(self):
        """Pushed data and the recovery chain of succeeded, failed and
        aborted tasks are let go; a queued task keeps its own."""
        engine = self.add_engine()
        push = {"blob": b"x" * 100_000}
        done, failed, aborted, queued = self.submit(
            Task("ok", push=push),
            Task("bad", push=push, recovery_task=Task("recover")),
            Task("abort me", push=push),
            Task("later", push=push),
        )
        self.turn()
        self.answer(engine, "ok")
        self.fail_with(engine, "bad")
        self.turn()
        self.controller.abort(aborted)
        records = self.controller._tasks
        self.assertEqual(records[failed].state.value, "scheduled")  # its recovery is queued
        for taskid in (done, aborted):
            self.assertEqual(records[taskid].spec.payload, b"")
            self.assertIsNone(records[taskid].spec.recovery)
        # (a payload with a big buffer is frames: their bytes count)
        self.assertGreater(serialization.frames_size(records[queued].spec.payload), 100_000)
        self.assertEqual(self.result(done).failure, None)
