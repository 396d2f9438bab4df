"""A batch is dispatched while its journal commit is under way, on a clock.

"Accepted" still means journaled (the answer waits for the commit), no
result of the batch reaches a client before its commit, a batch whose commit
fails is taken back whole, and a journal in trouble puts dispatch back
behind the commit.
"""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial import unittest

from taskfarm import serialization
from taskfarm.controller.journal import NullJournal
from taskfarm.controller.registry import EngineRegistry
from taskfarm.controller.scheduler import FIFOScheduler
from taskfarm.controller.taskcontroller import TaskController
from taskfarm.errors import JournalError, UnknownTask
from taskfarm.task import Task
from taskfarm.testing import ScriptedChannel


class _GatedJournal(NullJournal):
    """A journal whose submissions commit (or fail) when the test says."""

    def __init__(self) -> None:
        super().__init__()
        self.trouble = None
        self.batches: list[defer.Deferred] = []
        self.cleared_ids: list[int] = []

    def accept_batch(self, rows, token=None) -> defer.Deferred:
        list(rows)
        d: defer.Deferred = defer.Deferred()
        self.batches.append(d)
        return d

    def cleared(self, taskids) -> None:
        self.cleared_ids.extend(taskids)

    def commit(self) -> None:
        batches, self.batches = self.batches, []
        for d in batches:
            d.callback(None)

    def fail(self, error: BaseException) -> None:
        batches, self.batches = self.batches, []
        for d in batches:
            d.errback(error)


class EarlyDispatchTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.journal = _GatedJournal()
        self.registry = EngineRegistry(self.clock, task_slots=1, heartbeat_period=None)
        self.controller = TaskController(
            self.registry, FIFOScheduler(), self.clock, unmet_timeout=None,
            journal=self.journal, retention=None, prefetch=None,
        )
        self.controller.start()
        self.addCleanup(self.controller.stop)
        self.addCleanup(self.registry.stop)
        self.channel = ScriptedChannel.registered(self.registry)

    def submit(self, *tasks) -> tuple[defer.Deferred, list[int]]:
        d = defer.Deferred.fromCoroutine(
            self.controller.submit_durably([t.to_envelope() for t in tasks])
        )
        ids = [self.controller.ledger.next_id - len(tasks) + i for i in range(len(tasks))]
        return d, ids

    def answer_all(self) -> None:
        for seq, *_ in self.channel.pending():
            self.channel.reply(seq, True, serialization.dumps({}))

    def test_dispatch_does_not_wait_for_the_commit(self):
        """The task's command leaves in the next turn, before the commit;
        the submit answers only once the commit is done."""
        accepted, ids = self.submit(Task("a = 1"))
        self.clock.advance(0)
        self.assertEqual(len(self.channel.sent), 1)
        self.assertNoResult(accepted)
        self.journal.commit()
        self.assertEqual(self.successResultOf(accepted), ids)

    def test_commands_leave_in_the_submit_itself(self):
        """The submit's own dispatch pass sends the task's command: it waits
        for no reactor turn (nor the commit)."""
        self.submit(Task("a = 1"))
        self.assertEqual(len(self.channel.messages), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_result_before_the_commit(self):
        """A task that finished before its batch was committed: a blocking
        results or wait holds its answer until the commit, and a
        non-blocking results calls it unfinished."""
        _, (taskid,) = self.submit(Task("a = 1"))
        self.clock.advance(0)
        blocking = self.controller.results([taskid], block=True)
        waiting = self.controller.wait([taskid])
        self.answer_all()
        self.assertNoResult(blocking)
        self.assertNoResult(waiting)
        self.assertEqual(self.successResultOf(self.controller.results([taskid])), [None])
        self.journal.commit()
        (envelope,) = self.successResultOf(blocking)
        self.assertEqual(envelope[0], taskid)
        self.successResultOf(waiting)
        self.assertIsNotNone(self.successResultOf(self.controller.results([taskid]))[0])

    def test_a_wait_after_the_result_still_waits_for_the_commit(self):
        """A wait made once the task is done, but before its commit, holds too."""
        _, (taskid,) = self.submit(Task("a = 1"))
        self.clock.advance(0)
        self.answer_all()
        waiting = self.controller.wait([taskid])
        self.assertNoResult(waiting)
        self.journal.commit()
        self.successResultOf(waiting)

    def test_a_failed_commit_takes_the_batch_back(self):
        """The commit fails: the submit fails with JournalError; the task
        running on the engine is interrupted, the queued one leaves the
        scheduler, the finished one's result never reaches a client (its
        waiter fails) and its journal rows go; all three are forgotten."""
        accepted, ids = self.submit(Task("a = 1"), Task("a = 2"), Task("a = 3"))
        self.clock.advance(0)
        done = self.controller.results([ids[0]], block=True)
        sent = self.channel.pending()
        self.assertEqual(len(sent), 1)  # one slot: the others wait
        self.channel.reply(sent[0][0], True, serialization.dumps({}))
        self.clock.advance(0)
        running = self.channel.pending()
        self.assertEqual(len(running), 1)
        self.journal.fail(JournalError("disk full"))
        self.failureResultOf(accepted, JournalError)
        self.failureResultOf(done, JournalError)
        self.assertEqual(self.channel.interrupted, [running[0][0]])
        self.assertEqual(self.journal.cleared_ids, [ids[0]])
        self.assertEqual(sum(self.controller.queue_status().values()), 0)
        for taskid in ids:
            self.assertRaises(UnknownTask, self.controller.results, [taskid])
        # The interrupted task's late answer is ignored; nothing else runs.
        self.channel.reply(running[0][0], True, serialization.dumps({}))
        self.clock.advance(0)
        self.assertEqual(self.channel.pending(), [])
        self.assertEqual(sum(self.controller.queue_status().values()), 0)

    def test_a_journal_in_trouble_dispatches_after_the_commit(self):
        """Once a commit has failed (the journal's `trouble`), a new batch
        waits for its commit before it reaches an engine, so a refused
        batch never runs."""
        self.journal.trouble = JournalError("disk full")
        accepted, _ = self.submit(Task("a = 1"))
        self.clock.advance(0)
        self.assertEqual(self.channel.sent, [])
        self.journal.fail(JournalError("disk full"))
        self.failureResultOf(accepted, JournalError)
        self.clock.advance(0)
        self.assertEqual(self.channel.sent, [])
        accepted, ids = self.submit(Task("a = 2"))
        self.journal.commit()
        self.assertEqual(self.successResultOf(accepted), ids)
        self.clock.advance(0)
        self.assertEqual(len(self.channel.sent), 1)
