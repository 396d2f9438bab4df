"""What a user submits and gets back: `Task`, `MapTask`, `TaskResult`.

A task is encoded once, on the client, into a plain *envelope*
(`taskfarm.wire.TaskEnvelope`)::

    (kind, payload, options, depend, recovery)

``payload`` is opaque bytes only an engine opens; ``options`` is a
`taskfarm.wire.TaskOptions` ``(clear_before, clear_after, retries,
priority, timeout)``; ``depend`` is the cloudpickled predicate or None;
``recovery`` is the recovery task's envelope or None.  The controller reads
options and depend, never payload.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

import attrs

from taskfarm import serialization, wire
from taskfarm.errors import BadRequest, RecoveryLoopError, TaskfarmError, from_wire

# The envelope's kinds and limits are the wire's; named here for users.
from taskfarm.wire import (
    CALL,
    EXEC,
    MAX_RECOVERY_CHAIN,
    MAX_RETRIES,
    MAX_RETRY_DELAY,
    MAX_TIMEOUT,
)

__all__ = [
    "CALL", "EXEC", "MAX_RECOVERY_CHAIN", "MAX_RETRIES", "MAX_RETRY_DELAY", "MAX_TIMEOUT",
    "BaseTask", "Task", "MapTask", "TaskResult", "ResultNS", "format_time",
    "result_from_envelope",
]

_TIME_FORMAT = "%Y/%m/%d %H:%M:%S"


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError("%s must be True or False, not %r" % (name, value))
    return value


def _check_int(
    name: str, value: object, minimum: int | None = None, maximum: int | None = None
) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("%s must be an int, not %s" % (name, type(value).__name__))
    if minimum is not None and value < minimum:
        raise ValueError("%s must be >= %d, not %d" % (name, minimum, value))
    if maximum is not None and value > maximum:
        raise ValueError("%s must be <= %d, not %d" % (name, maximum, value))
    return value


# -- attrs validators and converters of the options ---------------------------------
# attrs runs them in the constructor and on every assignment (`on_setattr`),
# so an option is checked at once either way, and a refused assignment keeps
# the old value.


def _is_bool(task, attribute, value) -> None:
    _check_bool(attribute.name, value)


def _is_retries(task, attribute, value) -> None:
    _check_int(attribute.name, value, minimum=0, maximum=MAX_RETRIES)


def _is_int(task, attribute, value) -> None:
    _check_int(attribute.name, value)


def _is_task_or_none(task, attribute, value) -> None:
    if value is not None and not isinstance(value, BaseTask):
        raise TypeError(
            "%s must be a Task or MapTask, not %s" % (attribute.name, type(value).__name__)
        )


def _is_predicate_or_none(task, attribute, value) -> None:
    if value is not None and not callable(value):
        raise TypeError(
            "%s must be a function of one argument (the engine's "
            "properties), not %s" % (attribute.name, type(value).__name__)
        )


def _timeout(value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("timeout must be a number of seconds or None, not %r" % (value,))
    # Written so that NaN, infinity and ints too big for a float fail.
    if not 0 < value <= MAX_TIMEOUT:
        raise ValueError(
            "timeout must be a positive, finite number of seconds, not %r" % (value,)
        )
    return float(value)


def _retry_delay(value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("retry_delay must be a number of seconds or None, not %r" % (value,))
    if not 0 <= value <= MAX_RETRY_DELAY:  # NaN fails too
        raise ValueError(
            "retry_delay must be between 0 and %g seconds (MAX_RETRY_DELAY), not %r"
            % (MAX_RETRY_DELAY, value)
        )
    return float(value)


def _options_last(cls, fields: list) -> list:
    """attrs puts inherited fields first; the options of `BaseTask` go after
    a subclass's own fields, so ``Task(expression, pull, push, clear_before,
    ...)`` keeps its order.  A `MapTask` takes them by keyword only."""
    own = [f for f in fields if not f.inherited]
    options = [f for f in fields if f.inherited]
    if getattr(cls, "_keyword_options", False):
        options = [f.evolve(kw_only=True) for f in options]
    return own + options


@attrs.define(eq=False, repr=False, slots=False)
class BaseTask:
    """Options shared by every kind of task.

    All of them may be given to the constructor or assigned afterwards; each
    assignment is checked at once.
    """

    #: Reset the engine's namespace before the task runs.
    clear_before: bool = attrs.field(default=False, validator=_is_bool)
    #: Reset the engine's namespace after the task ran.
    clear_after: bool = attrs.field(default=False, validator=_is_bool)
    #: How many times a failed attempt is run again.
    retries: int = attrs.field(default=0, validator=_is_retries)
    #: The task run, under the same id, once retries are spent.
    recovery_task: BaseTask | None = attrs.field(default=None, validator=_is_task_or_none)
    #: A predicate of an engine's properties: may the task run there?
    depend: Callable[[dict], bool] | None = attrs.field(
        default=None, validator=_is_predicate_or_none
    )
    #: Higher runs first under the priority scheduler; FIFO ignores it.
    priority: int = attrs.field(default=0, validator=_is_int)
    #: Seconds one attempt may run before it fails with `TaskTimeout`.
    timeout: float | None = attrs.field(default=None, converter=_timeout)
    #: Seconds before the first retry (None: the controller's
    #: ``--retry-delay``); each further retry waits twice as long, up to
    #: `MAX_RETRY_DELAY`.
    retry_delay: float | None = attrs.field(default=None, converter=_retry_delay)

    # -- encoding ------------------------------------------------------------

    def _payload(self) -> tuple[str, bytes]:
        raise NotImplementedError

    def to_envelope(self) -> tuple:
        """Encode this task and its recovery chain for the wire: the plain
        form of a `taskfarm.wire.TaskEnvelope`.

        Raises `RecoveryLoopError` when the chain comes back to a task in it,
        `BadRequest` when it is longer than `MAX_RECOVERY_CHAIN` tasks, and
        `SerializationError` when a value cannot be pickled.
        """
        chain: list[BaseTask] = []
        seen: set[int] = set()
        task: BaseTask | None = self
        while task is not None:
            if id(task) in seen:
                raise RecoveryLoopError(
                    "the recovery_task chain of %r loops back to %r after %d "
                    "tasks; a chain must end" % (self, task, len(chain))
                )
            seen.add(id(task))
            chain.append(task)
            if len(chain) > MAX_RECOVERY_CHAIN:
                raise BadRequest(
                    "the recovery_task chain of %r is longer than %d tasks "
                    "(MAX_RECOVERY_CHAIN)" % (self, MAX_RECOVERY_CHAIN)
                )
            task = task.recovery_task
        envelope = None
        for task in reversed(chain):
            kind, payload = task._payload()
            depend = (
                None
                if task.depend is None
                else serialization.dumps(task.depend, "the depend function")
            )
            options = wire.TaskOptions(
                task.clear_before,
                task.clear_after,
                task.retries,
                task.priority,
                task.timeout,
                task.retry_delay,
            )
            envelope = wire.TaskEnvelope(kind, payload, options, depend, envelope)
        return envelope.plain()


def _is_code(task, attribute, value) -> None:
    if not isinstance(value, str):
        raise TypeError(
            "%s must be a str of Python code, not %s" % (attribute.name, type(value).__name__)
        )


def _pull_names(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        names: tuple = ()
    elif isinstance(value, str):
        names = (value,)
    elif isinstance(value, Sequence):
        names = tuple(value)
    else:
        raise TypeError(
            "pull must be a name or a sequence of names, not %s" % type(value).__name__
        )
    for name in names:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError("pull names must be identifiers, not %r" % (name,))
    return names


def _push_values(value: Mapping[str, object] | None) -> dict[str, object]:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise TypeError("push must be a dict of names to values, not %s" % type(value).__name__)
    for name in value:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError("push keys must be identifiers, not %r" % (name,))
    return dict(value)


@attrs.define(eq=False, repr=False, slots=False, field_transformer=_options_last)
class Task(BaseTask):
    """A code string run on an engine, with values pushed before and pulled after.

    `pull` is a name or a sequence of names; `push` a dict of names to values.
    """

    #: The Python code the task executes.
    expression: str = attrs.field(validator=_is_code)
    #: The names whose values come back in the result.
    pull: tuple[str, ...] = attrs.field(default=None, converter=_pull_names)
    #: Names and values put in the engine's namespace before the code runs.
    push: dict[str, object] = attrs.field(default=None, converter=_push_values)

    def _payload(self) -> tuple[str, bytes]:
        push = serialization.dumps_value(self.push, "the push dict") if self.push else None
        # Big pushed buffers stay out of band, up to the engine.
        return EXEC, serialization.pack_frames((self.expression, self.pull, push))

    def __repr__(self) -> str:
        return "Task(%r, pull=%r)" % (self.expression, list(self.pull))


def _is_function(task, attribute, value) -> None:
    if not callable(value):
        raise TypeError("%s must be callable, not %s" % (attribute.name, type(value).__name__))


def _forget_function_blob(task, attribute, value):
    # A new function makes the shared pickled copy (`map_tasks`) stale.
    task._function_blob = None
    return value


def _call_args(value: Sequence) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise TypeError("args must be a list or tuple, not %s" % type(value).__name__)
    return tuple(value)


def _call_kwargs(value: Mapping[str, object] | None) -> dict[str, object]:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise TypeError("kwargs must be a dict, not %s" % type(value).__name__)
    for name in value:
        if not isinstance(name, str):
            # The call on the engine would fail with this anyway.
            raise TypeError("kwargs keys must be str, not %r" % (name,))
    return dict(value)


@attrs.define(eq=False, repr=False, slots=False, field_transformer=_options_last)
class MapTask(BaseTask):
    """A function called on an engine as ``function(*args, **kwargs)``.

    Its result is the function's return value.  The function travels with
    cloudpickle, closures and default arguments included.  The options of
    `BaseTask` are keyword arguments.
    """

    _keyword_options = True

    #: The function called on the engine.
    function: Callable = attrs.field(
        validator=_is_function,
        on_setattr=[attrs.setters.validate, _forget_function_blob],
    )
    #: The positional arguments of the call.
    args: tuple = attrs.field(default=(), converter=_call_args)
    #: The keyword arguments of the call.
    kwargs: dict[str, object] = attrs.field(default=None, converter=_call_kwargs)
    #: `function` pickled once for many tasks (`map_tasks`), or None.
    _function_blob: bytes | None = attrs.field(init=False, default=None)

    def _payload(self) -> tuple[str, bytes]:
        function = self._function_blob or serialization.dumps(
            self.function, "function %r" % (getattr(self.function, "__name__", "?"),)
        )
        args = serialization.dumps_value((self.args, self.kwargs), "the arguments")
        return CALL, serialization.pack_frames((function, args))

    def __repr__(self) -> str:
        return "MapTask(%s, %r)" % (getattr(self.function, "__name__", "?"), self.args)


# -- results -------------------------------------------------------------------


class ResultNS:
    """Read-only attribute access to a result dict: ``tr.ns.a``."""

    __slots__ = ("_values", "_failure")

    def __init__(self, values: Mapping[str, object], failure: BaseException | None):
        object.__setattr__(self, "_values", MappingProxyType(dict(values)))
        object.__setattr__(self, "_failure", failure)

    def __getattr__(self, name: str) -> object:
        if self._failure is not None:
            raise self._failure
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError("the task pulled no name %r" % (name,)) from None

    def __getitem__(self, name: str) -> object:
        if self._failure is not None:
            raise self._failure
        return self._values[name]

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("a task's results are read-only")

    def __dir__(self):
        return list(self._values)

    def __repr__(self) -> str:
        return "ResultNS(%r)" % (dict(self._values),)


def format_time(timestamp: float | None) -> str | None:
    """A wall-clock time as ``2008/03/08 03:41:42``."""
    if timestamp is None:
        return None
    return time.strftime(_TIME_FORMAT, time.localtime(timestamp))


class TaskResult:
    """The outcome of one task, with when and where it ran.

    `results` is the dict of pulled values (empty on failure); `failure` the
    typed error or None; `submitted` and `completed` are formatted times;
    `duration` is the seconds the last attempt ran on its engine.
    """

    def __init__(
        self,
        taskid: int,
        results: dict,
        failure: BaseException | None,
        engineid: int | None,
        submitted_at: float,
        started_at: float | None,
        completed_at: float | None,
        value: object = None,
        attempts: int | None = None,
        stdout: str = "",
        stderr: str = "",
    ) -> None:
        self.taskid = taskid
        self.results = results
        self.failure = failure
        self.engineid = engineid
        self.submitted_at = submitted_at
        self.started_at = started_at
        self.completed_at = completed_at
        #: A MapTask's return value (None for code-string tasks).
        self.value = value
        #: How many times the task (its recovery tasks included) was sent
        #: to an engine: 1 + the retries it used (0 if it never ran).
        self.attempts = attempts
        #: What the task's last attempt wrote to stdout and to stderr on its
        #: engine (print included), each kept up to the engine's
        #: ``--max-task-output`` bytes and ending ``[... N bytes cut]`` when
        #: cut; empty when it wrote nothing or never ran.
        self.stdout = stdout
        self.stderr = stderr
        self._ns = ResultNS(results, failure)

    @property
    def ns(self) -> ResultNS:
        """The pulled values as attributes (``tr.ns.a``); for a failed task,
        reading it raises the failure, as the original."""
        if self.failure is not None:
            raise self.failure
        return self._ns

    @property
    def submitted(self) -> str | None:
        """When the controller accepted the task."""
        return format_time(self.submitted_at)

    @property
    def completed(self) -> str | None:
        """When the task finished."""
        return format_time(self.completed_at)

    @property
    def duration(self) -> float:
        """Seconds the last attempt ran on its engine."""
        if self.started_at is None or self.completed_at is None:
            return 0.0
        return max(0.0, self.completed_at - self.started_at)

    @property
    def keys(self) -> list[str]:
        """The pulled names."""
        return list(self.results)

    def __getitem__(self, key: str) -> object:
        return self._ns[key]

    def raise_exception(self) -> None:
        """Raise the task's failure, if it has one."""
        if self.failure is not None:
            raise self.failure

    def __repr__(self) -> str:
        if self.failure is not None:
            return "TaskResult[ID:%s]:%s(%s)" % (
                self.taskid,
                type(self.failure).__name__,
                self.failure,
            )
        return "TaskResult[ID:%s]:%r" % (self.taskid, self.results)


def result_from_envelope(envelope: tuple) -> TaskResult:
    """Build a `TaskResult` from the controller's result envelope (a
    `taskfarm.wire.ResultEnvelope`, or its plain form); `BadRequest` if it
    is malformed.
    """
    envelope = wire.ResultEnvelope.parse(envelope)
    results: dict = {}
    value = None
    failure = None
    if envelope.ok:
        outcome = serialization.loads(envelope.data, "the result of task %d" % envelope.taskid)
        if envelope.kind == CALL:
            value = outcome
        else:
            results = outcome
    else:
        failure = from_wire(envelope.data, envelope.taskid)
        if not isinstance(failure, TaskfarmError):
            failure = TaskfarmError(str(failure))
    return TaskResult(
        envelope.taskid,
        results,
        failure,
        envelope.engine_id,
        envelope.submitted,
        envelope.started,
        envelope.completed,
        value,
        envelope.attempts,
        envelope.stdout or "",
        envelope.stderr or "",
    )
