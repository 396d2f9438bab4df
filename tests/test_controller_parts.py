"""Unit tests of the controller's three parts on a `task.Clock`: the
`SubmissionLedger`, the `TaskStore` and the `Dispatcher`; and one contract,
run against both `Journal` and `NullJournal`, that the `TaskController`
behaves the same with either.
"""

from __future__ import annotations

import queue
import tempfile
from pathlib import Path

from twisted.internet import defer, task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from taskfarm import serialization
from taskfarm.controller import ledger as ledger_module
from taskfarm.controller.dispatcher import DEFAULT_RETRY_DELAY, Dispatcher
from taskfarm.controller.journal import Journal, NullJournal, StoredTask
from taskfarm.controller.ledger import MAX_RESERVE, TOKEN_LIFETIME, SubmissionLedger
from taskfarm.controller.registry import EngineRegistry
from taskfarm.controller.scheduler import FIFOScheduler
from taskfarm.controller.store import TaskStore
from taskfarm.controller.taskcontroller import TaskController
from taskfarm.controller.tasks import TaskSpec, TaskState
from taskfarm.errors import (
    BadRequest,
    JournalError,
    RemoteTaskError,
    TaskAborted,
    TaskTimeout,
    UnknownTask,
    to_wire,
)
from taskfarm.interfaces import IJournal
from taskfarm.task import Task, result_from_envelope
from taskfarm.testing import InProcessEvaluator, ScriptedChannel


class _RecordingJournal(NullJournal):
    """A NullJournal that notes what it is told, and restores what it is given."""

    def __init__(self, next_id: int = 0, tokens=(), stored=()) -> None:
        super().__init__()
        self.calls: list[tuple] = []
        self._next_id = next_id
        self._tokens = list(tokens)
        self._stored = list(stored)

    def next_id(self) -> int:
        return self._next_id

    def tokens(self):
        return list(self._tokens)

    def tasks(self):
        return iter(self._stored)

    def next_id_is(self, next_id):
        self.calls.append(("next_id_is", next_id))

    def requeued(self, taskid, link, retries_left, attempts):
        self.calls.append(("requeued", taskid, link, retries_left, attempts))

    def finished(self, record, link):
        self.calls.append(("finished", record.taskid, record.state))

    def cleared(self, taskids):
        self.calls.append(("cleared", list(taskids)))

    def forget_tokens(self, older_than):
        self.calls.append(("forget_tokens", older_than))


def _spec(source: str = "a = 1", **options) -> TaskSpec:
    return TaskSpec.from_envelope(Task(source, **options).to_envelope())


def _needs_gpu(properties):
    return properties.get("gpu", False)


# -- the ledger ------------------------------------------------------------------------


class SubmissionLedgerTests(unittest.SynchronousTestCase):
    """Ids handed out once, tokens remembered, both journaled."""

    def setUp(self):
        self.clock = task.Clock()
        self.journal = _RecordingJournal()
        self.ledger = SubmissionLedger(self.clock, self.journal)

    def test_reserve_hands_out_each_id_once(self):
        """Reserved blocks follow each other and each new counter is journaled."""
        self.assertEqual(self.ledger.reserve(3), 0)
        self.assertEqual(self.ledger.reserve(2), 3)
        self.assertEqual(self.journal.calls, [("next_id_is", 3), ("next_id_is", 5)])

    def test_reserve_refuses_bad_counts(self):
        """0, too many, a bool or a str is a ValueError, and spends no id."""
        for count in (0, MAX_RESERVE + 1, True, "3", -1):
            self.assertRaises(ValueError, self.ledger.reserve, count)
        self.assertEqual(self.ledger.next_id, 0)
        self.assertEqual(self.journal.calls, [])

    def test_assign_fresh_and_reserved_ids(self):
        """A batch without ids gets fresh ones (journaled); one with reserved
        ids spends none; an empty batch spends none either."""
        self.assertEqual(self.ledger.assign(None, 2), ([0, 1], 0))
        first = self.ledger.reserve(2)
        self.journal.calls.clear()
        self.assertEqual(self.ledger.assign([first, first + 1], 2), ([2, 3], -1))
        self.assertEqual(self.ledger.assign(None, 0), ([], -1))
        self.assertEqual(self.journal.calls, [])
        self.assertEqual(self.ledger.next_id, 4)

    def test_check_reserved(self):
        """Reserved ids must have been handed out before (their form is
        `wire.Submission`'s to check: tests/test_wire.py)."""
        self.ledger.reserve(3)
        self.ledger.check_reserved([0, 1, 2], 3)
        for ids in ([3], [0, 3], [-1]):
            self.assertRaises(BadRequest, self.ledger.check_reserved, ids, len(ids))

    def test_resent_batches(self):
        """A known token answers its ids again; another batch under it (other
        digest) is refused; a token of reserved ids needs them again."""
        self.assertIsNone(self.ledger.resent("t", None, "d"))
        self.ledger.remember("t", 5, 2, "d")
        self.assertEqual(self.ledger.resent("t", None, "d"), [5, 6])
        self.assertEqual(self.ledger.resent("t", None, None), [5, 6])
        self.assertRaises(BadRequest, self.ledger.resent, "t", None, "other")
        self.ledger.remember("r", -1, 2, None)
        self.assertRaises(BadRequest, self.ledger.resent, "r", None, None)
        self.assertEqual(self.ledger.resent("r", [7, 8], None), [7, 8])
        self.ledger.forget("r")
        self.assertIsNone(self.ledger.resent("r", [7, 8], None))

    def test_tokens_are_bounded(self):
        """Past MAX_TOKENS the oldest tokens are forgotten first."""
        self.patch(ledger_module, "MAX_TOKENS", 3)
        for i in range(5):
            self.ledger.remember("t%d" % i, i, 1, None)
        self.assertEqual(len(self.ledger), 3)
        self.assertNotIn("t1", self.ledger)
        self.assertIn("t2", self.ledger)

    def test_restore_and_token_row(self):
        """The counter and the tokens come back from the journal."""
        journal = _RecordingJournal(next_id=42, tokens=[("t", 40, 2, "d")])
        ledger = SubmissionLedger(self.clock, journal)
        ledger.restore()
        self.assertEqual(ledger.next_id, 42)
        self.assertEqual(ledger.resent("t", None, "d"), [40, 41])
        self.assertEqual(ledger.token_row("t", 7.0), ("t", 40, 2, "d", 7.0))

    def test_old_tokens_forgotten_by_the_clock(self):
        """forget_old_tokens asks the journal to drop tokens older than
        TOKEN_LIFETIME by the injected clock."""
        self.clock.advance(5000.0)
        self.ledger.forget_old_tokens()
        self.assertEqual(self.journal.calls, [("forget_tokens", 5000.0 - TOKEN_LIFETIME)])

    def test_incarnation_is_the_journals(self):
        """The incarnation comes from the journal: each NullJournal is new."""
        self.assertEqual(self.ledger.incarnation, self.journal.incarnation())
        other = SubmissionLedger(self.clock, NullJournal())
        self.assertNotEqual(other.incarnation, self.ledger.incarnation)


# -- the store ---------------------------------------------------------------------------


class TaskStoreTests(unittest.SynchronousTestCase):
    """Records, counts, waiters (and their cancellation), retention, restore."""

    def setUp(self):
        self.clock = task.Clock()
        self.journal = _RecordingJournal()
        self.store = TaskStore(self.clock, self.journal, retention=None)

    def add(self, *ids):
        return self.store.add(list(ids), [_spec() for _ in ids], self.clock.seconds())

    def finish(self, record):
        self.store.move(record, record.start, 1, 0)
        self.store.move(record, record.succeed, b"x", 0.0, 1.0)
        self.store.finished(record)

    def test_counts_follow_moves(self):
        """add and move keep the counts per state right."""
        one, two = self.add(0, 1)
        self.assertEqual(self.store.queue_status()["scheduled"], 2)
        self.store.move(one, one.start, 1, 0)
        self.assertEqual(self.store.counts[TaskState.RUNNING], 1)
        self.finish(two)
        self.assertEqual(
            self.store.queue_status(),
            {"scheduled": 0, "pending": 1, "waiting_retry": 0, "succeeded": 1, "failed": 0, "aborted": 0},
        )
        self.assertEqual(self.store.queue_status(verbose=True)["succeeded"], [1])
        self.assertEqual(self.journal.calls, [("finished", 1, TaskState.SUCCEEDED)])

    def test_unknown_and_taken_ids(self):
        """An unknown id is UnknownTask; an id in use is taken (BadRequest)."""
        self.add(0)
        self.assertRaises(UnknownTask, self.store.records, [0, 1])
        self.assertRaises(BadRequest, self.store.check_free, [1, 0])
        self.store.check_free([1, 2])

    def test_wait_fires_once_all_are_final(self):
        """wait fires when the last task it waits on finishes, at once if
        all are final already; no waiter is left behind."""
        one, two = self.add(0, 1)
        d = self.store.wait([0, 1])
        self.assertEqual(self.store.waiting(), 2)
        self.finish(one)
        self.assertNoResult(d)
        self.finish(two)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.store.waiting(), 0)
        self.assertIsNone(self.successResultOf(self.store.wait([0, 1])))

    def test_cancelled_wait_releases_its_waiter(self):
        """Cancelling a wait (before or after some of its tasks finished)
        takes it off every list; the tasks then finish without it."""
        one, two, three = self.add(0, 1, 2)
        d = self.store.wait([0, 1, 2])
        self.finish(one)
        self.assertEqual(self.store.waiting(), 2)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.store.waiting(), 0)
        self.finish(two)
        self.finish(three)
        self.assertEqual(self.store._waiters, {})

    def test_cancelled_blocking_results_leave_other_waiters(self):
        """A blocking results call, cancelled, releases only its own waiter:
        another waiter on the same task is still answered."""
        (record,) = self.add(0)
        leaving = self.store.results([0], block=True)
        staying = self.store.results([0], block=True)
        self.assertEqual(self.store.waiting(), 2)
        leaving.cancel()
        self.failureResultOf(leaving, defer.CancelledError)
        self.assertEqual(self.store.waiting(), 1)
        self.finish(record)
        (envelope,) = self.successResultOf(staying)
        self.assertEqual(envelope[:4], (0, record.spec.kind, True, b"x"))

    def test_waiter_cancelled_by_another_waiters_callback(self):
        """A waiter cancelled from another waiter's callback, as the same
        task finishes, is not fired twice."""
        (record,) = self.add(0)
        first = self.store.wait([0])
        second = self.store.wait([0])
        first.addCallback(lambda _: second.cancel())
        self.finish(record)
        self.successResultOf(first)
        self.failureResultOf(second, defer.CancelledError)
        self.assertEqual(self.store.waiting(), 0)

    def test_refused_batch_fails_and_releases_its_waiters(self):
        """A refused batch is forgotten; a waiter on it and on another task
        fails with the JournalError and leaves the other task's list too."""
        self.add(0)
        (refused,) = self.add(1)
        d = self.store.wait([0, 1])
        self.store.refuse([refused], JournalError("disk full"))
        self.failureResultOf(d, JournalError)
        self.assertEqual(self.store.waiting(), 0)
        self.assertRaises(UnknownTask, self.store.records, [1])
        self.assertEqual(self.store.queue_status()["scheduled"], 1)

    def test_clear(self):
        """clear forgets finished tasks only, journals each, and raises
        UnknownTask for unknown ids after clearing the known ones."""
        done, _ = self.add(0, 1)
        self.finish(done)
        self.journal.calls.clear()
        self.assertRaises(UnknownTask, self.store.clear, [0, 1, 9])
        self.assertEqual(self.journal.calls, [("cleared", [0])])
        self.assertEqual(list(self.store.tasks), [1])

    def test_sweep_on_the_clock(self):
        """With retention, finished tasks go once the clock is past it, the
        sweep hooks run on each sweep, and stop leaves no timer behind."""
        store = TaskStore(self.clock, self.journal, retention=10.0)
        hooked = []
        store.sweep_hooks.append(lambda: hooked.append(self.clock.seconds()))
        store.start()
        done, waiting = store.add([0, 1], [_spec(), _spec()], 0.0)
        store.move(done, done.start, 1, 0)
        store.move(done, done.succeed, b"", 0.0, 1.0)
        store.finished(done)
        self.clock.pump([1.0] * 10)
        self.assertEqual(list(store.tasks), [0, 1])
        self.clock.advance(1.0)
        self.assertEqual(list(store.tasks), [1])
        self.assertIn(("cleared", [0]), self.journal.calls)
        self.assertEqual(len(hooked), 11)
        store.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_restore(self):
        """Stored tasks come back: the unfinished ones are returned, in id
        order, to be queued again; the finished ones keep their outcome."""
        envelope = serialization.pack(Task("a = 1").to_envelope())
        error = serialization.pack(to_wire(TaskAborted("aborted")))
        stored = [
            StoredTask((0, envelope, 1.0, "succeeded", 0, 0, 1, 3, 2.0, 3.0, 1, b"ok")),
            StoredTask((1, envelope, 1.0, "queued", 0, 0, 0, None, None, None, None, None)),
            StoredTask((2, envelope, 1.0, "aborted", 0, 0, 1, 3, None, 4.0, 0, error)),
            StoredTask((3, envelope, 1.0, "queued", 0, 0, 1, None, None, None, None, None)),
        ]
        store = TaskStore(self.clock, _RecordingJournal(stored=stored), retention=10.0)
        queued = store.restore()
        self.assertEqual([r.taskid for r in queued], [1, 3])
        self.assertEqual(store.counts[TaskState.QUEUED], 2)
        self.assertEqual(list(store.finished_order), [(3.0, 0), (4.0, 2)])
        ok, aborted = store.records([0, 2])
        self.assertEqual((ok.ok, ok.data, ok.engine_id), (True, b"ok", 3))
        self.assertEqual(aborted.data[0], "TaskAborted")


# -- the dispatcher --------------------------------------------------------------------------


class DispatcherTests(unittest.SynchronousTestCase):
    """Kick, dispatch, replies and the unmet-depend timer, with a scripted engine."""

    def setUp(self):
        self.clock = task.Clock()
        self.registry = EngineRegistry(self.clock, heartbeat_period=None)
        self.addCleanup(self.registry.stop)
        self.evaluator = InProcessEvaluator(self.clock)
        self.evaluator.start()
        self.journal = _RecordingJournal()
        self.store = TaskStore(self.clock, self.journal, retention=None)
        self.dispatcher = Dispatcher(
            self.registry, FIFOScheduler(evaluator=self.evaluator), self.store, self.clock,
            unmet_timeout=10.0, prefetch=None,
        )
        self.dispatcher.start()
        self.addCleanup(self.dispatcher.stop)

    def engine(self, properties=None) -> ScriptedChannel:
        channel = ScriptedChannel.registered(self.registry, properties)
        return channel

    def admit(self, *specs):
        records = self.store.add(list(range(len(specs))), list(specs), self.clock.seconds())
        self.dispatcher.admit(records)
        return records

    def test_many_kicks_one_pass(self):
        """Kicks in one turn make one pass, at the end of the turn."""
        channel = self.engine()
        self.clock.advance(0)  # the pass the engine's arrival asked for
        (record,) = self.store.add([0], [_spec()], self.clock.seconds())
        self.dispatcher._scheduler.add_task(record)  # queued, no pass asked for yet
        self.dispatcher.kick()
        self.dispatcher.kick()
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)  # the pass, the unmet timer
        self.assertEqual(channel.sent, [])
        self.clock.advance(0)
        self.assertEqual(len(channel.sent), 1)
        self.assertEqual(self.store.counts[TaskState.RUNNING], 1)

    def test_an_admitted_batch_is_dispatched_at_once(self):
        """admit runs the pass itself: the batch's commands leave before the
        turn ends, and the pass a kick asked for earlier is not run twice."""
        channel = self.engine()
        self.dispatcher.kick()
        self.admit(_spec(), _spec())
        self.assertEqual(len(channel.messages), 1)
        self.assertEqual(len(channel.sent), 2)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # the unmet timer

    def test_reply_finishes_the_task_in_the_store(self):
        """A success reply finishes the task and wakes its waiter."""
        channel = self.engine()
        self.admit(_spec())
        waiting = self.store.wait([0])
        self.clock.advance(0)
        channel.reply(channel.pending()[0][0], True, b"result")
        self.successResultOf(waiting)
        (record,) = self.store.records([0])
        self.assertEqual((record.state, record.data), (TaskState.SUCCEEDED, b"result"))
        self.assertIn(("finished", 0, TaskState.SUCCEEDED), self.journal.calls)

    def test_failed_attempt_is_queued_again_and_journaled(self):
        """A failed try with a retry left is journaled as requeued and runs
        again once the default retry delay has passed (before issue 11: at
        once)."""
        channel = self.engine()
        self.admit(_spec(retries=1))
        self.clock.advance(0)
        channel.fail(channel.pending()[0][0], RemoteTaskError("E", "e", "", 0))
        self.assertIn(("requeued", 0, 0, 0, 1), self.journal.calls)
        self.clock.advance(0)
        self.assertEqual(len(channel.pending()), 0)
        self.assertEqual(self.store.counts[TaskState.WAITING_RETRY], 1)
        self.clock.advance(DEFAULT_RETRY_DELAY)
        self.assertEqual(len(channel.pending()), 1)
        self.assertEqual(self.store.counts[TaskState.RUNNING], 1)

    def test_late_reply_of_an_aborted_try_is_ignored(self):
        """Once aborted, a running task's late answer changes nothing."""
        channel = self.engine()
        (record,) = self.admit(_spec())
        self.clock.advance(0)
        (seq,) = [c[0] for c in channel.pending()]
        self.dispatcher.abort(record)
        self.assertEqual(channel.interrupted, [seq])
        channel.reply(seq, True, b"late")
        self.assertEqual(record.state, TaskState.ABORTED)
        self.assertEqual(record.data[0], "TaskAborted")

    def test_unmet_depend_times_out(self):
        """A task whose depend no engine satisfies fails with TaskTimeout
        once the unmet timeout has passed on the clock, not before."""
        self.engine({"gpu": False})
        self.admit(_spec(depend=_needs_gpu))
        self.clock.advance(0)
        self.clock.pump([1.0] * 9)
        (record,) = self.store.records([0])
        self.assertTrue(record.is_queued)
        self.clock.pump([1.0] * 10)
        self.assertEqual(record.state, TaskState.FAILED)
        self.assertEqual(record.data[0], TaskTimeout.__name__)

    def test_stop_leaves_no_timer(self):
        """stop cancels the pending pass and the unmet timer."""
        self.dispatcher.kick()
        self.dispatcher.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


# -- Journal and NullJournal: the same controller ----------------------------------------------


class _ThreadedClock(task.Clock):
    """A task.Clock that also takes `callFromThread` (the journal's writer
    thread answers through it); `run_from_thread` runs what came."""

    def __init__(self) -> None:
        super().__init__()
        self.from_thread: queue.SimpleQueue = queue.SimpleQueue()

    def callFromThread(self, function, *args, **kwargs):
        self.from_thread.put((function, args, kwargs))


class _ControllerJournalContract:
    """What a TaskController does is the same with either journal."""

    def make_journal(self, clock):
        raise NotImplementedError

    def settle(self):
        """Let the reactor turn and the journal commit what it was given."""
        raise NotImplementedError

    def setUp(self):
        self.clock = _ThreadedClock()
        self.journal = self.make_journal(self.clock)
        self.registry = EngineRegistry(self.clock, heartbeat_period=None)
        self.controller = TaskController(
            self.registry, FIFOScheduler(), self.clock, unmet_timeout=None,
            journal=self.journal, retention=100.0, prefetch=None,
            retry_delay=0.0,  # retries at once: these tests show the journal's part
        )
        self.controller.start()
        self.addCleanup(self.controller.stop)
        self.addCleanup(self.registry.stop)
        self.channel = ScriptedChannel()
        self.channel.engine = self.registry.register(self.channel, {})

    def submit_durably(self, tasks, **options):
        d = defer.Deferred.fromCoroutine(
            self.controller.submit_durably([t.to_envelope() for t in tasks], **options)
        )
        self.settle()
        return self.successResultOf(d)

    def answer_all(self):
        self.settle()
        for seq, *_ in self.channel.pending():
            self.channel.reply(seq, True, serialization.dumps({}))
        self.settle()

    def test_provides_the_journal_interface(self):
        """The journal provides IJournal."""
        self.assertTrue(verifyObject(IJournal, self.journal))

    def test_submit_run_and_results(self):
        """submit_durably answers the ids once journaled; the tasks run and
        their results come back."""
        ids = self.submit_durably([Task("a = 1"), Task("a = 2")])
        self.assertEqual(ids, [0, 1])
        d = self.controller.results(ids, block=True)
        self.answer_all()
        outcomes = [result_from_envelope(e) for e in self.successResultOf(d)]
        self.assertEqual([(r.taskid, r.failure) for r in outcomes], [(0, None), (1, None)])
        self.assertEqual(self.controller.queue_status()["succeeded"], 2)

    def test_reserved_ids_and_tokens(self):
        """Reserved ids are used as given; a resend under the same token gets
        the same ids and queues nothing twice."""
        d = defer.Deferred.fromCoroutine(self.controller.reserve_durably(2))
        self.settle()
        first = self.successResultOf(d)
        envelopes = [Task("a = 1"), Task("a = 2")]
        ids = self.submit_durably(envelopes, token="t", ids=[first, first + 1], digest="d")
        self.assertEqual(ids, [first, first + 1])
        again = self.submit_durably(envelopes, token="t", ids=[first, first + 1], digest="d")
        self.assertEqual(again, ids)
        self.assertEqual(len(self.channel.sent), 2)
        self.assertEqual(self.controller.queue_status(verbose=True)["pending"], ids)
        self.assertEqual(self.submit_durably([Task("b = 1")]), [first + 2])

    def test_abort_wakes_its_waiter_and_clear_forgets(self):
        """An aborted task wakes its waiter with TaskAborted; clear forgets it."""
        (taskid,) = self.submit_durably([Task("a = 1")])
        waiting = self.controller.wait([taskid])
        self.controller.abort(taskid)
        self.successResultOf(waiting)
        (envelope,) = self.successResultOf(self.controller.results([taskid]))
        self.assertIsInstance(result_from_envelope(envelope).failure, TaskAborted)
        self.assertEqual(self.controller.clear(), 1)
        self.assertRaises(UnknownTask, self.controller.results, [taskid])

    def test_retention(self):
        """A finished task is forgotten once the retention time has passed."""
        (taskid,) = self.submit_durably([Task("a = 1")])
        self.answer_all()
        self.clock.advance(99.0)
        self.successResultOf(self.controller.results([taskid]))
        self.clock.pump([1.0] * 11)
        self.settle()
        self.assertRaises(UnknownTask, self.controller.results, [taskid])

    def test_incarnation_is_stable(self):
        """The controller's incarnation is its journal's."""
        self.assertEqual(self.controller.incarnation, self.journal.incarnation())


class NullJournalControllerTests(_ControllerJournalContract, unittest.SynchronousTestCase):
    """The contract with a NullJournal (``--no-journal``)."""

    def make_journal(self, clock):
        return NullJournal()

    def settle(self):
        self.clock.advance(0)


class JournalControllerTests(_ControllerJournalContract, unittest.SynchronousTestCase):
    """The contract with a real SQLite Journal, its writer thread answering
    through the clock."""

    def make_journal(self, clock):
        folder = tempfile.TemporaryDirectory(prefix="taskfarm-parts-")
        self.addCleanup(folder.cleanup)
        journal = Journal(Path(folder.name) / "journal.sqlite", clock)
        journal.open()
        self.addCleanup(journal.close)
        return journal

    def settle(self):
        synced = self.journal.sync()
        self.clock.advance(0)
        while not synced.called:
            # Bounded: the writer thread answers within a commit.
            function, args, kwargs = self.clock.from_thread.get(timeout=10.0)
            function(*args, **kwargs)
        self.clock.advance(0)
