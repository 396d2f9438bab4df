"""The controller's dispatcher: tasks from the scheduler to the engines.

One dispatch pass hands every task the scheduler places to its engine; any
event "kicks" it (buildbot's pattern: many kicks in one reactor turn give one
pass).  Replies come back here: a success or a failure finishes the task in
the store, a failed attempt queues it again while retries or a recovery task
remain, and a late answer of a try that was written off is ignored.  The
dispatcher also sizes each engine's prefetch from its task times, fails
tasks whose depend cannot be loaded, and times out tasks whose depend no
engine satisfies (the unmet-depend timer, which needs the scheduler's
groups, so it lives here and not in the store).

**Paced retries.**  A failed attempt that will be retried waits in
``waiting_retry`` for its delay: the task's `retry_delay` (or the
controller's `retry_delay`) for the first retry, twice as long for each
further one, at most `MAX_RETRY_DELAY` (`taskfarm.backoff.policy`).  The
engine it failed on sits out `failure_penalty` seconds for that task: the
scheduler gives it to another engine with a free slot, or to that engine
after all when no other has one.  A task with no retries left fails at
once; a recovery task and a retry after engine loss (`EngineLost`) go out
at once, with no delay and no penalty.
"""

from __future__ import annotations

from functools import partial

from twisted.internet import task
from twisted.logger import Logger

from taskfarm import backoff
from taskfarm.controller.registry import EngineRegistry, RegistryListener
from taskfarm.controller.store import TaskStore
from taskfarm.controller.tasks import TaskRecord, TaskState
from taskfarm.errors import (
    DependError,
    EngineLost,
    TaskAborted,
    TaskAlreadyAborted,
    TaskAlreadyCompleted,
    TaskTimeout,
    to_wire,
)
from taskfarm.wire import MAX_RETRY_DELAY

#: How long a task may wait when no engine's properties satisfy its `depend`.
DEFAULT_UNMET_TIMEOUT = 60.0

#: Seconds of work kept queued on each engine: short tasks travel in big
#: batches, long ones one at a time, so load stays balanced.
DEFAULT_PREFETCH = 0.005
MAX_TASK_SLOTS = 256

#: Seconds before a task's first retry unless the task says otherwise
#: (`Task.retry_delay`); doubled per further retry, up to `MAX_RETRY_DELAY`.
DEFAULT_RETRY_DELAY = 0.1

#: Seconds the engine an attempt failed on sits out for that task (the
#: original's ``failurePenalty``).
DEFAULT_FAILURE_PENALTY = 1.0

#: The error a lost engine's tasks fail with: retried at once, elsewhere.
_ENGINE_LOST = EngineLost.__name__


class Dispatcher(RegistryListener):
    """Hands queued tasks to engines and takes their replies."""

    _log = Logger()

    def __init__(
        self,
        registry: EngineRegistry,
        scheduler,
        store: TaskStore,
        clock,
        unmet_timeout: float | None = DEFAULT_UNMET_TIMEOUT,
        prefetch: float | None = DEFAULT_PREFETCH,
        retry_delay: float = DEFAULT_RETRY_DELAY,
        failure_penalty: float = DEFAULT_FAILURE_PENALTY,
    ) -> None:
        if not 0 <= retry_delay <= MAX_RETRY_DELAY:
            raise ValueError(
                "retry_delay must be in 0..%g seconds, not %r" % (MAX_RETRY_DELAY, retry_delay)
            )
        if not 0 <= failure_penalty < float("inf"):
            raise ValueError("failure_penalty must be >= 0 seconds, not %r" % (failure_penalty,))
        self._registry = registry
        self._scheduler = scheduler
        self._store = store
        self._clock = clock
        self._unmet_timeout = unmet_timeout
        #: Seconds of work to keep queued on each engine (None: fixed slots).
        self._prefetch = prefetch
        self._dispatch_call = None
        self._unmet_since: dict[bytes, float] = {}
        self._unmet_loop: task.LoopingCall | None = None
        self._retry_delay = retry_delay
        self._failure_penalty = failure_penalty
        #: taskid -> the call that queues a waiting retry again.
        self._retry_calls: dict[int, object] = {}
        #: taskid -> the call that ends its engine's failure penalty.
        self._penalty_calls: dict[int, object] = {}
        #: Told of every failed attempt (`monitor.Monitor.attempt_failed`), or None.
        self.monitor = None
        registry.add_listener(self)
        # Depend verdicts arrive from the evaluator: they may place tasks.
        scheduler.watch(self.kick)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the unmet-depend timer (if unmet depends time out)."""
        if self._unmet_timeout:
            self._unmet_loop = task.LoopingCall(self._check_unmet)
            self._unmet_loop.clock = self._clock
            self._unmet_loop.start(max(self._unmet_timeout / 4.0, 0.05), now=False)

    def stop(self) -> None:
        """Stop the timer and any pending pass."""
        if self._unmet_loop is not None and self._unmet_loop.running:
            self._unmet_loop.stop()
        if self._dispatch_call is not None and self._dispatch_call.active():
            self._dispatch_call.cancel()
        self._dispatch_call = None
        for calls in (self._retry_calls, self._penalty_calls):
            for call in calls.values():
                if call.active():
                    call.cancel()
            calls.clear()

    def retry_due_at(self, taskid: int) -> float | None:
        """When a waiting retry of `taskid` is queued again (clock time), or None."""
        call = self._retry_calls.get(taskid)
        return call.getTime() if call is not None and call.active() else None

    def penalty_ends_at(self, taskid: int) -> float | None:
        """When the engine `taskid` last failed on may take it again, or None."""
        call = self._penalty_calls.get(taskid)
        return call.getTime() if call is not None and call.active() else None

    @property
    def scheduler(self):
        """The scheduler tasks are queued in."""
        return self._scheduler

    def pending_timers(self) -> int:
        """How many retry and penalty timers are set (0 after `stop`)."""
        return len(self._retry_calls) + len(self._penalty_calls)

    # -- tasks in and out ---------------------------------------------------------------

    def admit(self, records: list[TaskRecord]) -> None:
        """Give newly accepted (journaled, or restored) tasks to the scheduler."""
        for record in records:
            # One may have been aborted while its batch was being journaled.
            if record.is_queued and self._store.is_current(record):
                self._scheduler.add_task(record)
        # A pass now, not at the end of the turn: a batch is one event
        # already, and its tasks leave before the turn's other work.
        self.dispatch()

    def abort(self, record: TaskRecord) -> None:
        """Abort a queued or running task; it finishes with `TaskAborted`."""
        if record.state is TaskState.ABORTED:
            raise TaskAlreadyAborted()
        if record.is_final:
            raise TaskAlreadyCompleted()
        self._take_back(record, to_wire(TaskAborted("task %d was aborted" % record.taskid)))
        self._store.finished(record)

    def withdraw(self, records: list[TaskRecord], error: BaseException) -> None:
        """Take back the unfinished tasks of a batch whose commit failed
        (they were dispatched before it): out of the scheduler, interrupted
        on their engines, ended as aborted with `error`, not journaled (the
        store forgets them next)."""
        wire_error = to_wire(error)
        for record in records:
            if not record.is_final and self._store.is_current(record):
                self._take_back(record, wire_error)

    def _take_back(self, record: TaskRecord, error: tuple) -> None:
        self._end_timers(record.taskid)
        if record.is_queued:
            self._scheduler.remove_task(record)
        elif record.state is TaskState.WAITING_RETRY:
            pass  # in no queue and on no engine: only its timer, ended above
        else:
            engine = self._registry.engines.get(record.engine_id)
            if engine is not None:
                engine.interrupt(record.seq)
        self._store.move(record, record.abort, error, self._clock.seconds())

    # -- RegistryListener ---------------------------------------------------------------

    def engine_added(self, engine) -> None:
        self._scheduler.add_engine(engine)
        self.kick()

    def engine_removed(self, engine) -> None:
        self._scheduler.remove_engine(engine.engine_id)

    def properties_changed(self, engine) -> None:
        self.kick()

    # -- the dispatch pass --------------------------------------------------------------

    def kick(self) -> None:
        """Ask for a dispatch pass at the end of this reactor turn."""
        if self._dispatch_call is None:
            self._dispatch_call = self._clock.callLater(0, self.dispatch)

    def dispatch(self) -> None:
        """Run a dispatch pass now."""
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
            self._store.move(record, record.start, engine.engine_id, seq)
        # The pass is the turn's batch already: its commands leave now, not
        # one more reactor turn later.
        self._registry.flush()

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
                self._store.move(record, record.fail, error, None, now)
                self._store.finished(record)

    # -- replies ------------------------------------------------------------------------

    def _task_replied(
        self,
        record: TaskRecord,
        engine_id: int,
        seq: int,
        ok: bool,
        data,
        started,
        finished: float,
        output: tuple[str, str] | None = None,
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
            # The last attempt's output is the one kept (a retry's replaces it).
            record.output = output
            if ok:
                self._store.move(record, record.succeed, data, started, finished)
                self._store.finished(record)
            else:
                self._attempt_failed(record, engine_id, data, started, finished)
        self.kick()

    def _is_current(self, record: TaskRecord, engine_id: int, seq: int) -> bool:
        # A late answer of an aborted, re-queued or written-off try is stale.
        return (
            record.state is TaskState.RUNNING
            and record.engine_id == engine_id
            and record.seq == seq
        )

    def _attempt_failed(self, record, engine_id: int, error: tuple, started, finished) -> None:
        # Engine loss says nothing of the task: it goes out again at once.
        # A recovery task taking over is another task: not paced either.
        paced = error[0] != _ENGINE_LOST and record.retries_left > 0
        if self.monitor is not None:
            self.monitor.attempt_failed(record, engine_id, error)
        delay = 0.0
        if paced:
            first = record.spec.retry_delay
            if first is None:
                first = self._retry_delay
            delay = backoff.policy(first, max(first, MAX_RETRY_DELAY))(record.retries_spent)
        if not self._store.move(record, record.fail_attempt, error, started, finished, delay > 0):
            self._end_timers(record.taskid)
            self._store.finished(record)
            return
        self._store.requeued(record)
        self._log.info(
            "task {taskid} attempt {attempt} failed on engine {engine_id}; "
            "queued again in {delay} s",
            taskid=record.taskid,
            attempt=record.attempts,
            engine_id=engine_id,
            delay=delay,
        )
        self._end_timers(record.taskid)
        record.avoid_engine = None
        if paced and self._failure_penalty:
            record.avoid_engine = engine_id
            self._penalty_calls[record.taskid] = self._clock.callLater(
                self._failure_penalty, self._penalty_over, record
            )
        if record.state is TaskState.WAITING_RETRY:
            self._retry_calls[record.taskid] = self._clock.callLater(
                delay, self._retry_due, record
            )
        else:
            self._scheduler.add_task(record)

    def _retry_due(self, record: TaskRecord) -> None:
        """A waiting retry's delay has passed: queue it."""
        self._retry_calls.pop(record.taskid, None)
        if record.state is not TaskState.WAITING_RETRY or not self._store.is_current(record):
            return
        self._store.move(record, record.retry_now)
        self._scheduler.add_task(record)
        self.kick()

    def _penalty_over(self, record: TaskRecord) -> None:
        """The failed engine may take this task again."""
        self._penalty_calls.pop(record.taskid, None)
        record.avoid_engine = None
        if record.is_queued:
            self.kick()

    def _end_timers(self, taskid: int) -> None:
        for calls in (self._retry_calls, self._penalty_calls):
            call = calls.pop(taskid, None)
            if call is not None and call.active():
                call.cancel()

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
        self.kick()

    # -- the unmet-depend timer -----------------------------------------------------------

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
            if self._store.move(record, record.recover_or_fail, error, now):
                self._store.requeued(record)
                self._scheduler.add_task(record)
            else:
                self._store.finished(record)
        # Recovery tasks may run on the engines there are now.
        self.kick()
