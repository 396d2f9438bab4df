"""The load-balanced Task interface, on the controller.

Tasks arrive in batches, get ids, go to the scheduler, and are handed to
engines by one dispatch loop that any event "kicks" (buildbot's pattern:
many kicks in one reactor turn give one pass).  Every task ends in exactly
one of succeeded, failed (with a typed error) or aborted, and anyone waiting
on it is told.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

from twisted.internet import defer, task
from twisted.logger import Logger

from taskfarm import serialization
from taskfarm.controller.registry import EngineRegistry, RegistryListener
from taskfarm.controller.tasks import TaskRecord, TaskSpec, TaskState
from taskfarm.errors import (
    BadRequest,
    SerializationError,
    TaskAborted,
    TaskAlreadyAborted,
    TaskAlreadyCompleted,
    TaskTimeout,
    UnknownTask,
    to_wire,
)

#: How long a task may wait when no engine's properties satisfy its `depend`.
DEFAULT_UNMET_TIMEOUT = 60.0


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


class TaskController(RegistryListener):
    """Queues, dispatches and tracks tasks; keeps results until cleared."""

    _log = Logger()

    def __init__(
        self,
        registry: EngineRegistry,
        scheduler,
        clock,
        unmet_timeout: float | None = DEFAULT_UNMET_TIMEOUT,
    ) -> None:
        self._registry = registry
        self._scheduler = scheduler
        self._clock = clock
        self._unmet_timeout = unmet_timeout
        self._tasks: dict[int, TaskRecord] = {}
        self._counts = {state: 0 for state in TaskState}
        self._next_id = 0
        self._waiters: dict[int, list[_Countdown]] = {}
        self._known_depends: set[bytes] = set()
        self._dispatch_call = None
        self._unmet_since: dict[bytes, float] = {}
        self._unmet_loop: task.LoopingCall | None = None
        registry.add_listener(self)

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        """Begin watching for tasks whose dependencies no engine meets."""
        if self._unmet_timeout:
            self._unmet_loop = task.LoopingCall(self._check_unmet)
            self._unmet_loop.clock = self._clock
            self._unmet_loop.start(max(self._unmet_timeout / 4.0, 0.05), now=False)

    def stop(self) -> None:
        """Stop the timers; waiting clients are answered by their connection."""
        if self._unmet_loop is not None and self._unmet_loop.running:
            self._unmet_loop.stop()
        if self._dispatch_call is not None and self._dispatch_call.active():
            self._dispatch_call.cancel()
        self._dispatch_call = None

    # -- the client API ---------------------------------------------------------------

    def submit(self, envelopes: Iterable) -> list[int]:
        """Accept a batch of task envelopes; returns their ids, in order.

        The whole batch is checked before any task is queued, so a bad task
        rejects the batch and nothing is half-submitted.
        """
        specs = [TaskSpec.from_envelope(envelope) for envelope in envelopes]
        for spec in specs:
            for link in spec.chain():
                self._check_depend(link.depend)
        now = self._clock.seconds()
        ids = []
        for spec in specs:
            taskid = self._next_id
            self._next_id += 1
            record = TaskRecord(taskid, spec, now)
            self._tasks[taskid] = record
            self._counts[TaskState.QUEUED] += 1
            self._scheduler.add_task(record)
            ids.append(taskid)
        self._kick()
        return ids

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
        if unknown:
            raise UnknownTask("no such task ids: %s" % (unknown[:10],))
        return cleared

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

    def _check_depend(self, depend: bytes | None) -> None:
        if depend is None or depend in self._known_depends:
            return
        try:
            predicate = serialization.loads(depend, "the depend function")
        except SerializationError as e:
            raise BadRequest(str(e)) from None
        if not callable(predicate):
            raise BadRequest("depend is not callable")
        if len(self._known_depends) > 4096:
            self._known_depends.clear()
        self._known_depends.add(depend)

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
        for engine, record in self._scheduler.schedule():
            spec = record.spec
            seq = engine.send(
                "task",
                (spec.kind, spec.payload, spec.clear_before, spec.clear_after, spec.timeout),
                partial(self._task_replied, record, engine.engine_id),
            )
            self._move(record, record.start, engine.engine_id, seq)

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
        current = (
            record.state is TaskState.RUNNING
            and record.engine_id == engine_id
            and record.seq == seq
        )
        if current:
            if ok:
                self._move(record, record.succeed, data, started, finished)
                self._finished(record)
            elif self._move(record, record.fail_attempt, data, started, finished):
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
        self._kick()

    def _finished(self, record: TaskRecord) -> None:
        for countdown in self._waiters.pop(record.taskid, ()):
            countdown.one_done()

    def _check_unmet(self) -> None:
        now = self._clock.seconds()
        unmet = dict(self._scheduler.unmet_groups())
        for key in list(self._unmet_since):
            if key not in unmet:
                del self._unmet_since[key]
        for key, records in unmet.items():
            since = self._unmet_since.setdefault(key, now)
            if now - since < self._unmet_timeout:
                continue
            del self._unmet_since[key]
            error = to_wire(
                TaskTimeout(
                    "no engine's properties satisfied the task's depend "
                    "function for %g seconds" % self._unmet_timeout
                )
            )
            for record in records:
                self._scheduler.remove_task(record)
                if self._move(record, record.recover_or_fail, error, now):
                    self._scheduler.add_task(record)
                else:
                    self._finished(record)
