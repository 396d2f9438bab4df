"""The controller's record of one task, and the state machine it follows.

::

    queued ──► running ──► succeeded
      │  ▲ ▲      │ │
      │  │ └──────┘ └────► failed      (a failed attempt goes back to
      │  │ retry or recovery           queued while retries or a recovery
      │  │        │                    task remain)
      │  └─ waiting_retry ◄┘           (a retry that is paced waits here
      ▼          │                     for its delay first)
    aborted ◄────┘ (from queued, running or waiting_retry)

A recovery task runs under the same task id: the record swaps its spec for
the recovery spec and starts again with that spec's retries.
"""

from __future__ import annotations

import enum

from taskfarm import wire
from taskfarm.states import InvalidTransition
from taskfarm.wire import CALL, EXEC


class TaskState(enum.Enum):
    # Members are singletons compared by identity; the C hash of object
    # spares the controller a Python call per state lookup (several per task).
    __hash__ = object.__hash__

    QUEUED = "scheduled"
    RUNNING = "pending"
    #: A failed attempt whose retry waits out its delay (not in the scheduler).
    WAITING_RETRY = "waiting_retry"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABORTED = "aborted"


FINAL_STATES = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.ABORTED})

_ALLOWED = {
    TaskState.QUEUED: {TaskState.RUNNING, TaskState.ABORTED, TaskState.FAILED},
    TaskState.RUNNING: {
        TaskState.QUEUED,
        TaskState.WAITING_RETRY,
        TaskState.SUCCEEDED,
        TaskState.FAILED,
        TaskState.ABORTED,
    },
    TaskState.WAITING_RETRY: {TaskState.QUEUED, TaskState.ABORTED},
    TaskState.SUCCEEDED: set(),
    TaskState.FAILED: set(),
    TaskState.ABORTED: set(),
}


class TaskSpec:
    """What the controller needs to know about one task of a recovery chain."""

    __slots__ = (
        "kind",
        "payload",
        "clear_before",
        "clear_after",
        "retries",
        "priority",
        "timeout",
        "depend",
        "recovery",
        "retry_delay",
    )

    def __init__(
        self,
        kind: str,
        payload: bytes,
        clear_before: bool = False,
        clear_after: bool = False,
        retries: int = 0,
        priority: int = 0,
        timeout: float | None = None,
        depend: bytes | None = None,
        recovery: TaskSpec | None = None,
        retry_delay: float | None = None,
    ) -> None:
        self.kind = kind
        self.payload = payload
        self.clear_before = clear_before
        self.clear_after = clear_after
        self.retries = retries
        self.priority = priority
        self.timeout = timeout
        self.depend = depend
        self.recovery = recovery
        #: Seconds before the first retry; None: the controller's default.
        self.retry_delay = retry_delay

    @classmethod
    def from_envelope(cls, envelope: object) -> TaskSpec:
        """Check and decode a task envelope (`wire.TaskEnvelope.parse`):
        `BadRequest` naming the bad field if malformed."""
        return cls._from_parsed(wire.TaskEnvelope.parse(envelope))

    @classmethod
    def _from_parsed(cls, envelope: wire.TaskEnvelope) -> TaskSpec:
        options = envelope.options
        recovery = envelope.recovery
        return cls(
            envelope.kind,
            envelope.payload,
            options.clear_before,
            options.clear_after,
            options.retries,
            options.priority,
            options.timeout,
            envelope.depend,
            None if recovery is None else cls._from_parsed(recovery),
            options.retry_delay,
        )

    def command_args(self) -> tuple:
        """The plain `wire.TaskArgs` of this spec's ``task`` command."""
        return wire.TaskArgs(
            self.kind, self.payload, self.clear_before, self.clear_after, self.timeout
        ).plain()

    def finished(self) -> TaskSpec:
        """What a finished task still needs of its spec: only its kind.

        The payload (pushed data, code, function) and the rest of the chain
        are dropped, so finished tasks cost the controller their results
        only; the journal keeps the envelope for as long as retention says.
        """
        return _FINISHED_SPECS[self.kind]

    def chain(self):
        """This spec and its recovery specs, in order."""
        spec: TaskSpec | None = self
        while spec is not None:
            yield spec
            spec = spec.recovery


_FINISHED_SPECS = {kind: TaskSpec(kind, b"") for kind in (EXEC, CALL)}


class TaskRecord:
    """One submitted task as the controller tracks it."""

    __slots__ = (
        "taskid",
        "spec",
        "state",
        "retries_left",
        "attempts",
        "engine_id",
        "seq",
        "submitted",
        "started",
        "completed",
        "ok",
        "data",
        "group",
        "link",
        "avoid_engine",
        "output",
    )

    def __init__(self, taskid: int, spec: TaskSpec, submitted: float) -> None:
        self.taskid = taskid
        self.spec = spec
        #: Which task of the recovery chain `spec` is (0: the one submitted).
        self.link = 0
        self.state = TaskState.QUEUED
        self.retries_left = spec.retries
        self.attempts = 0
        self.engine_id: int | None = None
        self.seq: int | None = None
        self.submitted = submitted
        self.started: float | None = None
        self.completed: float | None = None
        #: The outcome, once final: ok -> pickled result, else wire error.
        self.ok = False
        self.data: object = None
        #: The scheduler's depend group while queued.
        self.group = None
        #: The engine this task's last attempt failed on, while it sits out
        #: the failure penalty for this task (None: no engine avoided).
        self.avoid_engine: int | None = None
        #: ``(stdout, stderr)`` of the last attempt an engine answered, or None.
        self.output: tuple[str, str] | None = None

    @property
    def is_queued(self) -> bool:
        return self.state is TaskState.QUEUED

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES

    def _move(self, new: TaskState) -> None:
        if new not in _ALLOWED[self.state]:
            raise InvalidTransition(
                "task %d cannot go from %s to %s" % (self.taskid, self.state, new)
            )
        self.state = new

    def start(self, engine_id: int, seq: int) -> None:
        """queued -> running on `engine_id` as command `seq`."""
        self._move(TaskState.RUNNING)
        self.attempts += 1
        self.engine_id = engine_id
        self.seq = seq

    def succeed(self, data: bytes, started: float | None, completed: float) -> None:
        """running -> succeeded."""
        self._move(TaskState.SUCCEEDED)
        self.ok, self.data = True, data
        self.started, self.completed = started, completed
        self.spec = self.spec.finished()

    def fail_attempt(
        self, error: tuple, started: float | None, completed: float, wait: bool = False
    ) -> bool:
        """A running attempt failed.  Returns True when the task will run again.

        Retries are spent first; then the recovery task takes over the id
        with its own retries; after that the task fails with `error`.  With
        `wait`, a retry (not a recovery task) goes to ``waiting_retry``
        rather than ``queued``; `retry_now` queues it once its delay passed.
        """
        if self.retries_left > 0:
            self.retries_left -= 1
            if wait:
                self._move(TaskState.WAITING_RETRY)
                self.engine_id = None
                self.seq = None
            else:
                self._requeue()
            return True
        if self.spec.recovery is not None:
            self._next_link()
            self._requeue()
            return True
        self.fail(error, started, completed)
        return False

    @property
    def retries_spent(self) -> int:
        """Retries of the current link's spec used so far."""
        return self.spec.retries - self.retries_left

    def retry_now(self) -> None:
        """waiting_retry -> queued: the retry's delay has passed."""
        self._requeue()

    def _next_link(self) -> None:
        self.spec = self.spec.recovery
        self.link += 1
        self.retries_left = self.spec.retries

    def recover_or_fail(self, error: tuple, now: float) -> bool:
        """A queued task can never run as it is (its depend is unmet).

        Retries cannot help, so its recovery task takes over if it has one
        (True: still queued, under the new spec); otherwise it fails.
        """
        if self.state is TaskState.QUEUED and self.spec.recovery is not None:
            self._next_link()
            return True
        self.fail(error, None, now)
        return False

    def fail(self, error: tuple, started: float | None, completed: float) -> None:
        """queued or running -> failed, for good."""
        self._move(TaskState.FAILED)
        self.ok, self.data = False, error
        self.started, self.completed = started, completed
        self.spec = self.spec.finished()

    def abort(self, error: tuple, now: float) -> None:
        """queued, running or waiting_retry -> aborted."""
        self._move(TaskState.ABORTED)
        self.ok, self.data = False, error
        self.completed = now
        self.spec = self.spec.finished()

    def _requeue(self) -> None:
        self._move(TaskState.QUEUED)
        self.engine_id = None
        self.seq = None

    @classmethod
    def restore(cls, stored, spec: TaskSpec) -> TaskRecord:
        """A record as the journal kept it; one that was not final is
        queued (one that waited to retry, too: it simply runs again)."""
        record = cls(stored.taskid, spec, stored.submitted)
        for _ in range(stored.link):
            record.spec = record.spec.recovery
        record.link = stored.link
        record.retries_left = stored.retries_left
        record.attempts = stored.attempts
        if stored.state != "queued":
            record.state = TaskState[stored.state.upper()]
            record.engine_id = stored.engine_id
            record.started, record.completed = stored.started, stored.completed
            record.ok = bool(stored.ok)
            record.data = stored.data
            record.output = stored.output
            record.spec = record.spec.finished()
        return record

    def result_envelope(self, data: object = None) -> tuple:
        """The plain `wire.ResultEnvelope` of this task (with `data` as its
        outcome if given: a result read back from its file)."""
        stdout, stderr = self.output if self.output is not None else (None, None)
        return wire.ResultEnvelope(
            self.taskid,
            self.spec.kind,
            self.ok,
            self.data if data is None else data,
            self.engine_id,
            self.submitted,
            self.started,
            self.completed,
            self.attempts,
            stdout,
            stderr,
        ).plain()
