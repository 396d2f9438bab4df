"""Every exception taskfarm raises.

Errors cross the wire as data: a name from this module plus a message (see
`to_wire` / `from_wire`).  A name this module does not know comes back as a
`TaskfarmError` carrying the original name, so nothing is silently lost.
"""

from __future__ import annotations

import pickle
import types


class TaskfarmError(Exception):
    """Base class of every taskfarm error."""


# -- set-up, profiles and connections ---------------------------------------


class ProfileError(TaskfarmError):
    """A profile folder or furl file is missing, unreadable or malformed."""


class ProfileInUse(ProfileError):
    """Another controller holds this profile (and its journal and furls)."""


class FurlError(TaskfarmError, ValueError):
    """A furl (or the thing given instead of one) cannot be used to connect."""


class WrongInterface(FurlError):
    """A furl names another controller interface than the client expects."""


class ControllerUnreachable(TaskfarmError, ConnectionError):
    """The controller did not answer within the connection timeout."""


class ConnectionLost(TaskfarmError, ConnectionError):
    """The connection to the controller broke while a call was in flight."""


class StaleFurl(FurlError):
    """The furl names a controller identity (TubID) the controller at its
    address no longer has: its security folder was renewed, and a fresh
    furl file was written."""


class WaitTimeout(TaskfarmError, TimeoutError):
    """A wait given a `timeout=` ran out; the message names what was waited
    for and for how long.  The client stays usable.  On the client side what
    was waited for may still finish later; a MultiEngine command past its
    `timeout` is interrupted on its engine, and that engine's part of the
    answer is this error."""


class NoEnginesWarning(UserWarning):
    """A call that needs engines is waiting while none is registered."""


class ClientClosed(ConnectionLost):
    """A call of a client was still waiting when that client was closed
    (never retried: other clients' calls are not touched)."""


class JournalError(TaskfarmError):
    """The controller's journal cannot be written (a full disk, say): the
    submission was refused whole, and none of its tasks will run."""


class ProtocolVersionError(TaskfarmError):
    """The two ends of a connection speak different wire versions."""


# -- payloads ----------------------------------------------------------------


class SerializationError(TaskfarmError, TypeError):
    """A value could not be pickled or unpickled; the message names it."""


class MessageTooLarge(TaskfarmError, ValueError):
    """A message is bigger than the configured size limit."""


class BulkRefused(TaskfarmError):
    """The bulk-data channel refused a transfer: an unknown, used or expired
    capability, or a peer whose certificate does not match its furl's tubid."""


class BadRequest(TaskfarmError, ValueError):
    """A peer sent a message the receiver cannot make sense of."""


# -- tasks -------------------------------------------------------------------


class RecoveryLoopError(TaskfarmError, ValueError):
    """A task's chain of recovery tasks comes back to a task already in it."""


class UnknownTask(TaskfarmError, IndexError):
    """No task with this id was submitted, or its result was cleared."""


class TaskAlreadyCompleted(TaskfarmError, IndexError):
    """`abort` was asked for a task that has already finished."""

    def __init__(self, message: str = "Task Already Completed") -> None:
        super().__init__(message)


class TaskAlreadyAborted(TaskAlreadyCompleted):
    """`abort` was asked twice for the same task."""

    def __init__(self, message: str = "Task Already Aborted") -> None:
        super().__init__(message)


class TaskAborted(TaskfarmError):
    """The failure recorded for a task that was aborted."""


class TaskTimeout(TaskfarmError):
    """A task ran too long, or waited too long for an engine that suits it."""


class DependError(TaskfarmError):
    """A task's `depend` function cannot be loaded (unpickled) at all, so no
    engine can ever be asked; the message names the cause."""


class EngineLost(TaskfarmError):
    """The engine running a command disconnected or died before answering."""


class RemoteTaskError(TaskfarmError):
    """User code raised on an engine.

    Carries the remote exception's type name (`ename`), message (`evalue`),
    the remote traceback text (`traceback`), the engine id, the task id (for
    a task's failure) and, when it could be unpickled here, the original
    exception object (`exception`).

    A failure that comes back from an engine is, where it can be, an
    instance of the original exception's class as well (see
    `remote_error`), so ``except ZeroDivisionError`` catches it.
    """

    def __init__(
        self,
        ename: str,
        evalue: str,
        traceback: str = "",
        engine_id: int | None = None,
        exception: BaseException | None = None,
        task_id: int | None = None,
    ) -> None:
        super().__init__(ename, evalue)
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback
        self.engine_id = engine_id
        self.exception = exception
        self.task_id = task_id

    def __str__(self) -> str:
        return "%s: %s" % (self.ename, self.evalue)

    def __reduce__(self):
        return (
            RemoteTaskError,
            (self.ename, self.evalue, self.traceback, self.engine_id, None, self.task_id),
        )


def _reduce_dual(self):
    # A dual instance pickles as the call that made it.
    return (
        remote_error,
        (self.ename, self.evalue, self.traceback, self.engine_id, self.exception, self.task_id),
    )


#: original exception class -> its dual subclass (None: none can be made).
_DUALS: dict[type, type | None] = {}


def _dual_class(cls: type) -> type | None:
    """The class that is both `cls` and `RemoteTaskError` (made once per
    class), or None when no such class can be made."""
    if cls in _DUALS:
        return _DUALS[cls]
    dual = None
    # Only Exception subclasses: a remote SystemExit or KeyboardInterrupt
    # must not stop the client.
    if issubclass(cls, Exception) and not issubclass(cls, RemoteTaskError):
        try:
            dual = type(
                "Remote" + cls.__name__,
                (cls, RemoteTaskError),
                {
                    "__module__": cls.__module__,
                    "__qualname__": "Remote" + cls.__qualname__,
                    "__doc__": "%s raised on an engine (also a RemoteTaskError)." % cls.__name__,
                    # str() and repr() are the original's, not RemoteTaskError's.
                    "__str__": cls.__str__,
                    "__repr__": cls.__repr__,
                    "__reduce__": _reduce_dual,
                },
            )
        except Exception:
            dual = None
    _DUALS[cls] = dual
    return dual


def _as_dual(exception: BaseException) -> RemoteTaskError | None:
    dual = _dual_class(type(exception))
    if dual is None:
        return None
    # The arguments and state the exception's own pickling uses: for some
    # built-ins (an OSError's filename, an ImportError's name) more than
    # its args and __dict__.
    args, state = exception.args, {}
    try:
        reduced = exception.__reduce__()
        if reduced[0] is type(exception) and isinstance(reduced[1], tuple):
            args = reduced[1]
            if len(reduced) > 2 and isinstance(reduced[2], dict):
                state = reduced[2]
    except Exception:
        pass
    try:
        error = dual.__new__(dual, *args)
        error.args = exception.args
        error.__dict__.update(vars(exception))
        for name, value in state.items():
            if name not in error.__dict__:
                setattr(error, name, value)
    except Exception:
        return None
    return error


def remote_error(
    ename: str,
    evalue: str,
    traceback: str = "",
    engine_id: int | None = None,
    exception: BaseException | None = None,
    task_id: int | None = None,
) -> RemoteTaskError:
    """The exception to raise here for a failure on an engine.

    An instance of the original exception's class and of `RemoteTaskError`
    when `exception` is given and such a class can be made; else a plain
    `RemoteTaskError`.  Either way it carries the name, message, remote
    traceback text, engine id and task id, and the remote traceback is added
    as a note, so it prints as part of the local traceback.
    """
    error = _as_dual(exception) if exception is not None else None
    if error is None:
        error = RemoteTaskError(ename, evalue, traceback, engine_id, exception, task_id)
    else:
        try:
            error.ename, error.evalue, error.traceback = ename, evalue, traceback
            error.engine_id, error.exception, error.task_id = engine_id, exception, task_id
        except Exception:
            error = RemoteTaskError(ename, evalue, traceback, engine_id, exception, task_id)
    if traceback:
        where = ["engine %s" % engine_id] if engine_id is not None else []
        if task_id is not None:
            where.append("task %s" % task_id)
        head = "Remote traceback (%s):" % ", ".join(where) if where else "Remote traceback:"
        error.__notes__ = [
            n for n in getattr(error, "__notes__", []) if isinstance(n, str)
        ] + [head + "\n" + traceback.rstrip("\n")]
    return error


# -- engines and the MultiEngine interface ------------------------------------


class InvalidEngineID(TaskfarmError, KeyError):
    """A target names an engine that is not registered."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "invalid engine id"


class NoEnginesRegistered(TaskfarmError):
    """`'all'` engines were asked for while none is registered."""


class QueueCleared(TaskfarmError):
    """A queued engine command was dropped by `clear_queue`."""


class InvalidProperty(TaskfarmError, ValueError):
    """An engine property is malformed or cannot be pickled."""


class ResultNotCompleted(TaskfarmError):
    """A non-blocking result was asked for before it was ready."""


class InvalidResultID(TaskfarmError, KeyError):
    """A pending result id is unknown or was already fetched or flushed."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "invalid result id"


class InvalidDeferredID(InvalidResultID):
    """`get_pending_deferred` was given an id that has no result to hand
    out: never handed out, already taken, cleared, or already waited for."""


class AbortedPendingDeferredError(TaskfarmError):
    """A `get_pending_deferred` waiter whose result was cleared by
    `clear_pending_deferreds` before it arrived."""


class NotAPendingResult(TaskfarmError, TypeError):
    """`barrier` was given something that is not a `PendingResult`."""


class CompositeError(TaskfarmError):
    """Errors from several engines gathered into one exception.

    `elist` holds `(engine_id, method, error)` triples; `str()` gives one
    ``[engine_id:method]: Type: message`` line per engine.
    """

    def __init__(self, message: str, elist: list) -> None:
        flat: list = []
        for engine_id, method, error in elist:
            if isinstance(error, CompositeError):
                flat.extend(error.elist)
            else:
                flat.append((engine_id, method, error))
        super().__init__(message, flat)
        self.message = message
        self.elist = flat

    def __str__(self) -> str:
        lines = [self.message]
        for engine_id, method, error in self.elist:
            lines.append("[%s:%s]: %s" % (engine_id, method, _describe(error)))
        return "\n".join(lines)

    def print_tracebacks(self, excid: int | None = None) -> None:
        """Print the remote traceback text of one error, or of all of them."""
        chosen = self.elist if excid is None else [self.elist[excid]]
        for engine_id, method, error in chosen:
            print("[%s:%s]: %s" % (engine_id, method, _describe(error)))
            print(getattr(error, "traceback", "") or "(no remote traceback)")

    def raise_exception(self, excid: int = 0) -> None:
        """Raise error number `excid` of the collected errors."""
        if not -len(self.elist) <= excid < len(self.elist):
            raise IndexError("an exception with index %i does not exist" % excid)
        raise self.elist[excid][2]


def _describe(error: BaseException) -> str:
    if isinstance(error, RemoteTaskError):
        return "%s: %s" % (error.ename, error.evalue)
    if isinstance(error, KeyError) and len(error.args) == 1:
        return "%s: %s" % (type(error).__name__, error.args[0])
    return "%s: %s" % (type(error).__name__, error)


# -- the wire form of errors -------------------------------------------------


def to_wire(error: BaseException) -> tuple:
    """Turn an exception into plain data that any peer can read."""
    if isinstance(error, RemoteTaskError):
        return remote_wire(
            error.ename, error.evalue, error.traceback, error.engine_id, _pickled(error.exception)
        )
    if isinstance(error, CompositeError):
        # Each engine's error travels typed, so the far side can raise it.
        return (
            "CompositeError",
            (error.message, [(e, m, to_wire(err)) for e, m, err in error.elist]),
        )
    if isinstance(error, KeyError) and len(error.args) == 1:
        # str() of a KeyError quotes its key; send the message itself.
        return (type(error).__name__, str(error.args[0]))
    return (type(error).__name__, str(error))


def remote_wire(
    ename: str, evalue: str, traceback: str, engine_id: int | None, pickled: bytes | None
) -> tuple:
    """The wire form of a `RemoteTaskError`; `pickled` is the original
    exception's bytes (the engine pickles it with cloudpickle, so classes
    defined in ``__main__`` travel by value), or None."""
    return ("RemoteTaskError", (ename, evalue, traceback, engine_id, pickled))


def _pickled(exception: BaseException | None) -> bytes | None:
    # The original exception travels when it can; its type and text always do.
    if exception is None:
        return None
    try:
        return pickle.dumps(exception, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        return None


def _unpickled(blob: bytes | None) -> BaseException | None:
    # Either a pickled exception, or (class, args, __dict__, pickled
    # exception) from `serialization.dumps_exception`.
    if not isinstance(blob, bytes):
        return None
    try:
        loaded = pickle.loads(blob)
    except Exception:
        return None
    if isinstance(loaded, BaseException):
        return loaded
    try:
        cls, args, state, whole = loaded
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            return None
    except (TypeError, ValueError):
        return None
    whole = whole if isinstance(whole, bytes) else None
    if _rebuild_first(cls):
        return _rebuilt(cls, args, state) or _unpickled(whole)
    return _unpickled(whole) or _rebuilt(cls, args, state)


def _rebuild_first(cls: type) -> bool:
    # Plain pickle calls ``cls(*args)``: wrong for an __init__ of the user's
    # that does not take its own args back (it fails, or changes them).  Such
    # a class, when it keeps the default pickling, is rebuilt from its state.
    return (
        isinstance(getattr(cls, "__init__", None), types.FunctionType)
        and getattr(cls, "__reduce__", None) is BaseException.__reduce__
        and getattr(cls, "__reduce_ex__", None) is BaseException.__reduce_ex__
        and getattr(cls, "__setstate__", None) is BaseException.__setstate__
    )


def _rebuilt(cls: type, args, state) -> BaseException | None:
    """An instance of `cls` with these args and attributes, made without
    calling its __init__."""
    try:
        exception = cls.__new__(cls, *args)
        exception.args = tuple(args)
        exception.__dict__.update(state)
    except Exception:
        return None
    return exception


def from_wire(data: tuple, task_id: int | None = None) -> BaseException:
    """Rebuild the exception `to_wire` described (a remote failure through
    `remote_error`, so it keeps its class where it can; `task_id` names the
    task it belongs to)."""
    name, detail = data
    if name == "RemoteTaskError":
        ename, evalue, traceback, engine_id, *pickled = detail
        exception = _unpickled(pickled[0]) if pickled else None
        return remote_error(ename, evalue, traceback, engine_id, exception, task_id)
    if name == "CompositeError":
        if isinstance(detail, str):
            return CompositeError(detail, [])
        message, elist = detail
        return CompositeError(message, [(e, m, from_wire(w, task_id)) for e, m, w in elist])
    cls = _WIRE_CLASSES.get(name)
    if cls is None:
        return TaskfarmError("%s: %s" % (name, detail))
    return cls(detail)


_WIRE_CLASSES = {
    name: obj
    for name, obj in list(globals().items())
    if isinstance(obj, type) and issubclass(obj, TaskfarmError)
}
# Plain built-in errors that our services raise on bad input.
_WIRE_CLASSES.update(
    {"TypeError": TypeError, "ValueError": ValueError, "KeyError": KeyError}
)
