"""What every controller Referenceable answers: reply envelopes and `hello`.

Each remote method answers a reply envelope (`wire.Answer`),
``(True, value)`` or ``(False, wire_error)``: errors are data, so a client awaits them like any
value (see foolscap-notes: raised remote exceptions break ``await``).
Shared by `taskfarm.remote.server` and `taskfarm.remote.multiengine`.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger

from taskfarm import serialization, wire
from taskfarm.errors import BadRequest, TaskfarmError, to_wire

_log = Logger()


def _answer(value) -> bytes:
    return serialization.pack(wire.Answer(True, value).plain())


def _answer_in_parts(value) -> list:
    # Results and pulled values keep their buffers out of band.
    return serialization.pack_message(wire.Answer(True, value).plain())


def _refuse_in_parts(failure) -> list:
    return [_refuse(failure)]


def _refuse(failure) -> bytes:
    error = failure.value
    if isinstance(error, RecursionError):
        # Data nested too deeply to check or describe (it unpickles
        # without recursion, but repr, hash or a recovery chain recurse).
        error = BadRequest("the request is nested too deeply")
    if not isinstance(error, (TaskfarmError, TypeError, ValueError, KeyError)):
        _log.failure("unexpected error in a remote call", failure)
        error = TaskfarmError("internal controller error: %s: %s" % (type(error).__name__, error))
    return serialization.pack(wire.Answer(False, to_wire(error)).plain())


def reply(function, *args) -> defer.Deferred:
    """Run `function(*args)` (value or Deferred) and answer an envelope."""
    d = defer.maybeDeferred(function, *args)
    d.addCallbacks(_answer, _refuse)
    return d


def reply_in_parts(function, *args) -> defer.Deferred:
    """`reply` for a method that answers `schemas.PARTS`: the envelope in
    parts (`serialization.pack_message`), big buffers out of band."""
    d = defer.maybeDeferred(function, *args)
    d.addCallbacks(_answer_in_parts, _refuse_in_parts)
    return d


def hello_blob(
    interface: str, incarnation: str | None = None, *, max_message_size: int,
    bulk: str | None = None,
) -> bytes:
    """What `hello` answers: which interface this is, the wire's limits (the
    answering Referenceable's own), (for the Task interface) the
    controller's incarnation and where its bulk-data channel listens."""
    return serialization.pack(
        wire.Hello(interface, wire.WIRE_VERSION, max_message_size, incarnation, bulk).plain()
    )
