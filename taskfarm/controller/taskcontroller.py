"""The load-balanced Task interface, on the controller.

`TaskController` is the facade the remote Task interface serves.  It
composes three parts, each on the injected clock:

- the `SubmissionLedger` (`ledger.py`): task ids, reservations, submission
  tokens and the incarnation;
- the `TaskStore` (`store.py`): the records and their counts, waiters,
  retention and restore from the journal;
- the `Dispatcher` (`dispatcher.py`): the dispatch pass, replies, prefetch
  and the depend timers.

Tasks arrive in batches, get ids from the ledger, are journaled, and reach
the scheduler through the dispatcher.  Every task ends in exactly one of
succeeded, failed (with a typed error) or aborted, and anyone waiting on it
is told.  Without a journal the parts write to a `NullJournal`.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskfarm import wire
from taskfarm.controller.dispatcher import (
    DEFAULT_FAILURE_PENALTY,
    DEFAULT_PREFETCH,
    DEFAULT_RETRY_DELAY,
    DEFAULT_UNMET_TIMEOUT,
    MAX_TASK_SLOTS,
    Dispatcher,
)
from taskfarm.controller.journal import NullJournal
from taskfarm.controller.ledger import MAX_RESERVE, MAX_TOKENS, TOKEN_LIFETIME, SubmissionLedger
from taskfarm.controller.monitor import Monitor
from taskfarm.controller.registry import EngineRegistry
from taskfarm.controller.store import DEFAULT_RETENTION, TaskStore
from taskfarm.controller.tasks import TaskRecord, TaskSpec
from taskfarm.controller.why import WHY_TIMEOUT, explain
from taskfarm.errors import JournalError

__all__ = [
    "DEFAULT_FAILURE_PENALTY",
    "DEFAULT_PREFETCH",
    "DEFAULT_RETENTION",
    "DEFAULT_RETRY_DELAY",
    "DEFAULT_UNMET_TIMEOUT",
    "MAX_RESERVE",
    "MAX_TASK_SLOTS",
    "MAX_TOKENS",
    "TOKEN_LIFETIME",
    "TaskController",
]


class TaskController:
    """Queues, dispatches and tracks tasks; keeps results until cleared."""

    _log = Logger()

    def __init__(
        self,
        registry: EngineRegistry,
        scheduler,
        clock,
        unmet_timeout: float | None = DEFAULT_UNMET_TIMEOUT,
        journal=None,
        retention: float | None = DEFAULT_RETENTION,
        prefetch: float | None = DEFAULT_PREFETCH,
        retry_delay: float = DEFAULT_RETRY_DELAY,
        failure_penalty: float = DEFAULT_FAILURE_PENALTY,
    ) -> None:
        self._registry = registry
        #: The clock every part runs on (the reactor, or a `task.Clock`).
        self.clock = clock
        #: Where tasks are kept across restarts (`Journal` or `NullJournal`).
        self._journal = NullJournal() if journal is None else journal
        self.ledger = SubmissionLedger(clock, self._journal)
        self.store = TaskStore(clock, self._journal, retention)
        self.store.sweep_hooks.append(self.ledger.forget_old_tokens)
        self.dispatcher = Dispatcher(
            registry,
            scheduler,
            self.store,
            clock,
            unmet_timeout=unmet_timeout,
            prefetch=prefetch,
            retry_delay=retry_delay,
            failure_penalty=failure_penalty,
        )
        #: Counters and recent runs for the dashboard, /metrics and
        #: ``taskfarm status`` (fed by the store, dispatcher and journal).
        self.monitor = Monitor(clock, registry, self.store)
        self.store.watcher = self.monitor.moved
        self.dispatcher.monitor = self.monitor
        if hasattr(self._journal, "on_commit"):
            self._journal.on_commit = self.monitor.journal_committed

    @property
    def incarnation(self) -> str:
        """Who this controller is (see `SubmissionLedger.incarnation`)."""
        return self.ledger.incarnation

    # Tests and tools read these two of the store directly.
    @property
    def _tasks(self) -> dict[int, TaskRecord]:
        return self.store.tasks

    @property
    def _finished_order(self):
        return self.store.finished_order

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        """Restore journaled tasks; start the unmet-depend and retention timers."""
        self.ledger.restore()
        queued = self.store.restore()
        if self.store.tasks or self.ledger.next_id:
            self._log.info(
                "restored {restored} tasks from {path} ({requeued} queued again); "
                "next task id {next_id}",
                restored=len(self.store.tasks),
                requeued=len(queued),
                path=str(self._journal.path),
                next_id=self.ledger.next_id,
            )
        self.dispatcher.admit(queued)
        self.dispatcher.start()
        self.store.start()

    def stop(self) -> None:
        """Stop the timers; waiting clients are answered by their connection."""
        self.dispatcher.stop()
        self.store.stop()

    # -- the client API ---------------------------------------------------------------

    def reserve(self, count: int) -> int:
        """Set aside `count` task ids for one client; returns the first.

        A client with reserved ids names them in `submit`, so its `run` can
        answer at once; ids are never handed out twice, even after a restart.
        """
        return self.ledger.reserve(count)

    def submit(
        self,
        envelopes: Iterable,
        token: str | None = None,
        ids: list[int] | None = None,
        digest: str | None = None,
    ) -> list[int]:
        """Accept a batch of task envelopes; returns their ids, in order.

        `ids`, when given, are ids this client reserved, one per task.  The
        whole batch is checked before any task is queued, so a bad task
        rejects the batch and nothing is half-submitted.  A batch sent again
        with the same `token` (after a lost connection) is not queued twice;
        `digest` tells a resend from another batch under a replayed token.
        With a journal, the tasks reach the scheduler only once they are
        journaled (`submit_durably` waits for that, and reports a refusal).
        """
        ids, admitted = self._submit(list(envelopes), token, ids, digest)
        admitted.addErrback(lambda _: None)  # a refusal is logged; nobody waits here
        return ids

    def _submit(
        self, envelopes: list, token: str | None, ids: list[int] | None, digest: str | None
    ) -> tuple[list[int], defer.Deferred]:
        """`submit`; also returns a Deferred that fires once the batch is
        journaled and queued, or fails with `JournalError` if it never is."""
        # Checked before the token: a resent batch answers with these ids.
        if ids is not None:
            self.ledger.check_reserved(ids, len(envelopes))
        resent = self.ledger.resent(token, ids, digest)
        if resent is not None:
            return resent, self.durable()
        if ids is not None:
            # Not a resend (its token is unknown): ids in use are someone else's.
            self.store.check_free(ids)
        # A depend is user code: it stays bytes here, and is only loaded in
        # the scheduler's evaluator processes (DependError if it cannot be).
        specs = [TaskSpec.from_envelope(envelope) for envelope in envelopes]
        now = self.clock.seconds()
        ids, first = self.ledger.assign(ids, len(specs))
        records = self.store.add(ids, specs, now)
        token_row = None
        if token is not None:
            self.ledger.remember(token, first, len(specs), digest)
            token_row = self.ledger.token_row(token, now)
        # While the journal writes, the batch may run already: its commit
        # goes on in the writer thread, in parallel.  "Accepted" still means
        # journaled (the answer waits for the commit), and no result of the
        # batch reaches a client before its commit (the store holds them).
        # A journal that has failed to write puts dispatch back behind the
        # commit, so a batch that it refuses then never runs.
        early = getattr(self._journal, "trouble", None) is None
        admitted = self.store.accept(records, envelopes, token_row, early)
        if early:
            self.dispatcher.admit(records)
            admitted.addErrback(partial(self._refuse_batch, records, token))
        else:
            admitted.addCallbacks(
                lambda _: self.dispatcher.admit(records), partial(self._refuse_batch, records, token)
            )
        return ids, admitted

    def _refuse_batch(self, records: list[TaskRecord], token: str | None, failure):
        """The batch could not be journaled: it is forgotten whole.  Tasks
        of it that were dispatched before the commit failed are taken back
        (interrupted if running); no client saw a result of it."""
        error = failure.value
        if not isinstance(error, JournalError):
            error = JournalError("the journal cannot be written: %s" % (error,))
        # Dispatched before its commit: what of it ran is dropped (its rows
        # and result files, if any were written, go too).
        ran = [r.taskid for r in records if r.is_final and self.store.is_current(r)]
        self.dispatcher.withdraw(records, error)
        if ran:
            self._journal.cleared(ran)
        self.store.refuse(records, error)
        if token is not None:
            self.ledger.forget(token)
        self._log.warn(
            "refused a batch of {count} tasks: {error}", count=len(records), error=error
        )
        return Failure(error)

    def durable(self) -> defer.Deferred:
        """Fires once every task accepted so far is in the journal."""
        return self._journal.sync()

    async def submit_durably(
        self,
        envelopes: Iterable,
        token: str | None = None,
        ids: list[int] | None = None,
        digest: str | None = None,
    ) -> list[int]:
        """`submit`, answering only once the tasks are journaled; a batch
        that cannot be journaled is refused whole with `JournalError`."""
        ids, admitted = self._submit(list(envelopes), token, ids, digest)
        await admitted
        return ids

    async def reserve_durably(self, count: int) -> int:
        """`reserve`, answering only once the new id counter is journaled."""
        first = self.reserve(count)
        await self.durable()
        return first

    def results(self, taskids: list[int], block: bool = False) -> defer.Deferred:
        """Result envelopes of `taskids` (None for unfinished ones unless
        `block`).  Cancelling a blocking call releases its waiter."""
        return self.store.results(taskids, block)

    def wait(self, taskids: list[int]) -> defer.Deferred:
        """A Deferred that fires (with None) once all `taskids` are final;
        cancelling it releases the waiter."""
        return self.store.wait(taskids)

    def abort(self, taskid: int) -> None:
        """Abort a queued or running task; it finishes with `TaskAborted`."""
        if isinstance(taskid, bool) or not isinstance(taskid, int):
            raise TypeError("abort takes one task id (an int), not %r" % (taskid,))
        (record,) = self.store.records([taskid])
        self.dispatcher.abort(record)

    def queue_status(self, verbose: bool = False) -> dict:
        """Counts (or, if `verbose`, id lists) per state, as the original had.

        With `verbose` it also has ``"engines"``: for every registered engine
        (and every engine id the kept records name),
        ``{engine_id: {"running": n, "succeeded": n, "failed": n}}``, the
        tasks running there now and the finished ones still kept (until
        cleared or expired) that ended there.
        """
        status = self.store.queue_status(verbose)
        if verbose:
            status["engines"] = self.store.per_engine(self._registry.ids())
        return status

    def why(self, taskid: int, timeout: float = WHY_TIMEOUT) -> defer.Deferred:
        """Why task `taskid` is where it is: a Deferred firing with a plain dict.

        ``taskid`` (int); ``state`` (str: queued, waiting_retry, running,
        succeeded, failed, aborted); ``summary`` (str, one line);
        ``engine_id`` (int or None: where it runs or last ran); ``attempts``
        (int); ``wait`` (float seconds until a waiting retry is queued
        again, else None); ``no_engine_matches`` (bool: a queued task whose
        depend no registered engine satisfies); ``properties_read`` (sorted
        list of str: the property names its depend read on the engines);
        ``engines``: for a queued or waiting task, one dict per registered
        engine in id order, ``{"engine_id": int, "reason": str, "detail":
        str, "slots": int, "taken": int}``, where `reason` is one of
        ``free``, ``busy``, ``depend_false``, ``depend_raised``,
        ``depend_failed``, ``depend_unknown``, ``depend_unloadable``,
        ``penalty``, ``retry_delay`` (see `taskfarm.controller.why`); else
        an empty list.

        The depend is traced in the evaluator's processes, within `timeout`
        seconds.  An unknown id fails with `UnknownTask`.
        """
        if isinstance(taskid, bool) or not isinstance(taskid, int):
            return defer.fail(TypeError("why takes one task id (an int), not %r" % (taskid,)))
        try:
            (record,) = self.store.records([taskid])
        except Exception as e:
            return defer.fail(e)
        return defer.Deferred.fromCoroutine(
            explain(
                record,
                self._registry,
                self.dispatcher.scheduler,
                self.dispatcher,
                self.clock,
                timeout,
            )
        )

    def status(self) -> tuple:
        """The cluster summary the dashboard shows (a plain
        `wire.ClusterSummary`): engines, queue counts by state, tasks/s,
        failures/s and the totals since the controller started."""
        summary = self.monitor.summary()
        return wire.ClusterSummary(
            summary["engines"],
            summary["queue"],
            summary["tasks_per_second"],
            summary["failures_per_second"],
            summary["succeeded_total"],
            summary["failed_total"],
            summary["aborted_total"],
            summary["retried_total"],
        ).plain()

    def clear(self, taskids: list[int] | None = None) -> int:
        """Forget finished tasks (all of them, or those listed); returns how many.

        Unfinished tasks are kept.  Unknown ids raise `UnknownTask` after the
        known ones are cleared.
        """
        return self.store.clear(taskids)

    def engine_ids(self) -> list[int]:
        """The ids of the registered engines."""
        return self._registry.ids()

    def spin(self) -> None:
        """Run a scheduling pass now (never needed: every event triggers one)."""
        self.dispatcher.dispatch()
