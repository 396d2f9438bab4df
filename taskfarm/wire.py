"""Every message that crosses a process boundary, as a type.

Client, controller and engine speak in the messages defined here, and each
message is checked in one place: its type's `parse`, which builds the type
from the plain data a peer sent and raises `BadRequest` naming the message
and the bad field (``task options: retries must be an int in 0..N, got
'x'``).  The types are NamedTuples, so code reads fields by name, and a
parsed message still unpacks like the tuple it came from.

**They travel as plain data.**  Envelopes are read by the data-only
unpickler (`taskfarm.serialization.unpack`), which refuses every class, a
NamedTuple's too.  So a sender builds the type and sends ``message.plain()``
(tuples, lists, dicts, bytes, numbers), and a receiver calls
``Type.parse(value)``.  Parts that a receiver only passes on (a task's
failure, a command's arguments forwarded to an engine) are checked by
their own `parse` and kept in their plain form.

**Versions.**  `WIRE_VERSION` is the version of the wire this code speaks;
every `hello` answer carries it, and a client or engine refuses a
controller of another version.  Each message says which version it was
written in, so that one from a newer peer is refused as such: version 1 of
a message is exactly its tuple of fields (what taskfarm has always sent,
and what the journal holds); a later version appends fields, the first of
them its version number::

    (field_1, ..., field_n)                        version 1
    (field_1, ..., field_n, version, more, ...)    version 2 and later

A reader finds the version at index n whatever follows it: n fields are
version 1; a version above `WIRE_VERSION` raises `ProtocolVersionError`
(a newer peer, not a malformed message); anything else must be a version
this code knows with exactly its fields, or it is a `BadRequest`.  Lists
(task ids, batches) are not versioned themselves: they change only with
the remote interface that carries them, whose remote name is versioned.
"""

from __future__ import annotations

import math
import reprlib
import sys
from typing import Any, NamedTuple

from taskfarm.errors import BadRequest, ProtocolVersionError
from taskfarm.serialization import as_frames

#: The wire version this code speaks; a peer with another one is refused at
#: `hello`.  2: a blocking `wait` or `results` may answer `NOT_YET`.
#: 3: task options may carry a `retry_delay` (`TaskOptions` version 3), and
#: a result its number of attempts (`ResultEnvelope` version 3).
#: 4: a MultiEngine call may carry a `timeout` (`EngineCall` version 4), and
#: so may the engine command it becomes (`Command` version 4); the control
#: operations ``interrupt`` and ``abort`` (`CONTROL_OPERATIONS`).
#: The Task interface answers ``why``; an engine's task reply carries
#: the task's stdout and stderr (`Reply` version 4), and so does a result
#: (`ResultEnvelope` version 4).
#: Also in 4: a value field (a task's payload, a result, pushed or pulled values, a
#: reply's data) may be *frames*, a list of byte strings with big buffers out
#: of band (`serialization.dumps_value`), and a message may travel as a list
#: of byte strings (`serialization.pack_message`); no message's fields changed.
#: 5: the controller's `Hello` names its bulk-data channel (``bulk``,
#: HOST:PORT or None), and the Task interface answers ``results_bulk``
#: (`BulkResults`): big results' frames travel over that channel
#: (`taskfarm.bulk`) and the answer holds their capability and sizes.
#: An engine's session answers ``upload`` (a capability for a big reply's
#: frames) and a reply may name its uploaded frames (`Reply` version 5).
WIRE_VERSION = 5

#: What a blocking `wait` or `results` answers when its tasks are still
#: unfinished after the controller's bound: the client asks again.  Each
#: call ends within the bound, so a client that left holds no waiter for
#: longer (the controller cannot tell a silent client from a gone one).
NOT_YET = "not-yet"

#: Task kinds: a code string (`Task`) or a function call (`MapTask`).
EXEC = "exec"
CALL = "call"

#: The most retries a task may ask for (the journal stores it as a 64-bit int).
MAX_RETRIES = 2**63 - 1

#: The longest timeout: any larger number cannot be a float number of seconds.
MAX_TIMEOUT = sys.float_info.max

#: The longest pause before a retry, in seconds: a task's `retry_delay` may
#: not ask for more, and the back-off that doubles it per retry stops here.
MAX_RETRY_DELAY = 30.0

#: The most tasks in one recovery chain (the task itself included).  The
#: envelope nests one level per task, and pickle recurses per level, so a
#: chain much longer (about 1,000) cannot be sent at all; the controller
#: refuses longer chains too.
MAX_RECOVERY_CHAIN = 100

#: MultiEngine ``properties`` actions.
PROPERTY_ACTIONS = frozenset({"get", "set", "has", "del", "clear"})

_SEQUENCES = (tuple, list)

_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxstring = 40
_repr.maxother = 40


def _show(value: object) -> str:
    """A short description of a bad value, whatever its size or depth."""
    if isinstance(value, (bytes, bytearray)) and len(value) > 40:
        return "%s of %d bytes" % (type(value).__name__, len(value))
    try:
        return _repr.repr(value)
    except Exception:  # RecursionError, or a repr that fails
        return "a %s" % type(value).__name__


def _bad(what: str, field: str, wanted: str, value: object) -> BadRequest:
    return BadRequest("%s: %s must be %s, got %s" % (what, field, wanted, _show(value)))


def _fields(cls, value, what: str, sequences=(tuple,)) -> tuple:
    """The version-1 fields of `value`, a message of type `cls` (see the
    module docstring for the versions)."""
    count = len(cls._fields)
    if type(value) is tuple and len(value) == count:
        return value  # the common case, first
    if isinstance(value, cls):
        return value
    if not isinstance(value, sequences):
        raise BadRequest(
            "%s must be a tuple (%s), got %s" % (what, ", ".join(cls._fields), _show(value))
        )
    if len(value) > count:
        version = value[count]
        if _is_int(version) and version > WIRE_VERSION:
            raise ProtocolVersionError(
                "%s of wire version %d came from a newer peer; this side speaks "
                "version %d (upgrade it)" % (what, version, WIRE_VERSION)
            )
        if _is_int(version) and version == 1 and len(value) == count + 1:
            return tuple(value[:count])
    elif len(value) == count:
        return tuple(value)
    raise BadRequest(
        "%s must have %d fields (%s), got %d"
        % (what, count, ", ".join(cls._fields), len(value))
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_timeout(what: str, timeout: object) -> None:
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not 0 < timeout <= MAX_TIMEOUT  # NaN and infinity fail too
    ):
        raise _bad(what, "timeout", "None or a positive, finite number of seconds", timeout)


def _check_kind(what: str, kind: object) -> None:
    if kind != EXEC and kind != CALL:
        raise _bad(what, "kind", "%r or %r" % (EXEC, CALL), kind)


def _plain(self) -> tuple:
    """The message as plain data, ready for `serialization.pack`."""
    return tuple(self)


def _value(what: str, field: str, value: object, wanted: str = "bytes or frames"):
    """A value field: one pickled blob (`bytes`), or frames (a non-empty
    sequence of byte strings, kept as `PickleBuffer` so that they travel on
    out of band, unopened)."""
    if isinstance(value, bytes):
        return value
    frames = as_frames(value)
    if frames is None:
        raise _bad(what, field, wanted, value)
    return frames


def parse_list(value: object, what: str) -> list:
    """`value` as a list (a batch of messages); `BadRequest` otherwise."""
    if not isinstance(value, list):
        raise BadRequest("%s must be a list, got %s" % (what, _show(value)))
    return value


# -- tasks ---------------------------------------------------------------------------


class TaskOptions(NamedTuple):
    """What the controller reads of a task besides its kind.

    Version 1 is the five fields up to `timeout` (what the journal of an
    older controller holds, and what a task without a `retry_delay` still
    sends); version 3 appends ``3, retry_delay``.
    """

    clear_before: bool = False
    clear_after: bool = False
    retries: int = 0
    priority: int = 0
    timeout: float | None = None
    #: Seconds before the first retry (None: the controller's default);
    #: doubled for each further retry, up to `MAX_RETRY_DELAY`.
    retry_delay: float | None = None

    @classmethod
    def parse(cls, value: object, what: str = "task options") -> TaskOptions:
        retry_delay = None
        if type(value) is tuple and len(value) == 5:
            fields = value
        elif (
            isinstance(value, _SEQUENCES)
            and len(value) == 7
            and _is_int(value[5])
            and value[5] == 3
        ):
            fields = tuple(value[:5])
            retry_delay = value[6]
            if retry_delay is not None and (
                not _is_number(retry_delay) or not 0 <= retry_delay <= MAX_RETRY_DELAY
            ):
                raise _bad(
                    what, "retry_delay",
                    "None or a number of seconds in 0..%g (MAX_RETRY_DELAY)" % MAX_RETRY_DELAY,
                    retry_delay,
                )
        else:
            fields = _options_fields(cls, value, what)
        clear_before, clear_after, retries, priority, timeout = fields
        if not isinstance(clear_before, bool):
            raise _bad(what, "clear_before", "True or False", clear_before)
        if not isinstance(clear_after, bool):
            raise _bad(what, "clear_after", "True or False", clear_after)
        # Inline checks: this runs for every task submitted.
        if (
            not isinstance(retries, int)
            or isinstance(retries, bool)
            or not 0 <= retries <= MAX_RETRIES
        ):
            raise _bad(what, "retries", "an int in 0..%d (MAX_RETRIES)" % MAX_RETRIES, retries)
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise _bad(what, "priority", "an int", priority)
        if timeout is not None:
            _check_timeout(what, timeout)
        return tuple.__new__(cls, tuple(fields) + (retry_delay,))

    def plain(self) -> tuple:
        """Version 1 (five fields) without a `retry_delay`, else version 3."""
        if self.retry_delay is None:
            return tuple(self[:5])
        return tuple(self[:5]) + (3, self.retry_delay)


def _options_fields(cls, value: object, what: str) -> tuple:
    """The five version-1 fields of task options (`_fields` counts the
    NamedTuple's six)."""
    if isinstance(value, cls):
        return tuple(value[:5])

    class _V1:
        _fields = cls._fields[:5]

    return _fields(_V1, value, what, _SEQUENCES)


class TaskEnvelope(NamedTuple):
    """One task as a client submits it and the journal keeps it.

    `payload` is the user bytes only an engine opens; `depend` the pickled
    predicate (opened only by the controller's evaluator processes) or
    None; `recovery` the recovery task's envelope or None.
    """

    kind: str
    payload: bytes
    options: TaskOptions
    depend: bytes | None = None
    recovery: TaskEnvelope | None = None

    @classmethod
    def parse(cls, value: object, depth: int = 0) -> TaskEnvelope:
        if depth >= MAX_RECOVERY_CHAIN:
            raise BadRequest(
                "the recovery chain is longer than %d tasks (MAX_RECOVERY_CHAIN)"
                % MAX_RECOVERY_CHAIN
            )
        what = "task envelope" if depth == 0 else "recovery task %d" % depth
        fields = value if type(value) is tuple and len(value) == 5 else (
            _fields(cls, value, what, _SEQUENCES)
        )
        kind, payload, options, depend, recovery = fields
        if kind != EXEC and kind != CALL:
            raise _bad(what, "kind", "%r or %r" % (EXEC, CALL), kind)
        if type(payload) is not bytes:
            payload = _value(what, "payload", payload)
        options = TaskOptions.parse(options, what + " options")
        if depend is not None and not isinstance(depend, bytes):
            raise _bad(what, "depend", "pickled bytes or None", depend)
        if recovery is not None:
            recovery = cls.parse(recovery, depth + 1)
        return tuple.__new__(cls, (kind, payload, options, depend, recovery))

    def plain(self) -> tuple:
        recovery = None if self.recovery is None else self.recovery.plain()
        options = self.options
        if isinstance(options, TaskOptions):
            options = options.plain()
        return (self.kind, self.payload, tuple(options), self.depend, recovery)


class Submission(NamedTuple):
    """A client's ``submit``: a batch of task envelopes.

    `token` makes a resend harmless; `ids` are ids the client reserved, one
    per task, or None.  The envelopes stay plain here: the controller
    parses each (`TaskEnvelope.parse`) and journals it as it came.
    """

    token: str | None
    envelopes: list
    ids: list[int] | None = None

    @classmethod
    def parse(cls, value: object) -> Submission:
        what = "submission"
        if type(value) is tuple and len(value) == 2:
            value = value + (None,)  # sent before clients reserved ids
        token, envelopes, ids = _fields(cls, value, what)
        if token is not None and not isinstance(token, str):
            raise _bad(what, "token", "a str or None", token)
        if not isinstance(envelopes, list):
            raise _bad(what, "envelopes", "a list of task envelopes", envelopes)
        if ids is not None:
            if not isinstance(ids, list) or len(ids) != len(envelopes):
                raise _bad(what, "ids", "None or one reserved id per task", ids)
            for taskid in ids:
                if not _is_int(taskid):
                    raise _bad(what, "ids", "task ids (ints)", taskid)
            if len(set(ids)) != len(ids):
                raise _bad(what, "ids", "distinct (it names a task id twice)", ids)
        return tuple.__new__(cls, (token, envelopes, ids))

    plain = _plain


class TaskIds:
    """A list of task ids (``results``, ``wait``, ``clear``)."""

    @staticmethod
    def parse(value: object, allow_none: bool = False) -> list[int] | None:
        if value is None and allow_none:
            return None
        if not isinstance(value, (list, tuple)) or not all(map(_is_int, value)):
            raise BadRequest(
                "task ids must be a list of ints%s, got %s"
                % (" or None" if allow_none else "", _show(value))
            )
        return list(value)


class ResultEnvelope(NamedTuple):
    """A finished task as the controller answers ``results``.

    `data` is the pickled outcome when `ok`, else a `WireError`; the times
    are the controller's (`submitted`) and the engine's (the others).
    """

    taskid: int
    kind: str
    ok: bool
    data: Any
    engine_id: int | None
    submitted: float
    started: float | None
    completed: float | None
    #: How many times the task was sent to an engine (version 3; None
    #: from a controller that did not say).
    attempts: int | None = None
    #: What its last attempt wrote to stdout and stderr, as the engine kept
    #: it (version 4; None when nothing was captured).
    stdout: str | None = None
    stderr: str | None = None

    @classmethod
    def parse(cls, value: object) -> ResultEnvelope:
        what = "result envelope"
        attempts = None
        output = (None, None)
        if (
            isinstance(value, tuple)
            and len(value) in (10, 12)
            and _is_int(value[8])
            and value[8] == (3 if len(value) == 10 else 4)
        ):
            attempts = value[9]
            if not _is_int(attempts) or attempts < 0:
                raise _bad(what, "attempts", "an int >= 0", attempts)
            if len(value) == 12:
                output = tuple(value[10:12])
                for name, text in zip(("stdout", "stderr"), output, strict=True):
                    if text is not None and not isinstance(text, str):
                        raise _bad(what, name, "a str or None", text)
            fields = tuple(value[:8])
        elif isinstance(value, cls):
            fields = tuple(value[:8])
            attempts = value.attempts
            output = (value.stdout, value.stderr)
        else:
            fields = _fields(_ResultFieldsV1, value, what)
        taskid, kind, ok, data, engine_id, submitted, started, completed = fields
        if not _is_int(taskid):
            raise _bad(what, "taskid", "an int", taskid)
        _check_kind(what, kind)
        if not isinstance(ok, bool):
            raise _bad(what, "ok", "True or False", ok)
        if ok and type(data) is not bytes:
            data = _value(what, "data", data, "the pickled result (bytes or frames)")
        if not ok:
            WireError.parse(data)
        if engine_id is not None and not _is_int(engine_id):
            raise _bad(what, "engine_id", "an int or None", engine_id)
        if not _is_number(submitted):
            raise _bad(what, "submitted", "a time", submitted)
        for name, time in (("started", started), ("completed", completed)):
            if time is not None and not _is_number(time):
                raise _bad(what, name, "a time or None", time)
        fields = tuple(fields)
        if ok:
            fields = fields[:3] + (data,) + fields[4:]
        return tuple.__new__(cls, fields + (attempts,) + output)

    def plain(self) -> tuple:
        """Version 1 (eight fields) without `attempts`, version 3 with it,
        version 4 with output too."""
        if self.stdout is not None or self.stderr is not None:
            attempts = 0 if self.attempts is None else self.attempts
            return tuple(self[:8]) + (4, attempts, self.stdout, self.stderr)
        if self.attempts is None:
            return tuple(self[:8])
        return tuple(self[:8]) + (3, self.attempts)


class _ResultFieldsV1:
    """The version-1 fields of a `ResultEnvelope`, for `_fields`."""

    _fields = ResultEnvelope._fields[:8]


# -- errors and answers ----------------------------------------------------------------


class WireError(NamedTuple):
    """An exception as data (`taskfarm.errors.to_wire` / `from_wire`)."""

    name: str
    detail: Any

    @classmethod
    def parse(cls, value: object) -> WireError:
        name, detail = _fields(cls, value, "wire error")
        if not isinstance(name, str):
            raise _bad("wire error", "name", "an exception class name (str)", name)
        return tuple.__new__(cls, (name, detail))

    plain = _plain


class Answer(NamedTuple):
    """What every Task and MultiEngine method answers: a value or an error."""

    ok: bool
    value: Any

    @classmethod
    def parse(cls, value: object) -> Answer:
        ok, answer = _fields(cls, value, "answer")
        if not isinstance(ok, bool):
            raise _bad("answer", "ok", "True or False", ok)
        if not ok:
            answer = WireError.parse(answer)
        return tuple.__new__(cls, (ok, answer))

    def plain(self) -> tuple:
        return (self.ok, tuple(self.value) if not self.ok else self.value)


class ClusterSummary(NamedTuple):
    """What ``status`` answers: the cluster summary the dashboard shows.

    `queue` maps each task state's name (`queue_status`'s keys) to its
    count; the rates are over the controller's last few seconds; the
    totals count since it started."""

    engines: int
    queue: dict
    tasks_per_second: float
    failures_per_second: float
    succeeded_total: int
    failed_total: int
    aborted_total: int
    retried_total: int

    @classmethod
    def parse(cls, value: object) -> ClusterSummary:
        what = "cluster summary"
        fields = _fields(cls, value, what)
        engines, queue, tasks_rate, failures_rate = fields[:4]
        if not _is_int(engines) or engines < 0:
            raise _bad(what, "engines", "an int >= 0", engines)
        if not isinstance(queue, dict) or not all(
            isinstance(k, str) and _is_int(v) for k, v in queue.items()
        ):
            raise _bad(what, "queue", "a dict of state name to count", queue)
        for name, rate in (("tasks_per_second", tasks_rate), ("failures_per_second", failures_rate)):
            if not _is_number(rate):
                raise _bad(what, name, "a number", rate)
        for name, total in zip(cls._fields[4:], fields[4:], strict=True):
            if not _is_int(total) or total < 0:
                raise _bad(what, name, "an int >= 0", total)
        return tuple.__new__(cls, tuple(fields))

    plain = _plain


class Hello(NamedTuple):
    """What every ``hello`` answers: which interface this is, the wire
    version, the controller's message limit and (Task interface) its
    incarnation.  Travels as a dict."""

    interface: str
    version: int
    max_message_size: int
    incarnation: str | None = None
    #: HOST:PORT of the controller's bulk-data channel (version 5), or None.
    bulk: str | None = None

    @classmethod
    def parse(cls, value: object) -> Hello:
        what = "hello"
        if not isinstance(value, dict):
            raise BadRequest("%s must be a dict, got %s" % (what, _show(value)))
        version = value.get("version")
        if version != WIRE_VERSION:
            raise ProtocolVersionError(
                "the peer speaks wire version %r, this side version %d"
                % (version, WIRE_VERSION)
            )
        interface = value.get("interface")
        if not isinstance(interface, str):
            raise _bad(what, "interface", "an interface name", interface)
        limit = value.get("max_message_size")
        if not _is_int(limit) or limit < 1:
            raise _bad(what, "max_message_size", "a positive int", limit)
        incarnation = value.get("incarnation")
        if incarnation is not None and not isinstance(incarnation, str):
            raise _bad(what, "incarnation", "a str or None", incarnation)
        bulk = value.get("bulk")
        if bulk is not None and not _is_location(bulk):
            raise _bad(what, "bulk", "HOST:PORT or None", bulk)
        return tuple.__new__(cls, (interface, version, limit, incarnation, bulk))

    def plain(self) -> dict:
        return self._asdict()


def _is_location(value: object) -> bool:
    if not isinstance(value, str) or ":" not in value:
        return False
    host, port = value.rsplit(":", 1)
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


#: The length of a bulk-data capability (`taskfarm.bulk.channel`).
CAPABILITY_BYTES = 32


class BulkResults(NamedTuple):
    """What ``results_bulk`` answers (version 5): result envelopes whose big
    frames were moved to the bulk-data channel.

    `moved` lists ``(index, parts)``: the envelope at `index` has its data
    (left empty here) in the next `parts` of the transfer that
    `capability` gives, of `sizes` bytes each, in order.  No capability
    (and no sizes, nothing moved) when no result was big enough."""

    envelopes: list
    capability: bytes | None
    sizes: list
    moved: list

    @classmethod
    def parse(cls, value: object) -> BulkResults:
        what = "bulk results"
        envelopes, capability, sizes, moved = _fields(cls, value, what)
        if not isinstance(envelopes, list):
            raise _bad(what, "envelopes", "a list", envelopes)
        if not isinstance(sizes, list) or not all(_is_int(n) and n >= 0 for n in sizes):
            raise _bad(what, "sizes", "a list of byte counts", sizes)
        if not isinstance(moved, list) or not all(
            isinstance(m, tuple) and len(m) == 2 and _is_int(m[0]) and _is_int(m[1])
            and 0 <= m[0] < len(envelopes) and m[1] >= 1
            for m in moved
        ) or len({m[0] for m in moved}) != len(moved):
            raise _bad(what, "moved", "a list of distinct (envelope index, parts)", moved)
        if sum(m[1] for m in moved) != len(sizes):
            raise _bad(what, "moved", "as many parts as sizes", moved)
        if sizes:
            if not isinstance(capability, bytes) or len(capability) != CAPABILITY_BYTES:
                raise _bad(what, "capability", "%d bytes" % CAPABILITY_BYTES, capability)
        elif capability is not None:
            raise _bad(what, "capability", "None when nothing moved", capability)
        return tuple.__new__(cls, (envelopes, capability, sizes, moved))

    plain = _plain


# -- the command stream (controller to engine and back) ----------------------------------


class TaskArgs(NamedTuple):
    """The arguments of a ``task`` command."""

    kind: str
    payload: bytes
    clear_before: bool
    clear_after: bool
    timeout: float | None

    @classmethod
    def parse(cls, value: object, what: str = "task command") -> TaskArgs:
        kind, payload, clear_before, clear_after, timeout = _fields(cls, value, what)
        _check_kind(what, kind)
        payload = _value(what, "payload", payload)
        if not isinstance(clear_before, bool):
            raise _bad(what, "clear_before", "True or False", clear_before)
        if not isinstance(clear_after, bool):
            raise _bad(what, "clear_after", "True or False", clear_after)
        _check_timeout(what, timeout)
        return tuple.__new__(cls, (kind, payload, clear_before, clear_after, timeout))

    plain = _plain


def _one_field(cls, value, what: str, check, wanted: str):
    (field,) = _fields(cls, value, what)
    if not check(field):
        raise _bad(what, cls._fields[0], wanted, field)
    return tuple.__new__(cls, (field,))


class ExecuteArgs(NamedTuple):
    """``execute``: run a code string."""

    code: str

    @classmethod
    def parse(cls, value: object, what: str = "execute command") -> ExecuteArgs:
        return _one_field(cls, value, what, lambda v: isinstance(v, str), "a str of code")

    plain = _plain


class PushArgs(NamedTuple):
    """``push``: put the pickled ``{name: value}`` into the namespace."""

    values: bytes

    @classmethod
    def parse(cls, value: object, what: str = "push command") -> PushArgs:
        (values,) = _fields(cls, value, what)
        return tuple.__new__(cls, (_value(what, "values", values, "pickled bytes or frames"),))

    plain = _plain


class PullArgs(NamedTuple):
    """``pull``: the values of these names."""

    names: tuple

    @classmethod
    def parse(cls, value: object, what: str = "pull command") -> PullArgs:
        return _one_field(
            cls, value, what,
            lambda v: isinstance(v, _SEQUENCES) and all(isinstance(n, str) for n in v),
            "a tuple of names",
        )

    plain = _plain


class GetResultArgs(NamedTuple):
    """``get_result``: the result of execute number `number` (None: the last)."""

    number: int | None

    @classmethod
    def parse(cls, value: object, what: str = "get_result command") -> GetResultArgs:
        return _one_field(
            cls, value, what, lambda v: v is None or _is_int(v), "an execute number or None"
        )

    plain = _plain


class MapArgs(NamedTuple):
    """``map``: call a pickled function on each of a pickled chunk of arguments."""

    function: bytes
    chunk: bytes

    @classmethod
    def parse(cls, value: object, what: str = "map command") -> MapArgs:
        function, chunk = _fields(cls, value, what)
        if not isinstance(function, bytes):
            raise _bad(what, "function", "pickled bytes", function)
        chunk = _value(what, "chunk", chunk, "pickled bytes or frames")
        return tuple.__new__(cls, (function, chunk))

    plain = _plain


class NoArgs(NamedTuple):
    """``reset``, ``keys``, ``kill``: no arguments."""

    @classmethod
    def parse(cls, value: object, what: str = "command") -> NoArgs:
        _fields(cls, value, what)
        return tuple.__new__(cls, ())

    def plain(self) -> tuple:
        return ()


#: Each command op an engine runs, and the type of its arguments.
COMMAND_ARGS = {
    "task": TaskArgs,
    "execute": ExecuteArgs,
    "push": PushArgs,
    "pull": PullArgs,
    "reset": NoArgs,
    "keys": NoArgs,
    "get_result": GetResultArgs,
    "map": MapArgs,
    "kill": NoArgs,
}

#: The ops a MultiEngine client may ask for (``task`` is the controller's own).
CLIENT_OPERATIONS = frozenset(COMMAND_ARGS) - {"task"}

#: MultiEngine operations the controller does itself, never queued in an
#: engine's stream: ``interrupt`` stops the MultiEngine command running on
#: each target, ``abort`` also drops the targets' queued MultiEngine commands.
CONTROL_OPERATIONS = frozenset({"interrupt", "abort"})

#: Engine ops the engine does at once, on arrival, ahead of its queue.
IMMEDIATE_OPERATIONS = frozenset({"kill"})


def _parse_args(op: str, args: object, what: str):
    return COMMAND_ARGS[op].parse(args, "%s %s" % (op, what))


class Command(NamedTuple):
    """One command of an engine's stream, in the order the engine runs them.

    Version 1 is ``(seq, op, args)``; version 4 appends ``4, timeout``: the
    seconds the command may run before the engine interrupts it (a
    MultiEngine call's `timeout`; a task carries its own in `TaskArgs`).
    """

    seq: int
    op: str
    args: tuple
    timeout: float | None = None

    @classmethod
    def parse(cls, value: object) -> Command:
        timeout = None
        if isinstance(value, _SEQUENCES) and len(value) == 5 and _is_int(value[3]) and value[3] == 4:
            timeout = value[4]
            value = tuple(value[:3])
            _check_timeout("command", timeout)
        seq, op, args = _fields(_CommandFieldsV1, value, "command")
        if not _is_int(seq):
            raise _bad("command", "seq", "an int", seq)
        if not isinstance(op, str) or op not in COMMAND_ARGS:
            raise _bad("command %d" % seq, "op", "one of %s" % sorted(COMMAND_ARGS), op)
        return tuple.__new__(cls, (seq, op, _parse_args(op, args, "command %d" % seq), timeout))

    def plain(self) -> tuple:
        """Version 1 without a `timeout`, else version 4."""
        if self.timeout is None:
            return (self.seq, self.op, tuple(self.args))
        return (self.seq, self.op, tuple(self.args), 4, self.timeout)


class _CommandFieldsV1:
    """The version-1 fields of a `Command`, for `_fields`."""

    _fields = ("seq", "op", "args")


class Reply(NamedTuple):
    """An engine's answer to command `seq`: `data` is the result bytes when
    `ok`, else a `WireError` (kept plain: it is stored and passed on)."""

    seq: int
    ok: bool
    data: Any
    started: float | None
    finished: float
    #: What the task wrote to stdout and stderr, bounded by the engine
    #: (version 4; None in a reply to any other command).
    stdout: str | None = None
    stderr: str | None = None
    #: The capability under which the engine uploaded this reply's frames
    #: over the bulk-data channel (version 5; `data` is then empty), or None.
    upload: bytes | None = None

    @classmethod
    def parse(cls, value: object) -> Reply:
        output = (None, None)
        upload = None
        if type(value) is tuple and len(value) == 8 and type(value[5]) is int and value[5] == 4:
            output = value[6:8]
            for name, text in zip(("stdout", "stderr"), output, strict=True):
                if not isinstance(text, str):
                    raise _bad("reply", name, "a str", text)
            value = value[:5]
        elif type(value) is tuple and len(value) == 9 and type(value[5]) is int and value[5] == 5:
            output, upload = value[6:8], value[8]
            for name, text in zip(("stdout", "stderr"), output, strict=True):
                if text is not None and not isinstance(text, str):
                    raise _bad("reply", name, "a str or None", text)
            if not (type(upload) is bytes and len(upload) == CAPABILITY_BYTES):
                raise _bad("reply", "upload", "a capability of %d bytes" % CAPABILITY_BYTES, upload)
            if value[1] is not True or value[2] != b"":
                raise _bad("reply", "upload", "an ok reply with empty data", upload)
            value = value[:5]
        elif isinstance(value, cls):
            output = (value.stdout, value.stderr)
            upload = value.upload
            value = tuple(value[:5])
        seq, ok, data, started, finished = fields = _fields(_ReplyFieldsV1, value, "reply")
        if type(seq) is not int:
            raise _bad("reply", "seq", "an int", seq)
        if type(ok) is not bool:
            raise _bad("reply", "ok", "True or False", ok)
        if ok:
            if type(data) is not bytes:
                data = _value("reply", "data", data, "the result (bytes or frames)")
                fields = (seq, ok, data, started, finished)
        elif not (type(data) is tuple and len(data) == 2 and isinstance(data[0], str)):
            raise _bad("reply", "data", "a wire error (name, detail)", data)
        if started is not None and not (type(started) is float and math.isfinite(started)):
            raise _bad("reply", "started", "None or a finite float time", started)
        if not (type(finished) is float and math.isfinite(finished)):
            raise _bad("reply", "finished", "a finite float time", finished)
        return tuple.__new__(cls, tuple(fields) + tuple(output) + (upload,))

    def plain(self) -> tuple:
        """Version 1 (five fields) without output, version 4 with it,
        version 5 when the frames were uploaded."""
        if self.upload is not None:
            return tuple(self[:5]) + (5, self.stdout, self.stderr, self.upload)
        if self.stdout is None and self.stderr is None:
            return tuple(self[:5])
        return tuple(self[:5]) + (4, self.stdout or "", self.stderr or "")


class _ReplyFieldsV1:
    """The version-1 fields of a `Reply`, for `_fields`."""

    _fields = Reply._fields[:5]


# -- the MultiEngine interface ----------------------------------------------------------


class EngineCall(NamedTuple):
    """An ``engine_call``: run `op` on each target, with `args`, or with
    ``per_target[engine_id]`` when given.  The arguments are checked by
    their op's type and kept plain: they travel on to the engines.

    Version 1 is the four fields up to `per_target`; version 4 appends
    ``4, timeout``: seconds each target's command may run before its engine
    interrupts it (that target then answers `WaitTimeout`).  A control
    operation (`CONTROL_OPERATIONS`) takes no arguments and no timeout: the
    controller does it itself, beside the command streams.
    """

    op: str
    targets: Any
    args: tuple
    per_target: dict | None = None
    timeout: float | None = None

    @classmethod
    def parse(cls, value: object) -> EngineCall:
        what = "engine call"
        timeout = None
        if isinstance(value, _SEQUENCES) and len(value) == 6 and _is_int(value[4]) and value[4] == 4:
            timeout = value[5]
            value = tuple(value[:4])
            _check_timeout(what, timeout)
        op, targets, args, per_target = _fields(_EngineCallFieldsV1, value, what)
        if isinstance(op, str) and op in CONTROL_OPERATIONS:
            if args not in ((), []) or per_target is not None or timeout is not None:
                raise BadRequest(
                    "%s: %s takes no arguments, per-target arguments or timeout" % (what, op)
                )
            return tuple.__new__(cls, (op, targets, (), None, None))
        if not isinstance(op, str) or op not in CLIENT_OPERATIONS:
            raise BadRequest("unknown MultiEngine operation %s" % _show(op))
        if per_target is None:
            args = tuple(_parse_args(op, args, what))
        elif isinstance(per_target, dict) and isinstance(args, tuple):
            per_target = {
                engine_id: tuple(_parse_args(op, engine_args, "%s for engine %s" % (what, _show(engine_id))))
                for engine_id, engine_args in per_target.items()
            }
        else:
            raise _bad(what, "per_target", "None or a dict of engine id to arguments", per_target)
        return tuple.__new__(cls, (op, targets, args, per_target, timeout))

    def plain(self) -> tuple:
        """Version 1 without a `timeout`, else version 4."""
        fields = (self.op, self.targets, tuple(self.args), self.per_target)
        return fields if self.timeout is None else fields + (4, self.timeout)


class _EngineCallFieldsV1:
    """The version-1 fields of an `EngineCall`, for `_fields`."""

    _fields = ("op", "targets", "args", "per_target")


class PropertiesRequest(NamedTuple):
    """A ``properties`` call: read or change the targets' properties."""

    action: str
    targets: Any
    argument: Any

    @classmethod
    def parse(cls, value: object) -> PropertiesRequest:
        what = "properties request"
        action, targets, argument = _fields(cls, value, what)
        if not isinstance(action, str) or action not in PROPERTY_ACTIONS:
            raise BadRequest("unknown properties action %s" % _show(action))
        return tuple.__new__(cls, (action, targets, argument))

    plain = _plain


class EngineOutcome(NamedTuple):
    """One target's part of a MultiEngine answer: `data` is bytes when `ok`,
    else a `WireError`."""

    engine_id: int
    ok: bool
    data: Any

    @classmethod
    def parse(cls, value: object) -> EngineOutcome:
        what = "engine outcome"
        engine_id, ok, data = _fields(cls, value, what)
        if not _is_int(engine_id):
            raise _bad(what, "engine_id", "an int", engine_id)
        if not isinstance(ok, bool):
            raise _bad(what, "ok", "True or False", ok)
        if not ok:
            data = WireError.parse(data)
        elif not isinstance(data, bytes) and as_frames(data) is not None:
            data = as_frames(data)
        return tuple.__new__(cls, (engine_id, ok, data))

    def plain(self) -> tuple:
        return (self.engine_id, self.ok, self.data if self.ok else tuple(self.data))


# -- why a task waits -------------------------------------------------------------------


class EngineReason(NamedTuple):
    """Why one engine does not run a waiting task now (see `Explanation`)."""

    engine_id: int
    #: ``free``, ``busy``, ``depend_false``, ``depend_raised``,
    #: ``depend_failed``, ``depend_unknown``, ``depend_unloadable``,
    #: ``penalty`` or ``retry_delay``.
    reason: str
    #: One sentence for people.
    detail: str
    #: The engine's task slots, and how many are taken.
    slots: int
    taken: int


class Explanation(NamedTuple):
    """What ``why(taskid)`` answers: where a task is and, while it waits,
    one reason per engine.  Travels as the controller's plain dict
    (`TaskController.why`); ``str()`` of it is the text for people."""

    taskid: int
    state: str
    summary: str
    engine_id: int | None
    attempts: int
    #: Seconds until a waiting retry is queued again, else None.
    wait: float | None
    #: True when the task's depend accepts none of the registered engines.
    no_engine_matches: bool
    #: The property names its depend read (sorted).
    properties_read: tuple
    engines: tuple

    @classmethod
    def parse(cls, value: object) -> Explanation:
        what = "why answer"
        if not isinstance(value, dict):
            raise BadRequest("%s must be a dict, got %s" % (what, _show(value)))
        try:
            fields = {name: value[name] for name in cls._fields}
        except KeyError as e:
            raise BadRequest("%s: the field %s is missing" % (what, e)) from None
        for name in ("taskid", "attempts"):
            if not _is_int(fields[name]):
                raise _bad(what, name, "an int", fields[name])
        for name in ("state", "summary"):
            if not isinstance(fields[name], str):
                raise _bad(what, name, "a str", fields[name])
        if fields["engine_id"] is not None and not _is_int(fields["engine_id"]):
            raise _bad(what, "engine_id", "an int or None", fields["engine_id"])
        if fields["wait"] is not None and not _is_number(fields["wait"]):
            raise _bad(what, "wait", "a number or None", fields["wait"])
        if not isinstance(fields["no_engine_matches"], bool):
            raise _bad(what, "no_engine_matches", "True or False", fields["no_engine_matches"])
        read = fields["properties_read"]
        if not isinstance(read, (list, tuple)) or not all(isinstance(n, str) for n in read):
            raise _bad(what, "properties_read", "a list of str", read)
        fields["properties_read"] = tuple(read)
        engines = fields["engines"]
        if not isinstance(engines, (list, tuple)):
            raise _bad(what, "engines", "a list", engines)
        parsed = []
        for entry in engines:
            if not isinstance(entry, dict):
                raise _bad(what, "engines", "a list of dicts", entry)
            try:
                reason = EngineReason(*(entry[name] for name in EngineReason._fields))
            except KeyError as e:
                raise BadRequest("%s: an engine's %s is missing" % (what, e)) from None
            if not (_is_int(reason.engine_id) and isinstance(reason.reason, str)
                    and isinstance(reason.detail, str) and _is_int(reason.slots)
                    and _is_int(reason.taken)):
                raise _bad(what, "engines", "(int, str, str, int, int) entries", entry)
            parsed.append(reason)
        fields["engines"] = tuple(parsed)
        return cls(**fields)

    def plain(self) -> dict:
        plain = self._asdict()
        plain["properties_read"] = list(self.properties_read)
        plain["engines"] = [e._asdict() for e in self.engines]
        return plain

    def __str__(self) -> str:
        lines = ["task %d: %s" % (self.taskid, self.summary)]
        lines.extend(
            "  engine %d: %s: %s" % (e.engine_id, e.reason, e.detail) for e in self.engines
        )
        return "\n".join(lines)
