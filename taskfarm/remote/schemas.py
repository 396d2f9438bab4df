"""The wire schema: every RemoteInterface taskfarm speaks, version 1.

The messages inside the byte strings are `taskfarm.wire`'s types; this
module declares the Foolscap methods that carry them.

Payloads travel as single byte strings (batches pickled by
`taskfarm.serialization`): Foolscap's cost is per token, not per byte.
Every byte-string argument is bounded by `MESSAGE`, whose limit the
controller sets from its configuration (`set_message_limit`), so an
oversized message is refused while its header is read, before it is held
in memory.
"""

from __future__ import annotations

from foolscap.api import RemoteInterface
from foolscap.constraint import ByteStringConstraint
from foolscap.schema import ChoiceOf, ListOf, TupleOf
from foolscap.tokens import STRING

from taskfarm.serialization import DEFAULT_MAX_MESSAGE_SIZE
from taskfarm.wire import NOT_YET, WIRE_VERSION

__all__ = [
    "WIRE_VERSION", "NOT_YET", "MESSAGE", "set_message_limit", "message_limit",
    "RIEngine", "RIEngineSession", "RIEngineRegistrar", "RITaskController", "RIMultiEngine",
]

MESSAGE = ByteStringConstraint(maxLength=DEFAULT_MAX_MESSAGE_SIZE)


def set_message_limit(limit: int) -> None:
    """Bound every byte-string argument this process receives to `limit`."""
    MESSAGE.maxLength = limit
    MESSAGE.taster[STRING] = limit


def message_limit() -> int:
    """The limit `set_message_limit` set."""
    return MESSAGE.maxLength


class RIEngine(RemoteInterface):
    """What the controller calls on an engine."""

    __remote_name__ = "taskfarm.RIEngine.v1"

    def commands(batch=MESSAGE):
        """A pickled list of ``(seq, op, args)`` commands, run in order."""
        return None

    def interrupt(seq=int):
        """Stop command `seq` if it is queued or running."""
        return None

    def cancel(seqs=ListOf(int, maxLength=100000)):
        """Drop these commands if they are still queued (never the running one)."""
        return None

    def set_properties(properties=MESSAGE):
        """The engine's properties as the controller now has them."""
        return None

    def ping():
        """Answer at once (a liveness check)."""
        return None


class RIEngineSession(RemoteInterface):
    """What a registered engine calls on the controller."""

    __remote_name__ = "taskfarm.RIEngineSession.v1"

    def replies(batch=MESSAGE):
        """A pickled list of ``(seq, ok, data, started, finished)`` replies."""
        return None


class RIEngineRegistrar(RemoteInterface):
    """The engine furl: lets an engine register, and nothing else."""

    __remote_name__ = "taskfarm.RIEngineRegistrar.v1"

    def hello():
        """The pickled interface description (name, version, limits)."""
        return MESSAGE

    def register(engine=RIEngine, properties=MESSAGE, requested_id=ChoiceOf(int, None)):
        """Register; returns the engine id and the session to reply through."""
        return TupleOf(int, RIEngineSession)


class RITaskController(RemoteInterface):
    """The Task interface furl.  Every answer is a pickled reply envelope
    ``(True, value)`` or ``(False, wire_error)``: errors travel as data."""

    __remote_name__ = "taskfarm.RITaskController.v1"

    def hello():
        return MESSAGE

    def submit(batch=MESSAGE):
        """A pickled ``(token, [envelope, ...], ids or None)``; answers the ids."""
        return MESSAGE

    def reserve(count=int):
        """Set aside `count` task ids for this client; answers the first."""
        return MESSAGE

    def results(taskids=MESSAGE, block=bool):
        """Result envelopes of the pickled list of task ids (`NOT_YET` when
        `block` and they are still unfinished after the bound)."""
        return MESSAGE

    def wait(taskids=MESSAGE):
        """Answer once every task in the pickled list is finished (None),
        or `NOT_YET` once the bound has passed first."""
        return MESSAGE

    def abort(taskid=int):
        return MESSAGE

    def queue_status(verbose=bool):
        return MESSAGE

    def clear(taskids=MESSAGE):
        """Forget finished tasks (a pickled list of ids, or None for all)."""
        return MESSAGE

    def spin():
        return MESSAGE

    def engine_ids():
        return MESSAGE


class RIMultiEngine(RemoteInterface):
    """The MultiEngine interface furl.  Answers are reply envelopes, as for
    `RITaskController`; per-engine outcomes are ``(engine_id, ok, data)``."""

    __remote_name__ = "taskfarm.RIMultiEngine.v1"

    def hello():
        return MESSAGE

    def engine_call(request=MESSAGE):
        """A pickled ``(op, targets, args, per_target_args_or_None)``."""
        return MESSAGE

    def properties(request=MESSAGE):
        """A pickled ``(action, targets, argument)``."""
        return MESSAGE

    def engine_ids():
        return MESSAGE

    def queue_status(targets=MESSAGE):
        return MESSAGE

    def clear_queue(targets=MESSAGE):
        return MESSAGE

    def kill_controller():
        return MESSAGE
