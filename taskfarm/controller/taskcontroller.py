"""The load-balanced Task interface, on the controller.

Tasks arrive in batches, get ids, go to the scheduler, and are handed to
engines by one dispatch loop that any event "kicks" (buildbot's pattern:
many kicks in one reactor turn give one pass).  Every task ends in exactly
one of succeeded, failed (with a typed error) or aborted, and anyone waiting
on it is told.
"""

from __future__ import annotations

import collections
import uuid
from collections.abc import Iterable
from functools import partial

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskfarm import serialization
from taskfarm.controller.registry import EngineRegistry, RegistryListener
from taskfarm.controller.tasks import TaskRecord, TaskSpec, TaskState
from taskfarm.errors import (
    BadRequest,
    DependError,
    JournalError,
    TaskAborted,
    TaskAlreadyAborted,
    TaskAlreadyCompleted,
    TaskTimeout,
    UnknownTask,
    to_wire,
)

#: How long a task may wait when no engine's properties satisfy its `depend`.
DEFAULT_UNMET_TIMEOUT = 60.0

#: Seconds of work kept queued on each engine: short tasks travel in big
#: batches, long ones one at a time, so load stays balanced.
DEFAULT_PREFETCH = 0.005
MAX_TASK_SLOTS = 256

#: How long finished tasks are kept (seconds) unless cleared sooner.
DEFAULT_RETENTION = 24 * 3600.0

#: How many submission tokens are remembered, and for how long (seconds).
MAX_TOKENS = 100_000

#: The most task ids one `reserve` call sets aside.
MAX_RESERVE = 100_000
TOKEN_LIFETIME = 3600.0


class _Countdown:
    """Fires its Deferred once every task it waits on has finished."""

    __slots__ = ("remaining", "deferred")

    def __init__(self, remaining: int) -> None:
        self.remaining = remaining
        self.deferred: defer.Deferred = defer.Deferred()

    def one_done(self) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            self.deferred.callback(None)

    def failed(self, error: BaseException) -> None:
        """A task waited on will never finish (its submission was refused)."""
        if not self.deferred.called:
            self.remaining = -1
            self.deferred.errback(error)


class TaskController(RegistryListener):
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
    ) -> None:
        self._registry = registry
        #: Seconds of work to keep queued on each engine (None: fixed slots).
        self._prefetch = prefetch
        self._scheduler = scheduler
        self._clock = clock
        self._unmet_timeout = unmet_timeout
        self._journal = journal
        #: Who this controller is: the journal's identity, or a new one per
        #: start without a journal.  Clients that see it change know that
        #: the tasks they sent before are gone, and their reserved ids too.
        self.incarnation = journal.incarnation() if journal is not None else uuid.uuid4().hex
        self._retention = retention
        #: (completed time, taskid) in completion order, for the retention sweep.
        self._finished_order: collections.deque = collections.deque()
        #: Submission token -> the ids it got (resubmission gets them again).
        self._tokens: collections.OrderedDict[str, tuple[int, int, str | None]] = (
            collections.OrderedDict()
        )
        self._sweep_loop: task.LoopingCall | None = None
        self._tasks: dict[int, TaskRecord] = {}
        self._counts = {state: 0 for state in TaskState}
        self._next_id = 0
        self._waiters: dict[int, list[_Countdown]] = {}
        self._dispatch_call = None
        self._unmet_since: dict[bytes, float] = {}
        self._unmet_loop: task.LoopingCall | None = None
        registry.add_listener(self)
        # Depend verdicts arrive from the evaluator: they may place tasks.
        scheduler.watch(self._kick)

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        """Restore journaled tasks; start the unmet-depend and retention timers."""
        if self._journal is not None:
            self._restore()
        if self._unmet_timeout:
            self._unmet_loop = self._every(max(self._unmet_timeout / 4.0, 0.05), self._check_unmet)
        if self._retention:
            self._sweep_loop = self._every(min(max(self._retention / 10.0, 0.05), 60.0), self._sweep)

    def _every(self, interval: float, function) -> task.LoopingCall:
        loop = task.LoopingCall(function)
        loop.clock = self._clock
        loop.start(interval, now=False)
        return loop

    def stop(self) -> None:
        """Stop the timers; waiting clients are answered by their connection."""
        for loop in (self._unmet_loop, self._sweep_loop):
            if loop is not None and loop.running:
                loop.stop()
        if self._dispatch_call is not None and self._dispatch_call.active():
            self._dispatch_call.cancel()
        self._dispatch_call = None

    # -- the client API ---------------------------------------------------------------

    def reserve(self, count: int) -> int:
        """Set aside `count` task ids for one client; returns the first.

        A client with reserved ids names them in `submit`, so its `run` can
        answer at once; ids are never handed out twice, even after a restart.
        """
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_RESERVE:
            raise ValueError("reserve between 1 and %d ids, not %r" % (MAX_RESERVE, count))
        first = self._next_id
        self._next_id += count
        if self._journal is not None:
            self._journal.next_id_is(self._next_id)
        return first

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
            self._check_reserved(ids, len(envelopes))
        if token is not None and token in self._tokens:
            first, count, known_digest = self._tokens[token]
            if digest is not None and known_digest is not None and digest != known_digest:
                raise BadRequest(
                    "submission token %s was already used for another batch; "
                    "every batch needs a token of its own" % token
                )
            if first >= 0:
                return list(range(first, first + count)), self.durable()
            if ids is None:
                raise BadRequest("this submission token came with reserved ids; send them again")
            return list(ids), self.durable()
        if ids is not None:
            # Not a resend (its token is unknown): ids in use are someone else's.
            taken = [taskid for taskid in ids if taskid in self._tasks]
            if taken:
                raise BadRequest("task ids %s are taken already" % taken[:10])
        # A depend is user code: it stays bytes here, and is only loaded in
        # the scheduler's evaluator processes (DependError if it cannot be).
        specs = [TaskSpec.from_envelope(envelope) for envelope in envelopes]
        now = self._clock.seconds()
        first = self._next_id
        if ids is None:
            ids = list(range(first, first + len(specs)))
            self._next_id += len(specs)
        records = []
        for taskid, spec in zip(ids, specs, strict=True):
            record = TaskRecord(taskid, spec, now)
            self._tasks[taskid] = record
            self._counts[TaskState.QUEUED] += 1
            records.append(record)
        if token is not None:
            self._remember_token(token, first if self._next_id > first else -1, len(specs), digest)
        if self._journal is None:
            self._admit(records)
            return ids, defer.succeed(None)
        if self._next_id > first:
            # Ids are spent whether or not the batch is journaled.
            self._journal.next_id_is(self._next_id)
        rows = [
            (record.taskid, serialization.pack(envelope), now, record.spec.retries)
            for record, envelope in zip(records, envelopes, strict=True)
        ]
        token_row = None if token is None else (token, self._tokens[token][0], len(specs), digest, now)
        admitted = self._journal.accept_batch(rows, token_row)
        admitted.addCallbacks(
            lambda _: self._admit(records), partial(self._refuse_batch, records, token)
        )
        return ids, admitted

    def _admit(self, records: list[TaskRecord]) -> None:
        """Give newly accepted (and journaled) tasks to the scheduler."""
        for record in records:
            # One may have been aborted while its batch was being journaled.
            if record.is_queued and self._tasks.get(record.taskid) is record:
                self._scheduler.add_task(record)
        self._kick()

    def _refuse_batch(self, records: list[TaskRecord], token: str | None, failure):
        """The batch could not be journaled: it is forgotten whole (none of
        it ran, since it never reached the scheduler)."""
        error = failure.value
        if not isinstance(error, JournalError):
            error = JournalError("the journal cannot be written: %s" % (error,))
        for record in records:
            if self._tasks.get(record.taskid) is record:
                del self._tasks[record.taskid]
                self._counts[record.state] -= 1
            for countdown in self._waiters.pop(record.taskid, ()):
                countdown.failed(error)
        if token is not None:
            self._tokens.pop(token, None)
        self._log.warn(
            "refused a batch of {count} tasks: {error}", count=len(records), error=error
        )
        return Failure(error)

    def _check_reserved(self, ids: list, count: int) -> None:
        # Their form (ints, one per task, distinct) is checked on the way
        # in, by `wire.Submission.parse`; here only that they are ours.
        for taskid in ids:
            if not 0 <= taskid < self._next_id:
                raise BadRequest("task id %d was never reserved" % taskid)

    def durable(self) -> defer.Deferred:
        """Fires once every task accepted so far is in the journal."""
        if self._journal is None:
            return defer.succeed(None)
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

    def _remember_token(self, token: str, first: int, count: int, digest: str | None) -> None:
        self._tokens[token] = (first, count, digest)
        while len(self._tokens) > MAX_TOKENS:
            self._tokens.popitem(last=False)

    def results(self, taskids: list[int], block: bool = False) -> defer.Deferred:
        """Result envelopes of `taskids` (None for unfinished ones unless `block`)."""
        records = self._records(taskids)
        if block:
            d = self.wait(taskids)
            d.addCallback(lambda _: [r.result_envelope() for r in records])
            return d
        return defer.succeed(
            [r.result_envelope() if r.is_final else None for r in records]
        )

    def wait(self, taskids: list[int]) -> defer.Deferred:
        """A Deferred that fires (with None) once all `taskids` are final."""
        records = self._records(taskids)
        unfinished = {r.taskid for r in records if not r.is_final}
        if not unfinished:
            return defer.succeed(None)
        countdown = _Countdown(len(unfinished))
        for taskid in unfinished:
            self._waiters.setdefault(taskid, []).append(countdown)
        return countdown.deferred

    def abort(self, taskid: int) -> None:
        """Abort a queued or running task; it finishes with `TaskAborted`."""
        if isinstance(taskid, bool) or not isinstance(taskid, int):
            raise TypeError("abort takes one task id (an int), not %r" % (taskid,))
        (record,) = self._records([taskid])
        if record.state is TaskState.ABORTED:
            raise TaskAlreadyAborted()
        if record.is_final:
            raise TaskAlreadyCompleted()
        error = to_wire(TaskAborted("task %d was aborted" % taskid))
        if record.is_queued:
            self._scheduler.remove_task(record)
        else:
            engine = self._registry.engines.get(record.engine_id)
            if engine is not None:
                engine.interrupt(record.seq)
        self._move(record, record.abort, error, self._clock.seconds())
        self._finished(record)

    def queue_status(self, verbose: bool = False) -> dict:
        """Counts (or, if `verbose`, id lists) per state, as the original had."""
        if not verbose:
            return {
                "scheduled": self._counts[TaskState.QUEUED],
                "pending": self._counts[TaskState.RUNNING],
                "succeeded": self._counts[TaskState.SUCCEEDED],
                "failed": self._counts[TaskState.FAILED],
                "aborted": self._counts[TaskState.ABORTED],
            }
        status: dict[str, list[int]] = {s.value: [] for s in TaskState}
        for taskid, record in self._tasks.items():
            status[record.state.value].append(taskid)
        return status

    def clear(self, taskids: list[int] | None = None) -> int:
        """Forget finished tasks (all of them, or those listed); returns how many.

        Unfinished tasks are kept.  Unknown ids raise `UnknownTask` after the
        known ones are cleared.
        """
        if taskids is None:
            taskids = [tid for tid, r in self._tasks.items() if r.is_final]
        cleared = 0
        unknown = []
        for taskid in taskids:
            record = self._tasks.get(taskid)
            if record is None:
                unknown.append(taskid)
            elif record.is_final:
                del self._tasks[taskid]
                self._counts[record.state] -= 1
                cleared += 1
                if self._journal is not None:
                    self._journal.cleared([taskid])
        self._compact_finished_order()
        if unknown:
            raise UnknownTask("no such task ids: %s" % (unknown[:10],))
        return cleared

    def _compact_finished_order(self) -> None:
        # Cleared tasks leave their entries in the retention queue; once
        # most entries are dead, drop them, so memory follows live tasks.
        order = self._finished_order
        live = self._counts[TaskState.SUCCEEDED] + self._counts[TaskState.FAILED] + self._counts[
            TaskState.ABORTED
        ]
        if len(order) > 1024 and len(order) > 2 * live:
            tasks = self._tasks
            self._finished_order = collections.deque(
                entry for entry in order if entry[1] in tasks
            )

    def engine_ids(self) -> list[int]:
        """The ids of the registered engines."""
        return self._registry.ids()

    def spin(self) -> None:
        """Run a scheduling pass now (never needed: every event triggers one)."""
        self._dispatch()

    # -- RegistryListener -------------------------------------------------------------

    def engine_added(self, engine) -> None:
        self._scheduler.add_engine(engine)
        self._kick()

    def engine_removed(self, engine) -> None:
        self._scheduler.remove_engine(engine.engine_id)

    def properties_changed(self, engine) -> None:
        self._kick()

    # -- inside -------------------------------------------------------------------------

    def _records(self, taskids: list[int]) -> list[TaskRecord]:
        records = []
        for taskid in taskids:
            record = self._tasks.get(taskid)
            if record is None:
                raise UnknownTask(
                    "no task with id %r (never submitted, or cleared)" % (taskid,)
                )
            records.append(record)
        return records

    def _move(self, record: TaskRecord, transition, *args):
        before = record.state
        outcome = transition(*args)
        self._counts[before] -= 1
        self._counts[record.state] += 1
        return outcome

    def _kick(self) -> None:
        if self._dispatch_call is None:
            self._dispatch_call = self._clock.callLater(0, self._dispatch)

    def _dispatch(self) -> None:
        if self._dispatch_call is not None and self._dispatch_call.active():
            self._dispatch_call.cancel()
        self._dispatch_call = None
        self._fail_broken_depends()
        for engine, record in self._scheduler.schedule():
            spec = record.spec
            timeout = spec.timeout
            seq = engine.send(
                "task",
                spec.command_args(),
                partial(self._task_replied, record, engine.engine_id),
                timeout,
                None if timeout is None else partial(self._task_overdue, record, engine.engine_id),
            )
            self._move(record, record.start, engine.engine_id, seq)

    def _fail_broken_depends(self) -> None:
        """Tasks whose depend can never be loaded fail with `DependError`."""
        broken = self._scheduler.broken_groups()
        if not broken:
            return
        now = self._clock.seconds()
        for _, reason, records in broken:
            for record in records:
                error = to_wire(DependError("depend function of task %d: %s" % (record.taskid, reason)))
                self._scheduler.remove_task(record)
                self._move(record, record.fail, error, None, now)
                self._finished(record)

    def _task_replied(
        self,
        record: TaskRecord,
        engine_id: int,
        seq: int,
        ok: bool,
        data,
        started,
        finished: float,
    ) -> None:
        self._scheduler.release(engine_id)
        if self._prefetch and started is not None:
            engine = self._registry.engines.get(engine_id)
            if engine is not None:
                slots = engine.observe(finished - started, self._prefetch, MAX_TASK_SLOTS)
                if slots is not None:
                    self._scheduler.resize(engine_id, slots)
        if self._is_current(record, engine_id, seq):
            if not ok and started is None and data[0] == "MessageTooLarge":
                # Never sent (see `EngineHandle._fit`): it would be as large
                # again, so retries cannot help; a recovery task still may.
                record.retries_left = 0
            if ok:
                self._move(record, record.succeed, data, started, finished)
                self._finished(record)
            else:
                self._attempt_failed(record, engine_id, data, started, finished)
        self._kick()

    def _is_current(self, record: TaskRecord, engine_id: int, seq: int) -> bool:
        # A late answer of an aborted, re-queued or written-off try is stale.
        return (
            record.state is TaskState.RUNNING
            and record.engine_id == engine_id
            and record.seq == seq
        )

    def _attempt_failed(self, record, engine_id: int, error: tuple, started, finished) -> None:
        if self._move(record, record.fail_attempt, error, started, finished):
            self._journal_requeue(record)
            self._log.info(
                "task {taskid} attempt {attempt} failed on engine {engine_id}; "
                "queued again",
                taskid=record.taskid,
                attempt=record.attempts,
                engine_id=engine_id,
            )
            self._scheduler.add_task(record)
        else:
            self._finished(record)

    def _task_overdue(self, record: TaskRecord, engine_id: int, seq: int) -> None:
        """The engine has not answered a task long past its timeout: the
        controller fails the try itself.  The engine's slot stays taken (it
        is still busy, or lying) until it answers or is lost."""
        if not self._is_current(record, engine_id, seq):
            return
        engine = self._registry.engines.get(engine_id)
        if engine is not None:
            engine.interrupt(seq)
        error = TaskTimeout(
            "the task ran past its timeout of %g s and engine %d did not answer "
            "within %g s more; the controller stopped waiting for it"
            % (record.spec.timeout, engine_id, self._registry.timeout_grace)
        )
        now = self._clock.seconds()
        self._attempt_failed(record, engine_id, to_wire(error), None, now)
        self._kick()

    def _finished(self, record: TaskRecord) -> None:
        if self._journal is not None:
            self._journal.finished(record, record.link)
        if self._retention:
            # The controller's clock, not `record.completed`: that is stamped
            # by the engine's own clock, which the sweep cannot compare with.
            self._finished_order.append((self._clock.seconds(), record.taskid))
        for countdown in self._waiters.pop(record.taskid, ()):
            countdown.one_done()

    def _journal_requeue(self, record: TaskRecord) -> None:
        if self._journal is not None:
            self._journal.requeued(record.taskid, record.link, record.retries_left, record.attempts)

    def _sweep(self) -> None:
        """Forget finished tasks older than the retention time."""
        horizon = self._clock.seconds() - self._retention
        order = self._finished_order
        expired = []
        while order and order[0][0] < horizon:
            _, taskid = order.popleft()
            record = self._tasks.get(taskid)
            if record is not None and record.is_final:
                del self._tasks[taskid]
                self._counts[record.state] -= 1
                expired.append(taskid)
        if expired and self._journal is not None:
            self._journal.cleared(expired)
        if self._journal is not None:
            self._journal.forget_tokens(self._clock.seconds() - TOKEN_LIFETIME)

    def _restore(self) -> None:
        """Load the journal: results come back, unfinished tasks queue again."""
        self._next_id = self._journal.next_id()
        restored = requeued = 0
        finished = []
        for stored in self._journal.tasks():
            spec = TaskSpec.from_envelope(serialization.unpack(stored.envelope))
            stored.data = self._journal.stored_data(stored)
            if stored.state != "queued" and not stored.ok and stored.data is not None:
                stored.data = serialization.unpack(stored.data)
            record = TaskRecord.restore(stored, spec)
            self._tasks[record.taskid] = record
            self._counts[record.state] += 1
            restored += 1
            if record.is_queued:
                self._scheduler.add_task(record)
                requeued += 1
            else:
                finished.append((record.completed or 0.0, record.taskid))
        if self._retention:
            self._finished_order.extend(sorted(finished))
        for token, first, count, digest in self._journal.tokens():
            self._tokens[token] = (first, count, digest)
        self._log.info(
            "restored {restored} tasks from {path} ({requeued} queued again); "
            "next task id {next_id}",
            restored=restored,
            requeued=requeued,
            path=str(self._journal.path),
            next_id=self._next_id,
        )
        self._kick()

    def _check_unmet(self) -> None:
        now = self._clock.seconds()
        unmet = dict(self._scheduler.unmet_groups())
        for key in list(self._unmet_since):
            if key not in unmet:
                del self._unmet_since[key]
        expired = []
        for key, records in unmet.items():
            since = self._unmet_since.setdefault(key, now)
            if now - since < self._unmet_timeout:
                continue
            del self._unmet_since[key]
            # Take every expired task out before queueing any recovery task:
            # the emptied groups are dropped with their queues, so a recovery
            # task with the same depend cannot meet its own stale entry there
            # (which let one pass hand the same task out twice).
            for record in records:
                self._scheduler.remove_task(record)
            expired.extend(records)
        if not expired:
            return
        error = to_wire(
            TaskTimeout(
                "no engine's properties satisfied the task's depend "
                "function for %g seconds" % self._unmet_timeout
            )
        )
        for record in expired:
            if self._move(record, record.recover_or_fail, error, now):
                self._journal_requeue(record)
                self._scheduler.add_task(record)
            else:
                self._finished(record)
        # Recovery tasks may run on the engines there are now.
        self._kick()
