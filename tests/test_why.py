"""Why a task waits (issue 13 item 3): `TaskController.why` gives one reason
per engine for a queued task (busy, its depend returned False or raised,
a failure penalty, a retry delay), says when no engine matches and which
properties the depend read, and says where a task that is not queued is.

The logic runs on a `task.Clock` with scripted engines and the in-process
evaluator; `WhyOverFoolscapTests` asks a real controller with its evaluator
processes, through the blocking-equivalent Deferred client.
"""

from __future__ import annotations

from twisted.internet import task
from twisted.trial import unittest

from taskfarm import serialization, wire
from taskfarm.controller import why
from taskfarm.controller.registry import EngineRegistry
from taskfarm.controller.scheduler import FIFOScheduler
from taskfarm.controller.taskcontroller import TaskController
from taskfarm.errors import RemoteTaskError, UnknownTask
from taskfarm.task import MapTask, Task
from taskfarm.testing.cluster import ClusterTestCase
from taskfarm.testing.fakes import InProcessEvaluator, ScriptedChannel
from taskfarm.testing.grid import LocalGrid
from taskfarm.testing.helpers import async_test


def needs_gpu(properties):
    return properties.get("gpu", False)


def needs_ram(properties):
    return properties["RAM"] >= 8


def _error():
    return RemoteTaskError("RuntimeError", "not yet", "Traceback (most recent call last):\n", 0)


class WhyTestCase(unittest.SynchronousTestCase):
    """A controller on a Clock: one task slot per engine, the in-process evaluator."""

    def setUp(self):
        self.clock = task.Clock()
        self.registry = EngineRegistry(self.clock, task_slots=1, heartbeat_period=None)
        self.evaluator = InProcessEvaluator(self.clock)
        self.evaluator.start()
        self.controller = TaskController(
            self.registry,
            FIFOScheduler(self.evaluator),
            self.clock,
            unmet_timeout=None,
            retention=None,
            prefetch=None,
            retry_delay=2.0,
            failure_penalty=10.0,
        )
        self.controller.start()
        self.addCleanup(self.controller.stop)
        self.addCleanup(self.registry.stop)

    def engine(self, **properties) -> ScriptedChannel:
        return ScriptedChannel.registered(self.registry, properties)

    def submit(self, *tasks) -> list[int]:
        ids = self.controller.submit([t.to_envelope() for t in tasks])
        self.clock.advance(0)
        self.clock.advance(0)  # the depend verdicts, then the pass they kick
        return ids

    def why(self, taskid) -> dict:
        d = self.controller.why(taskid)
        self.clock.advance(0)
        self.clock.advance(0)
        answer = self.successResultOf(d)
        # What the client reads of it: every answer parses.
        wire.Explanation.parse(serialization.unpack(serialization.pack(answer)))
        return answer

    def reasons(self, answer) -> dict[int, str]:
        return {e["engine_id"]: e["reason"] for e in answer["engines"]}


class QueuedReasonTests(WhyTestCase):
    def test_busy(self):
        """An engine whose slots are full is busy; the summary counts it."""
        a = self.engine()
        first, second = self.submit(Task("x = 1"), Task("y = 1"))
        self.assertEqual(len(a.pending()), 1)
        answer = self.why(second)
        self.assertEqual(answer["state"], "queued")
        self.assertEqual(self.reasons(answer), {a.engine.engine_id: why.BUSY})
        (entry,) = answer["engines"]
        self.assertEqual((entry["slots"], entry["taken"]), (1, 1))
        self.assertEqual(entry["detail"], "its task slots are full (1 of 1 taken)")
        self.assertEqual(answer["summary"], "queued: 1 engine busy")
        self.assertFalse(answer["no_engine_matches"])

    def test_depend_false_and_no_engine_matches(self):
        """A depend that returned False on every engine: each says so, the
        answer says no engine matches and names what the depend read."""
        a, b = self.engine(gpu=False, RAM=2), self.engine(RAM=4)
        (tid,) = self.submit(MapTask(len, ("ab",), depend=needs_gpu))
        answer = self.why(tid)
        self.assertEqual(
            self.reasons(answer),
            {a.engine.engine_id: why.DEPEND_FALSE, b.engine.engine_id: why.DEPEND_FALSE},
        )
        self.assertTrue(answer["no_engine_matches"])
        self.assertEqual(answer["properties_read"], ["gpu"])
        self.assertIn("no engine's properties satisfy its depend (it read gpu)", answer["summary"])
        self.assertIn("returned False", answer["engines"][0]["detail"])

    def test_depend_raised_names_the_exception(self):
        """A depend that raised on an engine says which exception."""
        a, b = self.engine(RAM=16), self.engine(cores=2)
        first, second = self.submit(
            MapTask(len, ("ab",), depend=needs_ram), MapTask(len, ("cd",), depend=needs_ram)
        )
        answer = self.why(second)
        self.assertEqual(
            self.reasons(answer),
            {a.engine.engine_id: why.BUSY, b.engine.engine_id: why.DEPEND_RAISED},
        )
        detail = answer["engines"][1]["detail"]
        self.assertIn("raised KeyError: 'RAM'", detail)
        self.assertIn("(it read RAM)", detail)
        self.assertFalse(answer["no_engine_matches"])
        self.assertEqual(answer["properties_read"], ["RAM"])

    def test_penalty(self):
        """The engine a task just failed on sits out its penalty for that task
        (here it took the next task instead); the other engine is busy."""
        a, b = self.engine(), self.engine()
        tid, _, _ = self.submit(
            Task("x = 1", retries=1, retry_delay=0), Task("y = 1"), Task("z = 1")
        )
        ((seq, _, _),) = a.pending()
        a.fail(seq, _error())
        self.clock.advance(0)
        self.assertEqual(len(a.pending()), 1)  # it took the next task
        answer = self.why(tid)
        self.assertEqual(answer["state"], "queued")
        self.assertEqual(
            self.reasons(answer),
            {a.engine.engine_id: why.PENALTY, b.engine.engine_id: why.BUSY},
        )
        self.assertIn("failure penalty for 10 s more", answer["engines"][0]["detail"])
        self.clock.advance(4)
        self.assertIn("for 6 s more", self.why(tid)["engines"][0]["detail"])

    def test_retry_delay(self):
        """A failed attempt waiting for its retry delay says so, per engine,
        with the seconds left."""
        a = self.engine()
        (tid,) = self.submit(Task("x = 1", retries=1))
        ((seq, _, _),) = a.pending()
        a.fail(seq, _error())
        self.clock.advance(0.5)
        answer = self.why(tid)
        self.assertEqual(answer["state"], "waiting_retry")
        self.assertEqual(answer["wait"], 1.5)
        self.assertEqual(self.reasons(answer), {a.engine.engine_id: why.RETRY_DELAY})
        self.assertIn("1.5 s", answer["summary"])

    def test_free_and_no_engines(self):
        """Without engines the answer says none is registered; an engine that
        accepts and has a slot is free."""
        (tid,) = self.submit(MapTask(len, ("ab",), depend=needs_gpu))
        answer = self.why(tid)
        self.assertEqual(answer["engines"], [])
        self.assertEqual(answer["summary"], "queued: no engine is registered")
        self.assertFalse(answer["no_engine_matches"])
        # Asked right after registering: not dispatched yet in this turn.
        a = ScriptedChannel.registered(self.registry, {"gpu": True})
        d = self.controller.why(tid)
        self.clock.advance(0)
        answer = self.successResultOf(d)
        self.assertEqual(self.reasons(answer), {a.engine.engine_id: why.FREE})

    def test_bounded_without_answers(self):
        """A depend evaluator that never answers cannot hold why(): after the
        bound the verdicts not known yet say so."""

        class Silent(InProcessEvaluator):
            def evaluate(self, key, properties, trace=False):
                from twisted.internet import defer

                return defer.Deferred()

        self.controller.dispatcher.scheduler._evaluator = Silent(self.clock)
        a = self.engine(gpu=True)
        (tid,) = self.submit(MapTask(len, ("ab",), depend=needs_gpu))
        d = self.controller.why(tid)
        self.clock.advance(why.WHY_TIMEOUT - 0.01)
        self.assertNoResult(d)
        self.clock.advance(0.02)
        answer = self.successResultOf(d)
        self.assertEqual(self.reasons(answer), {a.engine.engine_id: why.DEPEND_UNKNOWN})


class NotQueuedTests(WhyTestCase):
    def test_running_and_finished(self):
        """A running task names its engine; a finished one its outcome."""
        a = self.engine()
        ok, bad = self.submit(Task("x = 1"), Task("y = 1"))
        answer = self.why(ok)
        self.assertEqual(answer["state"], "running")
        self.assertEqual(answer["engine_id"], a.engine.engine_id)
        self.assertEqual(answer["summary"], "running on engine %d (attempt 1)" % a.engine.engine_id)
        self.assertEqual(answer["engines"], [])
        ((seq, _, _),) = a.pending()
        a.reply(seq, True, serialization.dumps({}))
        self.clock.advance(0)
        self.assertEqual(self.why(ok)["state"], "succeeded")
        ((seq, _, _),) = a.pending()
        a.fail(seq, _error())
        self.clock.advance(0)
        answer = self.why(bad)
        self.assertEqual(answer["state"], "failed")
        self.assertIn("RuntimeError: not yet", answer["summary"])

    def test_aborted(self):
        (tid,) = self.submit(Task("x = 1"))
        self.controller.abort(tid)
        self.assertEqual(self.why(tid)["state"], "aborted")

    def test_unknown_id_and_bad_id(self):
        """An unknown id is `UnknownTask`; a non-int is a TypeError."""
        self.failureResultOf(self.controller.why(12345), UnknownTask)
        self.failureResultOf(self.controller.why("1"), TypeError)


class PerEngineCountTests(WhyTestCase):
    def test_queue_status_verbose_counts_per_engine(self):
        """queue_status(verbose=True) counts running and finished tasks per
        engine, every registered engine listed."""
        a, b = self.engine(), self.engine()
        ids = self.submit(Task("a = 1"), Task("b = 1"), Task("c = 1"))
        ((seq, _, _),) = a.pending()
        a.reply(seq, True, serialization.dumps({}))
        self.clock.advance(0)
        ((seq, _, _),) = b.pending()
        b.fail(seq, _error())
        self.clock.advance(0)
        c = self.engine()
        engines = self.controller.queue_status(verbose=True)["engines"]
        ea, eb, ec = (x.engine.engine_id for x in (a, b, c))
        self.assertEqual(engines[ea], {"running": 1, "succeeded": 1, "failed": 0})
        self.assertEqual(engines[eb], {"running": 0, "succeeded": 0, "failed": 1})
        self.assertEqual(engines[ec], {"running": 0, "succeeded": 0, "failed": 0})
        self.assertEqual(len(ids), 3)


class ClientTests(unittest.TestCase):
    """The Deferred client's `why` over the in-process transport."""

    @async_test
    async def test_client_why(self):
        grid = LocalGrid(task_slots=1)
        self.addCleanup(grid.stop)
        grid.add_engine()
        channel = grid.registry.engines[0].channel
        channel.hold()
        tc = grid.task_client()
        d = tc.run_many([Task("import time"), Task("b = 1")])
        grid.settle()
        first, second = self.successResultOf(d)
        d = tc.why(second)
        grid.settle()
        answer = self.successResultOf(d)
        self.assertIsInstance(answer, wire.Explanation)
        self.assertEqual([e.reason for e in answer.engines], [why.BUSY])
        self.assertEqual(
            str(answer),
            "task %d: queued: 1 engine busy\n"
            "  engine 0: busy: its task slots are full (1 of 1 taken)" % second,
        )
        d = tc.why(999)
        grid.settle()
        self.failureResultOf(d, UnknownTask)
        channel.release()
        grid.settle()


class WhyOverFoolscapTests(ClusterTestCase):
    """A real controller: the depend is traced in its evaluator processes."""

    timeout = 60

    @async_test
    async def test_why_over_foolscap(self):
        tc = await self.start_cluster(1, [{"RAM": 2}])
        tid = await tc.run(MapTask(len, ("ab",), depend=needs_ram))
        answer = await tc.why(tid)
        self.assertEqual(answer.state, "queued")
        self.assertEqual([e.reason for e in answer.engines], [why.DEPEND_FALSE])
        self.assertTrue(answer.no_engine_matches)
        self.assertEqual(answer.properties_read, ("RAM",))
        status = await tc.queue_status(verbose=True)
        self.assertEqual(list(status["engines"]), answer_engine_ids(answer))
        await tc.abort(tid)
        self.assertEqual((await tc.why(tid)).state, "aborted")


def answer_engine_ids(answer) -> list[int]:
    return [e.engine_id for e in answer.engines]
