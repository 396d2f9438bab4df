"""The wire schema: every RemoteInterface taskfarm speaks, version 1.

The messages inside the byte strings are `taskfarm.wire`'s types; this
module declares the Foolscap methods that carry them.

Payloads travel as single byte strings (batches pickled by
`taskfarm.serialization`): Foolscap's cost is per token, not per byte.
Every byte-string argument and answer is declared as `MESSAGE`.  Those
that may carry big values (commands, replies, submissions, results,
MultiEngine calls) are `PARTS`: a list of byte strings
(`serialization.pack_message`: the envelope, then each big buffer as it
is, out of band).  Foolscap bounds each part and their count; the total is
checked against the same limit as soon as the message is unpacked.  The
limit is not a process-wide setting: each Referenceable has its own
(`BoundedReferenceable`), and Foolscap reads a call's argument constraints
from the receiving Referenceable's `getInterface()`.  So a controller and an
engine in one process keep their own limits, and an oversized message is
still refused while its header is read (Foolscap's token check), before it
is held in memory.  Calls we make, and their answers, are checked against
the peer's limit where we know it (`bounded_call`), else at the default.
"""

from __future__ import annotations

import copy

from foolscap.api import Referenceable, RemoteInterface
from foolscap.constraint import ByteStringConstraint
from foolscap.remoteinterface import RemoteInterfaceClass, getRemoteInterface
from foolscap.schema import ChoiceOf, ListOf, TupleOf

from taskfarm.serialization import DEFAULT_MAX_MESSAGE_SIZE, parts_limit
from taskfarm.wire import NOT_YET, WIRE_VERSION

__all__ = [
    "WIRE_VERSION", "NOT_YET", "MESSAGE", "PARTS", "bounded", "bounded_call",
    "BoundedReferenceable",
    "RIEngine", "RIEngineSession", "RIEngineRegistrar", "RITaskController", "RIMultiEngine",
]

#: A message: one byte string.  Its bound here is the default; a
#: Referenceable's own limit replaces it (`bounded`).  Never mutated.
MESSAGE = ByteStringConstraint(maxLength=DEFAULT_MAX_MESSAGE_SIZE)


def _parts(message: ByteStringConstraint, limit: int):
    # Always a list: Foolscap cannot choose between a string and a list
    # for an argument (its list unslicer insists on a list constraint).
    return ListOf(message, maxLength=parts_limit(limit))


#: A message in parts: a list of byte strings, each bounded as a
#: `MESSAGE` (`serialization.pack_message`).  Never mutated.
PARTS = _parts(MESSAGE, DEFAULT_MAX_MESSAGE_SIZE)

_bounded: dict[tuple[str, int], RemoteInterfaceClass] = {}


def bounded(interface: RemoteInterfaceClass, limit: int) -> RemoteInterfaceClass:
    """`interface` with every `MESSAGE` argument and answer bounded by `limit`.

    The copy is made once per (interface, limit).  It is registered with
    Foolscap under a name of its own (Foolscap insists on unique names),
    but that name never crosses the wire: `BoundedReferenceable` announces
    the declared interface's name.
    """
    key = (interface.__remote_name__, limit)
    clone = _bounded.get(key)
    if clone is None:
        message = ByteStringConstraint(maxLength=limit)
        parts = _parts(message, limit)

        def bound(constraint):
            if constraint is PARTS:
                return parts
            return message if constraint is MESSAGE else constraint

        attrs: dict = {"__remote_name__": "%s;max-message-size=%d" % key}
        for name in interface.names():
            schema = copy.copy(interface[name])
            schema.argConstraints = {
                arg: bound(c) for arg, c in schema.argConstraints.items()
            }
            schema.responseConstraint = bound(schema.responseConstraint)
            attrs[name] = schema
        clone = RemoteInterfaceClass(interface.__name__, (RemoteInterface,), attrs)
        _bounded[key] = clone
    return clone


def bounded_call(rref, method: str, limit: int) -> dict:
    """Keyword arguments for ``rref.callRemote(method, ...)`` that check the
    outbound arguments (and the answer) against the peer's `limit`, not the
    declared default: a sender refuses what its peer would."""
    interface = getattr(getattr(rref, "tracker", None), "interface", None)
    schema = bounded(interface, limit).get(method) if interface is not None else None
    return {} if schema is None else {"_methodConstraint": schema}


class BoundedReferenceable(Referenceable):
    """A Referenceable whose `MESSAGE` arguments (and answers) are bounded
    by its own `max_message_size`, checked by Foolscap token by token."""

    _bounded_interface = None

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.max_message_size = max_message_size

    def getInterface(self):
        # Foolscap's CallUnslicer asks the target for the schema of each
        # inbound call: this is where the limit becomes per-object.
        if self._bounded_interface is None:
            self._bounded_interface = bounded(getRemoteInterface(self), self.max_message_size)
        return self._bounded_interface

    def getInterfaceName(self):
        # What a peer sees: the declared (versioned) name, never the copy's.
        return getRemoteInterface(self).__remote_name__


class RIEngine(RemoteInterface):
    """What the controller calls on an engine."""

    __remote_name__ = "taskfarm.RIEngine.v1"

    def commands(batch=PARTS):
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

    def replies(batch=PARTS):
        """A pickled list of ``(seq, ok, data, started, finished)`` replies."""
        return None

    def upload(seq=int, sizes=MESSAGE):
        """A capability to upload the frames of the reply to command `seq`
        (the pickled list of their sizes) over the bulk-data channel, or
        None: reply over Foolscap (version 5).  `sizes` may instead be a
        batch, a pickled list of ``(seq, sizes)`` pairs (`seq` the first):
        several replies' frames in one transfer, each reply naming the one
        capability (`taskfarm.bulk.policy.BulkPolicy.batch_capability`)."""
        return MESSAGE


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

    def submit(batch=PARTS):
        """A pickled ``(token, [envelope, ...], ids or None)``; answers the ids."""
        return MESSAGE

    def reserve(count=int):
        """Set aside `count` task ids for this client; answers the first."""
        return MESSAGE

    def results(taskids=MESSAGE, block=bool):
        """Result envelopes of the pickled list of task ids (`NOT_YET` when
        `block` and they are still unfinished after the bound)."""
        return PARTS

    def results_bulk(taskids=MESSAGE, block=bool):
        """`results`, answered as a `wire.BulkResults`: big results' frames
        are fetched over the bulk-data channel (version 5)."""
        return PARTS

    def wait(taskids=MESSAGE):
        """Answer once every task in the pickled list is finished (None),
        or `NOT_YET` once the bound has passed first."""
        return MESSAGE

    def abort(taskid=int):
        return MESSAGE

    def queue_status(verbose=bool):
        return MESSAGE

    def why(taskid=int):
        """Why the task is where it is (`wire.Explanation`, as a dict)."""
        return MESSAGE

    def clear(taskids=MESSAGE):
        """Forget finished tasks (a pickled list of ids, or None for all)."""
        return MESSAGE

    def spin():
        return MESSAGE

    def engine_ids():
        return MESSAGE

    def status():
        """The cluster summary (`wire.ClusterSummary`), as the dashboard shows it."""
        return MESSAGE


class RIMultiEngine(RemoteInterface):
    """The MultiEngine interface furl.  Answers are reply envelopes, as for
    `RITaskController`; per-engine outcomes are ``(engine_id, ok, data)``."""

    __remote_name__ = "taskfarm.RIMultiEngine.v1"

    def hello():
        return MESSAGE

    def engine_call(request=PARTS):
        """A pickled ``(op, targets, args, per_target_args_or_None)``."""
        return PARTS

    def engine_call_bulk(request=PARTS):
        """`engine_call`, answered as a `wire.BulkResults`: big values are
        fetched over the bulk-data channel (version 5)."""
        return PARTS

    def upload(sizes=MESSAGE):
        """A capability to upload a push's value (its frames, of the pickled
        list of `sizes`) over the bulk-data channel."""
        return MESSAGE

    def engine_call_uploaded(request=PARTS, capability=MESSAGE):
        """`engine_call` of a push whose value's frames were uploaded under
        `capability` (its value in `request` left ``b""``)."""
        return PARTS

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
