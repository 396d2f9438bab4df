"""The controller's task store: every task record, until it is forgotten.

The store keeps the records and their counts per state, wakes the waiters
(`wait`, blocking `results`) when tasks finish, forgets finished tasks on
`clear` or once the retention time has passed (the sweep), and restores
the records from the journal at start.  It writes each final outcome,
requeue and clear to the journal; it never talks to engines or the
scheduler (that is the dispatcher's part).

Big results the journal keeps in files of their own are held in memory
only up to `resident_limit` bytes in all (the most recent ones): the
others are read back from their files when a client asks for them.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskfarm import serialization
from taskfarm.controller import resultfiles
from taskfarm.controller.resultfiles import StoredResult
from taskfarm.controller.tasks import TaskRecord, TaskSpec, TaskState
from taskfarm.errors import BadRequest, UnknownTask

#: How long finished tasks are kept (seconds) unless cleared sooner.
DEFAULT_RETENTION = 24 * 3600.0

#: How many bytes of big results already durable in their own files the
#: controller keeps in memory as well (the most recent; the rest are read
#: back from their files on request).
RESIDENT_LIMIT = 64 << 20


class _Countdown:
    """One waiter: fires its Deferred once every task it waits on has
    finished.  Cancelling the Deferred releases the waiter."""

    __slots__ = ("remaining", "taskids", "deferred")

    def __init__(self, taskids: set[int], canceller: Callable) -> None:
        self.taskids = taskids
        self.remaining = len(taskids)
        self.deferred: defer.Deferred = defer.Deferred(lambda _: canceller(self))

    def one_done(self) -> None:
        self.remaining -= 1
        # Not if it was cancelled meanwhile (by a callback of another waiter).
        if self.remaining == 0 and not self.deferred.called:
            self.deferred.callback(None)

    def failed(self, error: BaseException) -> None:
        """A task waited on will never finish (its submission was refused)."""
        if not self.deferred.called:
            self.remaining = -1
            self.deferred.errback(error)


class TaskStore:
    """Task records, their counts, waiters and retention."""

    _log = Logger()

    def __init__(
        self,
        clock,
        journal,
        retention: float | None = DEFAULT_RETENTION,
        resident_limit: int = RESIDENT_LIMIT,
    ) -> None:
        self._clock = clock
        self._journal = journal
        self._retention = retention
        #: Journaled big results still in memory: taskid -> bytes, oldest first.
        self.resident: collections.OrderedDict[int, int] = collections.OrderedDict()
        self.resident_bytes = 0
        self._resident_limit = resident_limit
        journal.on_result_durable = self._results_durable
        #: Every known task, by id.
        self.tasks: dict[int, TaskRecord] = {}
        #: How many tasks are in each state.
        self.counts = {state: 0 for state in TaskState}
        #: (completed time, taskid) in completion order, for the retention sweep.
        self.finished_order: collections.deque = collections.deque()
        #: Called after each sweep (the ledger forgets old tokens then).
        self.sweep_hooks: list[Callable[[], None]] = []
        self._waiters: dict[int, list[_Countdown]] = {}
        #: taskid -> the commit of its batch, for tasks dispatched before
        #: their batch was committed; no answer about them leaves before it.
        self._uncommitted: dict[int, _Commit] = {}
        self._sweep_loop: task.LoopingCall | None = None
        #: Called as ``watcher(record, before, engine_id)`` after every
        #: move (`taskfarm.controller.monitor.Monitor.moved`), or None.
        self.watcher: Callable | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the retention sweep (if tasks are kept for a limited time)."""
        if self._retention:
            self._sweep_loop = task.LoopingCall(self._sweep_tick)
            self._sweep_loop.clock = self._clock
            self._sweep_loop.start(min(max(self._retention / 10.0, 0.05), 60.0), now=False)

    def stop(self) -> None:
        """Stop the sweep; waiting clients are answered by their connection."""
        if self._sweep_loop is not None and self._sweep_loop.running:
            self._sweep_loop.stop()

    def restore(self) -> list[TaskRecord]:
        """Load the journal's tasks: results come back, and the unfinished
        ones, returned in id order, are to be queued again."""
        queued = []
        finished = []
        for stored in self._journal.tasks():
            spec = TaskSpec.from_envelope(serialization.unpack(stored.envelope))
            stored.data = self._journal.stored_result(stored)
            stored.output = _stored_output(getattr(stored, "output", None))
            if stored.state != "queued" and not stored.ok and stored.data is not None:
                stored.data = serialization.unpack(stored.data)
            elif stored.ok and stored.data is not None:
                stored.data = _as_value(stored.data)
            record = TaskRecord.restore(stored, spec)
            self.tasks[record.taskid] = record
            self.counts[record.state] += 1
            if record.is_queued:
                queued.append(record)
            else:
                finished.append((record.completed or 0.0, record.taskid))
        if self._retention:
            self.finished_order.extend(sorted(finished))
        return queued

    # -- records ------------------------------------------------------------------------

    def check_free(self, ids: list[int]) -> None:
        """`BadRequest` if any of `ids` is in use (by someone else's batch)."""
        taken = [taskid for taskid in ids if taskid in self.tasks]
        if taken:
            raise BadRequest("task ids %s are taken already" % taken[:10])

    def add(self, ids: list[int], specs: list[TaskSpec], now: float) -> list[TaskRecord]:
        """New queued records for `specs`, under `ids`."""
        records = []
        for taskid, spec in zip(ids, specs, strict=True):
            record = TaskRecord(taskid, spec, now)
            self.tasks[taskid] = record
            self.counts[TaskState.QUEUED] += 1
            records.append(record)
        return records

    def accept(
        self, records: list[TaskRecord], envelopes: list, token_row, early: bool = False
    ) -> defer.Deferred:
        """Journal a new batch; fires once it is committed (`JournalError` if never).

        With `early`, its tasks may run before the commit: until it, `wait`
        and blocking `results` about them hold their answers, and a
        non-blocking `results` answers them as unfinished.
        """
        rows = (
            (record.taskid, serialization.pack(envelope), record.submitted, record.spec.retries)
            for record, envelope in zip(records, envelopes, strict=True)
        )
        committed = self._journal.accept_batch(rows, token_row)
        if early and not committed.called:
            commit = _Commit()
            uncommitted = self._uncommitted
            for record in records:
                uncommitted[record.taskid] = commit
            # The first callback: it sees the commit's own outcome.
            committed.addBoth(self._committed, records, commit)
        return committed

    def _committed(self, result, records: list[TaskRecord], commit: _Commit):
        uncommitted = self._uncommitted
        for record in records:
            if uncommitted.get(record.taskid) is commit:
                del uncommitted[record.taskid]
        commit.done(result)
        return result

    def _after_commit(self, taskids) -> defer.Deferred | None:
        """Fires once the batches of `taskids` are committed (fails with the
        error of one that never is); None if they are already."""
        if not self._uncommitted:
            return None
        pending = {id(c): c for c in map(self._uncommitted.get, taskids) if c is not None}
        if not pending:
            return None
        done = defer.gatherResults([c.wait() for c in pending.values()], consumeErrors=True)
        done.addCallbacks(lambda _: None, lambda failure: failure.value.subFailure)
        return done

    def refuse(self, records: list[TaskRecord], error: BaseException) -> None:
        """Forget a batch that could not be journaled; its waiters fail with `error`."""
        for record in records:
            if self.tasks.get(record.taskid) is record:
                del self.tasks[record.taskid]
                self.counts[record.state] -= 1
            for countdown in self._waiters.pop(record.taskid, ()):
                self._release(countdown)
                countdown.failed(error)

    def is_current(self, record: TaskRecord) -> bool:
        """Whether `record` is still the store's record of its id."""
        return self.tasks.get(record.taskid) is record

    def records(self, taskids: list[int]) -> list[TaskRecord]:
        """The records of `taskids`, in order; `UnknownTask` for an unknown id."""
        records = []
        for taskid in taskids:
            record = self.tasks.get(taskid)
            if record is None:
                raise UnknownTask(
                    "no task with id %r (never submitted, or cleared)" % (taskid,)
                )
            records.append(record)
        return records

    def move(self, record: TaskRecord, transition, *args):
        """Run the record's `transition(*args)`, keeping the counts right."""
        before = record.state
        engine_id = record.engine_id
        outcome = transition(*args)
        self.counts[before] -= 1
        self.counts[record.state] += 1
        if self.watcher is not None:
            self.watcher(record, before, engine_id)
        return outcome

    def finished(self, record: TaskRecord) -> None:
        """`record` reached its final state: journal it and wake its waiters."""
        self._journal.finished(record, record.link)
        if self._retention:
            # The controller's clock, not `record.completed`: that is stamped
            # by the engine's own clock, which the sweep cannot compare with.
            self.finished_order.append((self._clock.seconds(), record.taskid))
        for countdown in self._waiters.pop(record.taskid, ()):
            countdown.one_done()

    def requeued(self, record: TaskRecord) -> None:
        """`record` is queued again (a retry or its recovery task): journal it."""
        self._journal.requeued(record.taskid, record.link, record.retries_left, record.attempts)

    # -- waiters ------------------------------------------------------------------------

    def wait(self, taskids: list[int]) -> defer.Deferred:
        """A Deferred that fires (with None) once all `taskids` are final.
        Cancelling it releases the waiter."""
        records = self.records(taskids)
        unfinished = {r.taskid for r in records if not r.is_final}
        if not unfinished:
            return self._after_commit(taskids) or defer.succeed(None)
        countdown = _Countdown(unfinished, self._release)
        for taskid in unfinished:
            self._waiters.setdefault(taskid, []).append(countdown)
        if self._uncommitted:
            # In the turn the last one finishes: its batch is committed by
            # then unless the engine beat the journal writer.
            countdown.deferred.addCallback(lambda _: self._after_commit(taskids))
        return countdown.deferred

    def results(self, taskids: list[int], block: bool = False) -> defer.Deferred:
        """Result envelopes of `taskids` (None for unfinished ones unless
        `block`).  Cancelling a blocking call releases its waiter."""
        records = self.records(taskids)
        if block:
            d = self.wait(taskids)
            d.addCallback(lambda _: self._envelopes(records))
            return d
        return self._envelopes(records)

    def _envelopes(self, records: list[TaskRecord]) -> defer.Deferred:
        # Results held on disk only are read back (in a thread) first.
        # A task dispatched before its batch was committed has no answer
        # before that commit.
        uncommitted = self._uncommitted
        records = [r if r.is_final and r.taskid not in uncommitted else None for r in records]
        stored = [r for r in records if r is not None and isinstance(r.data, StoredResult)]
        if not stored:
            return defer.succeed([None if r is None else r.result_envelope() for r in records])
        # The others' envelopes are taken now: while the files are read, a
        # result still in memory may be dropped to its file.
        ready = {
            r.taskid: r.result_envelope()
            for r in records
            if r is not None and not isinstance(r.data, StoredResult)
        }
        return defer.Deferred.fromCoroutine(self._read_envelopes(records, stored, ready))

    async def _read_envelopes(
        self, records: list[TaskRecord], stored: list[TaskRecord], ready: dict
    ) -> list:
        values = {}
        for record in stored:
            try:
                values[record.taskid] = _as_value(await self._journal.read_result(record.taskid))
            except Exception:
                if not self.is_current(record):
                    raise UnknownTask(
                        "task %d was cleared while its result was read" % record.taskid
                    ) from None
                raise
        return [
            None if r is None
            else r.result_envelope(values[r.taskid]) if r.taskid in values
            else ready[r.taskid]
            for r in records
        ]

    def _results_durable(self, taskids: list[int]) -> None:
        """The journal made these tasks' big results durable in their files:
        keep the newest in memory up to the limit, drop the others' bytes."""
        for taskid in taskids:
            record = self.tasks.get(taskid)
            if record is None or not record.ok or isinstance(record.data, StoredResult):
                continue
            size = resultfiles.nbytes(record.data)
            self.resident[taskid] = size
            self.resident_bytes += size
        while self.resident_bytes > self._resident_limit:
            taskid, size = self.resident.popitem(last=False)
            self.resident_bytes -= size
            record = self.tasks.get(taskid)
            if record is not None and record.ok and not isinstance(record.data, StoredResult):
                record.data = StoredResult(taskid, size)

    def _forget_resident(self, taskid: int) -> None:
        size = self.resident.pop(taskid, None)
        if size is not None:
            self.resident_bytes -= size

    def _release(self, countdown: _Countdown) -> None:
        """Take `countdown` off the lists of the tasks it still waits on."""
        for taskid in countdown.taskids:
            waiting = self._waiters.get(taskid)
            if waiting is None:
                continue
            try:
                waiting.remove(countdown)
            except ValueError:
                continue
            if not waiting:
                del self._waiters[taskid]

    def waiting(self) -> int:
        """How many waits are registered (one per task per waiter)."""
        return sum(len(countdowns) for countdowns in self._waiters.values())

    # -- status and forgetting ----------------------------------------------------------

    def queue_status(self, verbose: bool = False) -> dict:
        """Counts (or, if `verbose`, id lists) per state, as the original had."""
        if not verbose:
            return {
                "scheduled": self.counts[TaskState.QUEUED],
                "pending": self.counts[TaskState.RUNNING],
                "waiting_retry": self.counts[TaskState.WAITING_RETRY],
                "succeeded": self.counts[TaskState.SUCCEEDED],
                "failed": self.counts[TaskState.FAILED],
                "aborted": self.counts[TaskState.ABORTED],
            }
        status: dict[str, list[int]] = {s.value: [] for s in TaskState}
        for taskid, record in self.tasks.items():
            status[record.state.value].append(taskid)
        return status

    def per_engine(self, engine_ids: list[int]) -> dict[int, dict[str, int]]:
        """``{engine_id: {"running": n, "succeeded": n, "failed": n}}`` over
        the kept records, with a zero entry for each of `engine_ids`."""
        counts: dict[int, dict[str, int]] = {
            eid: {"running": 0, "succeeded": 0, "failed": 0} for eid in engine_ids
        }
        names = {
            TaskState.RUNNING: "running",
            TaskState.SUCCEEDED: "succeeded",
            TaskState.FAILED: "failed",
        }
        for record in self.tasks.values():
            name = names.get(record.state)
            if name is None or record.engine_id is None:
                continue
            entry = counts.get(record.engine_id)
            if entry is None:
                entry = counts[record.engine_id] = {"running": 0, "succeeded": 0, "failed": 0}
            entry[name] += 1
        return counts

    def clear(self, taskids: list[int] | None = None) -> int:
        """Forget finished tasks (all of them, or those listed); returns how many.

        Unfinished tasks are kept.  Unknown ids raise `UnknownTask` after the
        known ones are cleared.
        """
        if taskids is None:
            taskids = [tid for tid, r in self.tasks.items() if r.is_final]
        cleared = 0
        unknown = []
        for taskid in taskids:
            record = self.tasks.get(taskid)
            if record is None:
                unknown.append(taskid)
            elif record.is_final:
                del self.tasks[taskid]
                self.counts[record.state] -= 1
                cleared += 1
                self._journal.cleared([taskid])
                if self.resident:
                    self._forget_resident(taskid)
        self._compact_finished_order()
        if unknown:
            raise UnknownTask("no such task ids: %s" % (unknown[:10],))
        return cleared

    def _compact_finished_order(self) -> None:
        # Cleared tasks leave their entries in the retention queue; once
        # most entries are dead, drop them, so memory follows live tasks.
        order = self.finished_order
        live = self.counts[TaskState.SUCCEEDED] + self.counts[TaskState.FAILED] + self.counts[
            TaskState.ABORTED
        ]
        if len(order) > 1024 and len(order) > 2 * live:
            tasks = self.tasks
            self.finished_order = collections.deque(
                entry for entry in order if entry[1] in tasks
            )

    def _sweep_tick(self) -> None:
        self.sweep()
        for hook in self.sweep_hooks:
            hook()

    def sweep(self) -> None:
        """Forget finished tasks older than the retention time."""
        horizon = self._clock.seconds() - self._retention
        order = self.finished_order
        expired = []
        while order and order[0][0] < horizon:
            _, taskid = order.popleft()
            record = self.tasks.get(taskid)
            if record is not None and record.is_final:
                del self.tasks[taskid]
                self.counts[record.state] -= 1
                expired.append(taskid)
                if self.resident:
                    self._forget_resident(taskid)
        if expired:
            self._journal.cleared(expired)


def _stored_output(blob: bytes | None) -> tuple[str, str] | None:
    """The ``(stdout, stderr)`` a journal kept, or None (none, or unreadable)."""
    if blob is None:
        return None
    try:
        output = serialization.unpack(blob)
    except Exception:
        return None
    if (
        isinstance(output, tuple)
        and len(output) == 2
        and all(isinstance(text, str) for text in output)
    ):
        return output
    return None


def _as_value(data: object) -> object:
    """A result the journal gave back: one blob as it is; a list of byte
    strings (a result kept as frames) as frames again."""
    if isinstance(data, list):
        return serialization.as_frames(data) or data
    return data


class _Commit:
    """The commit of one batch dispatched early, as its waiters see it."""

    __slots__ = ("waiters",)

    def __init__(self) -> None:
        self.waiters: list[defer.Deferred] = []

    def wait(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.waiters.append(d)
        return d

    def done(self, result) -> None:
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(None)
